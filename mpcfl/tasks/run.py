"""A run's start at every party: the parties agree on one run id, commit to their inputs, and bind
the job to the run's folders (the files are :mod:`mpcfl.runs`).

At the start of every run, right after authentication and before anything is shared:

1. each party proposes a run id: a fresh run takes party 0's proposal (the local launcher gives
   every party the same); a resume (``--resume [RUN_ID]``) needs every party to name the same
   unfinished run, with the job's fingerprint, and refuses a finished one;
2. each party commits to its inputs as it loaded them (the parsed rows, not the files, which could
   change after they were hashed): a salted digest, announced to the others as an opaque value. On
   resume a party recomputes it with its kept salt and refuses, naming the part, if its data
   changed; every party also checks the others' announcements against those it recorded when the
   run began, and refuses naming the party whose inputs changed;
3. each party holds a lock on its run folder while it runs, so a run is never run twice at once.

Both exchanges are agreed steps (:func:`mpcfl.mpc.session.agreed_public`): a party that refuses
stops every other at once, never at the timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from mpcfl import runs
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import JobBase
from mpcfl.mpc.reveal import Disclosure
from mpcfl.mpc.session import agreed, agreed_public
from mpcfl.mpc.wire import from_words, to_words
from mpcfl.dp.budget import Budget

log = logging.getLogger(__name__)

_WORDS = runs.ID_BYTES // 8  # a run id, and a commitment (a sha256), each as four int64 words


@dataclass
class PartyRun:
    """This party's side of one run: the job bound to the run's folder, and the run's files."""

    job: JobBase
    run: runs.Run
    inputs: str  # every party's commitment, combined: the inputs the run's openings are made from
    resumed: bool
    lock: IO[bytes] = field(repr=False)  # held while this process runs the run

    def disclosure(self, budget: Budget | None) -> Disclosure:
        """The run's disclosure: its reveals are journaled, and on a resume checked by every party."""
        return Disclosure(budget, journal=self.run.journal(check=self.resumed), inputs=self.inputs)

    @contextlib.contextmanager
    def recorded(self) -> Iterator[None]:
        """Marks the run failed (or stopped) if the block raises; the caller marks it finished."""
        try:
            yield
        except KeyboardInterrupt:
            self.run.end(runs.STOPPED, "Ctrl-C or SIGTERM")
            raise
        except BaseException as err:
            self.run.end(runs.FAILED, str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise


def run_words(text: str) -> list[int]:
    """A run id as the small public integers :func:`mpcfl.mpc.session.agreed_public` exchanges."""
    return to_words(text.encode().ljust(runs.ID_BYTES, b"\0")).tolist()


def _bytes(words: list[int]) -> bytes:
    import torch

    return from_words(torch.tensor(words, dtype=torch.long))


def words_text(words: list[int]) -> str:
    """The run id :func:`run_words` sent."""
    return _bytes(words[:_WORDS]).rstrip(b"\0").decode(errors="replace")


def _chosen(job: JobBase, party: str, resume: str | bool) -> str:
    """The run this party proposes to resume: the one named, else its newest unfinished run."""
    root = job.party_root(party)
    if isinstance(resume, str):
        return runs.check_run_id(resume, where="--resume")
    chosen = runs.newest_unfinished(root, job.name)
    if chosen is None:
        raise MpcflError(f"party {party}: {root}: no unfinished run of job {job.name} to resume (see `mpcfl runs`)")
    return chosen


def _refuse_changed_inputs(job: JobBase, party: str, run_id: str, kept: dict[str, str], now: dict[str, str]) -> None:
    """Refuses, naming each part, if this party's digests ``now`` (with its kept salt) differ from those ``kept``."""
    changed = [key for key in sorted(set(now) | set(kept)) if now.get(key) != kept.get(key)]
    if changed:
        raise MpcflError(
            f"party {party}: its {', '.join(changed)} in {job.source} differ from what it committed to when run "
            f"{run_id} began; a resume must use the same inputs (start a new run for new data)"
        )


def _refuse_changed_commitments(party: str, run_id: str, recorded: dict[str, str], announced: dict[str, str]) -> None:
    """Refuses, naming the parties, if what the others announce now is not what they announced when the run began."""
    changed = [name for name, value in announced.items() if recorded.get(name) != value]
    if changed:
        raise MpcflError(
            f"party {party}: run {run_id}: the inputs of {', '.join(changed)} differ from those committed to "
            "when the run began; refusing to resume"
        )


def _reopen(
    job: JobBase, party: str, run_id: str, contents: Mapping[str, bytes]
) -> tuple[dict[str, Any], bytes, dict[str, str], IO[bytes]]:
    """This party's record of ``run_id``, checked for a resume (unfinished, not running elsewhere, same
    job, same inputs), its salt, the digests of its inputs now, and the run's lock.

    Raises:
        MpcflError: no such run here, it finished or is running, its job differs, or this party's inputs changed.
    """
    run = runs.Run(job.party_root(party), run_id)
    try:
        record = run.read()
        lock = run.lock()
    except MpcflError as err:
        raise MpcflError(f"party {party}: {err}") from None
    runs.refuse_finished(record, who=f"party {party}")
    if record.get("fingerprint") != job.fingerprint():
        raise MpcflError(
            f"party {party}: run {run_id} was started with a different configuration of job {record.get('job')!r}; "
            "refusing to resume it (start a new run)"
        )
    inputs = record.get("inputs", {})
    salt = bytes.fromhex(inputs.get("salt", ""))
    now = runs.commit_contents(contents, salt)
    _refuse_changed_inputs(job, party, run_id, inputs.get("files", {}), now)
    return record, salt, now, lock


def begin_run(
    job: JobBase, party: str, contents: Mapping[str, bytes], *, resume: str | bool = False, run_id: str | None = None
) -> PartyRun:
    """Agrees on the run with the other parties and opens this party's side of it; every party calls it
    once its inputs are loaded, before anything is shared.

    Args:
        contents: what this party's run is made from, by the job key naming each part, as loaded
            (:func:`mpcfl.data.party.contents`): committed to, so that a resume with other inputs is refused.
        resume: ``False`` for a new run; ``True`` for this party's newest unfinished run; or a run id.
        run_id: a new run's id as proposed to this party (party 0's proposal is the run's).

    Raises:
        MpcflError: this party cannot start or resume the run (the message says why).
        PeerFailure: another party cannot (its own process says why).
    """
    names = job.party_names
    root = job.party_root(party)

    Proposal = tuple[str, dict[str, Any] | None, bytes, dict[str, str], IO[bytes] | None]

    def propose() -> Proposal:
        if resume:
            chosen = _chosen(job, party, resume)
            return (chosen, *_reopen(job, party, chosen, contents))
        salt = secrets.token_bytes(32)
        return run_id or runs.new_run_id(), None, salt, runs.commit_contents(contents, salt), None

    def public(proposal: Proposal) -> list[int]:
        chosen, _, salt, digests, _ = proposal
        return run_words(chosen) + to_words(bytes.fromhex(runs.commitment(salt, digests))).tolist()

    (chosen, record, salt, digests, lock), everyone = agreed_public("run start", names, propose, public, width=2 * _WORDS)
    ids = [words_text(row) for row in everyone]
    announced = {name: _bytes(row[_WORDS:]).hex() for name, row in zip(names, everyone)}
    if resume and len(set(ids)) > 1:
        held = "; ".join(f"{name} {run}" for name, run in zip(names, ids))
        raise MpcflError(f"cannot resume job {job.name}: the parties name different runs ({held}); pass --resume RUN_ID")
    chosen = ids[0]
    inputs = hashlib.sha256("".join(announced[name] for name in names).encode()).hexdigest()
    if record is not None:
        recorded = record.get("commitments", {})
        agreed("input commitments", names, lambda: _refuse_changed_commitments(party, chosen, recorded, announced))
        run = runs.Run(root, chosen)
        runs.resumed(run)
        log.info("resuming run %s", chosen)
    else:
        run = agreed("run folder", names, lambda: runs.start(root, chosen, {
            "job": job.name, "party": party, "fingerprint": job.fingerprint(),
            "inputs": {"salt": salt.hex(), "files": digests, "commitment": announced[party]},
            "commitments": announced,
        }))
        lock = run.lock()  # a fresh folder: nobody else holds it
        log.info("run %s", chosen)
    return PartyRun(job=job.bound_to(chosen), run=run, inputs=inputs, resumed=record is not None, lock=lock)

