"""A trained model that leaves the platform usable: what training writes beside it, and loading it back.

Every training party writes ``preprocessing.json`` (its name, its feature columns in order, its
standardisation statistics if it standardised). A model receiver also writes ``model.pt``,
``model.json`` (the spec, every party's public column count, and the job's public preprocessing:
``data.scaling``, and under DP ``max_abs``, the clamp, and the row clipping) and ``model.onnx`` (the model on
preprocessed features). :func:`load_model` puts it together: from the receiver's run folder and, in
a vertical job, the other parties' run folders (their ``preprocessing.json``, which each hands over
by choice: its columns' names and statistics), a :class:`~mpcfl.models.preprocessed.Preprocessed`
module that scores raw rows of all columns in plain PyTorch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import TrainJob
from mpcfl.data.party import backbone_of
from mpcfl.models.backbone import backbone_digest, build_backbone
from mpcfl.models.build import build_torch_model
from mpcfl.models.preprocessed import Preprocessed
from mpcfl.models.spec import ModelSpec
from mpcfl.outputs import atomic_write
from mpcfl.tasks.train.dp_sgd import clips_features

PREPROCESSING = "preprocessing.json"


def model_record(job: TrainJob, n_features: int, feature_counts: list[int]) -> dict[str, Any]:
    """``model.json``: what rebuilds the module, and the job's public preprocessing."""
    dp = job.dp
    row_clip = None
    if clips_features(job):
        holders = sum(1 for c in feature_counts if c > 0) if job.partition == "vertical" else 1
        row_clip = dp.clip / math.sqrt(holders)  # each party's slice of a row (mpcfl.tasks.train.dp_sgd)
    regression = job.regression
    return {
        "model": job.model.model_dump(), "n_features": n_features, "partition": job.partition,
        "parties": job.party_names, "feature_counts": feature_counts,
        "scaling": job.data.scaling, "max_abs": job.data.max_abs if dp is not None else None, "row_clip": row_clip,
        "target": None if regression is None else {"loss": regression.loss, "center": regression.center, "scale": regression.scale},
        "classes": job.labels.classes,
        "backbone": None if job.data.backbone is None else {  # rebuilt from the job's own files, checked by its digest
            "factory": job.data.backbone.factory, "weights": None if job.data.backbone.weights is None else str(job.data.backbone.weights),
            "digest": backbone_digest(backbone_of(job)),
        },
    }


def export_onnx(model: nn.Module, state: dict[str, torch.Tensor], n_features: int, path: Path) -> None:
    """``model.onnx``: the trained module on preprocessed features, batch size free."""
    model.load_state_dict(state)
    model.eval()

    def write(handle: Any) -> None:  # through atomic_write: owner-only (as model.pt), never half-written
        torch.onnx.export(
            model, (torch.zeros(1, n_features),), handle, input_names=["features"], output_names=["logits"],
            dynamic_axes={"features": {0: "rows"}, "logits": {0: "rows"}}, dynamo=False,
        )

    atomic_write(path, write, binary=True)


def load_model(folder: str | Path, *others: str | Path) -> Preprocessed:
    """The model a receiver holds, with the job's preprocessing in front (raw columns in, logits out;
    a regression's predictions in the label column's units).

    Args:
        folder: the receiver's run folder (``model.pt``, ``model.json``, its ``preprocessing.json``).
        others: in a vertical job, the other parties' run folders (or their ``preprocessing.json``).

    Raises:
        MpcflError: no model here, or a party's preprocessing missing or not of this model.
    """
    folder = Path(folder)
    if not (folder / "model.pt").is_file():
        raise MpcflError(f"{folder}: no model.pt (not a model receiver's run folder)")
    record = json.loads((folder / "model.json").read_text())
    module = build_torch_model(ModelSpec(**record["model"]), n_features=record["n_features"])
    module.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    module.eval()
    saved = {}
    for where in (folder, *map(Path, others)):
        path = where if where.suffix == ".json" else where / PREPROCESSING
        try:
            part = json.loads(path.read_text())
        except FileNotFoundError:
            raise MpcflError(f"{path}: not found; pass each party's run folder") from None
        saved[part["party"]] = part
    vertical = record.get("partition") == "vertical"
    parties = record["parties"] if vertical else [json.loads((folder / PREPROCESSING).read_text())["party"]]
    counts = record["feature_counts"] if vertical else [record["n_features"]]
    columns, center, scale, row_clip, imputed, start = [], [], [], [], {}, 0
    inputs: list[tuple[int, bool]] = []  # per party: its raw columns' count, and whether they go through the backbone
    for party, count in zip(parties, counts):
        if count == 0:
            continue
        if party not in saved:
            raise MpcflError(f"{folder}: the model also takes party {party}'s {count} columns: pass its run folder")
        part = saved[party]
        if len(part["columns"]) != count:
            raise MpcflError(f"party {party}'s preprocessing.json has {len(part['columns'])} columns, the model {count}")
        columns += part.get("inputs") or part["columns"]
        inputs.append((len(part.get("inputs") or part["columns"]), part.get("inputs") is not None))
        imputed.update(part.get("imputed") or {})
        scaler, scaling = part.get("scaler"), record.get("scaling")
        for i, column in enumerate(part["columns"]):
            if scaler is not None:
                center.append(scaler["mean"][i])
                scale.append(scaler["std"][i])
            elif scaling is not None:
                center.append(scaling[column][0])
                scale.append(scaling[column][1])
            else:
                center.append(0.0)
                scale.append(1.0)
        if record.get("row_clip") is not None:
            row_clip.append((start, start + count, record["row_clip"]))
        start += count
    target = record.get("target")
    return Preprocessed(
        module, columns, center, scale, clamp=record.get("max_abs"), row_clip=row_clip,
        target=None if target is None else (target["center"], target["scale"]),
        imputed=imputed, classes=record.get("classes"), inputs=inputs,
        backbone=_backbone(record.get("backbone"), folder, ran=any(runs for _, runs in inputs)),
    )


def _backbone(saved: dict[str, Any] | None, folder: Path, *, ran: bool) -> nn.Module | None:
    """The training job's backbone, rebuilt from its factory and weights and checked against the digest
    training recorded (the files may have changed since); None when no party ``ran`` one.

    Raises:
        MpcflError: it cannot be built, or it is not the one the model was trained on.
    """
    if saved is None:
        if ran:
            raise MpcflError(f"{folder}: its model.json does not name the backbone the model was trained behind; train again")
        return None
    weights = None if saved["weights"] is None else Path(saved["weights"])
    module = build_backbone(saved["factory"], weights)
    if backbone_digest(module) != saved["digest"]:
        raise MpcflError(f"{folder}: data.backbone {saved['factory']} is not the backbone this model was trained on (its code or weights changed)")
    return module
