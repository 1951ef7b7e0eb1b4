"""Checkpoint and resume on real processes: a crash mid-training, then `mpcfl run --resume`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, DEMO, base_job, crash_after_epoch, mpcfl, run_dir, vertical_parties, write_job

from mpcfl.errors import MpcflError


def job_spec(tmp_path: Path, **training: Any) -> dict[str, Any]:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture", "mean_area"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["training"].update(epochs=3, **training)
    spec["outputs"]["model_to"] = ["p0"]
    return spec


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job whose p1 was killed after epoch 2 of 3; each test resumes its own copy of the folder."""
    folder = tmp_path_factory.mktemp("crashed")
    assert crash_after_epoch(write_job(folder, job_spec(folder)), 2) == 1
    return folder


def copy_of(crashed: Path, where: Path) -> Path:
    """The crashed job's folder copied to ``where`` (its outputs are relative to the job file); the job file."""
    shutil.copytree(crashed, where)
    return where / "job.yaml"


def test_resumed_model_equals_an_uninterrupted_run(tmp_path: Path, crashed: Path) -> None:
    whole = write_job(tmp_path / "whole", job_spec(tmp_path / "whole"))
    assert mpcfl("run", str(whole), timeout=180).returncode == 0
    broken = copy_of(crashed, tmp_path / "broken")
    out = tmp_path / "broken" / "out"
    interrupted = run_dir(broken, "p1")
    assert not (out / "p0" / "latest").exists(), "an unfinished run is presented as the current model"
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
    done = mpcfl("run", str(broken), "--resume", timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[p0] INFO mpcfl.tasks.train.runner: resuming after epoch 2" in done.stdout
    assert (out / "p0" / "latest").resolve().name == interrupted.name  # the same run, continued
    expected = torch.load(tmp_path / "whole" / "out" / "p0" / "latest" / "model.pt", weights_only=True)
    resumed = torch.load(out / "p0" / "latest" / "model.pt", weights_only=True)
    for name, value in expected.items():
        assert torch.allclose(resumed[name], value, atol=2e-3), (name, (resumed[name] - value).abs().max())
    history = json.loads((out / "p0" / "latest" / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_a_changed_config_refuses_the_checkpoint(tmp_path: Path, crashed: Path) -> None:
    # The same crash as above (one launch less): a checkpoint, then a change of the learning rate.
    job = copy_of(crashed, tmp_path / "changed")
    spec = yaml.safe_load(job.read_text())
    spec["training"]["learning_rate"] = 0.5
    write_job(job.parent, spec)
    done = mpcfl("run", str(job), "--resume", timeout=120)
    assert done.returncode == 1
    assert "was started with a different configuration of job 'test-job'; refusing to resume it" in done.stderr
    fresh = write_job(tmp_path / "fresh", job_spec(tmp_path / "fresh"))
    done = mpcfl("run", str(fresh), "--resume", timeout=120)
    assert done.returncode == 1
    assert "no unfinished run of job test-job to resume" in done.stderr


FAULTS = REPO / "tests" / "faults"  # a party that dies at an exact point (tests/faults/sitecustomize.py)


@pytest.mark.parametrize("crash", ["after epoch 1", "after epoch 2's steps", "before p1 charges epoch 2's metrics"])
def test_the_privacy_ledger_survives_a_crash_without_double_counting(
    crash: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after a checkpoint, or after the next epoch's steps are charged (as they end) and before its
    checkpoint: the resumed run charges each epoch once, in both parties' privacy.json and data ledgers.
    A peer that never charged epoch 2's metrics (dead, or skipping the charge while it receives them)
    cannot make hospital_a drop its own charge for them: the resume keeps it and is refused past the budget."""
    spec = yaml.safe_load((REPO / "configs" / "breast_cancer_dp.yaml").read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    spec["parties"][1]["name"] = "p1"
    spec["labels"]["party"] = "p1"
    spec["outputs"] = {"dir": str(tmp_path / "out"), "model_to": ["p1"], "metrics_to": ["p1"]}
    spec["training"]["epochs"] = 2  # one epoch before the crash and one after are enough to double-count
    spec["dp"]["metrics"] = {"mechanism": "gaussian", "noise_multiplier": 30.0, "when": "every_epoch"}
    job = write_job(tmp_path, spec)
    per_epoch = lambda i: [f"epoch {i} DP-SGD steps", f"epoch {i} loss and accuracy"]  # noqa: E731
    if crash == "after epoch 1":
        assert crash_after_epoch(job, 1) == 1
        # the kill follows p1's log line through the launcher's pipe: p1 may have charged epoch 2 by then
        expected = {"p1": (per_epoch(1), per_epoch(1) + ["epoch 2 DP-SGD steps"])}
    else:
        dying = "p1:after:epoch 2 DP-SGD steps" if crash == "after epoch 2's steps" else "p1:before:epoch 2 loss and accuracy"
        with monkeypatch.context() as faulty:
            faulty.setenv("MPCFL_DIE_AT_CHARGE", dying)
            faulty.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), str(FAULTS), os.environ.get("PYTHONPATH")])))
            assert mpcfl("run", str(job), timeout=180).returncode == 1
        expected = {"p1": (per_epoch(1) + ["epoch 2 DP-SGD steps"],)}
        if crash != "after epoch 2's steps":  # hospital_a charged the metrics, then found p1 gone before any opening
            expected["hospital_a"] = ([*per_epoch(1), *per_epoch(2)],)
    for party, ledgers in expected.items():
        ledger = json.loads((run_dir(job, party) / "privacy.json").read_text())["ledger"]
        assert [e["what"] for e in ledger] in ledgers, party
    done = mpcfl("run", str(job), "--resume", timeout=180)
    if "hospital_a" in expected:  # its metrics charge may have let its share reach p1: kept, whatever p1 says
        assert done.returncode == 1
        assert "reveal of epoch 2 DP-SGD steps refused: it would spend epsilon" in done.stderr, done.stderr[-2000:]
        for party, ledgers in expected.items():
            ledger = json.loads((run_dir(job, party) / "privacy.json").read_text())["ledger"]
            assert [e["what"] for e in ledger] in ledgers, party
        return
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for party in ("hospital_a", "p1"):
        privacy = json.loads((tmp_path / "out" / party / "latest" / "privacy.json").read_text())
        whats = [e["what"] for e in privacy["ledger"]]
        assert whats == [w for i in (1, 2) for w in per_epoch(i)] + ["trained model parameters"], party
        assert privacy["spent"] <= 3.0
        # the data's own ledgers (train and test file) hold the run's charges once, whatever the crashed attempt charged
        shown = mpcfl("ledger", "show", str(job), "--party", party, timeout=60)
        assert shown.stdout.count(f"epsilon {privacy['spent']:.4g} spent of 3") == 2, shown.stdout + shown.stderr



def test_checkpoints_pair_only_within_one_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 7 wrote epochs 1-3 at p0 and 1-2 at p1; attempt 11 resumed from epoch 2 and died after p1
    saved its epoch 3, before p0 did. Epoch 3's two files come from different sharings: epoch 2 is the
    newest both hold from one attempt."""
    from types import SimpleNamespace

    from mpcfl.mpc import session
    from mpcfl.tasks.train import checkpoint

    job = SimpleNamespace(party_names=["p0", "p1"], run_id="r", name="j")
    held = {"p0": [(3, 7), (2, 7)], "p1": [(3, 11), (2, 7)]}

    def exchange(mine: list[tuple[int, int]]) -> int:
        flat = lambda pairs: [v for pair in pairs for v in pair]  # noqa: E731
        monkeypatch.setattr(session, "all_gather_public", lambda values: [flat(held["p0"]), flat(held["p1"])])
        return checkpoint.common_epoch(job, mine)

    assert exchange(held["p0"]) == 2
    held["p1"] = [(3, 7), (2, 7)]  # one attempt wrote both parties' epoch 3
    assert exchange(held["p0"]) == 3
    held["p1"] = [(3, 11), (1, 11)]
    with pytest.raises(MpcflError, match="no checkpoint common to all parties"):
        exchange(held["p0"])
