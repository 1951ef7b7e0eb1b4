"""One party's whole job: join, load own data, share it, run the task, write own outputs."""

from __future__ import annotations

import logging
from typing import Any

from mpcfl.config import TrainJob
from mpcfl.data import PartyData, load_party_data, share_dataset
from mpcfl.outputs import plot_history, write_json, write_torch
from mpcfl.dp.budget import Budget
from mpcfl.reveal import install_budget, ledger
from mpcfl.runtime import Session, agreed, communication_stats, party_session
from mpcfl.train import TrainResult, train

log = logging.getLogger(__name__)


def run_party(job: TrainJob, party: str, *, rendezvous: str | None = None) -> None:
    """Runs ``party``'s side of the job to the end.

    Args:
        job: the validated job.
        party: this process's party name.
        rendezvous: ``tcp://HOST:PORT`` of the process group; else ``$RENDEZVOUS``.

    Raises:
        MpcflError: bad data, a peer failure, or the environment contradicts the job.
    """
    budget = None
    if job.dp is not None:
        budget = Budget.create(epsilon=job.dp.epsilon, delta=job.dp.delta, accountant=job.dp.accountant)
    install_budget(budget)
    with party_session(Session.of_job(job, rendezvous=rendezvous), party) as rank:
        data = agreed("data loading", job.party_names, lambda: load_party_data(job, party))
        shared = share_dataset(job, data, rank=rank, device=job.runtime.device)
        result = train(job, shared, rank=rank)
        shares = {name: param.share.cpu() for name, param in result.model.named_parameters()}
        totals = communication_stats()
    _write_outputs(job, party, rank, data, result, shares, totals, budget)


def _write_outputs(
    job: TrainJob,
    party: str,
    rank: int,
    data: PartyData,
    result: TrainResult,
    shares: dict[str, Any],
    totals: dict[str, float],
    budget: Budget | None,
) -> None:
    out = job.party_dir(party)
    sees_metrics = rank in job.ranks(job.outputs.metrics_to)
    if data.scaler:
        write_json(out / "scaler.json", data.scaler)
    if result.state_dict is not None:
        write_torch(out / "model.pt", result.state_dict)
        write_json(out / "model.json", {"model": job.model.model_dump(), "n_features": result.torch_model[0].in_features})
        log.info("saved the trained model to %s", out / "model.pt")
    if job.outputs.model_to == "none":
        from mpcfl._compat import import_crypten

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
            "communication": totals,
            "reveals": ledger(),
        },
    )
    if budget is not None:
        write_json(out / "privacy.json", {**budget.state_dict(), "dp_sgd": result.privacy, "spent": budget.spent()})
