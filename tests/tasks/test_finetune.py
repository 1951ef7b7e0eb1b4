"""Private fine-tuning (``data.backbone``): a public, frozen backbone each party runs on its own rows before
sharing, the head trained under MPC; real parties for training, prediction and a backbone disagreement."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, assert_no_leftovers, job_metrics, mpcfl, run_job, run_roles, write_csv, write_job
from mpcfl.data.files import DataError
from mpcfl.data.party import backbone_of, contents, load_party_data
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job
from mpcfl.models.backbone import backbone_digest, run_backbone
from mpcfl.tasks.train.baseline import train_plaintext
from mpcfl.tasks.train.export import load_model

DIGITS = REPO / "examples" / "data" / "digits_finetune"
FACTORY = str(REPO / "examples" / "models" / "digits_backbone.py") + ":digits_backbone"
WEIGHTS = REPO / "examples" / "models" / "digits_backbone.pt"
SECRET = "f" * 32


def binary_digits(folder: Path) -> list[dict[str, Any]]:
    """The example's two clinics, their label made binary (digit >= 5): one logit trains fast under MPC."""
    parties = []
    for clinic in ("clinic_a", "clinic_b"):
        files = {}
        for which in ("train", "test"):
            values = np.loadtxt(DIGITS / f"{clinic}_{which}.csv", delimiter=",", skiprows=1)
            values[:, -1] = values[:, -1] >= 5
            header = (DIGITS / f"{clinic}_{which}.csv").read_text().splitlines()[0].split(",")
            files[which] = str(write_csv(folder / f"{clinic}_{which}.csv", header, values))
        parties.append({"name": clinic, "data": files})
    return parties


def finetune_job(folder: Path, *, weights: Path = WEIGHTS, **changes: Any) -> dict[str, Any]:
    spec = {
        "name": "finetune", "task": "train", "partition": "horizontal", "parties": binary_digits(folder),
        "labels": {"column": "target"},
        "data": {"standardize": False, "backbone": {"factory": FACTORY, "weights": str(weights)}},
        "model": {"type": "logistic_regression"},
        "training": {"epochs": 1, "batch_size": 128, "learning_rate": 0.5, "momentum": 0.9, "sigmoid": "piecewise", "seed": 0},
        "outputs": {"dir": str(folder / "out"), "model_to": ["clinic_a"], "metrics_to": "all"},
        "runtime": {"timeout_s": 60},
    }
    spec.update(changes)
    return spec


def test_the_head_trains_on_the_backbone_as_in_plaintext_and_scores_raw_rows(tmp_path: Path) -> None:
    path = write_job(tmp_path, finetune_job(tmp_path))
    run_job(path)
    job = load_job(path)
    final = job_metrics(path, "clinic_a")["final"]
    baseline = train_plaintext(job).history[-1]
    assert final["test_accuracy"] > 0.9
    assert abs(final["test_accuracy"] - baseline["test_accuracy"]) <= 0.02
    saved = json.loads((job.party_root("clinic_a") / "latest" / "preprocessing.json").read_text())
    assert saved["columns"] == [f"backbone_{i}" for i in range(32)] and len(saved["inputs"]) == 64
    # The head takes the backbone's 32 features.
    assert torch.load(job.party_root("clinic_a") / "latest" / "model.pt", weights_only=True)["0.weight"].shape == (1, 32)
    # Raw pixel rows in: the receiver's load_model (the backbone rebuilt in front, checked by its digest),
    # and a secure predict job, each party's rows through the backbone at that party before sharing.
    raw = np.loadtxt(tmp_path / "clinic_b_test.csv", delimiter=",", skiprows=1)
    scorer = load_model(job.party_root("clinic_a") / "latest")
    with torch.no_grad():
        plain = (scorer(torch.tensor(raw[:, :-1], dtype=torch.float32)).squeeze(1) > 0).numpy()
    assert (plain == (raw[:, -1] == 1)).mean() > 0.9
    pixels = write_csv(tmp_path / "new_rows.csv", scorer.columns, raw[:, :-1])  # clinic_b's new images, no labels
    done = mpcfl("predict", str(path), "--rows", f"clinic_b={pixels}", "--to", "clinic_b", "--out", str(tmp_path / "pred"), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    with next((tmp_path / "pred").glob("clinic_b/*/predictions.csv")).open() as handle:
        secure = np.array([row["predicted"] == "1" for row in csv.DictReader(handle)])
    assert len(secure) == len(raw) and (secure == plain).mean() > 0.99
    assert_no_leftovers(str(path))


def test_a_party_with_another_backbone_is_refused_before_sharing(tmp_path: Path) -> None:
    """Each process reads its own copy of the job; clinic_b's backbone weights differ in one value."""
    state = torch.load(WEIGHTS, weights_only=True)
    state["0.bias"][0] += 1e-3
    torch.save(state, tmp_path / "other.pt")
    ours = str(write_job(tmp_path, finetune_job(tmp_path), "ours.yaml"))
    theirs = str(write_job(tmp_path, finetune_job(tmp_path, weights=tmp_path / "other.pt"), "theirs.yaml"))
    assert load_job(ours).fingerprint() != load_job(theirs).fingerprint()
    roles = [(["dealer", ours], SECRET), (["party", ours, "--party", "clinic_a"], SECRET),
             (["party", theirs, "--party", "clinic_b"], SECRET)]
    dealer, clinic_a, clinic_b = run_roles(roles, within=240)  # generous: on a loaded machine starting three processes is the slow part
    assert "clinic_b failed authentication" in clinic_a.stderr and "clinic_b failed authentication" in dealer.stderr
    assert clinic_b.returncode != 0 and "job file differs" in clinic_b.stderr
    assert not (tmp_path / "out").exists()  # refused before any run began, let alone any share
    assert_no_leftovers(ours)


def test_the_fingerprint_counts_the_backbone_by_its_values_not_its_folder(tmp_path: Path) -> None:
    prints = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(WEIGHTS, tmp_path / folder / "w.pt")
        shutil.copy(FACTORY.rpartition(":")[0], tmp_path / folder / "net.py")
        spec = finetune_job(tmp_path, weights=tmp_path / folder / "w.pt")
        spec["data"]["backbone"]["factory"] = "net.py:digits_backbone"
        spec["outputs"]["dir"] = "out"
        prints.append(load_job(write_job(tmp_path / folder, spec)).fingerprint())
    assert prints[0] == prints[1]
    (tmp_path / "b" / "net.py").write_text((tmp_path / "b" / "net.py").read_text().replace("nn.Tanh()", "nn.Sigmoid()"))
    assert load_job(tmp_path / "b" / "job.yaml").fingerprint() != prints[0]  # another architecture, the same weights


def test_the_backbone_that_runs_is_the_one_fingerprinted(tmp_path: Path) -> None:
    # Built once per loaded job: weights swapped after loading change neither the fingerprint the
    # parties agreed on nor the module that runs on the rows (a second build would have run them).
    shutil.copy(WEIGHTS, tmp_path / "w.pt")
    job = load_job(write_job(tmp_path, finetune_job(tmp_path, weights=tmp_path / "w.pt")))
    agreed, digest = job.fingerprint(), backbone_digest(backbone_of(job))
    state = torch.load(WEIGHTS, weights_only=True)
    torch.save({name: value + 1.0 for name, value in state.items()}, tmp_path / "w.pt")
    assert job.fingerprint() == agreed and backbone_digest(backbone_of(job)) == digest
    assert backbone_of(job) is backbone_of(job)
    assert load_job(tmp_path / "job.yaml").fingerprint() != agreed  # the swap, seen by a job loaded after it


@pytest.mark.parametrize(
    ("backbone", "error"),
    [
        ({"factory": "no_such_module_xyz:make"}, r"data.backbone.factory: .*cannot import 'no_such_module_xyz'"),
        ({"factory": f"{FACTORY.rpartition(':')[0]}:nothing"}, r"data.backbone.factory: .* has no function 'nothing'"),
        ({"factory": FACTORY, "weights": "missing.pt"}, r"data.backbone: weights: .*missing.pt: weights file not found"),
        ({"factory": FACTORY, "parties": ["clinic_a"]}, r"data.backbone.parties: in a horizontal job every party's rows"),
    ],
)
def test_backbone_errors_name_the_key(tmp_path: Path, backbone: dict[str, Any], error: str) -> None:
    spec = finetune_job(tmp_path)
    spec["data"]["backbone"] = backbone
    with pytest.raises(ConfigError, match=error):
        load_job(write_job(tmp_path, spec))


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("return nn.Flatten(0)", r"returned a 1-D torch.float32 tensor for one row; a backbone returns a 2-D float tensor"),
        ("return Rounded()", r"returned a 2-D torch.int64 tensor"),
        ("return Nan()", r"returned nan \(feature 0, data row 1\); features must be finite"),
    ],
)
def test_a_backbone_that_returns_no_features_names_the_party_and_the_key(tmp_path: Path, body: str, error: str) -> None:
    (tmp_path / "bad.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Rounded(nn.Module):\n    def forward(self, x):\n        return x.long()\n"
        "class Nan(nn.Module):\n    def forward(self, x):\n        return x * float('nan')\n"
        f"def make():\n    {body}\n"
    )
    spec = finetune_job(tmp_path)
    spec["data"]["backbone"] = {"factory": "bad.py:make"}
    job = load_job(write_job(tmp_path, spec))
    with pytest.raises(DataError, match=rf"^party clinic_b: .*clinic_b_train.csv: data.backbone: {error}"):
        load_party_data(job, "clinic_b")


def test_vertical_listed_parties_run_it_on_their_own_columns_and_the_rows_as_read_name_the_data(tmp_path: Path) -> None:
    header = (DIGITS / "clinic_a_train.csv").read_text().splitlines()[0].split(",")
    values = np.loadtxt(DIGITS / "clinic_a_train.csv", delimiter=",", skiprows=1)
    images = write_csv(tmp_path / "images.csv", header[:-1], values[:, :-1])
    labels = write_csv(tmp_path / "labels.csv", ["age", "target"], np.c_[np.arange(len(values)), values[:, -1]])
    spec = finetune_job(tmp_path, partition="vertical", labels={"party": "registry", "column": "target"},
                        parties=[{"name": "imaging", "data": {"train": str(images)}}, {"name": "registry", "data": {"train": str(labels)}}])
    spec["model"] = {"type": "logistic_regression", "num_classes": 10}
    spec["outputs"]["model_to"] = ["registry"]
    del spec["training"]["sigmoid"]
    spec["data"]["backbone"]["parties"] = ["imaging"]
    job = load_job(write_job(tmp_path, spec))
    imaging, registry = load_party_data(job, "imaging"), load_party_data(job, "registry")
    assert imaging.train.columns == [f"imaging_backbone_{i}" for i in range(32)] and imaging.inputs == header[:-1]
    assert np.abs(imaging.train.x).max() <= 1  # the backbone's tanh
    assert registry.train.columns == ["age"] and registry.inputs is None
    # The run and the privacy ledger commit to the rows as read: another backbone on them is the same data.
    spec["data"]["backbone"]["parties"] = "all"
    spec["data"]["backbone"]["factory"] = FACTORY.replace("digits_backbone.py", "digits_cnn.py").replace(":digits_backbone", ":digits_cnn")
    del spec["data"]["backbone"]["weights"]
    other = load_party_data(load_job(write_job(tmp_path, spec, "other.yaml")), "imaging")
    assert other.train.x.shape[1] == 10 and contents(other) == contents(imaging)


_CENTRED = """
import torch
from torch import nn


class Centred(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        return self.linear(x - x.mean(0))


class Counting(Centred):
    def forward(self, x):
        self.calls += 1
        return self.linear(x)
"""


def _load(tmp_path: Path, source: str, name: str) -> torch.nn.Module:
    import importlib.util

    path = tmp_path / f"{name.lower()}_{abs(hash(source))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.manual_seed(0)
    return getattr(module, name)().eval()


def test_one_record_changes_only_its_own_features_even_through_a_forward_that_mixes_rows(tmp_path: Path) -> None:
    # Per-example DP bounds each feature row: a backbone mixing rows (batch statistics) would let one record
    # move every row's features. Each row runs alone, so x - x.mean(0) sees that row only.
    centred = _load(tmp_path, _CENTRED, "Centred")
    rows = np.random.default_rng(0).normal(size=(6, 4))
    changed = rows.copy()
    changed[0] = 1e3
    before, after = run_backbone(centred, rows), run_backbone(centred, changed)
    np.testing.assert_array_equal(before[1:], after[1:])
    with pytest.raises(ValueError, match="changed its own parameters or buffers while running"):
        run_backbone(_load(tmp_path, _CENTRED, "Counting"), rows)


def test_under_dp_non_finite_features_become_zero_and_only_this_party_s_log_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    centred = _load(tmp_path, _CENTRED, "Centred")
    rows = np.ones((3, 4))
    rows[1] = np.inf  # one record: a refusal (seen by every peer) would depend on it
    with pytest.raises(ValueError, match="features must be finite"):
        run_backbone(centred, rows)
    features = run_backbone(centred, rows, dp=True)
    assert np.isfinite(features).all() and (features[1] == 0).all()
    assert "3 non-finite features in 1 rows set to 0" in caplog.text


def test_the_backbone_digest_covers_the_forward_code_not_only_the_layers(tmp_path: Path) -> None:
    other = _CENTRED.replace("self.linear(x - x.mean(0))", "self.linear(2 * x)")
    assert backbone_digest(_load(tmp_path, _CENTRED, "Centred")) != backbone_digest(_load(tmp_path, other, "Centred"))
    assert backbone_digest(_load(tmp_path, _CENTRED, "Centred")) == backbone_digest(_load(tmp_path, _CENTRED, "Centred"))
