"""`runtime.device: cuda` end to end: real party and dealer processes, shares on the GPU.

Skipped where torch sees no GPU (CI, the developers' machines); ``benchmarks/gpu_check.sh``
runs it on a GPU machine. The CPU suite covers the same code paths with ``device: cpu``
(the device is passed down explicitly, see :mod:`mpcfl.mpc.device`), and
tests/mpc/test_device.py the crossings between the device and the host.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import (DEMO, REPO, base_job, crash_after_epoch, demo_against_plaintext, job_metrics, party_lines, run_job,
                      vertical_parties, write_job)
from mpcfl.jobs.schema import load_job
from mpcfl.models.build import build_torch_model
from mpcfl.tasks.train.baseline import train_plaintext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch.cuda.is_available() is false")

DP_DEMO = REPO / "configs" / "breast_cancer_dp.yaml"
INFERENCE_DATA = REPO / "examples" / "data" / "digits_inference"


def config_on_cuda(config: Path, tmp_path: Path) -> dict[str, Any]:
    """A shipped config with absolute data paths, outputs under tmp_path and ``runtime.device: cuda``."""
    spec = yaml.safe_load(config.read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((config.parent / v).resolve()) for k, v in party["data"].items()}
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec.setdefault("runtime", {})["device"] = "cuda"
    return spec


def run_on_cuda(path: Path, *args: str) -> subprocess.CompletedProcess:
    done = run_job(path, *args)
    assert "computing on cuda" in done.stdout
    return done


def assert_saved_on_the_host(job_path: Path, party: str, *, model: bool) -> None:
    """Checkpoints (and the revealed model) load with weights_only, as plain CPU tensors."""
    folder = load_job(job_path).party_root(party) / "latest"
    checkpoint = torch.load(sorted((folder / "checkpoints").iterdir())[-1], weights_only=True)
    for share in [*checkpoint["params"].values(), *checkpoint["momentum"].values()]:
        assert type(share) is torch.Tensor and share.device.type == "cpu" and share.dtype == torch.int64
    if model:
        state = torch.load(folder / "model.pt", weights_only=True)
        assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in state.values())


def test_demo_logistic_regression_on_cuda_matches_plaintext(tmp_path: Path) -> None:
    path = write_job(tmp_path, config_on_cuda(DEMO, tmp_path))
    job, _, _ = demo_against_plaintext(path)
    assert_saved_on_the_host(path, "hospital_b", model=True)
    assert_saved_on_the_host(path, "hospital_a", model=False)
    build_torch_model(job.model, n_features=30).load_state_dict(
        torch.load(job.party_root("hospital_b") / "latest" / "model.pt", weights_only=True)
    )


def test_mlp_on_cuda(tmp_path: Path) -> None:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture", "mean_area"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"}, model={"type": "mlp", "hidden": [8]})
    spec["outputs"].update(model_to=["p0"], metrics_to=["p0"])
    spec["runtime"]["device"] = "cuda"
    path = write_job(tmp_path, spec)
    run_on_cuda(path)
    final = job_metrics(path, "p0")["final"]
    plain = train_plaintext(load_job(path)).history[-1]
    assert final["test_accuracy"] > 0.85
    assert abs(final["test_accuracy"] - plain["test_accuracy"]) <= 0.05
    assert_saved_on_the_host(path, "p0", model=True)


@pytest.mark.parametrize("model", [{"type": "logistic_regression"}, {"type": "mlp", "hidden": [8]}], ids=["lr", "mlp"])
def test_dp_sgd_on_cuda(tmp_path: Path, model: dict[str, Any]) -> None:
    """Feature-clipped (LR) and per-example-clipped (MLP) DP-SGD, noise shares added on the GPU."""
    spec = config_on_cuda(DP_DEMO, tmp_path)
    spec["model"] = model
    spec["training"]["epochs"] = 2
    spec["outputs"]["metrics_to"] = ["hospital_b"]
    spec["dp"]["metrics"] = {"mechanism": "gaussian", "noise_multiplier": 30.0}
    path = write_job(tmp_path, spec)
    run_on_cuda(path)
    privacy = json.loads((load_job(path).party_root("hospital_b") / "latest" / "privacy.json").read_text())
    assert [e["what"] for e in privacy["ledger"]][-1] == "trained model parameters"
    assert 0 < privacy["spent"] <= spec["dp"]["epsilon"]
    assert 0.0 <= job_metrics(path, "hospital_b")["final"]["test_accuracy"] <= 1.0
    assert_saved_on_the_host(path, "hospital_b", model=True)


def test_resume_on_cuda_puts_the_shares_back_on_the_gpu(tmp_path: Path) -> None:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture", "mean_area"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["training"]["epochs"] = 3
    spec["outputs"]["model_to"] = ["p0"]
    spec["runtime"]["device"] = "cuda"
    path = write_job(tmp_path, spec)
    assert crash_after_epoch(path, 1) == 1
    done = run_on_cuda(path, "--resume")
    assert "[p0] INFO mpcfl.tasks.train.runner: resuming after epoch 1" in done.stdout
    assert [row["epoch"] for row in job_metrics(path, "p0")["history"]] == [1, 2, 3]
    assert job_metrics(path, "p0")["final"]["test_accuracy"] > 0.85


def test_inference_on_cuda_matches_plaintext(tmp_path: Path) -> None:
    from mpcfl.models.zoo import digits_mlp

    spec = yaml.safe_load((REPO / "configs" / "digits_inference.yaml").read_text())
    spec["model"]["weights"] = str(INFERENCE_DATA / "bank_weights.pt")
    spec["inputs"]["file"] = str(INFERENCE_DATA / "clinic_inputs.npy")
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["runtime"]["device"] = "cuda"
    path = write_job(tmp_path, spec)
    done = run_on_cuda(path)
    # Four batches: the weights' fixed masks (runtime.mask_reuse) serve every product on the GPU.
    assert "[clinic] INFO mpcfl.mpc.fixed_mask: fixed the masks of 2 weight matrices" in done.stdout, done.stdout[-3000:]
    model = digits_mlp()
    model.load_state_dict(torch.load(INFERENCE_DATA / "bank_weights.pt", weights_only=True))
    inputs = np.load(INFERENCE_DATA / "clinic_inputs.npy")
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(inputs)).numpy()
    predictions = np.load(tmp_path / "out" / "clinic" / "latest" / "predictions.npy")
    assert predictions.shape == expected.shape
    assert np.abs(predictions - expected).max() < 1e-2
    assert (predictions.argmax(1) == expected.argmax(1)).all()


def test_dealer_truncation_and_a_huggingface_bert_on_cuda() -> None:
    """Three parties on the GPU (tests/scripts/cuda_transformer_party.py): the dealer's truncation pairs
    divide CUDA shares exactly where CrypTen's own division errs, the quotient's share stays on the
    GPU; a Hugging Face BERT served from p0 to p1 matches float torch (exact) and its emulation
    (mpc_friendly). Secure training of a ViT on the GPU: tests/models/test_transformer_training.py."""
    reports = {rank: json.loads(line) for rank, line in
               party_lines("cuda_transformer_party.py", 3, "cuda party", "--device", "cuda").items()}
    for rank, report in reports.items():
        assert report["device"].startswith("cuda"), report
        assert report["local"]["wrong"] > 10 and report["dealer"]["wrong"] == 0, report
        assert report["local"]["share_on"] == report["dealer"]["share_on"] == "cuda", report
    assert reports["1"]["bert_exact"]["error"] < 2e-2 and reports["1"]["bert_mpc_friendly"]["error"] < 2e-2, reports["1"]
    assert reports["1"]["bert_exact"]["on"] == "cpu"  # revealed values come back to the host
