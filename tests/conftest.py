"""Shared helpers: job files in tmp folders, CLI runs in real processes, leak checks."""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import os
import re
import signal
import socket
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
SCRIPTS = REPO / "tests" / "scripts"  # party scripts the tests launch
WDBC = REPO / "examples" / "data" / "wdbc.csv"
DEMO = REPO / "configs" / "breast_cancer_lr.yaml"
SPY = REPO / "tests" / "spy"  # the attacker's recorder (tests/spy/sitecustomize.py)


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


def dp_demo() -> dict:
    """The DP demo job as a dict, its data paths made absolute."""
    spec = yaml.safe_load((REPO / "configs" / "breast_cancer_dp.yaml").read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    return spec


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


def package_files_matching(pattern: str) -> list[str]:
    """The package's modules whose source matches ``pattern`` (a regex), as repo-relative paths."""
    return sorted(
        str(path.relative_to(REPO)) for path in (REPO / "mpcfl").rglob("*.py") if re.search(pattern, path.read_text())
    )


def live_processes(marker: str, *, source: str = "cmdline") -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (e.g. a tmp job path); with
    ``source="environ"``, whose environment does (a dealer's command line names no script).

    Under pytest-xdist, processes another worker's tests started (they inherit its
    ``PYTEST_XDIST_WORKER``) are not this test's: two workers may run the same script at once."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / source).read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
            if marker in cmdline and state != "Z" and not _another_workers(entry):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _another_workers(process: Path) -> bool:
    """Whether ``process`` (a /proc entry) was started under another pytest-xdist worker than this one."""
    mine = os.environ.get("PYTEST_XDIST_WORKER")
    if mine is None:
        return False
    for item in (process / "environ").read_bytes().split(b"\0"):
        if item.startswith(b"PYTEST_XDIST_WORKER="):
            return item != f"PYTEST_XDIST_WORKER={mine}".encode()
    return False


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().split(") ", 1)[1].split()[1]) if entry.name.isdigit() else None
        except OSError:
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    except OSError:
        pass  # the process ended
    return inodes


def listening_sockets(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state (0A) that one of ``pids`` holds, as the kernel reports it."""
    inodes = set().union(*(_socket_inodes(pid) for pid in pids))
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A" or inode not in inodes:
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback or address.startswith("::ffff:127.")


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


def party_lines(script_name: str, parties: int, marker: str, *options: str) -> dict[str, str]:
    """Runs ``tests/scripts/script_name`` under ``mpcfl launch [options]`` with parties p0..p{n-1}; the
    text after ``"{marker} {rank}: "`` in each party's output, by rank (every party's, else the test fails)."""
    script = str(SCRIPTS / script_name)
    names = ",".join(f"p{i}" for i in range(parties))
    result = mpcfl("launch", "--timeout-s", "60", *options, "--parties", names, script, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_leftovers(script)
    lines = dict(re.findall(rf"{re.escape(marker)} (\d+): (.*)", result.stdout))
    assert sorted(lines, key=int) == [str(i) for i in range(parties)], result.stdout[-2000:]
    return lines


def assert_shares_stay_home(views: dict[str, dict[str, np.ndarray]], parties: int) -> None:
    """No other party and not the dealer (rank ``parties``) holds any of a party's recorded own shares."""
    ranks = [str(i) for i in range(parties + 1)]
    for rank in ranks[:-1]:
        share = views[rank]["own_share"]
        share = share[np.abs(share) >= 1 << 20]  # small words would match by chance
        for watcher in set(ranks) - {rank}:
            seen = np.concatenate([v for k, v in views[watcher].items() if k.startswith("seen_")])
            assert int(np.isin(seen, share).sum()) == 0, f"rank {watcher} holds party {rank}'s share"


def assert_no_leftovers(marker: str, within: float = 10.0, *, source: str = "cmdline") -> None:
    deadline = time.monotonic() + within
    while live_processes(marker, source=source) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes(marker, source=source) == [], f"processes left behind: {live_processes(marker, source=source)}"


@pytest.fixture(scope="module")
def crypten_single() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND")}
    os.environ.update(RANK="0", WORLD_SIZE="1", DISTRIBUTED_BACKEND="gloo")
    os.environ["RENDEZVOUS"] = f"file:///tmp/mpcfl-test-convert-{os.getpid()}"
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    crypten.init()
    yield
    crypten.uninit()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _own_privacy_ledgers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's DP runs charge privacy ledgers of their own (mpcfl.dp.ledger), never the user's."""
    monkeypatch.setenv("MPCFL_LEDGER_DIR", str(tmp_path / "ledgers"))


UNCHECKED = REPO / "tests" / "unchecked"  # a build that skips named run-integrity checks


def unchecked(monkeypatch: pytest.MonkeyPatch, *checks: str) -> None:
    """Every process the test starts from now on skips ``checks`` (see tests/unchecked/sitecustomize.py)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(UNCHECKED), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPCFL_UNCHECKED", ",".join(checks))


@pytest.fixture
def spied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Loads the recorder of ``tests/spy`` into every process the test starts; returns where they write."""
    folder = tmp_path / "spy"
    folder.mkdir()
    monkeypatch.setenv("MPCFL_SPY_DIR", str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SPY), os.environ.get("PYTHONPATH")])))
    return folder


def spy_views(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """What each spied process recorded, by rank ("x" is the launcher)."""
    views: dict[str, dict[str, np.ndarray]] = {}
    for path in folder.glob("rank*.npz"):
        rank = path.name.split("-")[0].removeprefix("rank")
        with np.load(path) as data:
            views[rank] = {key: data[key] for key in data.files}
    return views


def run_job(path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``mpcfl run JOB [ARGS]`` in real processes; it must succeed and leave no process behind."""
    done = mpcfl("run", str(path), *args, timeout=timeout)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert_no_leftovers(str(path))
    return done


def run_roles(roles: list[tuple[list[str], str | None]], *, within: float) -> list[subprocess.CompletedProcess]:
    """Starts `mpcfl ARGS` per role with its own secret (None: none), on one fresh rendezvous; waits for all.

    Fails if they take more than ``within`` seconds (a refusal that waited for the timeout).
    """
    from mpcfl.launch.local import free_port

    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "MPCFL_JOB_SECRET")}
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mpcfl", *args, "--rendezvous", rendezvous],
            env={**env, **({"MPCFL_JOB_SECRET": secret} if secret else {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for args, secret in roles
    ]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=within - (time.monotonic() - started))
        except (subprocess.TimeoutExpired, ValueError):
            for other in processes:
                other.kill()
                other.communicate()
            pytest.fail(f"the processes ran past {within}s: a refusal waited for the timeout")
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def run_dir(job_path: Path, party: str) -> Path:
    """A party's folder of the newest run of the job at ``job_path`` (finished or not)."""
    from mpcfl import runs
    from mpcfl.jobs.schema import load_job

    job = load_job(job_path)
    root = job.party_root(party)
    found = runs.run_ids(root, job.name)
    assert found, f"no run in {root}"
    return root / found[-1]


def assert_only_failed_runs(out: Path) -> None:
    """A failed job wrote nothing under ``out`` but its runs' records (if it got so far), each marked
    unfinished, and no ``latest``."""
    import json

    from mpcfl import runs

    files = [p for p in out.rglob("*") if p.is_file() and p.name != ".lock"]
    assert all(p.name in (runs.RECORD, runs.JOURNAL) for p in files), files
    for record in (p for p in files if p.name == runs.RECORD):
        assert runs.status_of(json.loads(record.read_text())) != runs.FINISHED, record
    assert not list(out.glob(f"*/{runs.LATEST}"))


def job_metrics(job_path: Path, party: str) -> dict[str, Any]:
    """A party's metrics.json of the newest run of the job at ``job_path``."""
    import json

    return json.loads((run_dir(job_path, party) / "metrics.json").read_text())


def crash_after_epoch(job: Path, epoch: int, party: str = "p1") -> int:
    """Runs the job, SIGKILLs ``party`` right after it logs ``epoch``; returns the launcher's exit code."""
    return crash_after_line(job, f"[{party}] INFO mpcfl.tasks.train.loop: epoch epoch={epoch} ", party)[0]


def crash_after_line(job: Path, prefix: str, party: str) -> tuple[int, str, str]:
    """Runs the job, SIGKILLs ``party`` right after the launcher prints a line starting with ``prefix``;
    returns the launcher's exit code, its stderr and its stdout."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "mpcfl", "run", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    seen = []
    try:
        for line in launcher.stdout:
            seen.append(line)
            if line.startswith(prefix):
                pid = [p for p in live_processes(str(job)) if p in live_processes(f"--party {party} ")][0]
                os.kill(pid, signal.SIGKILL)
                break
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert_no_leftovers(str(job))
    return launcher.returncode, err, "".join(seen) + out


def demo_against_plaintext(path: Path) -> tuple[Any, float, float]:
    """Runs a demo-like job; its secure test accuracy must be above 90% and within 2 points of
    plaintext PyTorch on the same data. Returns the job and both accuracies."""
    from mpcfl.jobs.schema import load_job
    from mpcfl.tasks.train.baseline import train_plaintext

    run_job(path)
    job = load_job(path)
    secure = job_metrics(path, job.labels.party)["final"]["test_accuracy"]
    plain = train_plaintext(job).history[-1]["test_accuracy"]
    assert secure > 0.9
    assert abs(secure - plain) <= 0.02, (secure, plain)
    return job, secure, plain


def mann_whitney(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUC as the probability that a positive outscores a negative, ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))
