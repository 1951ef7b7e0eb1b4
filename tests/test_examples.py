"""Examples write into runs/ (or a temporary folder), never over tracked files unless told to."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
from _figures import add_figure_flags, figure_path  # noqa: E402


def test_no_example_names_a_tracked_figure_but_through_the_flag() -> None:
    tracked = subprocess.run(["git", "ls-files", "docs/figures"], cwd=REPO, capture_output=True, text=True, check=True)
    names = [line.rsplit("/", 1)[-1] for line in tracked.stdout.split()]
    assert names
    for script in sorted((REPO / "examples").glob("*.py")):
        if script.name == "_figures.py":
            continue
        code = script.read_text()
        assert not re.search(r"""["']figures["']""", code), f"{script.name} builds a path into docs/figures"
        for name in names:
            if name in code:
                assert f'figure_path(args, "{name}")' in code or f'figure_path(parser.parse_args(), "{name}")' in code, script.name


@pytest.mark.parametrize("argv", [[], ["--update-figure"]])
def test_the_tracked_figure_is_written_only_with_update_figure(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import _figures

    monkeypatch.setattr(_figures, "SCRATCH", tmp_path / "scratch")
    monkeypatch.setattr(_figures, "TRACKED", tmp_path / "tracked")
    parser = argparse.ArgumentParser()
    add_figure_flags(parser, "x.png")
    chosen = figure_path(parser.parse_args(argv), "x.png")
    assert chosen == (tmp_path / ("tracked" if argv else "scratch") / "x.png")
    assert chosen.parent.is_dir()
