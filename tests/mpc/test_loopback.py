"""Local runs listen on loopback only: spied on the real sockets of the job's processes, not on the code's intent."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from conftest import descendants, is_loopback, listening_sockets
from mpcfl.launch.fork import secure_predict_local
from test_auth import inference_job


def spy(root: int, running: Callable[[], bool]) -> set[tuple[str, int]]:
    """Every listening socket held by ``root`` or a process below it, polled while ``running()``."""
    seen: set[tuple[str, int]] = set()
    while running():
        seen |= listening_sockets(descendants(root))
        time.sleep(0.02)
    return seen


def assert_loopback_only(seen: set[tuple[str, int]]) -> None:
    assert seen, "the spy saw no listener at all: it cannot have watched the run"
    assert all(is_loopback(address) for address, _ in seen), f"listening beyond loopback: {sorted(seen)}"


def _watch(*args: str) -> tuple[set[tuple[str, int]], str]:
    """Runs ``python -m mpcfl ARGS`` while the spy lists its processes' listeners."""
    process = subprocess.Popen([sys.executable, "-m", "mpcfl", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = spy(process.pid, lambda: process.poll() is None)
        out = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 0, out[-1000:]
    return seen, out


def test_mpcfl_run_listens_on_loopback_only(tmp_path: Path) -> None:
    seen, out = _watch("run", str(inference_job(tmp_path)))
    assert_loopback_only(seen)
    assert "finished" in out


def test_mpcfl_launch_listens_on_loopback_only(tmp_path: Path) -> None:
    script = tmp_path / "party.py"
    script.write_text("import mpcfl, torch\nwith mpcfl.join():\n    mpcfl.mpc.session.all_gather_public([1])\n")
    seen, _ = _watch("launch", "--parties", "a,b", str(script))
    assert_loopback_only(seen)


def test_secure_predict_local_listens_on_loopback_only() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    done = threading.Event()
    seen: set[tuple[str, int]] = set()
    watcher = threading.Thread(target=lambda: seen.update(spy(os.getpid(), lambda: not done.is_set())))
    watcher.start()
    try:
        out = secure_predict_local(model, torch.ones(2, 4), timeout_s=30)
    finally:
        done.set()
        watcher.join()
    assert out.shape == (2, 3)
    assert_loopback_only(seen)
