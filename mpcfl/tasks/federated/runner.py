"""One party's federated job: join, load and prepare its own rows, then rounds of local training
whose updates are averaged under MPC; only each round's average is revealed, to every party.

The unit of a round, at every party in the same order:

1. load the global weights (public: every party computed them from the revealed averages);
2. train locally in plain PyTorch for ``local_epochs`` on its own rows (FedProx adds its term);
3. its update, ``local - global``: checked against the fixed-point bound (or clipped, with DP);
4. a public flag per party says whose update is usable; a party whose local round failed stops the
   job (naming it), or, with ``allow_dropouts``, sits the round out (it shares zeros and weight 0);
   with ``allow_dropouts``, a party whose process dies is left behind: the survivors re-form the
   session and redo the round from their kept updates (:meth:`_Training.resynchronise` says when
   they may);
5. the average under MPC (:mod:`mpcfl.tasks.federated.aggregate`), revealed to every party;
6. the strategy applies it identically everywhere; a checkpoint records the round.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpcfl.data.files import DataError
from mpcfl.data.party import (
    PartyData, apply_scaler, check_range, check_scaling_covers, clamp_range, columns_beyond, columns_hash, contents,
    load_party_data, scale_publicly,
)
from mpcfl.dp.accountant import Charge, replace_one
from mpcfl.errors import MpcflError, PeerFailure
from mpcfl.jobs.schema import FederatedJob
from mpcfl.jobs.session import session_of
from mpcfl.models.heads import head_of
from mpcfl.mpc.reveal import Disclosure, Privacy, budget_state
from mpcfl.mpc.session import (
    agreed, all_gather_public, communication_stats, party_session, reformed, session_device,
)
from mpcfl.outputs import plot_history, write_json, write_torch
from mpcfl.tasks.federated import aggregate, checkpoint
from mpcfl.tasks.federated.local import Rows, evaluate, flat, initial_model, load_flat, local_update
from mpcfl.tasks.federated.strategies import strategy_of
from mpcfl.tasks.run import begin_run
from mpcfl.tasks.train.checkpoint import common_epoch, new_attempt
from mpcfl.tasks.train.dp_sgd import check_plausible
from mpcfl.tasks.train.runner import privacy_budget

log = logging.getLogger(__name__)


class _Round:
    """What a party needs for the averages: the session's size and device, the public bound B."""

    def __init__(self, job: FederatedJob, device: torch.device, world: int) -> None:
        self.job, self.device, self.world = job, device, world
        self.bound = aggregate.count_bound(job.world_size, job.federated.max_rows)

    def average(self, values: np.ndarray | torch.Tensor, rows: int, what: str, *, who: str) -> torch.Tensor:
        """The row-weighted average over the parties, checked against the fixed-point bound first."""
        values = torch.as_tensor(values, dtype=torch.float64)
        agreed(what, self.job.party_names, lambda: aggregate.check_update(values, bound=aggregate.MAX_AVERAGED, who=who, what=what))
        return aggregate.weighted_average(
            values, rows, bound=self.bound, world=self.world, device=self.device, what=what,
            prefetch=self.job.runtime.prefetch,
        )


    def of_updates(
        self, update: torch.Tensor, rows: int, *, parties: int, privacy: _Privacy | None, round_index: int
    ) -> torch.Tensor:
        """A round's average update: row-weighted, or with DP the noisy plain mean of ``parties`` clipped updates."""
        what = f"round {round_index} average update"
        where = {"world": self.world, "device": self.device, "what": what}
        if privacy is None:
            return aggregate.weighted_average(update, rows, bound=self.bound, prefetch=self.job.runtime.prefetch, **where)
        return aggregate.noisy_mean(update, parties, privacy=privacy.of_round(parties, self.world), **where)


def _load(job: FederatedJob, party: str) -> PartyData:
    """This party's files, with its row count checked against the public bound ``federated.max_rows``
    where the weighted average needs it (without DP; with DP the mean is over parties, not rows, and a
    refusal would tell every peer something of this party's rows)."""
    data = load_party_data(job, party)
    rows = data.train.x.shape[0]
    if job.dp is None and rows > job.federated.max_rows:
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
    """Scales this party's rows (jointly, by public constants, or not at all) and range-checks them,
    or, with DP, clamps them (:func:`_clamp`)."""
    n_features = _check_columns(job, data)
    if job.data.standardize:
        _standardize(job, data, rounds, party)
    elif job.data.scaling is not None:
        agreed("scaling", job.party_names, lambda: scale_publicly(data, job.data.scaling, job.source))
        check_scaling_covers(job.data.scaling, n_features, job.source)
    if job.dp is not None:
        _clamp(job, data, party)
    else:
        agreed("range check", job.party_names, lambda: check_range(data, job.data.max_abs))
    return n_features


def _clamp(job: FederatedJob, data: PartyData, party: str) -> None:
    """With DP, values beyond ``data.max_abs`` are clamped to it, at this party alone: part of the
    mechanism (the clipped update bounds what any data can do), where a refusal would stop every
    peer on one record's value, outside the budget. Only this party's log names the columns."""
    columns = columns_beyond(data, job.data.max_abs)
    if clamped := clamp_range(data, job.data.max_abs):
        log.warning(
            "party %s: clamped %d feature value(s) in column(s) %s to data.max_abs=%g (DP: clamped, not refused; "
            "only this party's log says so)", party, clamped, ", ".join(repr(c) for c in columns), job.data.max_abs,
        )


class _Privacy:
    """Client-level DP: the clip, the noise multiplier and each round's charge, for a model of
    ``parameters`` parameters (fixed point's rounding grows with them: :mod:`mpcfl.dp.rounding`).

    Raises:
        MpcflError: delta protects no party, or rounding would move epsilon by more than 1%;
            both depend on the public job alone, so every party stops alike, before any update is shared.
    """

    def __init__(self, job: FederatedJob, parameters: int) -> None:
        dp = job.dp
        assert dp is not None
        check_plausible(job)  # the unit is a party: delta >= 1/parties protects none
        self.clip, self.colluders = dp.clip, job.colluders
        self.l2 = replace_one(dp.clip)  # one party's clipped update replaced by any other
        try:
            self.noise_multiplier, self.sensitivity = job.dp_calibration(parameters)
        except ValueError as err:
            raise MpcflError(f"{job.source}: {err}") from None

    def of_round(self, parties: int, world: int) -> Privacy:
        """The noise on the sum of ``parties`` clipped updates, in a session of ``world`` parties, and its charge.

        A session re-formed without a dead party has fewer parties than the job: at most all but one
        of them may collude there (the job's threshold is n-1 unless set).
        """
        scale = self.noise_multiplier * self.sensitivity
        colluders = min(self.colluders, world - 1)
        return Privacy(charge=Charge("gaussian", self.noise_multiplier), scale=scale, colluders=colluders)

    def notes(self) -> dict[str, Any]:
        return {
            "unit": "one party's whole data (client-level); each record is covered by it",
            "clip": self.clip, "sensitivity": self.sensitivity, "clip_sensitivity": self.l2,
            "noise_multiplier": self.noise_multiplier,
            "mechanism": "joint Skellam noise on the sum of the clipped updates, under MPC, before each reveal; "
                         "the sum is divided by the parties after it. The sensitivity is the clip's (2 x clip) "
                         "plus fixed point's rounding and the integer mechanism's excess (mpcfl.dp.rounding)",
        }


def _resume_point(job: FederatedJob, party: str, rank: int, budget: Any) -> checkpoint.RoundCheckpoint:
    """The newest round every party holds; under DP, only if the ledger on disk extends its ledger."""
    done = common_epoch(job, checkpoint.held_rounds(job, party, rank))  # rounds one attempt wrote at every party
    start = checkpoint.load(job, party, rank, done)
    if budget is not None and (start.privacy is None or not budget.extends(start.privacy)):
        raise MpcflError(
            f"party {party}: {budget.path}: does not extend the privacy ledger of the round {done} checkpoint; "
            "refusing to resume"
        )
    log.info("resuming after round %d", done)
    return start


def _who_takes_part(parties: tuple[str, ...], job: FederatedJob, error: MpcflError | None, round_index: int) -> list[int]:
    """Exchanges whose local round succeeded among the session's ``parties``; returns the ranks that take part.

    Raises:
        MpcflError: this party failed and dropouts are not allowed, or too few parties are left.
        PeerFailure: another party failed and dropouts are not allowed.
    """
    flags = all_gather_public([int(error is None)])
    live = [r for r, (ok,) in enumerate(flags) if ok]
    dropped = [parties[r] for r, (ok,) in enumerate(flags) if not ok]
    if not dropped:
        return live
    if not job.federated.allow_dropouts:
        if error is not None:
            raise error
        raise PeerFailure(f"party {', '.join(dropped)} failed its local training in round {round_index}; see its log")
    if len(live) < job.min_parties:
        raise MpcflError(
            f"round {round_index}: only {len(live)} of {len(parties)} parties have an update ({', '.join(dropped)} "
            f"failed), below federated.min_parties={job.min_parties}"
        )
    if error is not None:
        log.warning("%s; this party sits out round %d", error, round_index)
    log.warning("round %d: %s sit(s) out; averaging over %d parties", round_index, ", ".join(dropped), len(live))
    return live


class _Training:
    """One party's federated run: what it keeps across sessions when a peer's process dies and the
    survivors re-form (:func:`mpcfl.mpc.session.reformed`) and go on."""

    def __init__(self, job: FederatedJob, party: str, budget: Any, disclosure: Disclosure) -> None:
        self.job, self.party, self.budget = job, party, budget
        self.privacy: _Privacy | None = None  # calibrated in prepare, once the model's size is known
        self.disclosure = disclosure
        self.history: list[dict[str, Any]] = []
        self.left: list[str] = []  # parties whose process died, in the order the survivors lost them
        self.in_rounds = False
        self.update: tuple[torch.Tensor, float, MpcflError | None] | None = None  # the current round's, kept for a redo
        self.reveals_before = 0  # this party's reveals before the current round's average: one more means it began opening it
        self.attempt = 0  # this attempt's id (new_attempt, in prepare): its checkpoints pair only with each other

    def prepare(self, rank: int, resume: bool, data: PartyData) -> None:
        """Scales this party's rows (``data``, as loaded) and builds the model, in the first session."""
        job, party = self.job, self.party
        start = None
        self.attempt = new_attempt()
        if resume:
            start = agreed("checkpoint loading", job.party_names, lambda: _resume_point(job, party, rank, self.budget))
        self.data = data
        self.n_features = _prepare(job, self.data, _Round(job, session_device(), job.world_size), party)
        self.head = head_of(job.model)
        self.train_rows = Rows.of(self.data.train, self.head)
        self.test_rows = None if self.data.test is None else Rows.of(self.data.test, self.head)
        self.model = initial_model(job, self.n_features)
        self.strategy = strategy_of(job.federated.strategy)
        self.weights = flat(self.model)
        if job.dp is not None:  # before any update is shared: the model's size is public
            self.privacy = _Privacy(job, self.weights.numel())
            if self.budget is not None:
                self.budget.notes.update(self.privacy.notes())
        if start is not None:
            self.weights, self.history = start.weights, start.history
            self.strategy.load_state_dict(start.strategy)

    def resynchronise(self, parties: tuple[str, ...]) -> None:
        """After a re-forming: checks that the survivors, ``parties``, may redo the interrupted round without those left.

        A round may be redone only if no survivor finished it or began opening its average: one
        that did may hold (part of) the average with the lost party in it, and the redone average
        without it would then reveal its update by difference.

        Raises:
            MpcflError: the survivors are not all at the same round, or one began opening.
        """
        lost = ", ".join(self.left)
        opening = len(self.disclosure.records) > self.reveals_before
        states = all_gather_public([len(self.history), int(opening)])
        round_index = len(self.history) + 1
        if any(state != [len(self.history), 0] for state in states):
            raise MpcflError(
                f"party {self.party}: {lost} left during the opening of round {round_index}'s average, "
                f"which some of {', '.join(parties)} may hold in part; redoing it without {lost} could "
                "reveal its update by difference, so the job stops (its round checkpoints remain)"
            )
        log.warning("round %d: %s left; redoing it with %s", round_index, lost, ", ".join(parties))

    def run_rounds(self, parties: tuple[str, ...], rank: int) -> None:
        """The rounds left, in a session of ``parties`` in which this party is ``rank``."""
        job, spec, privacy = self.job, self.job.federated, self.privacy
        rounds = _Round(job, session_device(), len(parties))
        self.in_rounds = True
        for round_index in range(len(self.history) + 1, spec.rounds + 1):
            began, before = time.perf_counter(), communication_stats()
            if self.update is None:  # a redone round keeps this party's update: its local training is done
                self.update = self._local_round(round_index)
            update, loss, error = self.update
            self.reveals_before = len(self.disclosure.records)
            live = _who_takes_part(parties, job, error, round_index)
            rows = self.train_rows.x.shape[0] if rank in live else 0  # a party that sits out shares zeros, weight 0
            with self.disclosure.contributing([parties[r] for r in live]):
                average = rounds.of_updates(update, rows, parties=len(live), privacy=privacy, round_index=round_index)
            self.update = None
            self.weights = self.strategy.apply(self.weights, average)
            load_flat(self.model, self.weights)
            self._record(round_index, len(live), loss, began, before)

    def _local_round(self, round_index: int) -> tuple[torch.Tensor, float, MpcflError | None]:
        """This party's update (zeros if its local round failed), its loss, and its failure if any."""
        job, privacy = self.job, self.privacy
        try:
            update, loss = local_update(
                job, self.model, self.train_rows, self.head, self.strategy, weights=self.weights,
                round_index=round_index, rank=job.rank_of(self.party),
                clip=None if privacy is None else privacy.clip, bound=aggregate.MAX_AVERAGED,
                who=f"party {self.party}: round {round_index}",
            )
        except MpcflError as err:
            return torch.zeros_like(self.weights), float("nan"), err
        return update, loss, None

    def _record(self, round_index: int, parties: int, loss: float, began: float, before: dict[str, float]) -> None:
        record: dict[str, Any] = {"round": round_index, "parties": parties, "local_loss": loss}
        record["train_loss"], record["train_accuracy"] = evaluate(self.model, self.train_rows, self.head)
        if self.test_rows is not None:
            record["test_loss"], record["test_accuracy"] = evaluate(self.model, self.test_rows, self.head)
        if self.budget is not None:
            record["epsilon"] = self.budget.spent()
        record["seconds"] = time.perf_counter() - began
        now = communication_stats()
        record["bytes_sent"] = now["bytes"] - before["bytes"]
        record["comm_rounds"] = now["rounds"] - before["rounds"]  # with prefetch, later rounds wait on the dealer once
        self.history.append(record)
        checkpoint.save(self.job, self.party, self.job.rank_of(self.party), checkpoint.RoundCheckpoint(
            round=round_index, weights=self.weights, strategy=self.strategy.state_dict(), history=self.history,
            privacy=budget_state(), attempt=self.attempt,
        ))
        # Logged once saved: a round in the log is a round a resume can start after.
        log.info("round %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def run_party(
    job: FederatedJob,
    party: str,
    *,
    rendezvous: str | None = None,
    resume: str | bool = False,
    run_id: str | None = None,
    key_file: Path | None = None,
) -> None:
    """Runs ``party``'s side of the federated job to the end (``resume``, ``run_id``: see
    :func:`mpcfl.tasks.train.runner.run_party`).

    With ``federated.allow_dropouts``, a peer whose process dies during the rounds is left behind:
    the survivors re-form the session (fresh rendezvous, authentication and keys) and redo the
    interrupted round from their kept updates, then go on.

    Raises:
        MpcflError: bad data or checkpoints, a failed round, a refused reveal, or a peer failure.
    """
    session, training, epoch = session_of(job, rendezvous=rendezvous, key_file=key_file), None, 0
    with contextlib.ExitStack() as stack:
        while True:
            try:
                with party_session(session, party) as rank:
                    if training is None:
                        data = agreed("data loading", job.party_names, lambda: _load(job, party))
                        parts = contents(data)
                        run = begin_run(job, party, parts, resume=resume, run_id=run_id)
                        stack.enter_context(run.recorded())
                        job = run.job
                        budget = agreed("privacy ledger", job.party_names, lambda: privacy_budget(job, party, parts, resume=run.resumed))
                        training = _Training(job, party, budget, run.disclosure(budget))
                    with training.disclosure:
                        if not training.in_rounds:
                            training.prepare(rank, run.resumed, data)
                        else:
                            training.resynchronise(session.parties)
                        training.run_rounds(session.parties, rank)
                    totals = communication_stats()
                break
            except PeerFailure:
                if training is None or not training.in_rounds or job.survivors_needed is None:
                    raise
                epoch += 1
                before = session.parties
                session = reformed(session, party, epoch=epoch, min_parties=job.survivors_needed)
                training.left.extend(p for p in before if p not in session.parties)
        assert training is not None  # set in the first session, which the loop leaves only by success or raise
        _write_outputs(job, party, training, totals)
        run.run.finish(training.history[-1] if training.history else {})


def _write_outputs(job: FederatedJob, party: str, training: _Training, totals: dict[str, float]) -> None:
    out = job.party_dir(party)
    data, model, history, disclosure = training.data, training.model, training.history, training.disclosure
    if data.scaler:
        write_json(out / "scaler.json", data.scaler)
    if job.outputs.model_to == "all" or party in job.outputs.model_to:
        write_torch(out / "model.pt", model.state_dict())
        write_json(out / "model.json", {"model": job.model.model_dump(), "n_features": training.n_features})
        log.info("saved the federated model to %s", out / "model.pt")
    # On this party's own rows: each party's figure differs (the launcher's summary line compares them).
    plot_history(out / "metrics.png", history, title=f"{job.name}: federated training ({party}'s data)", x="round")
    write_json(out / "metrics.json", {
        "job": job.name, "party": party, "history": history, "final": history[-1] if history else {},
        "left": training.left, "communication": totals, "reveals": disclosure.ledger(),
    })
    if disclosure.budget is not None:
        disclosure.budget.persist()


def check_party(job: FederatedJob, party: str) -> list[str]:
    """``mpcfl validate --party``: this party's files as its process loads them, scaled and range-checked
    where it can alone (joint standardisation needs its peers)."""
    data = _load(job, party)
    lines = [f"{data.train.x.shape[0]} training rows (federated.max_rows={job.federated.max_rows}), "
             f"{data.train.x.shape[1]} feature columns"]
    if job.data.scaling is not None:
        scale_publicly(data, job.data.scaling, job.source)
    if not job.data.standardize and job.dp is None:
        check_range(data, job.data.max_abs)
        lines.append(f"values within data.max_abs={job.data.max_abs:g}")
    elif job.dp is not None and (columns := columns_beyond(data, job.data.max_abs)):
        # for this party's operator alone: the run clamps them (part of the mechanism) and tells no peer
        lines.append(f"values beyond data.max_abs={job.data.max_abs:g} in {', '.join(map(repr, columns))} "
                     "will be clamped to it (dp)")
    if job.dp is not None:  # the model's size, from this party's columns (every party holds the same)
        parameters = flat(initial_model(job, data.train.x.shape[1])).numel()
        privacy = _Privacy(job, parameters)
        lines.append(f"client-level dp over {parameters} parameters: noise multiplier {privacy.noise_multiplier:.4g}, "
                     f"sensitivity {privacy.sensitivity:.6g} (clip's {privacy.l2:g} plus fixed-point rounding)")
    return lines
