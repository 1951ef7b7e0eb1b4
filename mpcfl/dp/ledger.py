"""A data owner's privacy ledger for one dataset, across runs, jobs and resumes.

The budget belongs to the data, not the run. Each party keeps, in a folder it controls
(``$MPCFL_LEDGER_DIR``, default ``~/.mpcfl/ledgers``), one ledger per dataset, named by a digest
of the data as loaded: every DP run on that data charges it, and a run whose charges would take
the dataset past its total is refused. The total is set by the first DP run on the data (that
job's epsilon and delta) and is composed at that delta by that accountant. Starting a fresh
budget is an explicit act (:meth:`DatasetLedger.reset`, ``mpcfl ledger reset``), kept in the file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcfl.dp.accountant import Charge, create_accountant
from mpcfl.errors import MpcflError
from mpcfl.outputs import write_json
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

    @classmethod
    def open(cls, dataset: str, *, epsilon: float, delta: float, accountant: str, folder: Path | None = None) -> DatasetLedger:
        """The dataset's ledger; a dataset never charged before starts one with this job's budget as its total.

        Raises:
            MpcflError: the ledger file is unreadable.
        """
        path = (folder or ledger_dir()) / f"{dataset}.json"
        if not path.is_file():
            return cls(path=path, dataset=dataset, epsilon=epsilon, delta=delta, accountant=accountant)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            return cls(path=path, dataset=dataset, epsilon=state["epsilon"], delta=state["delta"],
                       accountant=state["accountant"], runs=state["runs"], resets=state.get("resets", []))
        except (OSError, ValueError, KeyError) as err:
            raise MpcflError(f"{path}: unreadable privacy ledger: {err}") from None

    def spent(self, *, without: str | None = None, extra: list[Charge] | None = None) -> float:
        """Epsilon at the ledger's delta of every run's charges but ``without``'s, plus ``extra``."""
        accountant = create_accountant(self.accountant, epsilon=self.epsilon)  # the grid the runs' budgets use
        for run_id, run in self.runs.items():
            if run_id != without:
                for charge in run["charges"]:
                    accountant.compose(Charge(**charge))
        return accountant.epsilon(self.delta, extra=extra) if accountant.history or extra else 0.0

    def _refusal(self, who: str, earlier: float, asked: float) -> str:
        return (
            f"{who}: dataset {self.dataset[:16]} ({self.path}): earlier runs spent epsilon {earlier:.4g} of its "
            f"total {self.epsilon:g} (delta {self.delta:g}), and this run asks {asked:.4g}; refused before anything "
            "is revealed (`mpcfl ledger show` lists the charges; only `mpcfl ledger reset` starts a fresh budget)"
        )

    def check_run(self, run_id: str, asked: float, *, who: str) -> None:
        """Refuses, before anything is shared, a run whose whole budget does not fit beside the earlier runs'.

        Raises:
            LedgerExhausted: the earlier runs' epsilon plus ``asked`` exceeds the total.
        """
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

    def record(self, run_id: str, *, job: str, party: str, charges: list[Charge]) -> None:
        """Writes this run's charges so far (replacing what it recorded before), atomically."""
        self.runs[run_id] = {"job": job, "party": party, "charges": [c.as_dict() for c in charges], "updated": utc_now()}
        self.save()

    def reset(self, reason: str) -> None:
        """Starts a fresh budget: the charges so far are kept in the file, under ``resets``."""
        self.resets.append({"at": utc_now(), "reason": reason, "spent": self.spent(), "runs": self.runs})
        self.runs = {}
        self.save()
        log.warning("privacy ledger of dataset %s reset: %s", self.dataset[:16], reason)

    def bind(self, run_id: str, *, job: str, party: str) -> Binding:
        return Binding(self, run_id, job, party)

    def save(self) -> None:
        write_json(self.path, {
            "dataset": self.dataset, "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
            "spent": self.spent(), "runs": self.runs, "resets": self.resets,
        })


@dataclass(frozen=True)
class Binding:
    """One run's place in a dataset's ledger: what a :class:`~mpcfl.dp.budget.Budget` charges through."""

    ledger: DatasetLedger
    run_id: str
    job: str
    party: str

    def check(self, charges: list[Charge], charge: Charge) -> None:
        self.ledger.check_charge(self.run_id, charges, charge, who=f"party {self.party}")

    def record(self, charges: list[Charge]) -> None:
        self.ledger.record(self.run_id, job=self.job, party=self.party, charges=charges)
