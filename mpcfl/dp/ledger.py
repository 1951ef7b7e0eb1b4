"""A data owner's privacy ledger for each of its data files, across runs, jobs and resumes.

The budget belongs to the data, not the run. Each party keeps, in a folder it controls
(``$MPCFL_LEDGER_DIR``, default ``~/.mpcfl/ledgers``, made owner-only), one ledger per data file,
named by the file's rows (:func:`mpcfl.data.files.rows_key`: whatever their order, format or a job's
view of them). Every DP run charges the ledger of every file it reads, and a charge that would take
any of them past its total is refused before anything is revealed. The total is set by the first DP
run that charges the file (that job's epsilon and delta) and is composed at that delta by that
accountant; a run refused before its first charge (a bad delta, a typo found at run time) writes
nothing, and after a reset the next run that charges sets the total again.

A run's charges are kept under its run id. A new run may not take an id a ledger has seen (its
charges would replace the earlier run's): only a resume continues one. Every check and write rereads
the ledger under an exclusive lock, so runs at the same time compose with each other rather than the
last writer's view winning. Starting a fresh budget is an explicit act (:meth:`DatasetLedger.reset`,
``mpcfl ledger reset``), kept in the file. A run that releases from a file with a ledger without DP
(a training job without ``dp``, a prediction of its rows) is noted in it too (:func:`note_outside_dp`):
no budget covers what it released.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcfl.dp.accountant import Charge, create_accountant
from mpcfl.errors import MpcflError
from mpcfl.outputs import lock_file, write_json
from mpcfl.runs import utc_now

log = logging.getLogger(__name__)

ENV_DIR = "MPCFL_LEDGER_DIR"


class LedgerExhausted(MpcflError):
    """A run would take a dataset past its owner's total privacy budget; nothing was revealed."""


def ledger_dir() -> Path:
    """Where this process keeps its datasets' ledgers."""
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".mpcfl" / "ledgers")


@dataclass
class DatasetLedger:
    """Every charge made to one dataset, by run; the dataset's total (epsilon, delta) and accountant."""

    path: Path
    dataset: str
    epsilon: float
    delta: float
    accountant: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> job, party, charges, updated
    resets: list[dict[str, Any]] = field(default_factory=list)
    outside_dp: list[dict[str, Any]] = field(default_factory=list)  # runs that released from the file without DP
    asked: tuple[float, float, str] | None = None  # this run's budget: the total while nothing is charged

    @classmethod
    def open(cls, dataset: str, *, epsilon: float, delta: float, accountant: str, folder: Path | None = None) -> DatasetLedger:
        """The dataset's ledger; one with no charge (never charged, or reset since) takes this job's budget as its total.

        Raises:
            MpcflError: the ledger file is unreadable.
        """
        ledger = cls(path=(folder or ledger_dir()) / f"{dataset}.json", dataset=dataset, epsilon=epsilon, delta=delta,
                     accountant=accountant, asked=(epsilon, delta, accountant))
        ledger._reload()
        return ledger

    def _reload(self) -> None:
        """The ledger as its file has it now (another run may have charged since this one read it)."""
        if not self.path.is_file():
            self.runs, self.resets, self.outside_dp = {}, [], []
            return
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            self.runs, self.resets, self.outside_dp = state["runs"], state.get("resets", []), state.get("outside_dp", [])
            total = (state["epsilon"], state["delta"], state["accountant"])
            charged = any(run["charges"] for run in self.runs.values())
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MpcflError(f"{self.path}: unreadable privacy ledger: {err}") from None
        self.epsilon, self.delta, self.accountant = total if charged or self.asked is None else self.asked

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the ledger's lock (a ``.lock`` file beside it) with the ledger reread inside."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:  # the file names are digests of the data: a listing confirms a guess
            log.warning("privacy ledger folder %s was readable by others; made owner-only", folder)
            folder.chmod(0o700)
        with lock_file(self.path.with_suffix(".lock")) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._reload()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def spent(self, *, without: str | None = None, extra: list[Charge] | None = None) -> float:
        """Epsilon at the ledger's delta of every run's charges but ``without``'s, plus ``extra``."""
        accountant = create_accountant(self.accountant, epsilon=self.epsilon)  # the grid the runs' budgets use
        for run_id, run in self.runs.items():
            if run_id != without:
                for charge in run["charges"]:
                    accountant.compose(Charge(**charge))
        return accountant.epsilon(self.delta, extra=extra) if accountant.history or extra else 0.0

    def seen(self, run_id: str) -> bool:
        """Whether a run of this id charged the ledger, before a reset or since."""
        return run_id in self.runs or any(run_id in reset["runs"] for reset in self.resets)

    def _where(self, who: str) -> str:
        return f"{who}: dataset {self.dataset[:16]} ({self.path})"

    def _refusal(self, who: str, earlier: float, asked: float) -> str:
        return (
            f"{self._where(who)}: earlier runs spent epsilon {earlier:.4g} of its "
            f"total {self.epsilon:g} (delta {self.delta:g}), and this run asks {asked:.4g}; refused before anything "
            "is revealed (`mpcfl ledger show` lists the charges; only `mpcfl ledger reset` starts a fresh budget)"
        )

    def check_run(self, run_id: str, asked: float, *, who: str, new: bool) -> None:
        """Refuses, before anything is shared, a new run under an id the ledger has seen, and a run
        whose whole budget does not fit beside the earlier runs'. Call it holding :meth:`locked`.

        Raises:
            MpcflError: a new run under a seen id.
            LedgerExhausted: the earlier runs' epsilon plus ``asked`` exceeds the total.
        """
        if new and self.seen(run_id):
            raise MpcflError(
                f"{self._where(who)}: run id {run_id} has charged this dataset before; a new run takes a new id "
                "(only a resume continues a run's charges)"
            )
        earlier = self.spent(without=run_id)
        if earlier + asked > self.epsilon * (1 + 1e-9):
            raise LedgerExhausted(self._refusal(who, earlier, asked))

    def check_charge(self, run_id: str, charges: list[Charge], charge: Charge, *, who: str) -> None:
        """Refuses a charge that, composed with every earlier run's and this run's ``charges``, exceeds the total.

        Raises:
            LedgerExhausted: it would.
        """
        after = self.spent(without=run_id, extra=[*charges, charge])
        if after > self.epsilon * (1 + 1e-9):
            raise LedgerExhausted(self._refusal(who, self.spent(without=run_id), after - self.spent(without=run_id)))

    def put(self, run_id: str, *, job: str, party: str, charges: list[Charge]) -> None:
        """Writes this run's charges so far (replacing what it wrote before), atomically. Call it holding :meth:`locked`."""
        self.runs[run_id] = {"job": job, "party": party, "charges": [c.as_dict() for c in charges], "updated": utc_now()}
        self.save()

    def reset(self, reason: str) -> None:
        """Starts a fresh budget: the charges so far are kept in the file, under ``resets``."""
        with self.locked():
            self.resets.append({"at": utc_now(), "reason": reason, "spent": self.spent(), "runs": self.runs})
            self.runs = {}
            self.save()
        log.warning("privacy ledger of dataset %s reset: %s", self.dataset[:16], reason)

    def save(self) -> None:
        write_json(self.path, {
            "dataset": self.dataset, "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
            "spent": self.spent(), "runs": self.runs, "resets": self.resets, "outside_dp": self.outside_dp,
        })


@contextlib.contextmanager
def _all_locked(ledgers: tuple[DatasetLedger, ...]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for ledger in sorted(ledgers, key=lambda ledger: str(ledger.path)):  # one order: no two runs deadlock
            stack.enter_context(ledger.locked())
        yield


def open_ledgers(datasets: list[str], *, epsilon: float, delta: float, accountant: str, legacy: str | None = None,
                 folder: Path | None = None) -> tuple[DatasetLedger, ...]:
    """The ledgers of a party's data files (:func:`mpcfl.data.files.rows_key` each).

    ``legacy`` names the ledger an earlier mpcfl kept for one job's view of the files (a digest of the
    rows as that job loaded them). Its runs are carried into each file's ledger, once, under the
    locks, each as ``legacy:<run id>`` (so no later run's id can replace them), and a file's ledger
    that did not exist yet takes its total; the old file is renamed ``.migrated``. Upgrading never
    starts a fresh budget by the way.
    """
    ledgers = tuple(DatasetLedger.open(d, epsilon=epsilon, delta=delta, accountant=accountant, folder=folder)
                    for d in dict.fromkeys(datasets))
    old = (folder or ledger_dir()) / f"{legacy}.json" if legacy else None
    if old is None or not old.is_file():
        return ledgers
    with _all_locked(ledgers):
        if not old.is_file():  # another process carried it over while this one waited for the locks
            return ledgers
        earlier = DatasetLedger.open(legacy, epsilon=epsilon, delta=delta, accountant=accountant, folder=folder)
        for ledger in ledgers:
            if not ledger.path.is_file():  # the data's total is the one its owner set before the upgrade
                ledger.epsilon, ledger.delta, ledger.accountant = earlier.epsilon, earlier.delta, earlier.accountant
            ledger.runs = {**{f"legacy:{run_id}": run for run_id, run in earlier.runs.items()}, **ledger.runs}
            ledger.resets = [*earlier.resets, *ledger.resets]
            ledger.save()
        old.rename(old.with_name(old.name + ".migrated"))
    log.warning("privacy ledger %s carried into the ledgers of each data file (%s)", old,
                ", ".join(ledger.dataset[:16] for ledger in ledgers))
    return ledgers


def any_ledger(folder: Path | None = None) -> bool:
    """Whether this process keeps any privacy ledger (else no data file of it was used under DP)."""
    folder = folder or ledger_dir()
    return folder.is_dir() and any(folder.glob("*.json"))


def note_outside_dp(datasets: list[str], run_id: str, *, job: str, party: str, what: str,
                    folder: Path | None = None) -> list[DatasetLedger]:
    """Notes, in each of these files' ledgers that exists, that run ``run_id`` releases ``what`` from the
    file without DP (once a run); a file never used under DP gets no ledger. Returns the ledgers noted.

    The run is not refused: the data owner chose a job without DP. Its releases are outside every
    budget the ledger keeps, and ``mpcfl ledger show`` says so.
    """
    noted = []
    for dataset in dict.fromkeys(datasets):
        ledger = DatasetLedger((folder or ledger_dir()) / f"{dataset}.json", dataset, 0.0, 0.0, "rdp")
        if not ledger.path.is_file():
            continue
        with ledger.locked():
            if not any(entry["run"] == run_id for entry in ledger.outside_dp):
                ledger.outside_dp.append({"run": run_id, "job": job, "party": party, "what": what, "at": utc_now()})
                ledger.save()
        noted.append(ledger)
    return noted


@dataclass(frozen=True)
class Binding:
    """One run's place in its data files' ledgers: what a :class:`~mpcfl.dp.budget.Budget` charges through."""

    ledgers: tuple[DatasetLedger, ...]
    run_id: str
    job: str
    party: str

    @classmethod
    def begin(cls, ledgers: tuple[DatasetLedger, ...], run_id: str, *, job: str, party: str, asked: float,
              new: bool) -> Binding:
        """Checks the run against every ledger (:meth:`DatasetLedger.check_run`), under the ledgers'
        locks. It writes nothing: the run enters a ledger with its first charge, so a run refused
        before that (a bad delta, a missing column) leaves no trace and sets no total.

        Raises:
            MpcflError: a new run under an id a ledger has seen.
            LedgerExhausted: a ledger has less than ``asked`` left.
        """
        with _all_locked(ledgers):
            for ledger in ledgers:
                ledger.check_run(run_id, asked, who=f"party {party}", new=new)
        return cls(ledgers, run_id, job, party)

    def charge(self, charges: list[Charge], charge: Charge) -> None:
        """Checks ``charge`` after ``charges`` against every ledger, then records both in each, under their locks.

        Raises:
            LedgerExhausted: a ledger would pass its total; nothing was recorded.
        """
        with _all_locked(self.ledgers):
            for ledger in self.ledgers:
                ledger.check_charge(self.run_id, charges, charge, who=f"party {self.party}")
            for ledger in self.ledgers:
                ledger.put(self.run_id, job=self.job, party=self.party, charges=[*charges, charge])

    def record(self, charges: list[Charge]) -> None:
        """Writes the run's charges so far into every ledger (none yet: nothing to write)."""
        if not charges:
            return
        with _all_locked(self.ledgers):
            for ledger in self.ledgers:
                ledger.put(self.run_id, job=self.job, party=self.party, charges=charges)
