"""The Python API: what the CLI does, from a notebook, with dicts, numpy arrays and DataFrames."""

from __future__ import annotations

import subprocess
import sys

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

import mpcfl
from conftest import DEMO, assert_no_leftovers
from mpcfl.errors import MpcflError


class _Frame:
    """What the API reads of a pandas DataFrame (pandas is not a dependency)."""

    def __init__(self, columns: list[str], values: np.ndarray) -> None:
        self.columns, self._values = columns, values

    def to_numpy(self) -> np.ndarray:
        return self._values


def _csv(path: Path) -> tuple[list[str], np.ndarray]:
    return path.read_text().splitlines()[0].split(","), np.loadtxt(path, delimiter=",", skiprows=1)


def test_train_predict_validate_and_baseline_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:  # relative to the working directory, as a dict's paths are
        party["data"] = {k: str((DEMO.parent / v).resolve().relative_to(DEMO.parent.parent)) for k, v in party["data"].items()}
    spec["training"]["epochs"] = 2
    spec["outputs"]["dir"] = str(tmp_path / "out")
    monkeypatch.chdir(DEMO.parent.parent)
    run = mpcfl.run(spec, echo=False)
    assert run.metrics("hospital_b")["test_accuracy"] > 0.9
    model = run.model("hospital_b")
    assert isinstance(model, torch.nn.Module)

    # hospital_a's rows as a numpy array, hospital_b's as a DataFrame with the label column
    a_columns, a_rows = _csv(Path(spec["parties"][0]["data"]["test"]))
    b_columns, b_rows = _csv(Path(spec["parties"][1]["data"]["test"]))
    scored = mpcfl.predict(spec_path := _write(tmp_path, spec), {"hospital_a": a_rows, "hospital_b": _Frame(b_columns, b_rows)},
                           to=["hospital_b"], echo=False)
    predictions = scored.predictions("hospital_b")
    assert len(predictions["predicted"]) == 113
    # The receiver's model with every party's preprocessing in front scores raw rows in plain torch
    assert model.columns == a_columns + b_columns[:-1]
    with torch.no_grad():
        raw = torch.tensor(np.hstack([a_rows, b_rows[:, :-1]]), dtype=torch.float32)
        plain = torch.sigmoid(model(raw)).squeeze(1).numpy()
    assert np.abs(plain - np.array(predictions["p_1"])).max() < 1e-3
    # Found by an attacker: model.onnx holds the receiver's weights, and was the one file others could read.
    for path in run.folder("hospital_b").iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, f"{path.name} is readable by others"
    exported = onnx.load(run.folder("hospital_b") / "model.onnx")
    onnx.checker.check_model(exported)
    assert [i.name for i in exported.graph.input] == ["features"]
    assert scored.metrics("hospital_b")["accuracy"] == pytest.approx(run.metrics("hospital_b")["test_accuracy"], abs=0.01)
    with pytest.raises(MpcflError, match=r"party hospital_a: rows of shape \(113, 3\); its model takes 20 columns"):
        mpcfl.predict(spec_path, {"hospital_a": a_rows[:, :3], "hospital_b": b_rows}, to=["hospital_b"], echo=False)

    assert mpcfl.validate(spec_path, party="hospital_a")[0] == "hospital_a: 456 training rows, 20 feature columns"
    assert len(mpcfl.baseline(spec_path)) == 2
    # Scoring the revealed model on every party's files (a measurement, as baseline): the run's own test accuracy.
    scores = mpcfl.score(spec_path)
    assert scores["test_accuracy"] == pytest.approx(run.metrics("hospital_b")["test_accuracy"], abs=0.01)
    assert mpcfl.score(spec_path, run.folder("hospital_b") / "model.pt") == scores
    cli = subprocess.run([sys.executable, "-m", "mpcfl", "baseline", str(spec_path), "--score"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and f"test_accuracy={scores['test_accuracy']:.4f}" in cli.stdout, cli.stderr
    cli = subprocess.run([sys.executable, "-m", "mpcfl", "baseline", str(spec_path), "--score", str(tmp_path / "no.pt")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and cli.stderr.strip().splitlines() == [f"mpcfl: error: {tmp_path / 'no.pt'}: no such model file"]
    with pytest.raises(MpcflError, match=r"run \S+ of job breast-cancer-lr failed: before the run began"):
        broken = dict(spec, runtime={"timeout_s": 60, "provider": "ttp"})
        broken["parties"] = [dict(p, data=dict(p["data"])) for p in spec["parties"]]
        broken["parties"][0]["data"]["train"] = str(tmp_path / "gone.csv")
        mpcfl.run(broken, echo=False)
    assert_no_leftovers(str(tmp_path))


def _write(folder: Path, spec: dict) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(mpcfl.api.resolve_paths(Path.cwd(), yaml.safe_load(yaml.safe_dump(spec)))))
    return path


def test_progress_bars_follow_the_launcher_then_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mpcfl.outputs import ENV_PROGRESS, progress_bars

    for setting, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(ENV_PROGRESS, setting)
        assert progress_bars() is expected
    monkeypatch.delenv(ENV_PROGRESS)
    assert progress_bars() is sys.stderr.isatty()
