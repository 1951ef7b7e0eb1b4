"""Secure training end to end: real party and dealer processes started by the launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import (
    DEMO, base_job, demo_against_plaintext, horizontal_parties, job_metrics, mann_whitney, run_job, vertical_parties, write_job,
)
from mpcfl.tasks.train.baseline import train_plaintext
from mpcfl.jobs.schema import load_job
from mpcfl.tasks.train.baseline import prepared_data
from mpcfl.models.build import build_torch_model


def test_demo_matches_plaintext_pytorch_within_two_points(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        for key, value in party["data"].items():
            party["data"][key] = str((DEMO.parent / value).resolve())
    spec["outputs"]["dir"] = str(tmp_path / "out")
    path = write_job(tmp_path, spec)
    job, _, _ = demo_against_plaintext(path)
    # Only the named receiver gets the model; it loads into the plain torch model.
    assert not (job.party_root("hospital_a") / "latest" / "model.pt").exists()
    state = torch.load(job.party_root("hospital_b") / "latest" / "model.pt", weights_only=True)
    model = build_torch_model(job.model, n_features=30)
    model.load_state_dict(state)
    # The reported metrics, from counts opened under MPC, are those of the model on the test rows
    _, _, x_test, y_test = prepared_data(job)
    with torch.no_grad():
        p = torch.sigmoid(model(x_test)).squeeze(1).numpy()
    labels = y_test.squeeze(1).numpy() == 1
    final = job_metrics(path, "hospital_b")["final"]
    predicted = p > 0.5
    assert final["test_confusion"] == [[int((~labels & ~predicted).sum()), int((~labels & predicted).sum())],
                                       [int((labels & ~predicted).sum()), int((labels & predicted).sum())]]
    assert abs(final["test_auc"] - mann_whitney(p, labels)) < 0.01 and 0 < final["test_f1"] <= 1
    assert (job.party_root("hospital_b") / "latest" / "metrics.png").stat().st_size > 1000
    # Every party records its own communication, and what it saw revealed.
    for party in ("hospital_a", "hospital_b"):
        record = job_metrics(path, party)
        assert record["communication"]["bytes"] > 0 and record["communication"]["rounds"] > 0
        assert {r["what"] for r in record["reveals"]} >= {"trained model parameters", "epoch 10 loss and accuracy"}


@pytest.mark.parametrize(
    ("partition", "n_parties", "model", "sigmoid"),
    [
        ("vertical", 3, {"type": "mlp", "hidden": [8]}, "poly"),
        ("horizontal", 2, {"type": "logistic_regression"}, "piecewise"),
        ("horizontal", 3, {"type": "mlp", "hidden": [8]}, "crypten"),
    ],
)
def test_partitions_and_models(tmp_path: Path, partition: str, n_parties: int, model: dict[str, Any], sigmoid: str) -> None:
    """Each partition and model, and each training.sigmoid (the cheap ones against the exact plaintext sigmoid)."""
    if partition == "vertical":
        groups = [["mean_radius", "mean_texture", "mean_area"], ["worst_radius", "worst_area"], ["mean_concavity", "worst_concave_points"]]
        parties = vertical_parties(tmp_path, groups, label_party=2)
        labels = {"party": "p2", "column": "malignant"}
    else:
        parties = horizontal_parties(tmp_path, n_parties)
        labels = {"column": "malignant"}
    spec = base_job(partition=partition, parties=parties, labels=labels, model=model)
    spec["training"].update(sigmoid=sigmoid, epochs=1)  # 8 steps: plaintext reaches 0.947-0.965 in one epoch
    spec["outputs"]["model_to"] = ["p0"]
    spec["outputs"]["metrics_to"] = ["p0"]
    path = write_job(tmp_path, spec)
    done = run_job(path)
    # Every step asks the dealer the same requests, the first (momentum starting at zero) included, so
    # the recording of one step serves the next (with 3 parties truncations go through the dealer too).
    assert "differs from the recorded one" not in done.stdout + done.stderr
    # Its output went to a pipe, not a terminal: no progress bar, whose redraws a log file would keep glued
    # to the next log line (found by a new user); the launcher tells its processes (MPCFL_PROGRESS).
    assert "batch/s" not in done.stdout + done.stderr and "epoch 1/1:" not in done.stdout + done.stderr
    job = load_job(path)
    final = job_metrics(path, "p0")["final"]
    plain = train_plaintext(job).history[-1]
    assert final["test_accuracy"] > 0.85
    assert abs(final["test_accuracy"] - plain["test_accuracy"]) <= (0.05 if sigmoid == "crypten" else 0.02)
    # Metrics go only to their receivers; the others keep only their own comm figures.
    others = job_metrics(path, "p1")["final"]
    assert "test_accuracy" not in others and others["bytes"] > 0
    n_features = 7 if partition == "vertical" else 30
    build_torch_model(job.model, n_features=n_features).load_state_dict(
        torch.load(job.party_root("p0") / "latest" / "model.pt", weights_only=True)
    )


def test_multiclass_mlp_on_digits(tmp_path: Path) -> None:
    from conftest import REPO, write_csv

    data = np.loadtxt(REPO / "examples" / "data" / "digits8x8.csv", delimiter=",", skiprows=1)[:600]
    header = [f"p{i}" for i in range(64)] + ["target"]
    data[:, :64] /= 16.0
    parties = []
    for i, rows in enumerate(np.array_split(data, 2)):
        train = write_csv(tmp_path / f"d{i}_train.csv", header, rows[:240])
        test = write_csv(tmp_path / f"d{i}_test.csv", header, rows[240:])
        parties.append({"name": f"p{i}", "data": {"train": str(train), "test": str(test)}})
    spec = base_job(
        partition="horizontal",
        parties=parties,
        labels={"column": "target"},
        model={"type": "mlp", "hidden": [16], "num_classes": 10},
        data={"standardize": False},
    )
    # 2 epochs of 15 steps: plaintext reaches 0.79 (0.91 after a third epoch, which cost 14 s of 57 here).
    spec["training"].update(loss="cross_entropy", epochs=2, batch_size=32, learning_rate=0.2)
    path = write_job(tmp_path, spec)
    run_job(path)
    final = job_metrics(path, "p1")["final"]
    plain = train_plaintext(load_job(path)).history[-1]
    assert final["test_accuracy"] > 0.7
    assert abs(final["test_accuracy"] - plain["test_accuracy"]) <= 0.05


def test_model_kept_secret_shared_when_nobody_receives_it(tmp_path: Path) -> None:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["runtime"]["provider"] = "tfp"
    path = write_job(tmp_path, spec)
    done = run_job(path)
    # Every party warns when the insecure TFP provider is in use.
    for party in ("p0", "p1"):
        assert f"[{party}] WARNING mpcfl.mpc.session: INSECURE" in done.stdout
    assert "[dealer]" not in done.stdout
    job = load_job(path)
    shares = [torch.load(job.party_root(p) / "latest" / "model_shares.pt", weights_only=True) for p in ("p0", "p1")]
    assert not any((job.party_root(p) / "latest" / "model.pt").exists() for p in ("p0", "p1"))
    assert [s["rank"] for s in shares] == [0, 1]
    # Neither share alone is the model, but their ring sum decodes to a working one.
    weight = (shares[0]["shares"]["0.weight"] + shares[1]["shares"]["0.weight"]).double() / 2 ** shares[0]["precision_bits"]
    assert weight.abs().max() < 50
    assert shares[0]["shares"]["0.weight"].double().abs().max() > 1e6


def test_revealed_wrap_around_symptoms_stop_the_run() -> None:
    from mpcfl.models.heads import BinaryHead
    from mpcfl.tasks.train.bounds import Bounds, WrapAround
    from mpcfl.tasks.train.loop import _check_metrics, _check_weights

    binary = BinaryHead(2)

    limits = Bounds(input_norm=10.0, steps=100, largest_product=1e6, weight=50.0, logit=1e3)
    healthy = torch.tensor([120.0, 90.0, 30.0, 20.0])
    _check_metrics(healthy, limits, [100, 25], head=binary, noise=0.0, what="party p0: epoch 1")
    _check_metrics(None, limits, [100, 25], head=binary, noise=0.0, what="not a receiver")
    for sums, entry in (([-2.0e9, 90.0, 30.0, 20.0], 0), ([120.0, float("nan"), 30, 20], 1), ([120.0, 90.0, 1e9, 20], 2)):
        with pytest.raises(WrapAround, match=rf"party p0: epoch 1: revealed value .* \(entry {entry}\) is outside"):
            _check_metrics(torch.tensor(sums), limits, [100, 25], head=binary, noise=0.0, what="party p0: epoch 1")
    # DP noise may push a sum below zero; that is not a symptom.
    _check_metrics(torch.tensor([-3.0, 90.0]), limits, [100], head=binary, noise=1.0, what="noisy")
    _check_weights({"0.weight": torch.tensor([[1.0, -49.0]]), "0.bias": torch.tensor([2.0])}, limits, what="w")
    with pytest.raises(WrapAround, match="party p1: trained model parameters: revealed value 2.7e\\+09"):
        _check_weights({"0.weight": torch.tensor([[1.0, 2.7e9]])}, limits, what="party p1: trained model parameters")
    assert "\n" not in str(pytest.raises(WrapAround, _check_weights, {"w": torch.tensor([float("inf")])}, limits, what="w").value)
