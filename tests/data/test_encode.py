"""Tables as people have them: label names, categorical columns, missing cells, at the owner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import mpcfl, run_job, wdbc, write_csv, write_job
from mpcfl.data.encode import Encoding, impute, read_encoded
from mpcfl.data.files import DataError
from mpcfl.data.party import read_table
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job
from mpcfl.tasks.train.baseline import train_plaintext


def _table(tmp_path: Path, rows: list[list[str]]) -> Path:
    path = tmp_path / "t.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


def test_names_categories_and_missing_cells_become_numbers_or_are_named(tmp_path: Path) -> None:
    path = _table(tmp_path, [["size", "x", "y"], ["small", "1.5", "benign"], ["huge", "", "malignant"], ["large", "2", "benign"]])
    encoding = Encoding(label="y", classes=("benign", "malignant"), categorical={"size": ("small", "large", "other")},
                        missing={"x": "mean"})
    columns, values, _ = read_encoded(path, party="a", encoding=encoding)
    assert columns == ["size=small", "size=large", "size=other", "x", "y"]
    assert values[1, :3].tolist() == [0, 0, 1] and np.isnan(values[1, 3]) and values[:, 4].tolist() == [0, 1, 0]
    assert impute(columns, [values], {"x": "mean"}, party="a") == {"x": 1.75} and values[1, 3] == 1.75
    strict = Encoding(label="y", classes=("benign", "malignant"), categorical={"size": ("small", "large")})
    with pytest.raises(DataError, match=r"line 3, column 'size': 'huge' is not one of its declared categories \['small', 'large'\] \(add 'other'"):
        read_encoded(path, party="a", encoding=strict)
    with pytest.raises(DataError, match=r"line 3, column 'x': the cell is empty or missing; declare the column in data.missing"):
        read_encoded(path, party="a", encoding=Encoding(label="y", classes=("benign", "malignant"), categorical=encoding.categorical))
    with pytest.raises(DataError, match=r"line 2, column 'y': 'benign' is not a number; name the classes in labels.classes"):
        read_encoded(path, party="a", encoding=Encoding(label="y", categorical=encoding.categorical, missing={"x": 0.0}))
    # at the label owner's own process, the names its file holds, as the job line to write
    hint = r"line 2, column 'y': 'benign' is not a number; its 2 names are classes: declare them in the job, e\.g\. labels\.classes: \[benign, malignant\]"
    with pytest.raises(DataError, match=hint):
        read_table(path, party="a", id_column=None, encoding=Encoding(label="y", categorical=encoding.categorical, missing={"x": 0.0}))
    plain = _table(tmp_path, [["x", "y"], ["1", "benign"], ["2", "malignant"], ["3"]])  # read as numbers; a short row
    with pytest.raises(DataError, match=hint):
        read_table(plain, party="a", id_column=None, encoding=Encoding(label="y"))
    # a regression's target column: its cells are values, never offered as class names
    with pytest.raises(DataError, match=r"'benign' is not a number; a regression's targets are numbers$"):
        read_table(plain, party="a", id_column=None, encoding=Encoding(label="y", values=True))


def _parties(folder: Path) -> list[dict]:
    """wdbc over three hospitals, as they have it: a size category, missing textures, label names."""
    header, values = wdbc()
    rng = np.random.default_rng(0)
    area = values[:, header.index("mean_area")]
    size = np.where(area < 500, "small", np.where(area < 900, "medium", "large"))
    texture = values[:, header.index("mean_texture")].astype(str)
    texture[rng.random(len(texture)) < 0.1] = ""
    label = np.where(values[:, header.index("malignant")] == 1, "malignant", "benign")
    groups = {
        "p0": (["mean_radius", "size"], lambda c, i: size[i] if c == "size" else str(values[i, header.index(c)])),
        "p1": (["mean_texture", "worst_radius"], lambda c, i: texture[i] if c == "mean_texture" else str(values[i, header.index(c)])),
        "p2": (["worst_area", "diagnosis"], lambda c, i: label[i] if c == "diagnosis" else str(values[i, header.index(c)])),
    }
    split = int(len(values) * 0.8)
    parties = []
    for name, (columns, cell) in groups.items():
        files = {}
        for which, rows in (("train", range(split)), ("test", range(split, len(values)))):
            files[which] = str(write_csv(folder / f"{name}_{which}.csv", columns, [[cell(c, i) for c in columns] for i in rows]))
        parties.append({"name": name, "data": files})
    return parties


def test_a_three_party_job_with_names_categories_and_missing_cells_trains_and_predicts(tmp_path: Path) -> None:
    spec = {
        "name": "as-they-have-it", "partition": "vertical", "parties": _parties(tmp_path),
        "labels": {"party": "p2", "column": "diagnosis", "classes": ["benign", "malignant"]},
        "data": {"categorical": {"size": ["small", "medium", "large"]}, "missing": {"mean_texture": "median"}},
        "model": {"type": "logistic_regression"},  # no num_classes, no loss: they follow from the classes
        "training": {"epochs": 3, "batch_size": 64, "learning_rate": 0.5, "momentum": 0.9},
        "outputs": {"dir": str(tmp_path / "out"), "model_to": ["p2"], "metrics_to": ["p2"]},
    }
    path = write_job(tmp_path, spec)
    run_job(path)
    job = load_job(path)
    final = json.loads((job.party_root("p2") / "latest" / "metrics.json").read_text())["final"]
    assert final["test_accuracy"] > 0.85
    saved = json.loads((job.party_root("p0") / "latest" / "preprocessing.json").read_text())
    assert saved["columns"] == ["mean_radius", "size=small", "size=medium", "size=large"]
    textures = np.loadtxt(tmp_path / "p1_train.csv", delimiter=",", skiprows=1, usecols=0, converters={0: lambda s: float(s or "nan")})
    imputed = json.loads((job.party_root("p1") / "latest" / "preprocessing.json").read_text())["imputed"]
    assert imputed == {"mean_texture": pytest.approx(float(np.nanmedian(textures)))}
    rows = [f"{p['name']}={p['data']['test']}" for p in spec["parties"]]
    done = mpcfl("predict", str(path), "--rows", *rows, "--to", "p2", timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    predictions = (tmp_path / "out" / "predictions" / "p2" / "latest" / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "row,predicted,p_benign,p_malignant"
    assert {line.split(",")[1] for line in predictions[1:]} == {"benign", "malignant"}
    scored = json.loads((tmp_path / "out" / "predictions" / "p2" / "latest" / "metrics.json").read_text())
    assert scored["metrics"]["accuracy"] == pytest.approx(final["test_accuracy"], abs=0.01)


def test_a_horizontal_job_fills_missing_cells_with_the_mean_over_every_party_under_mpc(tmp_path: Path) -> None:
    """Each party's own mean would differ: the fill is the mean of every party's present cells, computed
    under MPC, opened to every party (and recorded), the same at each; the baseline fills alike."""
    header, values = wdbc()
    rng = np.random.default_rng(1)
    column = header.index("mean_texture")
    parties, present = [], []
    for i, rows in enumerate(np.array_split(values, 2)):
        rows = rows.astype(object)
        gaps = rng.random(len(rows)) < [0.05, 0.3][i]  # unequal shares of gaps: the parties' own means differ
        split = int(len(rows) * 0.8)
        present.append(rows[:split][~gaps[:split], column].astype(float))  # the training cells a mean is taken of
        rows[gaps, column] = ""
        files = {w: str(write_csv(tmp_path / f"p{i}_{w}.csv", header, part)) for w, part in (("train", rows[:split]), ("test", rows[split:]))}
        parties.append({"name": f"p{i}", "data": files})
    spec = {
        "name": "horizontal-gaps", "partition": "horizontal", "parties": parties, "labels": {"column": "malignant"},
        "data": {"missing": {"mean_texture": "mean"}}, "model": {"type": "logistic_regression"},
        "training": {"epochs": 2, "batch_size": 64, "learning_rate": 0.5, "momentum": 0.9},
        "outputs": {"dir": str(tmp_path / "out"), "model_to": ["p0"], "metrics_to": "all"},
    }
    path = write_job(tmp_path, spec)
    run_job(path)
    job = load_job(path)
    joint = float(np.concatenate(present).mean())
    assert abs(joint - float(present[0].mean())) > 0.1  # a party's own mean would have been another fill
    fills = []
    for party in ("p0", "p1"):
        folder = job.party_root(party) / "latest"
        fills.append(json.loads((folder / "preprocessing.json").read_text())["imputed"]["mean_texture"])
        assert fills[-1] == pytest.approx(joint, rel=1e-3)  # divided under MPC: within fixed point's error
        openings = [json.loads(line) for line in (folder / "openings.jsonl").read_text().splitlines()]
        opened = {o["what"] for o in openings if sorted(o["to"]) == ["p0", "p1"]}
        assert {"column means for missing cells", "whether each column to fill has a present cell"} <= opened, openings
    assert fills[0] == fills[1]  # one opened value, the same fill at every party
    final = json.loads((job.party_root("p0") / "latest" / "metrics.json").read_text())["final"]
    assert final["test_accuracy"] == pytest.approx(train_plaintext(job).history[-1]["test_accuracy"], abs=0.02)
    spec["data"]["missing"] = {"mean_texture": "median"}
    with pytest.raises(ConfigError, match="a joint median under MPC is not built; fill with mean"):
        load_job(write_job(tmp_path, spec, "median.yaml"))
