"""Regression: linear and MLP regression under MPC against `mpcfl baseline` on the shipped diabetes
job, its metrics (R^2, MAE, RMSE in the label's units), the model in plain torch, secure prediction
of new rows, and the checks that keep a target from wrapping fixed point or voiding DP."""

from __future__ import annotations

import csv
import re
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, job_metrics, mpcfl, run_dir, run_job, write_job
from mpcfl.data.files import DataError
from mpcfl.data.party import load_party_data
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job
from mpcfl.tasks.train.baseline import train_plaintext
from mpcfl.tasks.train.dp_sgd import calibration, clips_features, metrics_charge

SHIPPED = REPO / "configs" / "diabetes_regression.yaml"
DATA = REPO / "examples" / "data" / "diabetes"


def _diabetes(tmp_path: Path, **changes: dict) -> dict:
    spec = yaml.safe_load(SHIPPED.read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((SHIPPED.parent / v).resolve()) for k, v in party["data"].items()}
    spec["outputs"]["dir"] = str(tmp_path / "out")
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def _read(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as handle:
        rows = list(csv.reader(handle))
    return rows[0], np.array(rows[1:], dtype=float)


def _r2(predicted: np.ndarray, target: np.ndarray) -> float:
    return 1 - float(((predicted - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def test_secure_linear_regression_matches_the_baseline_and_predicts_new_rows(tmp_path: Path) -> None:
    job = write_job(tmp_path, _diabetes(tmp_path, training={"epochs": 8}))
    run_job(job)
    final = job_metrics(job, "clinic")["final"]
    plain = train_plaintext(load_job(job)).history[-1]
    # the bar: secure R^2 within 0.01 of mpcfl baseline on the same job
    assert final["test_r2"] == pytest.approx(plain["test_r2"], abs=0.01)
    assert final["test_r2"] > 0.4  # the job learns: OLS on these features reaches about 0.5
    for key in ("test_mae", "test_rmse", "train_mae", "test_loss"):
        assert final[key] == pytest.approx(plain[key], rel=0.01), key
    assert 30 < final["test_mae"] < 60  # in the label's units (progression), not the scaled target's
    assert "test_accuracy" not in final and "test_auc" not in final
    # the lab, also a metric receiver, reads the same aggregates; it never held a target
    assert job_metrics(job, "lab")["final"]["test_r2"] == pytest.approx(final["test_r2"], abs=1e-9)

    # the model with the job's preprocessing: raw columns in, progression out
    model = mpcfl_load(run_dir(job, "clinic"), run_dir(job, "lab"))
    _, clinic = _read(DATA / "clinic_test.csv")
    _, lab = _read(DATA / "lab_test.csv")
    raw = torch.tensor(np.hstack([clinic[:, :4], lab]), dtype=torch.float32)
    with torch.no_grad():
        plain_predictions = model(raw).squeeze(1).double().numpy()
    assert _r2(plain_predictions, clinic[:, 4]) == pytest.approx(final["test_r2"], abs=0.01)

    # new rows split across the parties: the predictions, in the label's units, to the clinic only
    done = mpcfl(
        "predict", str(job), "--rows", f"clinic={DATA / 'clinic_test.csv'}", f"lab={DATA / 'lab_test.csv'}", "--to", "clinic",
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"finished: r2=0\.\d+ mae=\d+\.\d+ loss=[\d.]+ \(clinic\)", done.stdout), done.stdout[-500:]
    out = tmp_path / "out" / "predictions"
    header, table = _read(out / "clinic" / "latest" / "predictions.csv")
    assert header == ["row", "predicted"]
    assert np.mean(np.abs(table[:, 1] - plain_predictions) < 0.5) >= 0.99  # within half a unit of progression
    metrics = json.loads((out / "clinic" / "latest" / "metrics.json").read_text())["metrics"]
    assert metrics["r2"] == pytest.approx(_r2(table[:, 1], clinic[:, 4]), abs=1e-3)
    assert not (out / "lab" / "latest" / "predictions.csv").exists()


def mpcfl_load(*folders: Path) -> torch.nn.Module:
    from mpcfl import load_model

    return load_model(*folders)


def test_an_mlp_regression_matches_the_baseline(tmp_path: Path) -> None:
    spec = _diabetes(tmp_path, model={"type": "mlp", "hidden": [8]}, training={"loss": "mse", "epochs": 5, "learning_rate": 0.01})
    job = write_job(tmp_path, spec)
    run_job(job)
    final = job_metrics(job, "clinic")["final"]
    assert final["test_r2"] == pytest.approx(train_plaintext(load_job(job)).history[-1]["test_r2"], abs=0.01)


def test_regression_jobs_are_checked_before_anything_runs(tmp_path: Path) -> None:
    def refused(match: str, **changes: dict) -> None:
        with pytest.raises(ConfigError, match=match):
            load_job(write_job(tmp_path, _diabetes(tmp_path, **changes)))

    assert load_job(SHIPPED).training.loss == "mse"  # linear_regression decides the loss
    refused(r"training.loss: mse fits a value; use model.type: linear_regression", model={"type": "logistic_regression"}, training={"loss": "mse"})
    refused(r"linear_regression fits a value with mse or huber, not bce", training={"loss": "bce"})
    refused(r"model.num_classes: linear_regression predicts a value", model={"num_classes": 3})
    refused(r"labels.classes: a regression .* predicts a value", labels={"classes": ["low", "high"]})
    refused(r"training.sigmoid: a regression has no sigmoid", training={"sigmoid": "poly"})
    refused(r"labels.scaling: must be|scale > 0", labels={"scaling": [150, 0]})
    dp = {"epsilon": 4, "delta": 1e-5, "clip": 1.0}
    refused(r"with dp, mse's gradient grows with the error, unbounded; use huber", dp=dp)
    breast = yaml.safe_load((REPO / "configs" / "breast_cancer_lr.yaml").read_text())
    breast["labels"]["scaling"] = [0, 1]
    with pytest.raises(ConfigError, match="labels.scaling: bounds and scales a regression's targets"):
        load_job(write_job(tmp_path, breast, "breast.yaml"))


def test_a_target_beyond_its_bound_is_refused_or_under_dp_clamped(tmp_path: Path) -> None:
    # without labels.scaling, progression (25..346) is far beyond labels.max_abs = 5
    spec = _diabetes(tmp_path)
    del spec["labels"]["scaling"]
    with pytest.raises(DataError, match=r"label column 'progression', data row 1: 151 scales to 151, beyond labels.max_abs=5; declare labels.scaling"):
        load_party_data(load_job(write_job(tmp_path, spec)), "clinic")
    # under DP a refusal would depend on one record: the target is clamped instead
    scaling = {c: [0.0, 100.0] for c in ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")}
    spec = _diabetes(
        tmp_path, labels={"scaling": [150, 10]}, training={"loss": "huber", "huber_delta": 0.5},
        data={"standardize": False, "scaling": scaling, "max_abs": 4}, outputs={"metrics_to": "none"},
        dp={"epsilon": 4, "delta": 1e-5, "clip": 1.0},
    )
    job = load_job(write_job(tmp_path, spec, "dp.yaml"))
    y = load_party_data(job, "clinic").train.y
    assert y.max() == 5.0 and y.min() == -5.0  # (346 - 150) / 10 and (25 - 150) / 10, clamped
    from mpcfl.data.party import _targets

    spec_of = job.regression
    assert _targets(np.array([np.inf, -np.inf, 160.0]), spec_of, dp=True, where="w").tolist() == [5.0, -5.0, 1.0]
    with pytest.raises(DataError, match="data row 1: inf is not a number"):
        _targets(np.array([np.inf]), spec_of, dp=False, where="w")
    # linear regression clips features, as logistic regression does; Huber's gradient bound delta prices the clip
    assert clips_features(job)
    noise, sensitivity = calibration(job, 10, 354)
    wide = load_job(write_job(tmp_path, {**spec, "training": {**spec["training"], "huber_delta": 1.0}}, "wide.yaml"))
    assert calibration(wide, 10, 354)[1] == pytest.approx(2 * sensitivity, rel=0.01)


def test_dp_regression_metrics_pay_for_the_absolute_error(tmp_path: Path) -> None:
    """A regression's second released sum is clipped absolute errors in [0, L], not hits in {0, 1}."""
    scaling = {c: [0.0, 100.0] for c in ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")}
    metrics = {"noise_multiplier": 4.0, "loss_bound": 2.0}
    spec = _diabetes(
        tmp_path, training={"loss": "huber"}, data={"standardize": False, "scaling": scaling, "max_abs": 4},
        dp={"epsilon": 4, "delta": 1e-5, "clip": 1.0, "metrics": metrics},
    )
    charge, scale = metrics_charge(load_job(write_job(tmp_path, spec)))
    assert scale == pytest.approx(4.0 * np.hypot(2.0, 2.0))
    breast = yaml.safe_load((REPO / "configs" / "breast_cancer_dp.yaml").read_text())
    breast["dp"]["metrics"] = metrics
    breast["outputs"]["metrics_to"] = "all"
    for party in breast["parties"]:
        party["data"] = {k: str((REPO / "configs" / v).resolve()) for k, v in party["data"].items()}
    assert metrics_charge(load_job(write_job(tmp_path, breast, "breast.yaml")))[1] == pytest.approx(4.0 * np.hypot(2.0, 1.0))


def test_federated_regression_is_refused(tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "configs" / "breast_cancer_fed.yaml").read_text())
    spec["model"] = {"type": "linear_regression"}
    with pytest.raises(ConfigError, match="federated training classifies"):
        load_job(write_job(tmp_path, spec))
