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


def test_dp_gap_prints_the_folds_and_the_test_patients_for_a_setting() -> None:
    """examples/dp_gap.py on two folds and three seeds: one row per setting, the accuracies plausible
    (a model that learnt nothing would sit near the 63% of benign patients) and each gap their difference."""
    done = subprocess.run([sys.executable, str(REPO / "examples" / "dp_gap.py"), "--sampling", "poisson+dealer",
                           "--splits", "2", "--seeds", "1", "--test-seeds", "3"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = [line for line in done.stdout.splitlines() if line.startswith("| poisson+dealer |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    folds, folds_plain, gap, test, test_plain, test_gap = (float(c.rstrip("%")) for c in cells)
    assert all(80 < value <= 100 for value in (folds, folds_plain, test, test_plain)), row
    assert abs(gap - (folds_plain - folds)) < 0.02 and abs(test_gap - (test_plain - test)) < 0.02, row
