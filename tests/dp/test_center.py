"""dp.center: features centred on their noisy mean before DP logistic regression's row clip.

The unit tests bound what one row can move (the sum's sensitivity) and check the calibration
composes the centring's charge with DP-SGD's; the real-process test spies on what the other
hospital holds of hospital_a's columns, and checks a crash and a resume open the mean once.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO, REPO, base_job, horizontal_parties, mpcfl, run_dir, write_job

from mpcfl.data.party import PartyData, Split
from mpcfl.dp.accountant import Charge, create_accountant
from mpcfl.jobs.schema import load_job
from mpcfl.models.build import build_torch_model
from mpcfl.tasks.train.baseline import evaluate_state_dict, prepared_data
from mpcfl.tasks.train.dp_sgd import apply_center, calibration, center_noise, center_sums, sampling


FAULTS = REPO / "tests" / "faults"


def dp_spec(tmp_path, **center) -> dict:
    spec = yaml.safe_load((REPO / "configs" / "breast_cancer_dp.yaml").read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    spec["parties"][1]["name"] = "p1"
    spec["labels"]["party"] = "p1"
    spec["outputs"] = {"dir": str(tmp_path / "out"), "model_to": ["p1"], "metrics_to": "none"}
    spec["training"].update(batch_size=228, epochs=2, learning_rate=8.0)
    spec["dp"].update(epsilon=1.0, sampling="poisson", error_clip=0.2, center={"bound": 3.0, **center})
    return spec


def part_of(x: np.ndarray) -> PartyData:
    columns = [f"c{i}" for i in range(x.shape[1])]
    return PartyData(party="p", train=Split(path=None, columns=columns, x=x, y=None), test=None)


@pytest.mark.parametrize("partition", ["vertical", "horizontal"])
def test_one_row_moves_the_sum_by_at_most_the_bound(tmp_path, partition: str) -> None:
    spec = dp_spec(tmp_path)
    spec["partition"] = partition
    job = load_job(write_job(tmp_path, spec)) if partition == "vertical" else None
    if job is None:  # the sums' code reads only the partition and dp.center
        job = load_job(write_job(tmp_path, dp_spec(tmp_path))).model_copy(update={"partition": "horizontal"})
    counts = [20, 10] if partition == "vertical" else [30, 30]
    rows = np.random.default_rng(0).normal(0, 2, (50, counts[1]))
    adversarial = np.vstack([rows, 1e6 * np.ones((1, counts[1]))])  # one record more, as large as it likes
    before, after = (center_sums(job, part_of(x), counts, 1) for x in (rows, adversarial))
    k = 2 if partition == "vertical" else 1
    assert np.linalg.norm(after - before) <= 3.0 / math.sqrt(k) + 1e-9
    if partition == "vertical":  # p1's term lands on its own columns, after p0's 20
        assert not before[:20].any() and before[20:].any()


def test_the_centring_is_charged_with_dp_sgd_within_epsilon(tmp_path) -> None:
    job = load_job(write_job(tmp_path, dp_spec(tmp_path)))
    plain = load_job(write_job(tmp_path, {**dp_spec(tmp_path), "dp": {**dp_spec(tmp_path)["dp"], "center": None}}, "plain.yaml"))
    z, _ = calibration(job, 30, 456)
    z_alone, _ = calibration(plain, 30, 456)
    assert z > z_alone  # DP-SGD gets what the centring leaves
    steps, rate = sampling(job, 456)
    spent = create_accountant("rdp", epsilon=1.0).epsilon(
        1e-5, extra=[Charge("gaussian", 16.0), Charge("gaussian", z, 2 * steps, rate)])
    assert 0.99 < spent <= 1.0 + 1e-6
    # the noise covers the bound plus each coordinate's encoding, never less than the bound alone
    assert 16.0 * 3.0 < center_noise(job, 30) < 16.0 * 3.0 * 1.001


def test_shuffled_batches_double_the_means_sensitivity(tmp_path) -> None:
    """Under sampling: shuffle neighbours replace a row (n is fixed), which moves the sum by twice the bound."""
    spec = dp_spec(tmp_path)
    poisson = load_job(write_job(tmp_path, spec))
    spec["dp"]["sampling"] = "shuffle"
    shuffle = load_job(write_job(tmp_path, spec, "shuffle.yaml"))
    assert center_noise(shuffle, 30) == pytest.approx(2 * center_noise(poisson, 30), rel=1e-4)  # the encoding term is not doubled


def test_a_value_scaled_past_the_floats_moves_the_sum_by_the_bound_only(tmp_path) -> None:
    job = load_job(write_job(tmp_path, dp_spec(tmp_path)))
    rows = np.random.default_rng(1).uniform(-1, 1, (20, 10))
    extreme = np.vstack([rows, [[np.inf] + [-np.inf] * 8 + [np.nan]]])  # what scaling 1e308 by 0.5 gives
    moved = center_sums(job, part_of(extreme), [20, 10], 1) - center_sums(job, part_of(rows), [20, 10], 1)
    assert np.isfinite(moved).all() and np.linalg.norm(moved) <= 3.0 / math.sqrt(2) + 1e-9


def test_every_party_receives_the_mean_so_one_is_a_colluder(tmp_path) -> None:
    spec = dp_spec(tmp_path)
    spec["outputs"].update(model_to="none", metrics_to="none")
    spec["dp"]["collusion_threshold"] = 0
    done = mpcfl("validate", str(write_job(tmp_path, spec)), timeout=60)
    assert done.returncode != 0 and "dp.center opens the mean to every party" in done.stderr, done.stderr
    del spec["dp"]["center"]
    assert mpcfl("validate", str(write_job(tmp_path, spec)), timeout=60).returncode == 0


@pytest.mark.parametrize("key", ["bound", "noise_multiplier"])
def test_an_infinite_setting_is_refused_not_opened_without_noise(tmp_path, key: str) -> None:
    """bound: .inf made the noise NaN, and a NaN scale skipped the noise: the exact mean was opened."""
    spec = dp_spec(tmp_path)
    spec["dp"]["center"][key] = float("inf")
    done = mpcfl("validate", str(write_job(tmp_path, spec)), timeout=60)
    assert done.returncode != 0 and f"dp.center.{key}" in done.stderr, done.stderr
    from mpcfl.mpc.reveal import Privacy

    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            Privacy(charge=Charge("gaussian", 16.0), scale=scale)


def test_mlp_refuses_dp_center(tmp_path) -> None:
    spec = dp_spec(tmp_path)
    spec["model"] = {"type": "mlp", "hidden": [4]}
    del spec["dp"]["error_clip"]
    done = mpcfl("validate", str(write_job(tmp_path, spec)), timeout=60)
    assert done.returncode != 0 and "dp.center: centres the features" in done.stderr, done.stderr


def test_the_mean_is_folded_into_the_scaler() -> None:
    part = part_of(np.array([[1.0, 2.0], [3.0, 6.0]]))
    part.scaler = {"columns": ["c0", "c1"], "mean": [10.0, 20.0], "std": [2.0, 4.0]}
    apply_center(part, np.array([0.5, -1.0]))
    assert part.train.x.tolist() == [[0.5, 3.0], [2.5, 7.0]]
    assert part.scaler["mean"] == [11.0, 16.0] and part.center == [0.5, -1.0]


def test_a_centred_dp_run_opens_a_noisy_mean_once_across_a_crash(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """p1 holds hospital_a's column means only with the noise the charge pays for; a crash in epoch 2 (after
    its steps are charged, before its checkpoint) and a resume reuse the opened mean (charged once); the
    exported model applies it."""
    spec = dp_spec(tmp_path)
    # a third epoch: after epoch 2 hospital_a could otherwise record the model's release (never opened,
    # p1 being dead) before it notices, and the resume then keeps epoch 2's charge, conservatively
    spec["training"]["epochs"] = 3
    job_path = write_job(tmp_path, spec)
    job = load_job(job_path)
    with monkeypatch.context() as faulty:  # p1 dies at an exact point (tests/faults/sitecustomize.py)
        faulty.setenv("MPCFL_DIE_AT_CHARGE", "p1:after:epoch 2 DP-SGD steps")
        faulty.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), str(FAULTS), os.environ.get("PYTHONPATH")])))
        assert mpcfl("run", str(job_path), timeout=180).returncode == 1
    first = torch.load(run_dir(job_path, "p1") / "checkpoints" / "epoch-0001.pt", weights_only=True)["center"]
    done = mpcfl("run", str(job_path), "--resume", timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[p1] INFO mpcfl.tasks.train.runner: resuming after epoch 1" in done.stdout
    opened = {}
    for party in ("hospital_a", "p1"):
        latest = tmp_path / "out" / party / "latest"
        privacy = json.loads((latest / "privacy.json").read_text())
        whats = [e["what"] for e in privacy["ledger"]]
        assert whats.count("feature sums for centring (dp.center)") == 1, whats
        assert whats[0] == "feature sums for centring (dp.center)" and privacy["spent"] <= 1.0 + 1e-9
        opened[party] = json.loads((latest / "preprocessing.json").read_text())["center"]
    # each party kept its own columns' slice of what the crashed attempt opened: not opened again
    assert opened["hospital_a"] + opened["p1"] == pytest.approx(first, abs=1e-12)
    # p1's view of hospital_a's columns: the true clipped mean plus noise of the charged scale
    true = center_sums(job, _scaled(job, "hospital_a"), [20, 10], 0)[:20] / 456
    error = np.asarray(first[:20]) - true
    sigma = center_noise(job, 30) * job.noise_inflation / 456
    assert 0.5 * sigma < error.std() < 2 * sigma, (error.std(), sigma)
    # the exported model (its scaler holds the mean) maps the raw test rows as training prepared them
    from mpcfl import load_model

    model = load_model(tmp_path / "out" / "p1" / "latest", tmp_path / "out" / "hospital_a" / "latest")
    trained = build_torch_model(job.model, n_features=30)
    trained.load_state_dict(torch.load(tmp_path / "out" / "p1" / "latest" / "model.pt", weights_only=True))
    _, _, x_test, _ = prepared_data(job, center=np.asarray(first))
    with torch.no_grad():
        assert torch.allclose(model(model.encode(_raw_test_table(job))), trained(x_test), atol=1e-4)
    # `mpcfl baseline --score` scores it on the mean it was trained on, not on a fresh simulated one
    from mpcfl import score

    scored = score(job_path)
    assert scored == evaluate_state_dict(job, trained.state_dict(), center=np.asarray(first))


def _scaled(job, party: str) -> PartyData:
    """A party's training rows after data.scaling, as the centring's sum takes them."""
    from mpcfl.data.party import load_party_data, scale_publicly

    data = load_party_data(job, party)
    scale_publicly(data, job.data.scaling, job.source)
    return data


def _raw_test_table(job) -> dict[str, list[str]]:
    """Both hospitals' raw test cells, by column (the label column left out)."""
    table = {}
    for party in job.parties:
        with open(party.data.test, newline="") as handle:
            rows = list(csv.DictReader(handle))
        table |= {column: [row[column] for row in rows] for column in rows[0] if column != "malignant"}
    return table


def test_a_horizontal_job_centres_every_party_on_the_noisy_mean_of_all_rows(tmp_path) -> None:
    """Rows split between two parties: the sum over both is opened to each, with noise; each keeps it whole."""
    demo = dp_spec(tmp_path)
    spec = base_job(partition="horizontal", parties=horizontal_parties(tmp_path, 2),
                    labels={"column": "malignant"}, data={"standardize": False, "scaling": demo["data"]["scaling"]},
                    dp={**demo["dp"], "noise": "dealer"}, runtime={"timeout_s": 60, "provider": "ttp"})
    spec["outputs"] = {"dir": str(tmp_path / "out"), "model_to": ["p0"], "metrics_to": "none"}
    spec["training"].update(batch_size=228, learning_rate=8.0)
    job_path = write_job(tmp_path, spec)
    done = mpcfl("run", str(job_path), timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job = load_job(job_path)
    centers = [json.loads((tmp_path / "out" / p / "latest" / "preprocessing.json").read_text())["center"] for p in ("p0", "p1")]
    assert centers[0] == centers[1] and len(centers[0]) == 30
    for party in ("p0", "p1"):
        whats = [e["what"] for e in json.loads((tmp_path / "out" / party / "latest" / "privacy.json").read_text())["ledger"]]
        assert whats.count("feature sums for centring (dp.center)") == 1, whats
    parts = [_scaled(job, p) for p in ("p0", "p1")]
    rows = sum(p.train.x.shape[0] for p in parts)
    true = sum(center_sums(job, p, [30, 30], r) for r, p in enumerate(parts)) / rows
    error = np.asarray(centers[0]) - true
    sigma = center_noise(job, 30) / rows  # the dealer's noise: no inflation
    assert 0.5 * sigma < error.std() < 2 * sigma, (error.std(), sigma)


def test_a_second_run_on_the_same_data_pays_for_its_own_mean(tmp_path) -> None:
    """Across runs: the mean's release enters each hospital's ledger of its data, so a second run on the
    same rows, whose budget the first spent, is refused before it opens a second noisy mean (two
    independent draws would average the noise away, outside any ledger)."""
    job_path = write_job(tmp_path, dp_spec(tmp_path))
    assert mpcfl("run", str(job_path), timeout=180).returncode == 0
    ledgers = sorted((tmp_path / "ledgers").glob("*.json"))  # each hospital's, of its train and test files
    assert len(ledgers) == 4
    for path in ledgers:
        (run,) = json.loads(path.read_text())["runs"].values()
        assert run["charges"][0] == {"count": 1, "mechanism": "gaussian", "noise_multiplier": 16.0}, path
    again = mpcfl("run", str(job_path), timeout=180)
    assert again.returncode != 0 and "refused before anything is revealed" in again.stderr, again.stderr[-2000:]
    assert "feature sums for centring" not in again.stdout  # no second opening, not even logged
    written = {path.resolve() for path in (tmp_path / "out" / "p1").glob("*/preprocessing.json")}
    assert len(written) == 1  # the refused run wrote no mean
