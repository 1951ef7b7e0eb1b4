"""The local launcher under failure: it stops everyone, names the culprit, and leaves no process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    REPO, SCRIPTS, assert_no_leftovers, assert_only_failed_runs, base_job, live_processes, mpcfl, vertical_parties,
    write_job,
)

FAULTS = REPO / "tests" / "faults"  # a deviating party (tests/faults/sitecustomize.py)


def small_job(tmp_path: Path, **runtime: object) -> Path:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["training"]["epochs"] = 200
    spec["runtime"].update(runtime)
    return write_job(tmp_path, spec)


def start(job: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mpcfl", "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"never saw {needle!r}:\n{''.join(seen[-30:])}")


def signal_and_wait(launcher: subprocess.Popen, pid: int, sig: int, timeout: float) -> tuple[str, float]:
    """Sends ``sig`` to one child, waits for the launcher; returns its stderr and how long it took."""
    sent_at = time.monotonic()
    os.kill(pid, sig)
    try:
        _, err = launcher.communicate(timeout=timeout)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    return err, time.monotonic() - sent_at


def party_pid(job: Path, party: str) -> int:
    pids = [p for p in live_processes(str(job)) if p in live_processes(f"--party {party} ")]
    assert len(pids) == 1, pids
    return pids[0]


@pytest.mark.parametrize("victim", ["p1", "dealer"])
def test_a_party_dying_mid_training_stops_the_job(tmp_path: Path, victim: str) -> None:
    job = small_job(tmp_path)
    launcher = start(job)
    wait_for_line(launcher, "[p1] INFO mpcfl.tasks.train.dataset: shared")
    time.sleep(1.0)  # now inside the training loop
    pid = party_pid(job, victim) if victim != "dealer" else [
        p for p in live_processes(str(job)) if p in live_processes(" dealer ")
    ][0]
    err, elapsed = signal_and_wait(launcher, pid, signal.SIGKILL, timeout=60)
    assert launcher.returncode == 1
    assert elapsed < 15, f"took {elapsed:.1f}s to stop"
    assert f"mpcfl: error: {victim} failed: killed by signal 9" in err
    assert_no_leftovers(str(job))
    # Only the run's record, its openings and checkpoints (kept for --resume) may exist: no model, metrics or plot.
    kept = {"run.json", "openings.jsonl", ".lock"}
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and "checkpoints" not in p.parts and p.name not in kept]
    assert written == [], f"a failed job wrote outputs: {written}"


def test_a_party_dying_at_start_up_stops_the_job(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    launcher = start(job)
    deadline = time.monotonic() + 30
    while not [p for p in live_processes(str(job)) if p in live_processes("--party p1 ")]:
        assert time.monotonic() < deadline, "p1 never started"
        time.sleep(0.02)
    err, elapsed = signal_and_wait(launcher, party_pid(job, "p1"), signal.SIGKILL, timeout=60)
    assert launcher.returncode == 1
    assert elapsed < 15, f"took {elapsed:.1f}s to stop"
    assert "mpcfl: error: p1 failed: killed by signal 9" in err
    assert_no_leftovers(str(job))


def test_a_party_dying_around_the_final_reveal_stops_the_job(tmp_path: Path) -> None:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["training"]["epochs"] = 1
    spec["outputs"]["model_to"] = ["p1"]
    job = write_job(tmp_path, spec)
    launcher = start(job)
    wait_for_line(launcher, "[p0] INFO mpcfl.tasks.train.loop: epoch epoch=1 ")  # next: revealing the model
    err, elapsed = signal_and_wait(launcher, party_pid(job, "p0"), signal.SIGKILL, timeout=60)
    assert launcher.returncode == 1
    assert elapsed < 15, f"took {elapsed:.1f}s to stop"
    assert "mpcfl: error: p0 failed: killed by signal 9" in err
    # Whether p1 got the model first is a race; if it did, its file is whole (atomic write).
    model = tmp_path / "out" / "p1" / "latest" / "model.pt"
    if model.exists():
        torch.load(model, weights_only=True)
    assert_no_leftovers(str(job))


def test_launcher_terminated_takes_its_children_along(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    launcher = start(job)
    wait_for_line(launcher, "[p0] INFO mpcfl.tasks.train.dataset: shared")
    assert len(live_processes(str(job))) == 4  # launcher, dealer, two parties
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=30)
    assert launcher.returncode == 130
    assert_no_leftovers(str(job))


def test_bad_data_at_one_party_fails_the_job_once_naming_the_party_and_the_cell(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    bad = tmp_path / "p0_train.csv"
    bad.write_text(bad.read_text().replace("\n17.99,", "\nseventeen,", 1))
    done = mpcfl("run", str(job), timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mpcfl: error: p0 failed: party p0: ")
    assert "p0_train.csv: line 2, column 'mean_radius': 'seventeen' is not a number" in last
    # Printed once, by the launcher: the dealer and p1, which only stopped because p0 did, stay off the console.
    assert (done.stdout + done.stderr).count("mpcfl: error: ") == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert_only_failed_runs(tmp_path / "out")
    assert_no_leftovers(str(job))


def test_world_size_from_the_environment_must_match_the_job(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    env = dict(os.environ, WORLD_SIZE="3")
    done = subprocess.run(
        [sys.executable, "-m", "mpcfl", "party", str(job), "--party", "p0", "--rendezvous", "tcp://127.0.0.1:1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 1
    assert "mpcfl: error: party p0: environment WORLD_SIZE=3 does not match job test-job" in done.stderr


def test_unknown_party_name(tmp_path: Path) -> None:
    done = mpcfl("party", str(small_job(tmp_path)), "--party", "p9", timeout=60)
    assert done.returncode == 1
    assert "no party named 'p9' (parties: p0, p1)" in done.stderr


def test_a_stopped_party_is_named_once_its_peers_time_out(tmp_path: Path) -> None:
    job = small_job(tmp_path, timeout_s=5)
    launcher = start(job)
    wait_for_line(launcher, "[p1] INFO mpcfl.tasks.train.dataset: shared")
    time.sleep(1.0)
    err, elapsed = signal_and_wait(launcher, party_pid(job, "p1"), signal.SIGSTOP, timeout=90)
    assert launcher.returncode == 1
    assert elapsed < 5 + 15, f"took {elapsed:.1f}s to stop"
    # p1 is named; the dealer, idle while the parties wait on p1, may be named with it.
    assert re.search(r"mpcfl: error: (dealer, )?p1(, dealer)? stopped responding \(hung, stopped, or cut off", err), err
    assert_no_leftovers(str(job))


def test_a_party_withholding_its_dealer_digests_is_the_one_named_in_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # p1 goes on as if it had sent them, so it gives up too, waiting on p0 in an opening: every
    # process ends as one that lost a peer, in whatever order, and only the dealer knows whose
    # digest never came.
    job = small_job(tmp_path, timeout_s=5)
    monkeypatch.setenv("MPCFL_WITHHOLD_DIGESTS", "p1")
    # The hook imports mpcfl before `-m` puts the working directory on sys.path: this checkout first.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), str(FAULTS), os.environ.get("PYTHONPATH")])))
    waited = "gave up waiting for party p1 (its dealer digest of request "
    for _ in range(2):
        done = mpcfl("run", str(job), timeout=120)
        assert done.returncode == 1
        blame = done.stderr.strip().splitlines()[-1]
        assert blame.startswith(f"mpcfl: error: p1 stalled the job: dealer: {waited}"), blame
        assert "mpcfl: error: " not in done.stdout  # the launcher's line alone says it
        assert "waiting on" not in done.stdout  # the launcher reads those lines; they are not output
        assert_no_leftovers(str(job))


def test_rendezvous_port_in_use_and_unreachable(tmp_path: Path) -> None:
    import socket

    job = small_job(tmp_path, timeout_s=3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = mpcfl("party", str(job), "--party", "p0", "--rendezvous", f"tcp://127.0.0.1:{port}", timeout=60)
    assert done.returncode == 1
    assert f"party p0: cannot host the rendezvous tcp://127.0.0.1:{port}: the port is already in use" in done.stderr
    done = mpcfl("party", str(job), "--party", "p1", "--rendezvous", "tcp://127.0.0.1:9", timeout=60)
    assert done.returncode == 1
    assert "party p1: cannot reach the rendezvous tcp://127.0.0.1:9 within timeout_s=3s: is rank 0 (p0) running" in done.stderr
    problems = [line for line in done.stderr.splitlines() if not line.startswith("INFO ")]
    assert len(problems) == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("partition", ["vertical", "horizontal"])
def test_parties_whose_shapes_disagree(tmp_path: Path, partition: str) -> None:
    from conftest import horizontal_parties

    if partition == "vertical":
        job = small_job(tmp_path)
        short = tmp_path / "p1_train.csv"
        short.write_text("\n".join(short.read_text().splitlines()[:-5]) + "\n")
        expected = "party p1: its train file has 450 rows, party p0 has 455; a vertical partition needs the same rows"
    else:
        parties = horizontal_parties(tmp_path, 2)
        for key in ("train", "test"):
            narrow = Path(parties[1]["data"][key])
            lines = [",".join(line.split(",")[1:]) for line in narrow.read_text().splitlines()]
            narrow.write_text("\n".join(lines) + "\n")
        job = write_job(tmp_path, base_job(partition="horizontal", parties=parties, labels={"column": "malignant"}))
        expected = "party p1: its columns differ from party p0's; a horizontal partition needs the same columns"
    done = mpcfl("run", str(job), timeout=120)
    assert done.returncode == 1
    assert expected in done.stderr.strip().splitlines()[-1]
    assert_only_failed_runs(tmp_path / "out")
    assert_no_leftovers(str(job))


def test_a_long_local_step_announced_as_quiet_outlasts_the_timeout() -> None:
    # The dealer hears no request, and party 1 no message, for twice the timeout.
    result = mpcfl("launch", "--timeout-s", "3", "--parties", "p0,p1", str(SCRIPTS / "quiet_party.py"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("quiet: product [0.0, 1.0, 4.0, 9.0]") == 2
    assert_no_leftovers(str(SCRIPTS / "quiet_party.py"))


@pytest.mark.parametrize(
    ("codes", "spare", "behind"),
    [
        ({"p0": None, "p1": None, "p2": -9, "dealer": None}, 1, ["p2"]),  # a killed party, within the spare
        ({"p0": None, "p1": -9, "p2": -9, "dealer": None}, 1, []),  # more deaths than the job survives
        ({"p0": None, "p1": None, "p2": 1, "dealer": None}, 1, []),  # an own error stops the job as ever
        ({"p0": 3, "p1": None, "p2": -9, "dealer": None}, 1, []),  # a survivor failed too
        ({"p0": None, "p1": None, "p2": None, "dealer": -9}, 1, []),  # the dealer is never expendable
        ({"p0": None, "p1": None, "p2": -9, "dealer": None}, 0, []),  # a job without dropouts
    ],
)
def test_the_launcher_goes_on_without_a_dead_party_only_where_the_job_survives_it(
    codes: dict[str, int | None], spare: int, behind: list[str]
) -> None:
    from types import SimpleNamespace

    from mpcfl.launch.local import Child, _left_behind

    children = [Child(name=name, process=SimpleNamespace(returncode=code)) for name, code in codes.items()]  # type: ignore[arg-type]
    assert [c.name for c in _left_behind(children, frozenset({"p0", "p1", "p2"}), spare)] == behind
