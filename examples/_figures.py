"""Where an example draws its figure: ``runs/examples/`` unless told otherwise.

The figures in ``docs/figures/`` are tracked: they document results in the docs, so an
example overwrites one only when asked, with ``--update-figure``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRACKED = REPO / "docs" / "figures"
SCRATCH = REPO / "runs" / "examples"  # runs/ is git-ignored


def add_figure_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """``--figure PATH`` and ``--update-figure`` for the figure ``name``."""
    parser.add_argument("--figure", type=Path, help=f"where to write the figure (default: runs/examples/{name})")
    parser.add_argument(
        "--update-figure", action="store_true", help=f"overwrite the tracked docs/figures/{name} that the docs show"
    )


def figure_path(args: argparse.Namespace, name: str) -> Path:
    """The path the flags of :func:`add_figure_flags` choose, its folder made."""
    if args.update_figure and args.figure is not None:
        raise SystemExit("--figure and --update-figure: give one")
    path = TRACKED / name if args.update_figure else args.figure or SCRATCH / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
