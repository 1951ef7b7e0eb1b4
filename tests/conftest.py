"""Shared helpers: job files in tmp folders, CLI runs in real processes, leak checks."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WDBC = REPO / "examples" / "data" / "wdbc.csv"
DEMO = REPO / "configs" / "breast_cancer_lr.yaml"


def write_csv(path: Path, header: list[str], rows: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def wdbc() -> tuple[list[str], np.ndarray]:
    with WDBC.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    return header, np.loadtxt(WDBC, delimiter=",", skiprows=1)


def write_job(folder: Path, spec: dict[str, Any], name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def base_job(name: str = "test-job", **sections: Any) -> dict[str, Any]:
    """A job with small, fast training settings; sections override whole keys."""
    job: dict[str, Any] = {
        "name": name,
        "partition": "vertical",
        "model": {"type": "logistic_regression"},
        "training": {"epochs": 2, "batch_size": 64, "learning_rate": 0.1, "momentum": 0.9, "seed": 0},
        "outputs": {"dir": "out", "model_to": "none", "metrics_to": "all"},
        "runtime": {"timeout_s": 30},
    }
    job.update(sections)
    return job


def vertical_parties(folder: Path, groups: list[list[str]], label_party: int) -> list[dict[str, Any]]:
    """Splits wdbc by columns into one train/test file pair per group (80/20 rows)."""
    header, values = wdbc()
    split = int(len(values) * 0.8)
    parties = []
    for i, columns in enumerate(groups):
        cols = columns + (["malignant"] if i == label_party else [])
        index = [header.index(c) for c in cols]
        train = write_csv(folder / f"p{i}_train.csv", cols, values[:split, index])
        test = write_csv(folder / f"p{i}_test.csv", cols, values[split:, index])
        parties.append({"name": f"p{i}", "data": {"train": str(train), "test": str(test)}})
    return parties


def horizontal_parties(folder: Path, n: int) -> list[dict[str, Any]]:
    """Splits wdbc by rows into n parties, each with the label column and its own test rows."""
    header, values = wdbc()
    parties = []
    for i, rows in enumerate(np.array_split(values, n)):
        split = int(len(rows) * 0.8)
        train = write_csv(folder / f"p{i}_train.csv", header, rows[:split])
        test = write_csv(folder / f"p{i}_test.csv", header, rows[split:])
        parties.append({"name": f"p{i}", "data": {"train": str(train), "test": str(test)}})
    return parties


def live_processes(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (e.g. a tmp job path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def mpcfl(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs the mpcfl CLI in a real process; kills its whole group on timeout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mpcfl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"mpcfl {' '.join(args)} ran past {timeout}s\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def assert_no_leftovers(marker: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while live_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes(marker) == [], f"processes left behind: {live_processes(marker)}"


@pytest.fixture(scope="module")
def crypten_single() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND")}
    os.environ.update(RANK="0", WORLD_SIZE="1", DISTRIBUTED_BACKEND="gloo")
    os.environ["RENDEZVOUS"] = f"file:///tmp/mpcfl-test-convert-{os.getpid()}"
    from mpcfl._compat import import_crypten

    crypten = import_crypten()
    crypten.init()
    yield
    crypten.uninit()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
