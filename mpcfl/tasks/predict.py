"""Secure prediction with a trained model: new rows split across the parties as in training.

A training run ends with its model revealed to some parties (``model.pt``) or kept secret-shared
(``model_shares.pt`` at every party). A predict job (``task: predict``, or ``mpcfl predict``)
scores new rows with it, every party supplying its own columns of them:

1. every party finds the training run (``model_run``: an id, or the latest finished), checks it was
   run with the training job as it is now, and all agree on the same run id;
2. each loads its own file of new rows, whose columns must be its training feature columns, and
   preprocesses them as training did (its saved scaler, or the job's public scaling; under DP the
   clamp to ``data.max_abs`` and logistic regression's row clipping);
3. rows are lined up by the training job's ID column through private set intersection, or by position;
4. the model enters MPC from the first party holding its revealed weights, or, when nobody holds
   them, from every party's own shares: it is then never revealed, to anyone;
5. the logits are opened to ``predictions_to`` only, through :func:`mpcfl.mpc.reveal.reveal`;
   each receiver writes ``predictions.csv`` (row ID or position, predicted class, each class's
   probability), and, when its file holds the label column, the accuracy and loss on them.

What else is disclosed: every party's number of new rows and training column counts (public
shapes, as in training), and with IDs what PSI discloses (:mod:`mpcfl.data.psi`). Predictions of
a DP model are post-processing of it and cost no budget; they do reveal the new rows' predictions
to the receivers, which is the job's purpose.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from mpcfl import runs
from mpcfl.data.files import DataError, rows_key
from mpcfl.data.party import (
    PartyData, Split, apply_scaler, backbone_of, check_range, contents, encoding_of, read_table, through_backbone,
)
from mpcfl.data.psi import intersect, job_salt, salted
from mpcfl.dp.ledger import any_ledger
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import PredictJob, TrainJob
from mpcfl.jobs.session import session_of
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.heads import Head, job_head
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.device import to_device
from mpcfl.mpc.reveal import reveal
from mpcfl.mpc.session import agreed, agreed_public, communication_stats, party_session, session_device
from mpcfl.outputs import atomic_write, write_json
from mpcfl.tasks.run import begin_run, run_words, words_text
from mpcfl.tasks.train.dataset import prepare
from mpcfl.tasks.train.dp_sgd import apply_center
from mpcfl.tasks.train.export import PREPROCESSING
from mpcfl.tasks.train.runner import note_releases_outside_dp

log = logging.getLogger(__name__)

@dataclass
class TrainedRun:
    """This party's side of the training run whose model predicts."""

    folder: Path
    columns: list[str]  # this party's training feature columns, in order
    scaler: dict[str, Any] | None  # its standardisation statistics, when training standardised
    imputed: dict[str, float]  # what filled each declared column's missing cells in training
    inputs: list[str] | None = None  # with a backbone: the raw columns it took (``columns`` are its outputs)
    center: list[float] | None = None  # dp.center's noisy mean of its columns, subtracted after scaling


def training_run(job: PredictJob, party: str) -> TrainedRun:
    """Finds this party's folder of the training run, finished and made with the training job as it is now.

    Raises:
        MpcflError: no such run, unfinished, another configuration, or from before predictions existed.
    """
    train = job.train
    assert train is not None
    root = train.party_root(party)
    folder = runs.latest(root, train.name) if job.model_run == "latest" else root / job.model_run
    record = runs.Run(root, folder.name).read()
    where = f"party {party}: training run {folder.name}"
    if record.get("status") != runs.FINISHED:
        raise MpcflError(f"{where} did not finish ({runs.status_of(record)}); its model cannot predict")
    if record.get("fingerprint") != train.fingerprint():
        raise MpcflError(f"{where} was made with another configuration of {train.source}; predict with that job as it was")
    try:
        saved = json.loads((folder / PREPROCESSING).read_text())
    except FileNotFoundError:
        raise MpcflError(f"{where}: no {PREPROCESSING} (the run predates predictions); train again") from None
    return TrainedRun(
        folder, saved["columns"], saved.get("scaler"), saved.get("imputed") or {}, saved.get("inputs"), saved.get("center"),
    )


def load_rows(job: PredictJob, party: str, trained: TrainedRun) -> Split | None:
    """This party's new rows, their columns checked against its training columns; their labels when
    the file has the label column (vertical: at the label owner; horizontal: at any party, its own
    rows'). None when the party gives no file.

    Raises:
        DataError: names the party, the file and the columns that differ.
    """
    train = job.train
    assert train is not None
    path = job.rows.get(party)
    if path is None:
        if (trained.columns and train.partition == "vertical") or train.keyed:  # horizontal: one party's rows
            what = "its training feature columns" if trained.columns else "its ID column (rows are lined up by ID)"
            raise DataError(f"party {party}: rows: no file of new rows, and the model needs {what}")
        return None
    encoding = encoding_of(train, party)
    table = read_table(Path(path), party=party, id_column=train.id_column_of(party), encoding=encoding)
    label = encoding.label  # vertical: the label owner's; horizontal: every party holds its own rows' labels
    columns, x, y = table.columns, table.values, None
    if label is not None and label in columns:
        index = columns.index(label)
        regression = train.regression  # scaled as training scaled it: the head maps both back to the label's units
        y = x[:, index].astype(np.int64) if regression is None else (x[:, index] - regression.center) / regression.scale
        x = np.delete(x, index, axis=1)
        columns = [c for c in columns if c != label]
    expected = trained.inputs if trained.inputs is not None else trained.columns
    if columns != expected:
        missing = [c for c in expected if c not in columns]
        extra = [c for c in columns if c not in expected]
        detail = f"missing {missing}" if missing else f"extra {extra}" if extra else "in another order"
        raise DataError(
            f"party {party}: {path}: columns must be this party's training feature columns {expected}: {detail}"
        )
    for column, fill in trained.imputed.items():  # training's fills, not the new rows' own statistics
        values = x[:, columns.index(column)]
        values[np.isnan(values)] = fill
    if np.isnan(x).any():
        row, col = map(int, np.argwhere(np.isnan(x))[0])
        raise DataError(f"party {party}: {path}: column {columns[col]!r}, data row {row + 1}: missing")
    split = Split(Path(path), columns, x, y, table.ids)
    if trained.inputs is not None:  # the rows through the training job's backbone, as training's were
        split.x, split.columns = through_backbone(train, party, backbone_of(train), split)
    return split


def _preprocess(train: TrainJob, party: str, split: Split, trained: TrainedRun, feature_counts: list[int]) -> None:
    """Training's preprocessing (:func:`mpcfl.tasks.train.dataset.prepare`) with the statistics training saved."""

    def saved(part: PartyData) -> None:
        if trained.scaler is not None:
            apply_scaler(part, np.asarray(trained.scaler["mean"]), np.asarray(trained.scaler["std"]))

    check = None if train.dp is not None else (lambda part: check_range(part, train.data.max_abs))

    def centre(part: PartyData) -> None:
        if trained.center is None:
            raise MpcflError(f"party {party}: {trained.folder / PREPROCESSING}: no dp.center mean (the run predates it); train again")
        apply_center(part, np.asarray(trained.center))

    prepare(train, PartyData(party=party, train=split, test=None), feature_counts=feature_counts, standardize=saved,
            check=check or (lambda part: None), center=centre)


def _shared_model(train: TrainJob, trained: TrainedRun, n_features: int, *, rank: int, device: torch.device) -> Any:
    """The trained model under MPC: shared by the first party holding its weights, else rebuilt from
    every party's own shares (never revealed)."""
    torch_model = build_torch_model(train.model, n_features=n_features, seed=train.training.seed)
    names = train.party_names
    holds = (trained.folder / "model.pt").is_file()
    _, flags = agreed_public("model source", names, lambda: holds, lambda h: [int(h)], width=1)
    holders = [r for r, (flag,) in enumerate(flags) if flag]
    if holders:
        if rank == holders[0]:
            agreed("model loading", names, lambda: torch_model.load_state_dict(
                torch.load(trained.folder / "model.pt", map_location="cpu", weights_only=True)))
        else:
            agreed("model loading", names, lambda: None)
        log.info("the model enters MPC from %s, which holds its weights", names[holders[0]])
        return to_crypten(torch_model).encrypt(src=holders[0]).to(device)
    model = to_crypten(torch_model).encrypt(src=0).to(device)  # the shapes; every share is replaced

    def own_shares() -> dict[str, torch.Tensor]:
        path = trained.folder / "model_shares.pt"
        if not path.is_file():
            raise MpcflError(f"party {names[rank]}: {trained.folder}: neither model.pt nor model_shares.pt; nothing to predict with")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("rank") != rank or saved.get("world_size") != len(names):
            raise MpcflError(f"party {names[rank]}: {path}: shares of rank {saved.get('rank')}, this party is rank {rank}")
        return saved["shares"]

    shares = agreed("model shares", names, own_shares)
    for name, param in model.named_parameters():
        if shares[name].shape != param.share.shape:
            raise MpcflError(f"{trained.folder}: share {name} has shape {tuple(shares[name].shape)}, the model {tuple(param.share.shape)}")
        param.share = to_device(shares[name], device)
    log.info("the model enters MPC from the parties' own shares; it is revealed to no one")
    return model


def _line_up(job: PredictJob, split: Split | None, rank: int) -> list[str] | None:
    """With IDs: keeps this party's rows every party holds, in the agreed order (PSI), and returns
    their IDs (for the receiver's file). Without: nothing to do; positions line the rows up."""
    train = job.train
    assert train is not None
    if not train.keyed:
        return None
    assert split is not None and split.ids is not None
    rows, _ = intersect(
        salted(split.ids, job_salt(train)), names=train.party_names, hub=train.rank_of(train.labels.party), rank=rank,
        split="new rows", max_ids=train.data.max_ids,
    )
    ids = [split.ids[i] for i in rows]
    split.keep(rows)
    return ids


def run_party(
    job: PredictJob, party: str, *, rendezvous: str | None = None, run_id: str | None = None, key_file: Path | None = None
) -> None:
    """One party's side of a predict job; the receivers write ``predictions.csv``."""
    train = job.train
    assert train is not None
    names = job.party_names
    receivers = [job.rank_of(name) for name in job.predictions_to]
    with contextlib.ExitStack() as stack:
        with party_session(session_of(job, rendezvous=rendezvous, key_file=key_file), party) as rank:
            trained, everyone = agreed_public(
                "training run", names, lambda: training_run(job, party), lambda t: run_words(t.folder.name),
                width=len(run_words("")),
            )
            chosen = {words_text(row) for row in everyone}
            if len(chosen) > 1:
                raise MpcflError(f"the parties' training runs differ ({', '.join(sorted(chosen))}); pass model_run")
            split = agreed("rows loading", names, lambda: load_rows(job, party, trained))
            loaded = {} if split is None else contents(PartyData(party=party, train=split, test=None))
            run = begin_run(job, party, loaded, run_id=run_id)
            stack.enter_context(run.recorded())
            job = run.job
            if split is not None and any_ledger():  # predictions are exact functions of these rows: no DP covers them
                note_releases_outside_dp(job, party, [rows_key(split.path, party=party)], "predictions of its rows")
            with run.disclosure(None) as disclosure:
                ids = _line_up(job, split, rank)
                n_rows = 0 if split is None else split.x.shape[0]
                _, shapes = agreed_public(
                    "row counts", names, lambda: None, lambda _: [n_rows, len(trained.columns)], width=2
                )
                logits = _predict(job, party, split, trained, shapes, rank=rank)
                opened = reveal(logits, to=receivers, what="predictions of the new rows")
            totals = communication_stats()
        out = job.party_dir(party)
        record: dict[str, Any] = {
            "job": job.name, "party": party, "training_run": trained.folder.name,
            "communication": totals, "reveals": disclosure.ledger(),
        }
        headline: dict[str, Any] = {}
        if opened is not None:
            record.update(_write_predictions(out, train, opened.double().cpu(), split, ids))
            headline = record.get("metrics") or {"predictions": int(opened.shape[0])}
        write_json(out / "metrics.json", record)
        run.run.finish(headline)


def _predict(job: PredictJob, party: str, split: Split | None, trained: TrainedRun, shapes: list[list[int]], *, rank: int) -> Any:
    """The model's logits on every party's columns of the new rows, secret-shared."""
    crypten = import_crypten()
    train = job.train
    assert train is not None
    names = job.party_names
    given = {r: rows for r, (rows, _) in enumerate(shapes) if rows}
    if len(set(given.values())) > 1:
        counts = ", ".join(f"{names[r]} {rows}" for r, rows in given.items())
        raise DataError(f"the parties' files of new rows have different row counts ({counts}); a vertical job lines them up by position")
    columns = [cols for _, cols in shapes]
    vertical = train.partition == "vertical"
    n_features = sum(columns) if vertical else columns[0]
    if split is not None and split.x.shape[1]:
        agreed("preprocessing", names, lambda: _preprocess(train, party, split, trained, columns if vertical else [n_features]))
    else:
        agreed("preprocessing", names, lambda: None)
    device = session_device()
    model = _shared_model(train, trained, n_features, rank=rank, device=device)
    rows = next(iter(given.values()))
    owners = [r for r, cols in enumerate(columns) if cols and (vertical or r in given)]
    parts = []
    for r in owners:
        width = columns[r]
        x = torch.tensor(split.x, dtype=torch.float32) if r == rank else torch.zeros(rows, width)
        parts.append(crypten.cryptensor(x, src=r, device=device))
    x_enc = crypten.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    model.eval()
    with crypten.no_grad():
        return model(x_enc)


def _write_predictions(out: Path, train: TrainJob, logits: torch.Tensor, split: Split | None, ids: list[str] | None) -> dict[str, Any]:
    """A receiver's ``predictions.csv``, and the loss and scores when it holds the rows' labels."""
    head = job_head(train)
    key = train.id_column_of(train.labels.party) if ids is not None else "row"
    keys = ids if ids is not None else [str(i) for i in range(logits.shape[0])]
    if head.classifies:
        atomic_write(out / "predictions.csv", _class_rows(train, head, logits, key, keys))
    else:
        values = head.to_label_units(logits.double()).squeeze(1).tolist()  # type: ignore[attr-defined]
        atomic_write(out / "predictions.csv", lambda handle: _write_rows(handle, [key, "predicted"], zip(keys, (f"{v:.6g}" for v in values))))
    log.info("saved %d predictions to %s", len(keys), out / "predictions.csv")
    record: dict[str, Any] = {"predictions": {"file": "predictions.csv", "rows": len(keys)}}
    if split is not None and split.y is not None and len(split.y) == len(keys):
        y = head.plain_targets(split.y)
        record["metrics"] = {"loss": float(head.plain_loss(logits.float(), y)), **head.plain_scores(logits.float(), y)}
    return record


def _write_rows(handle: Any, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def _class_rows(train: TrainJob, head: Head, logits: torch.Tensor, key: str, keys: list[str]) -> Callable[[Any], None]:
    """Writes each row's predicted class name and every class's probability."""
    probabilities = head.plain_probabilities(logits)
    predicted = probabilities.argmax(dim=1)
    names = train.labels.classes or [str(c) for c in range(probabilities.shape[1])]
    rows = (
        [name, names[label], *(f"{p:.6g}" for p in row)]
        for name, label, row in zip(keys, predicted.tolist(), probabilities.tolist())
    )
    return lambda handle: _write_rows(handle, [key, "predicted", *(f"p_{name}" for name in names)], rows)



def check_party(job: PredictJob, party: str) -> list[str]:
    """``mpcfl validate --party``: this party's side of the training run, and its new rows' columns."""
    trained = training_run(job, party)
    split = load_rows(job, party, trained)
    rows = "no file of new rows" if split is None else f"{split.x.shape[0]} new rows of its {len(trained.columns)} training columns"
    return [f"training run {trained.folder.name}", rows]
