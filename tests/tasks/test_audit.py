"""The membership-inference audit: its statistics, and `mpcfl audit` end to end (no MPC needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DEMO, REPO, mpcfl, write_job
from mpcfl.tasks.train.audit import epsilon_lower_bound, evaluate_attack, lira_scores, pooled_attacks, roc, train_on_subsets
from mpcfl.tasks.train.baseline import train_plaintext
from mpcfl import runs
from mpcfl.jobs.schema import TrainJob, load_job


def test_perfect_separation() -> None:
    members = np.array([True] * 500 + [False] * 500)
    scores = np.where(members, 1.0, 0.0) + np.linspace(0, 0.1, 1000)
    result = evaluate_attack("oracle", scores, members, delta=1e-5)
    assert result.auc == pytest.approx(1.0)
    assert result.tpr_at_1pct == 1.0 and result.tpr_at_01pct == 1.0
    # 500 non-members with no false positive bound the FPR at ~0.0074 with 95% confidence.
    assert result.epsilon_lower_bound == pytest.approx(math.log((0.99264 - 1e-5) / 0.0073508), rel=1e-3)


def test_random_scores_give_no_evidence() -> None:
    rng = np.random.default_rng(0)
    members = rng.random(4000) < 0.5
    result = evaluate_attack("coin", rng.random(4000), members, delta=1e-5)
    assert abs(result.auc - 0.5) < 0.03
    assert result.epsilon_lower_bound < 0.3


def test_roc_counts_and_bound_edges() -> None:
    fpr, tpr, fp, tp = roc(np.array([3.0, 2.0, 1.0]), np.array([True, False, True]))
    assert fp.tolist() == [0, 0, 1, 1] and tp.tolist() == [0, 1, 1, 2]
    assert fpr.tolist() == [0, 0, 1, 1] and tpr.tolist() == [0, 0.5, 0.5, 1]
    assert epsilon_lower_bound(np.array([0, 0]), np.array([0, 0]), delta=0.0) == 0.0


def test_lira_scores_favour_the_in_distribution() -> None:
    confidences = np.array([[5.0, 0.0], [5.2, 0.1], [0.0, 5.0], [0.1, 5.1], [4.9, -0.1], [0.2, 4.8]])
    included = np.array([[True, False], [True, False], [False, True], [False, True], [True, False], [False, True]])
    scores = lira_scores(np.array([5.0, 0.0]), confidences, included)
    assert scores[0] > 0 > scores[1]


def test_audit_command_writes_report_and_plot(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    spec["outputs"]["dir"] = str(tmp_path / "out")
    path = write_job(tmp_path, spec)
    job = load_job(path)
    run = runs.start(job.party_root("hospital_b"), runs.new_run_id(), {"job": job.name})  # as a finished run leaves it
    receiver = run.dir
    torch.save(train_plaintext(job).model.state_dict(), receiver / "model.pt")
    run.finish({})
    done = mpcfl("audit", str(path), "--shadows", "4", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| loss threshold |" in done.stdout and "| LiRA (4 shadows) |" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"wrote {receiver / 'audit.json'} and {receiver / 'audit_roc.png'}"
    assert "mpcfl: warning: --shadows 4: a LiRA AUC from fewer than 16 shadow models is noise" in done.stderr
    report = json.loads((receiver / "audit.json").read_text())
    assert report["members"] == 456 and report["non_members"] == 113
    for attack in report["attacks"].values():
        assert 0.0 <= attack["auc"] <= 1.0 and attack["epsilon_lower_bound"] >= 0.0
    assert (receiver / "audit_roc.png").stat().st_size > 1000
    missing = mpcfl("audit", str(path), "--party", "hospital_a", timeout=60)
    assert missing.returncode == 1 and "out/hospital_a: no finished run yet" in missing.stderr, missing.stderr


def _digits_job(dp: dict | None) -> TrainJob:
    spec = {
        "name": "digits-audit-test",
        "partition": "horizontal",
        "parties": [{"name": "a", "data": {"train": "unused.csv"}}, {"name": "b", "data": {"train": "unused.csv"}}],
        "labels": {"column": "target"},
        "data": {"standardize": False, "max_abs": 1.0},  # pixels / 16, in [0, 1]
        "model": {"type": "mlp", "hidden": [64], "num_classes": 10},
        "training": {"epochs": 40, "batch_size": 40, "learning_rate": 0.3, "momentum": 0.9, "loss": "cross_entropy"},
        "outputs": {"dir": "unused", "metrics_to": "none"},
        "dp": dp,
    }
    return TrainJob.model_validate(spec)


def test_pooled_attacks_separate_a_memorising_model_from_a_dp_one() -> None:
    torch.set_num_threads(1)
    data = np.loadtxt(REPO / "examples" / "data" / "digits8x8.csv", delimiter=",", skiprows=1, dtype=np.float32)[:160]
    x, y = torch.from_numpy(data[:, :64] / 16.0), torch.from_numpy(data[:, 64].astype(np.int64))
    plain = pooled_attacks(train_on_subsets(_digits_job(None), x, y, models=8, size=80, seed=0), delta=1e-5)
    private = pooled_attacks(train_on_subsets(_digits_job({"epsilon": 1.0, "delta": 1e-5}), x, y, models=8, size=80, seed=0), delta=1e-5)
    for attack in plain:
        assert attack.members == attack.non_members == 8 * 80
        assert attack.auc > 0.6, attack.name  # 80 digits trained for 40 epochs are memorised
    for attack in private:
        assert abs(attack.auc - 0.5) < 0.05, attack.name
    assert plain[1].auc > private[1].auc + 0.1


@pytest.mark.parametrize(("shadows", "warned", "refused"), [(0, False, False), (3, False, True), (-1, False, True), (15, True, False), (16, False, False)])
def test_too_few_shadows_are_refused_or_warned_about(shadows: int, warned: bool, refused: bool) -> None:
    from mpcfl.errors import MpcflError
    from mpcfl.tasks.train.audit import check_shadows

    if refused:
        with pytest.raises(MpcflError, match=rf"--shadows: {shadows}: LiRA needs at least 4"):
            check_shadows(shadows)
    else:
        assert (check_shadows(shadows) is not None) == warned
