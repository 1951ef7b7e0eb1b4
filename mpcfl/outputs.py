"""What a party writes into its own output folder, always atomically.

Each file is written to a temporary name in the same folder and renamed into
place, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on use: the launcher and the CLI write run records and load no torch
    import numpy as np


#: Set by a local launcher for its processes: "1" when its own output is a terminal (bars redraw in
#: place there), "0" when it goes to a file or a pipe (a batch job's log), where each redraw would be
#: text glued to the next log line.
ENV_PROGRESS = "MPCFL_PROGRESS"


def progress_bars() -> bool:
    """Whether this process draws progress bars: as its launcher says, else whether stderr is a terminal."""
    setting = os.environ.get(ENV_PROGRESS)
    return sys.stderr.isatty() if setting is None else setting == "1"


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Calls ``write(handle)`` on a temporary file, then renames it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock_file(path: Path) -> Any:
    """``path`` opened for ``fcntl.flock`` (created owner-only, as every file written here)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def write_json(path: Path, payload: Any) -> None:
    atomic_write(path, lambda handle: json.dump(payload, handle, indent=2, sort_keys=True))


def write_npy(path: Path, array: np.ndarray) -> None:
    import numpy as np

    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False), binary=True)


def write_torch(path: Path, payload: Any) -> None:
    """Saves tensors (and plain containers of them) loadable with ``weights_only=True``."""
    import torch

    atomic_write(path, lambda handle: torch.save(payload, handle), binary=True)


def plot_history(path: Path, history: list[dict[str, float]], *, title: str, x: str = "epoch") -> None:
    """A PNG of loss and accuracy (a regression: R^2) per ``x`` (``epoch``; a federated job's ``round``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    keys = [("loss", ax_loss), ("train_loss", ax_loss), ("test_loss", ax_loss), ("train_accuracy", ax_acc), ("test_accuracy", ax_acc),
            ("test_auc", ax_acc), ("test_f1", ax_acc), ("test_r2", ax_acc)]
    for key, axis in keys:
        rows = [row for row in history if key in row]  # a DP job may release the final epoch's alone
        if rows:
            axis.plot([row[x] for row in rows], [row[key] for row in rows], marker="o", label=key.replace("_", " "))
    ax_loss.set(xlabel=x, ylabel="loss", title="loss")
    ax_acc.set(xlabel=x, ylabel="accuracy, AUC, F1, R^2", title="scores")
    for axis in (ax_loss, ax_acc):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(fig)
