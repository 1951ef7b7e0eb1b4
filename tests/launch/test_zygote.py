"""Warm starts (:mod:`mpcfl.launch.zygote`): a run's processes are forked from one interpreter that holds
no secret, each in its own process group and named by its command; the launcher learns each exit status as
from a process it started itself; ``MPCFL_COLD_START=1`` starts them cold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_no_leftovers, live_processes
from launch.test_launch import small_job, start, wait_for_line
from mpcfl.launch.local import _clean_env
from mpcfl.launch.zygote import Zygote
from mpcfl.mpc.auth import ENV_SECRET, new_secret


def _gone(pid: int) -> bool:
    """The process has exited and been reaped, or is a zombie its parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of the process holds ``needle``."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            span, permissions = line.split()[:2]
            if not permissions.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                memory.seek(start)
                if needle in memory.read(end - start):
                    return True
            except OSError:
                continue
    return False


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, process group) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()
    return int(fields[1]), int(fields[2])


def _processes_of_a_running_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cold: bool) -> dict[str, tuple[int, int, int]]:
    """Starts a long job, and once it trains: role -> (pid, parent pid, process group) of the launcher,
    the dealer and both parties, and of their parent where it is not the launcher (``"zygote"``)."""
    monkeypatch.setenv("MPCFL_COLD_START", "1" if cold else "0")
    secret = new_secret()
    monkeypatch.setenv(ENV_SECRET, secret)  # the run's secret, known here so it can be looked for
    job = small_job(tmp_path)
    launcher = start(job)
    found: dict[str, tuple[int, int, int]] = {}
    try:
        wait_for_line(launcher, "[p1] INFO mpcfl.tasks.train.dataset: shared")
        for pid in live_processes(str(job)):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            role = next((r for r in ("--party p0 ", "--party p1 ", " dealer ", " run ") if r in title), None)
            assert role is not None, title
            found[role.strip()] = (pid, *_stat(pid))
        parents = {found[role][1] for role in ("--party p0", "--party p1", "dealer")}
        (parent,) = parents
        if parent != found["run"][0]:
            found["zygote"] = (parent, *_stat(parent))
            # The zygote never held the run's secret, in its environment or anywhere in its memory,
            # while each party did (the control: the search finds it where it is).
            assert f"{ENV_SECRET}=".encode() not in Path(f"/proc/{parent}/environ").read_bytes()
            assert not _memory_holds(parent, secret.encode())
            assert _memory_holds(found["--party p0"][0], secret.encode())
            assert b"mpcfl.launch.zygote" in Path(f"/proc/{parent}/cmdline").read_bytes()
        return found
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.communicate(timeout=60)
        assert_no_leftovers(str(job))
        if "zygote" in found:
            assert _gone(found["zygote"][0])


def test_a_run_s_processes_are_forked_from_one_zygote_each_in_its_own_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = _processes_of_a_running_job(tmp_path, monkeypatch, cold=False)
    launcher = found["run"][0]
    zygote, zygote_parent, _ = found["zygote"]
    assert zygote_parent == launcher
    for role in ("--party p0", "--party p1", "dealer"):
        pid, parent, group = found[role]
        assert parent == zygote and group == pid  # killpg(pid) stops exactly this child and its own


def test_cold_starts_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = _processes_of_a_running_job(tmp_path, monkeypatch, cold=True)
    assert "zygote" not in found
    assert {found[role][1] for role in ("--party p0", "--party p1", "dealer")} == {found["run"][0]}


def test_the_launcher_learns_each_child_s_exit_status_and_output(tmp_path: Path) -> None:
    env = _clean_env()
    job = small_job(tmp_path)
    zygote = Zygote(env)
    try:
        version = zygote.spawn([sys.executable, "-m", "mpcfl", "--version"], env)
        assert version.wait(timeout=60) == 0
        assert version.stdout.read().decode().startswith("mpcfl ")
        unknown = zygote.spawn([sys.executable, "-m", "mpcfl", "no-such-command"], env)
        assert unknown.wait(timeout=60) == 2  # argparse's status, as from a cold start
        assert b"invalid choice" in unknown.stdout.read()
        other = zygote.spawn([sys.executable, "-c", "print('hello')"], env)
        assert other.wait(timeout=60) == 1
        assert b"the zygote starts `python -m mpcfl ...` only" in other.stdout.read()
        # A child that runs until killed: its group, as the launcher stops it, and the signal as its status.
        private = {ENV_SECRET: new_secret()}
        waiting = zygote.spawn([sys.executable, "-m", "mpcfl", "party", str(job), "--party", "p0",
                                "--rendezvous", f"file://{tmp_path}/store"], env, private)
        deadline = time.monotonic() + 60
        while waiting.poll() is None and not live_processes(f"{job} --party p0 "):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(waiting.pid, signal.SIGKILL)
        assert waiting.wait(timeout=30) == -signal.SIGKILL
        # A child still running when the zygote dies goes with it (the launcher's death takes both).
        orphan = zygote.spawn([sys.executable, "-m", "mpcfl", "party", str(job), "--party", "p1",
                               "--rendezvous", f"file://{tmp_path}/other"], env, private)
        with pytest.raises(subprocess.TimeoutExpired):  # waiting for p0 at the rendezvous
            orphan.wait(timeout=0.5)
        os.kill(zygote.pid, signal.SIGKILL)
        assert orphan.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while not _gone(orphan.pid):
            assert time.monotonic() < deadline, "the zygote's child outlived it"
            time.sleep(0.05)
    finally:
        zygote.close()
    assert _gone(zygote.pid)
    assert_no_leftovers(str(job))
