"""Party-local loading and checks: every bad file gets an error naming party, file and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import base_job, write_csv
from mpcfl.jobs.schema import TrainJob
from mpcfl.data.files import DataError, load_table
from mpcfl.tasks.train.dataset import check_alone, check_bounds
from mpcfl.data.party import (
    check_joint_stats_range,
    check_range,
    load_party_data,
    standardize_locally,
)


def job_for(tmp_path: Path, train_a: Path, train_b: Path, **model: object) -> TrainJob:
    spec = base_job(
        parties=[{"name": "a", "data": {"train": str(train_a)}}, {"name": "b", "data": {"train": str(train_b)}}],
        labels={"party": "b", "column": "y"},
        model={"type": "logistic_regression", **model},
    )
    spec["outputs"]["dir"] = str(tmp_path / "out")
    return TrainJob.model_validate(spec)


def test_csv_loads_with_header(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", ["x1", "x2"], [[1, 2.5], [3, -4]])
    table = load_table(path, party="a")
    assert table.columns == ["x1", "x2"]
    np.testing.assert_array_equal(table.values, [[1, 2.5], [3, -4]])


def test_npy_loads(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    table = load_table(tmp_path / "a.npy", party="a")
    assert table.values.shape == (3, 2) and table.columns == ["0", "1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("x1,x2\n1,2\n3,abc\n", "line 3, column 'x2': 'abc' is not a number"),
        ("x1,x2\n1,2\n3\n", "line 3 has 1 cells, the header has 2"),
        ("x1,x2\n1,nan\n", "column 'x2', data row 1: nan is not a finite number"),
        ("x1,x2\n1,2\ninf,2\n", "column 'x1', data row 2: inf is not a finite number"),
        ("", "empty file"),
        ("x1,x2\n", "no data rows"),
    ],
)
def test_bad_csv_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        load_table(path, party="clinic")
    assert str(caught.value).startswith(f"party clinic: {path}")
    assert message in str(caught.value)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        load_table(tmp_path / "nope.csv", party="a")
    (tmp_path / "a.parquet").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_table(tmp_path / "a.parquet", party="a")


def test_labels_split_off_and_checked(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", ["x1"], [[1], [2]])
    b = write_csv(tmp_path / "b.csv", ["x2", "y"], [[5, 0], [6, 1]])
    job = job_for(tmp_path, a, b)
    data_b = load_party_data(job, "b")
    assert data_b.train.columns == ["x2"] and data_b.train.y.tolist() == [0, 1]
    assert load_party_data(job, "a").train.y is None
    bad = write_csv(tmp_path / "b2.csv", ["x2", "y"], [[5, 0], [6, 2]])
    with pytest.raises(DataError, match=r"label column 'y', data row 2: 2.0 is not a class label in 0..1"):
        load_party_data(job_for(tmp_path, a, bad), "b")
    missing = write_csv(tmp_path / "b3.csv", ["x2", "z"], [[5, 0]])
    with pytest.raises(DataError, match="no label column 'y'"):
        load_party_data(job_for(tmp_path, a, missing), "b")


def test_standardisation_and_range_check(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", ["area", "constant"], [[1000, 1], [3000, 1], [2000, 1]])
    b = write_csv(tmp_path / "b.csv", ["x2", "y"], [[5, 0], [6, 1], [7, 1]])
    job = job_for(tmp_path, a, b)
    data = load_party_data(job, "a")
    with pytest.raises(DataError, match=r"party a: .*a.csv: column 'area' reaches 3000, beyond data.max_abs=100"):
        check_range(data, 100)
    standardize_locally(data)
    np.testing.assert_allclose(data.train.x[:, 0], [-1.2247449, 1.2247449, 0], rtol=1e-6)
    np.testing.assert_array_equal(data.train.x[:, 1], [0, 0, 0])
    check_range(data, 100)
    assert data.scaler["columns"] == ["area", "constant"]


def test_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"x1,x2\n\xff\xfe\x00\x01,2\n")
    with pytest.raises(DataError, match=r"party a: .*garbage.csv: (cannot read|line 2)"):
        load_table(garbage, party="a")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"party a: .*objects.npy: cannot read: .*pickle"):
        load_table(pickled, party="a")
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="data file not found"):
        load_table(folder, party="a")


def hostile_job(tmp_path: Path) -> TrainJob:
    """The attacker's review: +-9,999 features, under the default max_abs, not standardised."""
    rng = np.random.default_rng(0)
    a = write_csv(tmp_path / "a.csv", ["x1", "x2", "x3"], rng.choice([-9999.0, 9999.0], size=(200, 3)))
    b = write_csv(tmp_path / "b.csv", ["x4", "y"], np.c_[rng.uniform(-1, 1, 200), rng.integers(0, 2, 200)])
    spec = job_for(tmp_path, a, b).model_dump()
    spec["data"] = {"standardize": False}
    return TrainJob.model_validate(spec)


def test_values_that_would_wrap_in_training_are_refused_naming_party_file_and_column(tmp_path: Path) -> None:
    job = hostile_job(tmp_path)
    data = load_party_data(job, "a")
    check_range(data, job.data.max_abs)  # under max_abs: only the training bound sees the danger
    with pytest.raises(DataError) as caught:
        check_bounds(job, data, n_features=4, n_rows=200, metric_rows=200, share=3 / 4)
    text = str(caught.value)
    assert text.startswith(f"party a: {tmp_path / 'a.csv'}: column 'x1' (data row 1) drives"), text
    assert "data.standardize: true" in text and "training.learning_rate" in text and "\n" not in text
    with pytest.raises(DataError, match="party a: .*column 'x1'"):
        check_alone(job, load_party_data(job, "a"))
    # Standardised, the same columns leave ample headroom; the label holder's one small column too.
    standardize_locally(data)
    assert check_bounds(job, data, n_features=4, n_rows=200, metric_rows=200, share=3 / 4) > 100
    assert check_bounds(job, load_party_data(job, "b"), n_features=4, n_rows=200, metric_rows=200, share=1 / 4) > 100


def test_joint_standardisation_refuses_raw_values_whose_squares_would_wrap(tmp_path: Path) -> None:
    a = write_csv(tmp_path / "a.csv", ["x1", "y"], [[1e7, 0], [1, 1]])
    job = job_for(tmp_path, a, a).model_copy(update={"partition": "horizontal"})
    with pytest.raises(DataError, match=r"party a: .*a.csv: column 'x1' reaches 1e\+07, beyond 4194304 \(2\^22\)"):
        check_joint_stats_range(load_party_data(job, "a"))
