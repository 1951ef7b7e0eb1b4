"""One party's whole job: join, load own data, share it, run the task, write own outputs."""

from __future__ import annotations

import contextlib
import math
import json
import logging
from pathlib import Path
from typing import Any

from mpcfl.data.party import PartyData, contents, dataset_digest, ledger_keys, load_party_data
from mpcfl.data.psi import align
from mpcfl.dp.budget import Budget, is_release
from mpcfl.dp.ledger import Binding, any_ledger, note_outside_dp, open_ledgers
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import FederatedJob, TrainJob
from mpcfl.jobs.session import session_of
from mpcfl.mpc.device import to_host
from mpcfl.mpc.reveal import Disclosure
from mpcfl.mpc.session import agreed, agreed_public, communication_stats, party_session, session_device
from mpcfl.outputs import plot_history, write_json, write_torch
from mpcfl.tasks.run import begin_run
from mpcfl.tasks.train import checkpoint
from mpcfl.tasks.train.dataset import share_dataset
from mpcfl.tasks.train.dp_sgd import center_noise, check_plausible, training_step
from mpcfl.tasks.train.export import PREPROCESSING, export_onnx, model_record
from mpcfl.tasks.train.loop import TrainResult, train

log = logging.getLogger(__name__)


def privacy_budget(job: TrainJob | FederatedJob, party: str, parts: dict[str, bytes], *, resume: bool) -> Budget | None:
    """The run's privacy budget, persisted on every charge, and charged to the ledgers of this party's
    data files too (:func:`mpcfl.data.party.ledger_keys`, :mod:`mpcfl.dp.ledger`; an earlier version's
    ledger of ``parts``, :func:`mpcfl.data.party.contents`, carried over); on resume, the run's ledger so far.

    Raises:
        MpcflError: no ledger to resume from, or one that does not match; a new run under an id a
            ledger has seen.
        LedgerExhausted: earlier runs on this party's data leave less than this run's epsilon.
    """
    if job.dp is None:
        if job.run_id is not None and any_ledger():  # else no file was used under DP: no need to read them for keys
            note_releases_outside_dp(job, party, list(ledger_keys(job, party)), "a model and metrics trained without DP")
        return None
    assert job.run_id is not None  # a run's budget
    budget = Budget.create(epsilon=job.dp.epsilon, delta=job.dp.delta, accountant=job.dp.accountant)
    budget.path = job.party_dir(party) / "privacy.json"
    ledgers = open_ledgers(list(ledger_keys(job, party)), epsilon=job.dp.epsilon, delta=job.dp.delta,
                           accountant=job.dp.accountant, legacy=dataset_digest(parts))
    budget.dataset = Binding.begin(ledgers, job.run_id, job=job.name, party=party, asked=job.dp.epsilon, new=not resume)
    if resume:
        if not budget.path.is_file():
            raise MpcflError(f"party {party}: {budget.path}: missing; refusing to resume a dp job without its privacy ledger")
        try:
            budget.load_state_dict(json.loads(budget.path.read_text()))
        except (ValueError, KeyError) as err:
            raise MpcflError(f"party {party}: {budget.path}: cannot resume its privacy ledger: {err}") from None
        log.info("resumed the privacy ledger: epsilon %.4g spent of %g", budget.spent(), budget.epsilon)
    return budget


def note_releases_outside_dp(job: Any, party: str, datasets: list[str], what: str) -> None:
    """Notes in the ledgers of ``party``'s data files, where it has any (they were used under DP), that
    this run releases ``what`` from them without DP, and warns its operator (:func:`mpcfl.dp.ledger.note_outside_dp`)."""
    noted = note_outside_dp(datasets, job.run_id, job=job.name, party=party, what=what)
    if noted:
        log.warning("party %s: %d of its data files have privacy ledgers (used under DP before); this run releases "
                    "%s from them, outside any DP budget: noted in their ledgers (`mpcfl ledger show`)",
                    party, len(noted), what)


def _resume_point(job: TrainJob, party: str, rank: int, budget: Budget | None) -> checkpoint.Checkpoint:
    """The checkpoint of the newest epoch every party holds; under DP, only if ``budget``
    (the ledger from privacy.json) extends the checkpoint's ledger.

    Raises:
        MpcflError: no common checkpoint, or a ledger that does not match it.
    """
    epoch = checkpoint.common_epoch(job, checkpoint.held(job, party, rank))
    log.info("resuming after epoch %d", epoch)
    start = checkpoint.load(job, party, rank, epoch)
    if job.dp is not None and job.dp.center is not None and (
        start.center is None or not all(math.isfinite(v) for v in start.center)
    ):  # opening it again would charge a release the calibration did not plan
        raise MpcflError(f"party {party}: the epoch {epoch} checkpoint holds no dp.center mean; refusing to resume")
    if budget is not None and (start.privacy is None or not budget.extends(start.privacy)):
        raise MpcflError(
            f"party {party}: {budget.path}: does not extend the privacy ledger of the epoch {epoch} checkpoint; "
            "refusing to resume"
        )
    return start


def drop_unreleased(job: TrainJob, budget: Budget, start: checkpoint.Checkpoint) -> None:
    """On resume, drops the entries after the checkpoint's ledger when no party recorded a release
    among them, decided jointly so that every party's ledger goes the same way.

    A party charges a reveal before its share leaves it, so a party whose entries after the
    checkpoint hold no release (:func:`~mpcfl.dp.budget.is_release`) sent no share for any opening
    since: what it holds there is secret computation (an epoch's DP-SGD steps, charged as they end,
    then a crash before the checkpoint), which the resumed run redoes with fresh noise and charges
    once. Each party decides on its own entries only, never on a peer's word (a peer that skipped a
    charge could otherwise make it drop a release that reached the peer), and shares one bit so
    that all keep or all drop: any release anywhere keeps every entry.
    """
    assert start.privacy is not None  # _resume_point refuses a DP checkpoint without its ledger
    later = budget.later(start.privacy)
    _, released = agreed_public("privacy ledger tails", job.party_names, lambda: None,
                                lambda _: [int(any(is_release(entry) for entry in later))], width=1)
    if later and not any(flag for flag, in released):
        dropped = budget.rewind(start.privacy)
        log.info("privacy ledger: %d entr%s after the epoch %d checkpoint released nothing (secret computation): "
                 "dropped, redone with fresh noise (epsilon %.4g spent)",
                 dropped, "y" if dropped == 1 else "ies", start.epoch, budget.spent())


def run_party(
    job: TrainJob,
    party: str,
    *,
    rendezvous: str | None = None,
    resume: str | bool = False,
    run_id: str | None = None,
    key_file: Path | None = None,
) -> None:
    """Runs ``party``'s side of the job to the end.

    Args:
        job: the validated job.
        party: this process's party name.
        rendezvous: ``tcp://HOST:PORT`` of the process group; else ``$RENDEZVOUS``.
        resume: continue a run from the newest checkpoint all parties hold: ``True`` for this
            party's newest unfinished run, or its run id (see :mod:`mpcfl.tasks.run`).
        run_id: a new run's id, as the launcher proposes it.
        key_file: this party's private key, for a job with ``runtime.identity``.

    Raises:
        MpcflError: bad data or checkpoints, a peer failure, or the environment contradicts the job.
    """
    with contextlib.ExitStack() as stack:
        with party_session(session_of(job, rendezvous=rendezvous, key_file=key_file), party) as rank:
            data = agreed("data loading", job.party_names, lambda: load_party_data(job, party))
            parts = contents(data)
            run = begin_run(job, party, parts, resume=resume, run_id=run_id)
            stack.enter_context(run.recorded())
            job = run.job
            budget = agreed("privacy ledger", job.party_names, lambda: privacy_budget(job, party, parts, resume=run.resumed))
            # Every reveal of this run is recorded, and charged to the budget, until the with ends.
            with run.disclosure(budget) as disclosure:
                start = None
                if run.resumed:
                    start = agreed("checkpoint loading", job.party_names, lambda: _resume_point(job, party, rank, budget))
                    if budget is not None:
                        drop_unreleased(job, budget, start)
                attempt = checkpoint.new_attempt()  # this attempt's checkpoints pair only with each other
                alignment = align(job, data, rank=rank) if job.keyed else None
                device = session_device()
                log.info("computing on %s", device)
                shared = share_dataset(job, data, rank=rank, device=device, center=None if start is None else start.center)
                if job.dp is not None:
                    check_plausible(job, shared.x_train.size(0))  # n is public, and the same at every party
                engine = training_step(job, shared.n_features, shared.x_train.size(0))
                if budget is not None:
                    budget.notes.update(engine.notes())
                    if job.dp.center is not None:
                        honest = center_noise(job, shared.n_features)  # what the accountant counts; the parties' shares add up to more
                        budget.notes["dp_center"] = {**job.dp.center.model_dump(), "noise_std": honest,
                                                     "noise_std_total": honest * job.noise_inflation}
                result = train(job, shared, engine=engine, rank=rank, party=party, device=device, resume=start, attempt=attempt)
            shares = {name: to_host(param.share) for name, param in result.model.named_parameters()}
            totals = communication_stats()
        _write_outputs(job, party, rank, data, result, shares, totals, disclosure, alignment)
        run.run.finish(result.history[-1] if result.history else {})


def _write_outputs(
    job: TrainJob,
    party: str,
    rank: int,
    data: PartyData,
    result: TrainResult,
    shares: dict[str, Any],
    totals: dict[str, float],
    disclosure: Disclosure,
    alignment: dict[str, Any] | None,
) -> None:
    out = job.party_dir(party)
    sees_metrics = rank in job.ranks(job.outputs.metrics_to)
    if data.scaler:
        write_json(out / "scaler.json", data.scaler)
    # what a predict job applies to this party's new rows (mpcfl.tasks.predict), and mpcfl.load_model to all columns
    write_json(out / PREPROCESSING, {
        "party": party, "columns": data.train.columns, "scaler": data.scaler or None, "imputed": data.imputed,
        "inputs": data.inputs,  # with a backbone: the raw columns it takes (its outputs are "columns")
        "center": data.center,  # dp.center's noisy mean of its columns (folded into "scaler" too)
    })
    if result.state_dict is not None:
        write_torch(out / "model.pt", result.state_dict)
        write_json(out / "model.json", model_record(job, result.n_features, result.feature_counts))
        export_onnx(result.torch_model, result.state_dict, result.n_features, out / "model.onnx")
        log.info("saved the trained model to %s (and model.onnx)", out / "model.pt")
    if job.outputs.model_to == "none":
        from mpcfl.mpc.engine import import_crypten

        write_torch(
            out / "model_shares.pt",
            {
                "job": job.name,
                "party": party,
                "rank": rank,
                "world_size": job.world_size,
                "precision_bits": import_crypten().config.cfg.encoder.precision_bits,
                "shares": shares,
            },
        )
        log.info("the model stays secret-shared; saved this party's shares to %s", out / "model_shares.pt")
    if sees_metrics:
        plot_history(out / "metrics.png", result.history, title=f"{job.name}: secure training ({party})")
    write_json(
        out / "metrics.json",
        {
            "job": job.name,
            "party": party,
            "history": result.history,
            "final": result.history[-1] if result.history else {},
            "metrics_release": result.metrics_release,
            "communication": totals,
            **({} if alignment is None else {"private_set_intersection": alignment}),
            "reveals": disclosure.ledger(),
        },
    )
    if disclosure.budget is not None:
        disclosure.budget.persist()
