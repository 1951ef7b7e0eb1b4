"""Soak: many consecutive jobs must leak no process, port or file descriptor.

    python benchmarks/soak.py [--jobs 20]

Runs a small 2-party job (plus dealer) through the local launcher, in this
process, again and again. After each job it counts this process's open file
descriptors and threads, the processes left running that mention the job file,
and whether the job's rendezvous port can be bound again. Prints one line per
job and a summary; exits 1 if anything leaked.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from mpcfl.launch.local import local as launch
from mpcfl.jobs.schema import load_job

REPO = Path(__file__).resolve().parent.parent


def _job(folder: Path) -> Path:
    data = np.loadtxt(REPO / "examples" / "data" / "wdbc.csv", delimiter=",", skiprows=1)[:200]
    np.savetxt(folder / "a.csv", data[:, :5], delimiter=",", header="a,b,c,d,e", comments="")
    np.savetxt(folder / "b.csv", data[:, [20, 21, 30]], delimiter=",", header="f,g,y", comments="")
    spec = {
        "name": "soak",
        "partition": "vertical",
        "parties": [{"name": "a", "data": {"train": "a.csv"}}, {"name": "b", "data": {"train": "b.csv"}}],
        "labels": {"party": "b", "column": "y"},
        "model": {"type": "logistic_regression"},
        "training": {"epochs": 1, "batch_size": 100},
        "outputs": {"dir": "out", "model_to": ["b"]},
        "runtime": {"timeout_s": 30},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _processes_mentioning(marker: str) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    count += 1
            except OSError:
                pass
    return count


def _port_free(port: int) -> bool:
    """Nobody listens on ``port`` (connections in TIME_WAIT are the kernel's, not a leak)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    ports: list[int] = []
    original = launch.free_port

    def recording_free_port() -> int:
        ports.append(original())
        return ports[-1]

    launch.free_port = recording_free_port  # to check each job's port afterwards
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(_job(Path(tmp)))
        fds, threads, leaks = [], [], 0
        for i in range(args.jobs):
            started = time.perf_counter()
            code = launch.run_local(job, sink=io.StringIO())
            fds.append(len(os.listdir("/proc/self/fd")))
            threads.append(threading.active_count())
            left = _processes_mentioning(str(job.source))
            free = _port_free(ports[-1])
            leaks += int(code != 0 or left > 0 or not free)
            print(f"job {i + 1:2d}: exit {code}, {time.perf_counter() - started:5.1f}s, open fds {fds[-1]}, "
                  f"threads {threads[-1]}, processes left {left}, port {ports[-1]} free again: {free}")
    growth = fds[-1] - fds[0]
    print(f"\n{args.jobs} jobs: failures or leaks in {leaks}; open fds {fds[0]} -> {fds[-1]} ({growth:+d}); "
          f"threads {threads[0]} -> {threads[-1]}")
    return 1 if leaks or growth > 0 or threads[-1] > threads[0] else 0


if __name__ == "__main__":
    sys.exit(main())
