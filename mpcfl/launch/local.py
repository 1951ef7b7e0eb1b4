"""The local launcher: every party and the dealer as processes on this machine.

For a job, each child runs ``python -m mpcfl party|dealer``; for a party script
(:func:`launch_script`), each party runs the script with its role in the
environment. All meet on a private file rendezvous, and every listener binds to
loopback (:func:`local_rendezvous`). A child's
output lines are prefixed with its name. If any child fails, the others are
stopped and the launcher reports the child that failed first, or, if the others
only followed it, the one they were waiting for: in one line, the children's own error lines
(each party, and the dealer, says it stopped) being kept off the console unless ``--debug``; each
child still prints them, so a party's own log (run on its own host) has them. Children die
with the launcher (PR_SET_PDEATHSIG) and are killed as process groups, so no
process is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mpcfl import runs
from mpcfl.errors import WAITING_ON, MpcflError, first_own_failure
from mpcfl.jobs import registry
from mpcfl.jobs.schema import JobBase
from mpcfl.launch.env import KEYS, script_session, to_env
from mpcfl.launch.zygote import ForkedProcess, Zygote, die_with_parent, warm_starts
from mpcfl.mpc import providers
from mpcfl.mpc.auth import ENV_SECRET, Credentials, new_secret
from mpcfl.mpc.compat import DEFAULT_TIMEOUT_S
from mpcfl.outputs import ENV_PROGRESS

log = logging.getLogger(__name__)

_GRACE_S = 5.0
_POLL_S = 0.05
_write_lock = threading.Lock()


def _local_secret() -> str:
    """Every local run authenticates its processes: with the user's secret if set, else a fresh one per run."""
    return os.environ.get(ENV_SECRET) or new_secret()


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# gloo binds its pair listeners to this interface's address; unset, to whatever the host
# name resolves to, which on many hosts is a LAN address.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo"}


@contextlib.contextmanager
def local_rendezvous() -> Iterator[str]:
    """A ``file://`` rendezvous in a fresh private folder, removed afterwards.

    With ``tcp://127.0.0.1:PORT``, rank 0 hosts torch's TCPStore, which listens on
    every interface whatever host is given: anyone who can reach the port could
    list and write its keys. A file store has no listener, and the 0700 folder
    keeps other local users out.
    """
    folder = tempfile.mkdtemp(prefix="mpcfl-rendezvous-")  # mode 0700
    try:
        yield f"file://{folder}/store"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Child:
    """One supervised process and what it last said."""

    name: str
    process: subprocess.Popen | ForkedProcess
    error_line: str = ""
    last_line: str = ""  # a script's traceback ends with its exception
    waiting_on: str | None = None  # the peer it gave up waiting for, as it said (errors.WAITING_ON)
    ended_at: float | None = None
    pump: threading.Thread | None = field(default=None, repr=False)
    relay_errors: bool = False  # copy its error lines to the console too (--debug); the launcher's own line says it

    @property
    def failed(self) -> bool:
        return self.process.returncode not in (None, 0)


def _pump(child: Child, stream: IO[bytes], sink: IO[str]) -> None:
    """Copies a child's output to ``sink``, each line or progress update prefixed."""
    prefix = f"[{child.name}] "
    pending = b""
    while chunk := stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096):
        pending += chunk
        while True:
            cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            segment, end, pending = pending[:cut], pending[cut : cut + 1], pending[cut + 1 :]
            text = segment.decode("utf-8", "replace")
            if not text.strip():
                continue
            if text.startswith(WAITING_ON):  # for the launcher; the error line says it in words
                child.waiting_on = text.removeprefix(WAITING_ON).strip()
                continue
            if text.startswith("mpcfl: error: "):
                child.error_line = text.removeprefix("mpcfl: error: ")
                if not child.relay_errors:  # the launcher prints the failure once, naming its first cause
                    continue
            child.last_line = text.strip()
            with _write_lock:
                sink.write(prefix + text + end.decode())
                sink.flush()
    if pending:
        with _write_lock:
            sink.write(prefix + pending.decode("utf-8", "replace") + "\n")
            sink.flush()


def _mpcfl(*argv: str) -> list[str]:
    return [sys.executable, "-m", "mpcfl", *argv]


def _clean_env() -> dict[str, str]:
    """This process's environment for a child, without any launcher contract (one inherited from an
    enclosing launcher, or torchrun's, would contradict this one) and without a secret: each child gets
    the run's own."""
    env = {k: v for k, v in os.environ.items() if k not in (*KEYS, "MASTER_ADDR", "MASTER_PORT")}
    return env | {"PYTHONUNBUFFERED": "1", ENV_PROGRESS: "1" if sys.stdout.isatty() else "0", **LOOPBACK_ENV}


def _spawn(
    name: str, command: list[str], *, sink: IO[str], secret: str, env: dict[str, str] | None = None, debug: bool = False,
    zygote: Zygote | None = None,
) -> Child:
    """Starts one supervised child in its own process group, forked by ``zygote`` if one is given;
    ``env`` adds to a clean environment, ``secret`` is the run's job secret; ``debug`` relays its error lines too."""
    full_env = _clean_env() | (env or {}) | LOOPBACK_ENV
    process: subprocess.Popen | ForkedProcess
    if zygote is not None:
        process = zygote.spawn(command, full_env, private={ENV_SECRET: secret})
    else:
        full_env[ENV_SECRET] = secret
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    child = Child(name=name, process=process, relay_errors=debug)
    child.pump = threading.Thread(target=_pump, args=(child, process.stdout, sink), daemon=True)
    child.pump.start()
    return child


def _kill_group(child: Child, sig: int) -> None:
    try:
        os.killpg(child.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(children: list[Child]) -> None:
    """SIGTERM every live child's process group, then SIGKILL what is left after a grace period."""
    for child in children:
        if child.process.poll() is None:
            _kill_group(child, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        # Kill the group even if the leader exited: a grandchild may still hold it.
        _kill_group(child, signal.SIGKILL)
        child.process.wait()
        if child.pump is not None:
            child.pump.join(timeout=2)


_SETTLE_S = 3.0
#: The longest the launcher waits for the other processes to report after a first failure: a peer
#: of a hung process gives up about a job's timeout after it started waiting, which may be later
#: than the first witness started (it was computing), so up to the job's timeout, within these bounds.
_SETTLE_MAX_S = 15.0


def _settle_s(timeout_s: float) -> float:
    """How long the launcher lets the others report after a first failure, for a job's ``timeout_s``."""
    return max(_SETTLE_S, min(timeout_s, _SETTLE_MAX_S))


def _blame(children: list[Child]) -> str:
    """Who failed first, and how: a child that failed on its own beats one that lost a peer;
    if every failure is a lost peer, the children still running are the ones that hung; if
    none is, the one that the first witness, in start order, gave up waiting for."""
    failed = sorted((c for c in children if c.failed), key=lambda c: c.ended_at or float("inf"))
    culprit = first_own_failure([(c, c.process.returncode) for c in failed])
    if culprit is not None:
        code = culprit.process.returncode
        if code < 0:
            reason = f"killed by signal {-code}"
        else:
            reason = culprit.error_line or f"exited with status {code}" + (f": {culprit.last_line}" if culprit.last_line else "")
        return f"{culprit.name} failed: {reason}"
    silent = [c.name for c in children if c.process.poll() is None]
    if silent:
        return (
            f"{', '.join(silent)} stopped responding (hung, stopped, or cut off from the network); "
            f"the others gave up: {failed[0].error_line or 'lost a peer'}"
        )
    # Start order puts the dealer first: the protocol trusts it already, and it names a party only
    # for a digest the party owed whatever the others did. Then the parties, by rank.
    names = {c.name for c in children}
    witness = next((c for c in children if c.failed and c.waiting_on in names), None)
    if witness is not None:
        return f"{witness.waiting_on} stalled the job: {witness.error_line}"
    return f"{failed[0].name} failed: {failed[0].error_line or 'lost a peer'}"


def _left_behind(children: list[Child], expendable: frozenset[str], spare: int) -> list[Child]:
    """The failed children the job goes on without: up to ``spare`` of the ``expendable``, killed by a
    signal (a dead process; one that failed on its own stops the job as ever), while no other failed."""
    failed = [c for c in children if c.failed]
    dead = [c for c in failed if c.name in expendable and c.process.returncode < 0]
    return dead if len(dead) == len(failed) and len(dead) <= spare else []


def supervise(children: list[Child], *, sink: IO[str], expendable: frozenset[str] = frozenset(), spare: int = 0,
              settle: float = _SETTLE_S) -> int:
    """Waits for all children; on the first failure lets the others report for up to ``settle``
    seconds (:func:`_settle_s`), then stops the rest. Returns the exit code.

    Up to ``spare`` of the ``expendable`` children (parties of a job that survives them) may die
    without stopping the others; the launcher names each, and the exit code is 0 if the rest succeed.
    """
    warned: set[str] = set()

    def note_exits() -> None:
        for child in children:
            if child.ended_at is None and child.process.poll() is not None:
                child.ended_at = time.monotonic()

    try:
        while True:
            note_exits()
            behind = _left_behind(children, expendable, spare)
            for child in behind:
                if child.name not in warned:
                    warned.add(child.name)
                    print(f"mpcfl: warning: {child.name} died (killed by signal {-child.process.returncode}); "
                          "the job goes on without it (federated.allow_dropouts)", file=sys.stderr)
            if any(c.failed for c in children) and not behind:
                # Let the other processes report before blaming: a peer's own error may trail
                # by a poll, and the peers of a hung process give up at about the same time.
                until = time.monotonic() + settle
                while time.monotonic() < until:
                    note_exits()
                    ended = [(c, c.process.returncode) for c in children if c.failed]
                    if first_own_failure(ended) is not None or all(c.ended_at is not None for c in children):
                        break
                    time.sleep(_POLL_S)
                for child in children:  # an ended child's last lines (its error, whom it waited for) first
                    if child.ended_at is not None and child.pump is not None:
                        child.pump.join(timeout=2)
                message = _blame(children)
                stop_all(children)
                print(f"mpcfl: error: {message}", file=sys.stderr)
                return 1
            if all(c.ended_at is not None for c in children):
                for child in children:
                    if child.pump is not None:
                        child.pump.join(timeout=2)
                return 0
            time.sleep(_POLL_S)
    except BaseException:
        stop_all(children)
        raise


def _dealer_first(processes: list[str]) -> list[str]:
    """Start order: the dealer (if any) first, as in the group the parties wait on it, never the reverse."""
    return sorted(processes, key=lambda name: name != providers.DEALER)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM to the launcher stops the job like Ctrl-C: children are stopped, not orphaned."""
    raise KeyboardInterrupt


def _run(children_of: Callable[[], list[Child]], *, sink: IO[str], **tolerance: Any) -> int:
    """Starts the children, supervises them (``tolerance``: see :func:`supervise`), and turns SIGTERM into a clean stop."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return supervise(children_of(), sink=sink, **tolerance)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local(
    job: JobBase,
    *,
    debug: bool = False,
    resume: str | bool = False,
    key_dir: Path | None = None,
    sink: IO[str] | None = None,
    run_id: str | None = None,
) -> int:
    """Runs every process of the job (the parties, and the dealer if its provider has one) on this machine.

    Each call is a new run with its own id and folders (:mod:`mpcfl.runs`); with ``resume``
    (``True``: the parties' newest unfinished run, or a run id) the parties continue that run
    from their checkpoints instead. A job with ``runtime.identity`` needs ``key_dir`` holding
    ``NAME.key`` for every process.

    Returns:
        0 when every process succeeded, or, in a job that survives dead parties (federated with
        ``allow_dropouts``), when every other process did and the dead ones were killed by a signal
        (each named on stderr); 1 otherwise.

    Raises:
        MpcflError: the job has identities but no ``key_dir`` is given.
    """
    sink = sink or sys.stdout
    if job.runtime.identity is not None and key_dir is None:
        raise MpcflError(f"{job.source}: runtime.identity is set: pass --key-dir, the folder holding NAME.key of every process")
    job_file = str(Path(job.source).resolve())
    common = ["--debug"] if debug else []
    run_id = run_to_resume(job, resume) if resume else run_id or runs.new_run_id()
    which = ["--resume" if resume else "--run-id", run_id]

    def command(name: str, role: str, *args: str) -> list[str]:
        keys = ["--key-file", str(key_dir / f"{name}.key")] if key_dir is not None else []
        return _mpcfl(*common, role, job_file, *args, "--rendezvous", rendezvous, *keys)

    secret = _local_secret()

    def children() -> list[Child]:
        started = []
        for name in _dealer_first(providers.get(job.runtime.provider).processes(job.party_names)):
            args = ("dealer",) if name == providers.DEALER else ("party", "--party", name, *which)
            started.append(_spawn(name, command(name, *args), sink=sink, secret=secret, debug=debug, zygote=zygote))
        return started

    resumable = registry.RESUME in registry.task_of(job).features
    hint = f"; `mpcfl run {job.source} --resume {run_id}` continues it" if resumable else ""
    try:
        zygote_env = _clean_env()  # what every child starts from; no secret
        if not debug:  # as each party's CLI sets it, but torch reads it when it loads: in the zygote
            zygote_env.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        with local_rendezvous() as rendezvous, warm_starts(zygote_env) as zygote:
            needed = job.survivors_needed
            spare = 0 if needed is None else job.world_size - needed
            code = _run(children, sink=sink, expendable=frozenset(job.party_names), spare=spare,
                        settle=_settle_s(job.runtime.timeout_s))
    except KeyboardInterrupt:
        print(f"mpcfl: run {run_id} stopped{hint}", file=sys.stderr)
        raise
    if code == 0:
        print(summary_line(job, run_id), file=sink)
    return code


def run_to_resume(job: JobBase, resume: str | bool) -> str:
    """The run every party will resume: the one named, or their newest unfinished one. Every party's
    folder is on this machine, so what each party would refuse is refused here, before anything starts
    (the parties check again, as they do when each runs on its own host).

    Raises:
        MpcflError: the parties hold no such run, or a finished one, or name different runs.
    """
    if isinstance(resume, str):
        run_id = runs.check_run_id(resume, where="--resume")
    else:
        newest = {name: runs.newest_unfinished(job.party_root(name), job.name) for name in job.party_names}
        if not any(newest.values()):
            raise MpcflError(f"{job.source}: no unfinished run of job {job.name} to resume (see `mpcfl runs`)")
        if len(set(newest.values())) > 1:
            held = "; ".join(f"{name} {run or 'none'}" for name, run in newest.items())
            raise MpcflError(f"{job.source}: the parties' newest unfinished runs differ ({held}); pass --resume RUN_ID")
        run_id = next(iter(newest.values()))
    for name in job.party_names:
        try:
            runs.refuse_finished(runs.Run(job.party_root(name), run_id).read(), who=name)
        except MpcflError as err:
            raise MpcflError(f"{job.source}: {err}") from None
    return run_id


def summary_line(job: JobBase, run_id: str) -> str:
    """What a finished run gave, in one line: its headline figures as the first party that recorded them
    has them, where the model and the run's privacy ledger are (the parties that hold them), and the outputs.

    e.g. ``mpcfl: job demo run R finished: epoch=10 test_accuracy=0.9737 loss=0.08 (hospital_b); model:
    runs/demo/hospital_b/R/model.pt; outputs in runs/demo/<party>/R (and <party>/latest)``
    """
    headlines = {}
    for name in job.party_names:
        with contextlib.suppress(MpcflError):
            headlines[name] = runs.Run(job.party_root(name), run_id).read().get("headline") or {}
    first = next((name for name, headline in headlines.items() if runs.headline_text(headline)), None)
    headline = f": {runs.headline_text(headlines[first])} ({first})" if first else ""
    parts = [f"mpcfl: job {job.name} run {run_id} finished{headline}"]
    # Each party's own test rows (federated): the figure across parties, where they differ.
    accuracy = {name: h["test_accuracy"] for name, h in headlines.items() if isinstance(h.get("test_accuracy"), float)}
    if len(set(accuracy.values())) > 1:
        parts.append("test_accuracy by party: " + " ".join(f"{name}={value:.4f}" for name, value in accuracy.items()))
    for what, file in (("model", "model.pt"), ("privacy ledger", "privacy.json")):
        holders = [name for name in job.party_names if (job.party_root(name) / run_id / file).is_file()]
        if len(holders) == 1:
            parts.append(f"{what}: {job.party_root(holders[0]) / run_id / file}")
        elif holders:
            parts.append(f"{what}: {job.outputs.dir}/<party>/{run_id}/{file} at {', '.join(holders)}")  # type: ignore[attr-defined]
    parts.append(f"outputs in {job.outputs.dir}/<party>/{run_id} (and <party>/latest)")  # type: ignore[attr-defined]
    return "; ".join(parts)


def launch_script(
    script: list[str],
    *,
    parties: list[str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    provider: str = providers.DEFAULT,
    device: str = "cpu",
    sink: IO[str] | None = None,
    debug: bool = False,
) -> int:
    """Runs ``python SCRIPT ...`` once per party, plus the provider's dealer if it has one, on this machine.

    Each copy finds its role in the environment (:func:`mpcfl.launch.env.to_env`)
    and joins with :func:`mpcfl.join`.

    Returns:
        0 when every process succeeded, 1 otherwise.
    """
    sink = sink or sys.stdout

    def children() -> list[Child]:
        started = []
        for name in _dealer_first(session.process_names):
            command = _mpcfl("dealer") if name == providers.DEALER else [sys.executable, *script]
            started.append(_spawn(name, command, sink=sink, secret=secret, env=to_env(session, name), debug=debug))
        return started

    secret = _local_secret()
    with local_rendezvous() as rendezvous:
        session = script_session(
            tuple(parties), rendezvous=rendezvous, timeout_s=timeout_s, provider=provider, device=device,
            credentials=Credentials(secret=secret.encode()),
        )
        return _run(children, sink=sink, settle=_settle_s(timeout_s))
