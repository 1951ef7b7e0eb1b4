"""One party's federated job: join, load and prepare its own rows, then rounds of local training
whose updates are averaged under MPC; only each round's average is revealed, to every party.

The unit of a round, at every party in the same order:

1. load the global weights (public: every party computed them from the revealed averages);
2. train locally in plain PyTorch for ``local_epochs`` on its own rows (FedProx adds its term);
3. its update, ``local - global``: checked against the fixed-point bound (or clipped, with DP);
4. a public flag per party says whose update is usable; a party whose local round failed stops the
   job (naming it), or, with ``allow_dropouts``, sits the round out (it shares zeros and weight 0);
5. the average under MPC (:mod:`mpcfl.tasks.federated.aggregate`), revealed to every party;
6. the strategy applies it identically everywhere; a checkpoint records the round.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpcfl.data.files import DataError
from mpcfl.data.party import (
    PartyData, apply_scaler, check_range, check_scaling_covers, columns_hash, load_party_data, scale_publicly,
)
from mpcfl.dp.accountant import Charge, calibrate_noise_multiplier, replace_one
from mpcfl.errors import MpcflError, PeerFailure
from mpcfl.jobs.schema import FederatedJob
from mpcfl.jobs.session import session_of
from mpcfl.models.heads import head_of
from mpcfl.mpc.reveal import Disclosure, Privacy, budget_state
from mpcfl.mpc.session import agreed, all_gather_public, communication_stats, party_session, session_device
from mpcfl.outputs import write_json, write_torch
from mpcfl.tasks.federated import aggregate, checkpoint
from mpcfl.tasks.federated.local import Rows, evaluate, flat, initial_model, load_flat, local_update
from mpcfl.tasks.federated.strategies import strategy_of
from mpcfl.tasks.train.checkpoint import common_epoch
from mpcfl.tasks.train.runner import privacy_budget

log = logging.getLogger(__name__)


class _Round:
    """What a party needs for the averages: its rank, the session's size and device, the public bound B."""

    def __init__(self, job: FederatedJob, rank: int, device: torch.device) -> None:
        self.job, self.rank, self.device = job, rank, device
        self.world = job.world_size
        self.bound = aggregate.count_bound(job.world_size, job.federated.max_rows)

    def average(self, values: np.ndarray | torch.Tensor, rows: int, what: str, *, who: str) -> torch.Tensor:
        """The row-weighted average over the parties, checked against the fixed-point bound first."""
        values = torch.as_tensor(values, dtype=torch.float64)
        agreed(what, self.job.party_names, lambda: aggregate.check_update(values, bound=aggregate.MAX_AVERAGED, who=who, what=what))
        return aggregate.weighted_average(
            values, rows, bound=self.bound, rank=self.rank, world=self.world, device=self.device, what=what
        )


    def of_updates(
        self, update: torch.Tensor, rows: int, *, parties: int, privacy: _Privacy | None, round_index: int
    ) -> torch.Tensor:
        """A round's average update: row-weighted, or with DP the noisy plain mean of ``parties`` clipped updates."""
        what = f"round {round_index} average update"
        where = {"rank": self.rank, "world": self.world, "device": self.device, "what": what}
        if privacy is None:
            return aggregate.weighted_average(update, rows, bound=self.bound, **where)
        return aggregate.noisy_mean(update, parties, privacy=privacy.of_round(parties), **where)


def _load(job: FederatedJob, party: str) -> PartyData:
    """This party's files, with its row count checked against the public bound ``federated.max_rows``."""
    data = load_party_data(job, party)
    rows = data.train.x.shape[0]
    if rows > job.federated.max_rows:
        raise DataError(
            f"party {party}: {data.train.path}: {rows} training rows, beyond federated.max_rows="
            f"{job.federated.max_rows} in {job.source}; raise it (the average's divisor is scaled by it)"
        )
    return data


def _check_columns(job: FederatedJob, data: PartyData) -> int:
    """Checks that every party holds the same columns (public in a horizontal split); returns their number."""
    test = 0 if data.test is None else 1
    everyone = all_gather_public([data.train.x.shape[1], columns_hash(data.train.columns), test])
    for r, other in enumerate(everyone):
        if other != everyone[0]:
            what = "test files" if other[:2] == everyone[0][:2] else "columns"
            raise DataError(
                f"party {job.party_names[r]}: its {what} differ from party {job.party_names[0]}'s; a federated "
                "job needs the same columns (and test files at all parties or none) at every party"
            )
    return everyone[0][0]


def _standardize(job: FederatedJob, data: PartyData, rounds: _Round, party: str) -> None:
    """Column means and standard deviations over every party's rows, as row-weighted averages under
    MPC; only those statistics are revealed.

    The variance is averaged in units of the mean absolute deviation (c), so a wide column's squared
    deviations stay within the averaging bound: var = c^2 * mean(((x - mean) / c)^2).
    """
    x, rows = data.train.x, data.train.x.shape[0]
    who = f"party {party}: {data.train.path}"
    mean = rounds.average(x.mean(axis=0), rows, "column means for standardisation", who=who).numpy()
    spread = rounds.average(np.abs(x - mean).mean(axis=0), rows, "column mean deviations for standardisation", who=who)
    unit = np.where(spread.numpy() > 0, spread.numpy(), 1.0)
    scaled = rounds.average((((x - mean) / unit) ** 2).mean(axis=0), rows, "column variances for standardisation", who=who)
    apply_scaler(data, mean, unit * np.sqrt(np.clip(scaled.numpy(), 0.0, None)))


def _prepare(job: FederatedJob, data: PartyData, rounds: _Round, party: str) -> int:
    """Scales this party's rows (jointly, by public constants, or not at all) and range-checks them."""
    n_features = _check_columns(job, data)
    if job.data.standardize:
        _standardize(job, data, rounds, party)
    elif job.data.scaling is not None:
        agreed("scaling", job.party_names, lambda: scale_publicly(data, job.data.scaling, job.source))
        check_scaling_covers(job.data.scaling, n_features, job.source)
    agreed("range check", job.party_names, lambda: check_range(data, job.data.max_abs))
    return n_features


class _Privacy:
    """Client-level DP: the clip, the noise multiplier and each round's charge."""

    def __init__(self, job: FederatedJob) -> None:
        dp = job.dp
        assert dp is not None
        self.clip, self.colluders = dp.clip, job.colluders
        self.sensitivity = replace_one(dp.clip)  # one party's clipped update replaced by any other
        self.noise_multiplier = dp.noise_multiplier or calibrate_noise_multiplier(
            epsilon=dp.epsilon, delta=dp.delta, count=job.federated.rounds, accountant=dp.accountant
        )

    def of_round(self, parties: int) -> Privacy:
        """The noise on the mean of ``parties`` clipped updates, and its charge."""
        scale = self.noise_multiplier * self.sensitivity / parties
        return Privacy(charge=Charge("gaussian", self.noise_multiplier), scale=scale, colluders=self.colluders)

    def notes(self) -> dict[str, Any]:
        return {
            "unit": "one party's whole data (client-level); each record is covered by it",
            "clip": self.clip, "sensitivity": self.sensitivity, "noise_multiplier": self.noise_multiplier,
            "mechanism": "joint Skellam noise on the mean of the clipped updates, under MPC, before each reveal",
        }


def _resume_point(job: FederatedJob, party: str, rank: int, budget: Any) -> checkpoint.RoundCheckpoint:
    """The newest round every party holds; under DP, only if the ledger on disk extends its ledger."""
    done = common_epoch(job, checkpoint.available_rounds(job, party))
    start = checkpoint.load(job, party, rank, done)
    if budget is not None and (start.privacy is None or not budget.extends(start.privacy)):
        raise MpcflError(
            f"party {party}: {budget.path}: does not extend the privacy ledger of the round {done} checkpoint; "
            "refusing to resume"
        )
    log.info("resuming after round %d", done)
    return start


def _who_takes_part(job: FederatedJob, error: MpcflError | None, round_index: int) -> list[int]:
    """Exchanges whose local round succeeded; returns the ranks that take part.

    Raises:
        MpcflError: this party failed and dropouts are not allowed, or too few parties are left.
        PeerFailure: another party failed and dropouts are not allowed.
    """
    flags = all_gather_public([int(error is None)])
    live = [r for r, (ok,) in enumerate(flags) if ok]
    dropped = [job.party_names[r] for r, (ok,) in enumerate(flags) if not ok]
    if not dropped:
        return live
    if not job.federated.allow_dropouts:
        if error is not None:
            raise error
        raise PeerFailure(f"party {', '.join(dropped)} failed its local training in round {round_index}; see its log")
    if len(live) < job.min_parties:
        raise MpcflError(
            f"round {round_index}: only {len(live)} of {job.world_size} parties have an update ({', '.join(dropped)} "
            f"failed), below federated.min_parties={job.min_parties}"
        )
    if error is not None:
        log.warning("%s; this party sits out round %d", error, round_index)
    log.warning("round %d: %s sit(s) out; averaging over %d parties", round_index, ", ".join(dropped), len(live))
    return live


def run_party(
    job: FederatedJob, party: str, *, rendezvous: str | None = None, resume: bool = False, key_file: Path | None = None
) -> None:
    """Runs ``party``'s side of the federated job to the end.

    Raises:
        MpcflError: bad data or checkpoints, a failed round, a refused reveal, or a peer failure.
    """
    spec = job.federated
    with party_session(session_of(job, rendezvous=rendezvous, key_file=key_file), party) as rank:
        budget = agreed("privacy ledger", job.party_names, lambda: privacy_budget(job, party, resume=resume))
        privacy = None if job.dp is None else _Privacy(job)
        if budget is not None and privacy is not None:
            budget.notes.update(privacy.notes())
        with Disclosure(budget) as disclosure:
            start = None
            if resume:
                start = agreed("checkpoint loading", job.party_names, lambda: _resume_point(job, party, rank, budget))
            data = agreed("data loading", job.party_names, lambda: _load(job, party))
            rounds = _Round(job, rank, session_device())
            n_features = _prepare(job, data, rounds, party)
            head = head_of(job.model)
            train_rows = Rows.of(data.train, head)
            test_rows = None if data.test is None else Rows.of(data.test, head)
            model = initial_model(job, n_features)
            strategy = strategy_of(spec.strategy)
            weights, history = flat(model), []
            if start is not None:
                weights, history = start.weights, start.history
                strategy.load_state_dict(start.strategy)
            for round_index in range(len(history) + 1, spec.rounds + 1):
                began, sent = time.perf_counter(), communication_stats()["bytes"]
                who = f"party {party}: round {round_index}"
                error, update, loss = None, torch.zeros_like(weights), float("nan")
                try:
                    update, loss = local_update(
                        job, model, train_rows, head, strategy, weights=weights, round_index=round_index,
                        rank=rank, clip=None if privacy is None else privacy.clip, bound=aggregate.MAX_AVERAGED, who=who,
                    )
                except MpcflError as err:
                    error = err
                live = _who_takes_part(job, error, round_index)
                rows = train_rows.x.shape[0] if rank in live else 0  # a party that sits out shares zeros, weight 0
                average = rounds.of_updates(update, rows, parties=len(live), privacy=privacy, round_index=round_index)
                weights = strategy.apply(weights, average)
                load_flat(model, weights)
                record: dict[str, Any] = {"round": round_index, "parties": len(live), "local_loss": loss}
                record["train_loss"], record["train_accuracy"] = evaluate(model, train_rows, head)
                if test_rows is not None:
                    record["test_loss"], record["test_accuracy"] = evaluate(model, test_rows, head)
                if budget is not None:
                    record["epsilon"] = budget.spent()
                record["seconds"] = time.perf_counter() - began
                record["bytes_sent"] = communication_stats()["bytes"] - sent
                history.append(record)
                checkpoint.save(job, party, rank, checkpoint.RoundCheckpoint(
                    round=round_index, weights=weights, strategy=strategy.state_dict(), history=history,
                    privacy=budget_state(),
                ))
                # Logged once saved: a round in the log is a round a resume can start after.
                log.info("round %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        totals = communication_stats()
    _write_outputs(job, party, data, model, n_features, history, totals, disclosure)


def _write_outputs(
    job: FederatedJob, party: str, data: PartyData, model: torch.nn.Module, n_features: int,
    history: list[dict[str, Any]], totals: dict[str, float], disclosure: Disclosure,
) -> None:
    out = job.party_dir(party)
    if data.scaler:
        write_json(out / "scaler.json", data.scaler)
    if job.outputs.model_to == "all" or party in job.outputs.model_to:
        write_torch(out / "model.pt", model.state_dict())
        write_json(out / "model.json", {"model": job.model.model_dump(), "n_features": n_features})
        log.info("saved the federated model to %s", out / "model.pt")
    write_json(out / "metrics.json", {
        "job": job.name, "party": party, "history": history, "final": history[-1] if history else {},
        "communication": totals, "reveals": disclosure.ledger(),
    })
    if disclosure.budget is not None:
        disclosure.budget.persist()
