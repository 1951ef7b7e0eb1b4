"""Secure prediction with a trained model: new rows split across the parties, the model revealed to
one party or kept in shares, the predictions opened to their receiver only."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DEMO, REPO, SPY, assert_no_leftovers, base_job, horizontal_parties, mpcfl, run_job, spy_views, write_job
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job
from mpcfl.tasks.train.baseline import prepared_data

SMALLEST_TELLING = 1 << 12  # ring values below this can be public small integers


def _demo(tmp_path: Path, model_to: list[str] | str) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "breast_cancer_lr.yaml").read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    spec["training"]["epochs"] = 2
    spec["outputs"] = {"dir": str(tmp_path / "out"), "model_to": model_to, "metrics_to": "all"}
    return write_job(tmp_path, spec)


def _new_rows(job: Path) -> list[str]:
    spec = load_job(job)
    return [f"{p.name}={p.data.test}" for p in spec.parties]


def _read(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open() as handle:
        rows = list(csv.reader(handle))
    return rows[0], np.array(rows[1:], dtype=float)


def _plain_logits(job: Path, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same model on the same rows in plain torch (reading both parties' files: a measurement)."""
    _, _, x_test, _ = prepared_data(load_job(job))
    return x_test.double() @ state["0.weight"].double().T + state["0.bias"].double()


def test_a_secret_shared_model_predicts_new_rows_and_only_the_receiver_learns_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _demo(tmp_path, "none")
    run_job(job)
    out = tmp_path / "out"
    # The model nobody holds: the test adds both parties' shares (the parties never do).
    shares = [torch.load(out / p / "latest" / "model_shares.pt", weights_only=True)["shares"] for p in ("hospital_a", "hospital_b")]
    ring = {name: shares[0][name] + shares[1][name] for name in shares[0]}  # int64 addition wraps like the ring
    state = {name: value.double() / 2**16 for name, value in ring.items()}
    spy = tmp_path / "spy"
    spy.mkdir()
    monkeypatch.setenv("MPCFL_SPY_DIR", str(spy))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SPY), os.environ.get("PYTHONPATH")])))
    done = mpcfl("predict", str(job), "--rows", *_new_rows(job), "--to", "hospital_b", timeout=180)
    monkeypatch.delenv("MPCFL_SPY_DIR")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert re.search(r"finished: accuracy=0\.\d+ loss=[\d.]+ \(hospital_b\)", done.stdout), done.stdout[-500:]
    header, table = _read(out / "predictions" / "hospital_b" / "latest" / "predictions.csv")
    assert header == ["row", "predicted", "p_0", "p_1"]
    plain = torch.sigmoid(_plain_logits(job, state)).squeeze(1).numpy()
    assert len(table) == len(plain) == 113
    assert np.mean(table[:, 1] == (plain > 0.5)) >= 0.99  # the bar: agreement on 99% of rows
    assert np.abs(table[:, 3] - plain).max() < 0.02
    metrics = json.loads((out / "predictions" / "hospital_b" / "latest" / "metrics.json").read_text())
    labels = np.loadtxt(load_job(job).parties[1].data.test, delimiter=",", skiprows=1)[:, -1]
    assert metrics["metrics"]["accuracy"] == pytest.approx(np.mean((plain > 0.5) == labels), abs=0.01)
    # hospital_a gave rows and learnt nothing: no predictions file, no figures
    mine = out / "predictions" / "hospital_a" / "latest"
    assert not (mine / "predictions.csv").exists() and "metrics" not in json.loads((mine / "metrics.json").read_text())
    views = spy_views(spy)
    opened = views["1"]["opened_protocol"]
    assert opened.size == 113  # the logits, and nothing else, were opened to hospital_b
    encoded = torch.cat([v.reshape(-1) for v in ring.values()]).numpy()
    for rank in ("0", "1", "2"):  # the model stays secret from everyone, the dealer too
        assert not np.isin(views[rank]["seen_protocol"], encoded[np.abs(encoded) >= SMALLEST_TELLING]).any()
    for rank in ("0", "2"):  # the other hospital and the dealer: nothing during the opening, no logit
        assert int(views[rank].get("received_protocol", np.zeros(1)).sum()) == 0
        telling = opened[np.abs(opened) >= SMALLEST_TELLING]
        near = np.unique(np.concatenate([telling + d for d in range(-2, 3)]))
        assert not np.isin(views[rank]["seen_protocol"], near).any(), f"rank {rank} holds a prediction"
    assert_no_leftovers(str(job))


def test_a_revealed_model_predicts_from_its_holder_and_bad_rows_are_named(tmp_path: Path) -> None:
    job = _demo(tmp_path, ["hospital_b"])
    run_job(job)
    out = tmp_path / "out"
    state = torch.load(out / "hospital_b" / "latest" / "model.pt", weights_only=True)
    done = mpcfl("predict", str(job), "--rows", *_new_rows(job), "--to", "hospital_a", "hospital_b", timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "the model enters MPC from hospital_b, which holds its weights" in done.stdout
    plain = torch.sigmoid(_plain_logits(job, state)).squeeze(1).numpy()
    for party in ("hospital_a", "hospital_b"):
        _, table = _read(out / "predictions" / party / "latest" / "predictions.csv")
        assert np.mean(table[:, 1] == (plain > 0.5)) >= 0.99
    # hospital_a's file lacks a training column: one line naming the party, the file and the column
    spec = load_job(job)
    path = spec.parties[0].data.test
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.csv"
    cut.write_text("\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n")
    done = mpcfl("predict", str(job), "--rows", f"hospital_a={cut}", _new_rows(job)[1], "--to", "hospital_b", timeout=120)
    assert done.returncode != 0
    assert f"party hospital_a: {cut}: columns must be this party's training feature columns" in done.stderr
    assert "missing ['mean_radius']" in done.stderr
    # A party the job lacks is named by the flag the user typed, not a key of a temporary job file
    for flags, line in (([f"hospitl_a={cut}", "--to", "hospital_b"], "--rows: 'hospitl_a' is not a party of"),
                        ([f"hospital_a={cut}", "--to", "hospital_c"], "--to: 'hospital_c' is not a party of")):
        done = mpcfl("predict", str(job), "--rows", *flags, timeout=60)
        assert done.returncode == 1 and f"mpcfl: error: {line} {job} (its parties: hospital_a, hospital_b)" in done.stderr, done.stderr
    assert_no_leftovers(str(job))


def test_a_horizontal_party_predicts_its_own_labelled_rows_and_scores_them(tmp_path: Path) -> None:
    """Found by a new user: in a horizontal job every party's file has the label column, and predict
    refused it as an extra column. The rows' owner reads its own labels; the scores are its alone."""
    spec = base_job(partition="horizontal", parties=horizontal_parties(tmp_path, 2), labels={"column": "malignant"})
    spec["training"]["epochs"] = 1
    spec["outputs"]["model_to"] = ["p1"]
    job = write_job(tmp_path, spec)
    run_job(job)
    rows = load_job(job).parties[0].data.test
    done = mpcfl("predict", str(job), "--rows", f"p0={rows}", "--to", "p0", timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    record = json.loads(next((tmp_path / "out" / "predictions" / "p0" / "latest").glob("*.json")).read_text())
    assert record["metrics"]["accuracy"] > 0.85, record
    header, table = _read(tmp_path / "out" / "predictions" / "p0" / "latest" / "predictions.csv")
    assert header[:2] == ["row", "predicted"] and len(table) == len(rows.read_text().splitlines()) - 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": {"clinic": "x.csv"}}, "rows: 'clinic' is not a party of this job"),
        ({"predictions_to": ["clinic"]}, "predictions_to: 'clinic' is not a party of this job"),
        ({"model_run": "yesterday"}, "model_run: 'yesterday' is neither latest nor a run id"),
        ({"train_job": "missing.yaml"}, "train_job: "),
    ],
)
def test_predict_job_errors_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    train = _demo(tmp_path, "none")
    spec = {"task": "predict", "train_job": str(train), "rows": {"hospital_a": "a.csv"}, "predictions_to": ["hospital_b"],
            "outputs": {"dir": str(tmp_path / "predictions")}, **change}
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_job(path)
