"""Runs: every ``mpcfl run`` of a job is an identity, with its own folder at each party.

A party's outputs for one run go to ``<outputs.dir>/<party>/<run-id>/``:

- ``run.json``: the run's record at this party: status (``running``, ``finished``, ``failed``,
  ``stopped``), start and end times, the job's fingerprint, this party's commitment to its inputs
  (with the salt and per-file digests that only this party keeps) and every party's announced
  commitment, and the headline metrics once finished;
- ``openings.jsonl``: the durable history of what left MPC, written before each opening
  (:class:`Journal`);
- the task's files (model, metrics, checkpoints, the privacy ledger).

``<outputs.dir>/<party>/latest`` is a symbolic link to the run that finished last, moved only when a
run finishes, so nothing of an unfinished or failed run is ever presented as the current model.
Earlier runs are never overwritten. This module is pure file handling; agreeing on a run among the
parties is :mod:`mpcfl.tasks.run`.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mpcfl.errors import MpcflError
from mpcfl.outputs import atomic_write, lock_file, write_json

RECORD = "run.json"
JOURNAL = "openings.jsonl"
LATEST = "latest"
RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"
# UTC time to the second, then 48 random bits: ids sort by start time, and two runs started in the
# same second (two users, two launchers) still differ.
_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{12}$")
ID_BYTES = 32  # a run id padded for the wire (mpcfl.tasks.run)


def new_run_id() -> str:
    """A fresh, time-ordered run id, e.g. ``20261203-081502-3fa94c0e12ab``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(6)}"


def is_run_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))


def check_run_id(run_id: str, *, where: str) -> str:
    """Returns ``run_id`` if it is well formed (it names a folder, so nothing else is accepted).

    Raises:
        MpcflError: not a run id.
    """
    if not is_run_id(run_id):
        raise MpcflError(f"{where}: {run_id!r} is not a run id (like 20261203-081502-3fa94c0e12ab)")
    return run_id


def utc_now() -> str:
    """Now, as the records of runs and ledgers write it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def commit_contents(contents: Mapping[str, bytes], salt: bytes) -> dict[str, str]:
    """Salted digests of what a party's run is made from, by the job key that names each part
    (``data.train``: the rows as loaded, not the file, which could change after it was hashed).

    The salt stays with the party, so a digest announced to the others tells them nothing about
    the contents (no dictionary search of a small file), yet the party cannot change them unseen.
    """
    return {key: hashlib.sha256(salt + key.encode() + b"\0" + value).hexdigest() for key, value in sorted(contents.items())}


def commitment(salt: bytes, digests: Mapping[str, str]) -> str:
    """The one value a party announces for its inputs: a digest of its per-file digests."""
    text = json.dumps(sorted(digests.items()))
    return hashlib.sha256(salt + text.encode()).hexdigest()


@dataclass(frozen=True)
class Run:
    """One run's folder at one party."""

    root: Path  # <outputs.dir>/<party>
    run_id: str

    @property
    def dir(self) -> Path:
        return self.root / self.run_id

    @property
    def record_path(self) -> Path:
        return self.dir / RECORD

    def read(self) -> dict[str, Any]:
        """This party's record of the run.

        Raises:
            MpcflError: no such run here, or its record is unreadable.
        """
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MpcflError(f"{self.dir}: no run {self.run_id} here") from None
        except (OSError, ValueError) as err:
            raise MpcflError(f"{self.record_path}: unreadable run record: {err}") from None

    def write(self, record: dict[str, Any]) -> None:
        write_json(self.record_path, record)

    def update(self, **changes: Any) -> dict[str, Any]:
        record = {**self.read(), **changes}
        self.write(record)
        return record

    def finish(self, headline: Mapping[str, Any]) -> None:
        """Marks the run finished and points ``latest`` at it."""
        self.update(status=FINISHED, ended=utc_now(), headline=dict(headline), error=None)
        link = self.root / LATEST
        temporary = self.root / f".{LATEST}.{secrets.token_hex(4)}"
        os.symlink(self.run_id, temporary)  # relative: the outputs folder may move
        os.replace(temporary, link)

    def end(self, status: str, error: str) -> None:
        """Marks an unfinished run failed or stopped, with the one line that says why."""
        record = self.read()
        if record.get("status") == RUNNING:
            self.update(status=status, ended=utc_now(), error=error)

    def journal(self, *, check: bool) -> Journal:
        return Journal(self.dir / JOURNAL, check=check)

    def lock(self) -> IO[bytes]:
        """Holds the run for this process until the returned file is closed (at exit at the latest), so
        two processes never run, or resume, the same run at one party at once.

        Raises:
            MpcflError: another process holds it.
        """
        handle = lock_file(self.dir / ".lock")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise MpcflError(f"{self.dir}: run {self.run_id} is in use by another process (still running?)") from None
        return handle


def refuse_finished(record: Mapping[str, Any], *, who: str) -> None:
    """Refuses to resume a finished run: its outputs are final, and its steps all opened."""
    if record.get("status") == FINISHED:
        raise MpcflError(
            f"{who}: run {record.get('run_id')} finished at {record.get('ended')}; a finished run is never resumed "
            "(start a new run without --resume)"
        )


def start(root: Path, run_id: str, record: dict[str, Any]) -> Run:
    """Creates a new run's folder and record; refuses a run id already used here.

    Raises:
        MpcflError: the run exists.
    """
    run = Run(root, check_run_id(run_id, where=str(root)))
    try:
        run.dir.mkdir(parents=True)
    except FileExistsError:
        raise MpcflError(f"{run.dir}: run {run_id} exists already; a new run never writes into an earlier one") from None
    run.write({"run_id": run_id, "status": RUNNING, "started": utc_now(), "ended": None, "resumed": [],
               "pid": os.getpid(), **record})
    return run


def resumed(run: Run) -> dict[str, Any]:
    """Marks an existing run running again (a resume), keeping its history."""
    record = run.read()
    return run.update(status=RUNNING, ended=None, error=None, pid=os.getpid(),
                      resumed=[*record.get("resumed", []), utc_now()])


def run_ids(root: Path, job: str) -> list[str]:
    """The runs of ``job`` in a party's folder, oldest first (jobs that share an outputs folder keep apart)."""
    if not root.is_dir():
        return []
    found = sorted(p.name for p in root.iterdir() if is_run_id(p.name) and (p / RECORD).is_file())
    return [run_id for run_id in found if Run(root, run_id).read().get("job") == job]


def newest_unfinished(root: Path, job: str) -> str | None:
    """The newest run of ``job`` here that did not finish, if any."""
    for run_id in reversed(run_ids(root, job)):
        if Run(root, run_id).read().get("status") != FINISHED:
            return run_id
    return None


def latest(root: Path, job: str) -> Path:
    """The folder of the run that finished last, which must be one of ``job``'s.

    Raises:
        MpcflError: no run has finished here, the link dangles, or it is another job's run.
    """
    link = root / LATEST
    if link.is_symlink() and not link.is_dir():
        raise MpcflError(f"{link}: points to run {os.readlink(link)}, which was deleted (see `mpcfl runs`)")
    if not link.is_dir():
        raise MpcflError(f"{root}: no finished run yet (see `mpcfl runs`)")
    owner = Run(root, link.resolve().name).read().get("job")
    if owner != job:
        raise MpcflError(f"{link}: the latest run here is one of job {owner}, not of job {job}; give each job its own outputs.dir")
    return link.resolve()


#: The headline figures shown of a run, in this order (``mpcfl runs``, the launcher's summary line).
HEADLINE_KEYS = (
    "epoch", "round", "test_accuracy", "train_accuracy", "accuracy", "test_r2", "test_mae", "r2", "mae", "loss", "test_loss",
    "predictions",
)


def headline_text(headline: Mapping[str, Any]) -> str:
    """A run's headline figures as ``key=value`` words: ``epoch=10 test_accuracy=0.9737 loss=0.0812``."""
    return " ".join(
        f"{key}={headline[key]:.4f}" if isinstance(headline[key], float) else f"{key}={headline[key]}"
        for key in HEADLINE_KEYS if key in headline
    )


def status_of(record: Mapping[str, Any]) -> str:
    """A record's status; a ``running`` one whose process is gone on this host was interrupted."""
    status = record.get("status", "?")
    pid = record.get("pid")
    if status == RUNNING and isinstance(pid, int) and not Path(f"/proc/{pid}").exists():
        return "interrupted"
    return status


@dataclass(frozen=True)
class Opening:
    """One entry of a run's opening history: a value left MPC, toward whom, made from whose inputs."""

    what: str
    to: tuple[str, ...]
    contributors: tuple[str, ...]
    inputs: str  # the run's combined input commitment

    def as_json(self) -> dict[str, Any]:
        return {"what": self.what, "to": list(self.to), "contributors": list(self.contributors), "inputs": self.inputs}


class Journal:
    """A run's durable history of openings at one party, appended (and synced) before each opening.

    A step (an opening's ``what``) may be opened again only from the same contributors toward the
    same receivers on the same committed inputs: that recomputes a value already opened (and under
    DP is charged again). Opened again with other contributors, the two values together would give
    away the difference: one party's contribution.
    """

    def __init__(self, path: Path, *, check: bool) -> None:
        self.path, self.check = path, check
        self.entries: list[Opening] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    item = json.loads(line)
                    self.entries.append(Opening(item["what"], tuple(item["to"]), tuple(item["contributors"]), item["inputs"]))

    def conflict(self, opening: Opening) -> str | None:
        """Why ``opening`` may not happen (a one-line reason), or None."""
        for earlier in self.entries:
            if earlier.what == opening.what and earlier != opening:
                differs = (
                    f"contributors {', '.join(earlier.contributors)} then, {', '.join(opening.contributors)} now"
                    if earlier.contributors != opening.contributors
                    else f"receivers {', '.join(earlier.to)} then, {', '.join(opening.to)} now"
                    if earlier.to != opening.to
                    else "other inputs"
                )
                return (
                    f"{opening.what!r} was already opened in this run with {differs}; opening it again would reveal "
                    "the difference, so the run refuses"
                )
        return None

    def record(self, opening: Opening) -> None:
        """Appends ``opening`` durably; an entry identical to an earlier one is not repeated."""
        if opening in self.entries:
            return
        line = json.dumps(opening.as_json(), sort_keys=True) + "\n"
        # Append by rewriting atomically: a crash never leaves half a line, and the file is
        # small (a few entries per epoch or round).
        text = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        atomic_write(self.path, lambda handle: handle.write(text + line))
        self.entries.append(opening)

