"""Full-MPC training of a user's torch module (model.factory): real party and dealer processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import REPO, base_job, run_job, write_csv, write_job
from mpcfl.jobs.schema import load_job
from mpcfl.models.build import build_torch_model
from mpcfl.tasks.train.baseline import train_plaintext

TINY_CNN = """
from torch import nn

def tiny_cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(18, 10))
"""


def test_tiny_cnn_trains_like_plaintext_torch_and_loads_back(tmp_path: Path) -> None:
    """Same public initial weights and batch order as plain torch: the revealed weights follow it."""
    (tmp_path / "tiny_cnn.py").write_text(TINY_CNN)
    data = np.loadtxt(REPO / "examples" / "data" / "digits8x8.csv", delimiter=",", skiprows=1)[:128]
    data[:, :64] /= 16.0
    header = [f"p{i}" for i in range(64)] + ["target"]
    parties = []
    for i, rows in enumerate(np.array_split(data, 2)):
        train = write_csv(tmp_path / f"d{i}_train.csv", header, rows)
        parties.append({"name": f"p{i}", "data": {"train": str(train)}})
    spec = base_job(
        partition="horizontal", parties=parties, labels={"column": "target"}, data={"standardize": False},
        model={"factory": f"{tmp_path / 'tiny_cnn.py'}:tiny_cnn", "num_classes": 10},
    )
    spec["training"].update(loss="cross_entropy", epochs=1, batch_size=64, learning_rate=0.5)
    spec["outputs"].update(model_to=["p0"], metrics_to="none")  # the metrics' cost is the head's, tested elsewhere
    path = write_job(tmp_path, spec)
    run_job(path)
    job = load_job(path)
    revealed = torch.load(job.party_root("p0") / "latest" / "model.pt", weights_only=True)
    plain = train_plaintext(job)
    for name, value in plain.model.state_dict().items():
        assert torch.allclose(revealed[name], value, atol=2e-3), (name, (revealed[name] - value).abs().max())
    # The weights load into the user's own module; and the untrained start was not the answer.
    model = build_torch_model(job.model, n_features=64)
    model.load_state_dict(revealed)
    start = build_torch_model(job.model, n_features=64, seed=job.training.seed).state_dict()
    moved = max(float((revealed[n] - start[n]).abs().max()) for n in start)
    assert moved > 0.02  # ten times the tolerance above
    # Nothing but the weights left MPC, and only towards p0 (every party records what it took part in).
    for party in ("p0", "p1"):
        reveals = json.loads((job.party_root(party) / "latest" / "metrics.json").read_text())["reveals"]
        assert [(r["what"], r["to"]) for r in reveals] == [("trained model parameters", [0])], reveals
    record = json.loads((job.party_root("p0") / "latest" / "model.json").read_text())
    assert record["n_features"] == 64 and record["model"]["factory"] == job.model.factory
