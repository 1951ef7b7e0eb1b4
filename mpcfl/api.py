"""The Python API for what the CLI does: run a job, predict with a trained model, validate, baseline, score.

Every process of a job runs on this machine, as ``mpcfl run`` starts them; use it to try things
out, in notebooks, and in tests. Jobs are given as a YAML path, a dict (paths in it relative to the
working directory), or a loaded job; rows as a file, a numpy array, or a DataFrame::

    import mpcfl

    run = mpcfl.run("configs/breast_cancer_lr.yaml")
    run.metrics("hospital_b")["test_accuracy"]
    model = run.model("hospital_b")                       # a torch module, at a model receiver
    scored = mpcfl.predict("configs/breast_cancer_lr.yaml", {"hospital_a": a_rows, "hospital_b": b_rows},
                           to=["hospital_b"])
    scored.predictions("hospital_b")                      # {"row": [...], "predicted": [...], "p_0": ...}
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mpcfl import runs
from mpcfl.errors import MpcflError
from mpcfl.jobs import registry
from mpcfl.jobs.schema import JobBase, TrainJob, load_job, resolve_paths

JobLike = str | Path | Mapping[str, Any] | JobBase


@dataclass(frozen=True)
class Run:
    """One finished run of a job on this machine, and what each party wrote."""

    job: JobBase
    run_id: str

    def folder(self, party: str) -> Path:
        """``party``'s folder of this run."""
        self.job.rank_of(party)
        return self.job.party_root(party) / self.run_id

    def record(self, party: str) -> dict[str, Any]:
        """``party``'s ``metrics.json``."""
        return json.loads((self.folder(party) / "metrics.json").read_text())

    def metrics(self, party: str | None = None) -> dict[str, Any]:
        """The final metrics ``party`` saw (a training job's last epoch, a predict job's figures); by
        default the first party's that has any."""
        for name in [party] if party else self.job.party_names:
            record = self.record(name)
            final = record.get("final") or record.get("metrics") or {}
            if any(key not in ("epoch", "seconds", "rounds", "bytes") for key in final):
                return final
        return {}

    def model(self, party: str) -> Any:
        """The trained model a model receiver holds, with the job's preprocessing in front: raw rows of
        every party's columns in, logits out (:func:`mpcfl.tasks.train.export.load_model`)."""
        from mpcfl.tasks.train.export import load_model

        others = [self.folder(name) for name in self.job.party_names if name != party]
        return load_model(self.folder(party), *others)

    def predictions(self, party: str) -> dict[str, list[Any]]:
        """A predict job's ``predictions.csv`` at a receiver, by column."""
        with (self.folder(party) / "predictions.csv").open() as handle:
            rows = list(csv.reader(handle))
        key, *others = rows[0]  # the row ID or position stays text; the rest are numbers where they can be
        columns = {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}
        return {key: columns[key], **{name: _numbers(columns[name]) for name in others}}


def _numbers(values: list[str]) -> list[Any]:
    """A column as numbers when every cell is one (probabilities, class indices), else as it is (class names)."""
    try:
        return [float(v) for v in values]
    except ValueError:
        return values


@contextlib.contextmanager
def job_file(job: JobLike) -> Iterator[Path]:
    """The job as a YAML file that every party process can read, for as long as the block runs."""
    if isinstance(job, (str, Path)):
        yield Path(job)
        return
    if isinstance(job, JobBase):
        if job.source is None:
            raise MpcflError("a job object needs the file it was loaded from (load_job); pass a dict instead")
        yield Path(job.source)
        return
    with tempfile.TemporaryDirectory(prefix="mpcfl-job-") as folder:
        path = Path(folder) / "job.yaml"
        # a dict's relative paths are the working directory's, as a file's are its folder's
        spec = resolve_paths(Path.cwd(), yaml.safe_load(yaml.safe_dump(dict(job))))
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        yield path


def run(job: JobLike, *, resume: str | bool = False, key_dir: Path | None = None, echo: bool = True) -> Run:
    """Runs every process of the job on this machine (``mpcfl run``) and returns the finished run.

    Args:
        resume: continue an unfinished run (``True``: the newest; or its id).
        key_dir: for ``runtime.identity``, the folder holding every process's ``NAME.key``.
        echo: print the processes' output as they run (to stdout).

    Raises:
        MpcflError: the job is invalid, or the run failed (the message is the failure's line).
    """
    from mpcfl.launch.local import run_local, run_to_resume

    with job_file(job) as path:
        loaded = load_job(path)
        if resume:
            registry.task_of(loaded).require(loaded, registry.RESUME)
            run_id = run_to_resume(loaded, resume)
        else:
            run_id = runs.new_run_id()
        sink = sys.stdout if echo else _Lines()
        code = run_local(loaded, resume=run_id if resume else False, key_dir=key_dir, sink=sink, run_id=run_id)
        if code != 0:
            raise MpcflError(f"run {run_id} of job {loaded.name} failed: {_first_error(loaded, run_id)}")
        return Run(loaded, run_id)


def _first_error(job: JobBase, run_id: str) -> str:
    """The first error a party recorded in the run, or where to look when none could (it failed before the run began)."""
    for party in job.party_names:
        with contextlib.suppress(MpcflError):
            error = runs.Run(job.party_root(party), run_id).read().get("error")
            if error:
                return f"{party}: {error}"
    return "before the run began at every party; the processes' output says why"


class _Lines:
    """A sink that keeps the processes' output instead of printing it."""

    def __init__(self) -> None:
        self.text: list[str] = []

    def write(self, text: str) -> int:
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def predict(
    train_job: JobLike,
    rows: Mapping[str, Any],
    *,
    to: list[str],
    model_run: str = "latest",
    out: Path | None = None,
    echo: bool = True,
) -> Run:
    """Scores new rows with a training run's model (``mpcfl predict``): each party's own columns of them.

    Args:
        rows: by party, a file, a 2-D numpy array (columns in the party's training order) or a
            DataFrame (its column names are used).
        to: the parties that receive the predictions.
        out: outputs folder (default: the training job's ``outputs.dir/predictions``).
    """
    with job_file(train_job) as path, tempfile.TemporaryDirectory(prefix="mpcfl-rows-") as folder:
        return run(predict_job(path, rows, to=to, model_run=model_run, out=out, folder=Path(folder)), echo=echo)


def predict_job(
    train_job: Path, rows: Mapping[str, Any], *, to: list[str], model_run: str, out: Path | None, folder: Path,
    names: tuple[str, str] = ("rows", "to"),
) -> dict[str, Any]:
    """A predict job for :func:`predict` and ``mpcfl predict``; arrays and DataFrames are written to ``folder``.

    Raises:
        MpcflError: ``rows`` or ``to`` names a party the training job lacks (the error names the
            argument as the caller spells it, ``names``), or the job is not a training job.
    """
    train = load_job(train_job)
    if not isinstance(train, TrainJob):
        raise MpcflError(f"{train_job}: predict takes a training job; this one is {train.summary}")
    for argument, parties in zip(names, (list(rows), list(to))):
        for name in parties:
            if name not in train.party_names:
                raise MpcflError(f"{argument}: {name!r} is not a party of {train_job} (its parties: {', '.join(train.party_names)})")
    files = {name: _rows_file(train, name, value, model_run, folder) for name, value in rows.items()}
    return {
        "task": "predict", "train_job": str(Path(train_job).resolve()), "model_run": model_run, "rows": files,
        "predictions_to": list(to), "outputs": {"dir": str((out or train.outputs.dir / "predictions").resolve())},
    }


def _rows_file(train: TrainJob, party: str, value: Any, model_run: str, folder: Path) -> str:
    """A party's new rows as a CSV file: a path as it is; an array or DataFrame written with a header."""
    if isinstance(value, (str, Path)):
        return str(Path(value).resolve())
    if hasattr(value, "to_numpy") and hasattr(value, "columns"):  # a DataFrame, without importing pandas
        header, values = [str(c) for c in value.columns], value.to_numpy()
    else:
        import numpy as np

        from mpcfl.tasks.train.export import PREPROCESSING

        values = np.asarray(value)
        root = train.party_root(party)
        trained = runs.latest(root, train.name) if model_run == "latest" else root / model_run
        header = json.loads((trained / PREPROCESSING).read_text())["columns"]
        if values.ndim != 2 or values.shape[1] != len(header):
            raise MpcflError(f"party {party}: rows of shape {values.shape}; its model takes {len(header)} columns ({', '.join(header)})")
    path = folder / f"{party}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(values.tolist())
    return str(path)


def validate(job: JobLike, party: str | None = None) -> list[str]:
    """``mpcfl validate``: checks the job and the files it names, and loads each party's files as its
    process would (``party``'s alone, with ``party``: on a multi-host job each host holds only its
    own); returns what the CLI prints.

    Raises:
        MpcflError: the first problem, in one line naming the file and the key.
    """
    with job_file(job) as path:
        loaded = load_job(path)
        for key, file in loaded.files(party).items():
            try:
                with open(file, "rb") as handle:
                    handle.read(1)
            except OSError as err:
                hint = "" if party else "; on a multi-host job, validate each party on its own host with --party NAME"
                owner = key.split(".")[1] if key.startswith("parties.") else None
                who = f" (party {loaded.parties[int(owner)].name})" if owner is not None else ""
                raise MpcflError(f"{loaded.source}: {key}{who}: {file}: {err.strerror or err}{hint}") from None
        if party:
            loaded.rank_of(party)
        # Every file named is readable here (else refused above): each party's own checks run, its
        # label column, scaling columns and rows, as its process would run them.
        check = registry.task_of(loaded).check_party()
        lines = [f"{name}: {line}" for name in ([party] if party else loaded.party_names) for line in check(loaded, name)]
        size = None  # the model's input features and training rows, where every file here gives them
        if not party and isinstance(loaded, TrainJob) and not loaded.keyed:  # rows lined up by position: they must fit
            from mpcfl.data.party import load_party_data
            from mpcfl.tasks.train.dataset import check_shapes, joint_size, public_shape

            shapes = [public_shape(loaded, load_party_data(loaded, name)) for name in loaded.party_names]
            check_shapes(loaded, shapes)
            size = joint_size(loaded, shapes)[:2]
        if not party and getattr(loaded, "dp", None) is not None:
            from mpcfl.tasks.train.dp_sgd import calibration, check_plausible

            check_plausible(loaded, None if size is None else size[1])
            if size is not None:  # the run's own calibration, rounding check included, for any sampling
                calibration(loaded, *size)
            elif isinstance(loaded, TrainJob) and loaded.data.scaling is not None and loaded.dp.sampling == "shuffle":
                calibration(loaded, len(loaded.data.scaling))  # data.scaling names every column: the model's size is known
        return [*lines, f"{path}: valid job {loaded.name!r}: {loaded.world_size} parties, {loaded.summary}"]


def baseline(job: JobLike) -> list[dict[str, float]]:
    """``mpcfl baseline``: the same training job in plaintext PyTorch, reading every party's files (a
    measurement, never part of a secure run); its per-epoch history."""
    with job_file(job) as path:
        loaded = load_job(path)
        registry.task_of(loaded).require(loaded, registry.BASELINE)
        from mpcfl.tasks.train.baseline import train_plaintext

        return train_plaintext(loaded).history


def score(job: JobLike, model: str | Path | None = None) -> dict[str, float]:
    """``mpcfl baseline --score``: a revealed model's loss and scores on the job's train and test rows,
    reading every party's files (a measurement, never part of a secure run: under DP it is outside the
    budget). ``model``: a ``model.pt``; default the first receiver's latest run.

    Raises:
        MpcflError: no receiver and no model given, or the model file is missing; names the path.
    """
    with job_file(job) as path:
        loaded = load_job(path)
        registry.task_of(loaded).require(loaded, registry.BASELINE)
        if model is None:
            receivers = loaded.outputs.model_to if isinstance(loaded.outputs.model_to, list) else []
            if not receivers:
                raise MpcflError(f"{path}: outputs.model_to is none, so no party holds a model to score; name a model.pt")
            model = runs.latest(loaded.party_root(receivers[0]), loaded.name) / "model.pt"
        model = Path(model)
        if not model.is_file():
            raise MpcflError(f"{model}: no such model file")
        import torch

        from mpcfl.tasks.train.baseline import evaluate_state_dict, run_center

        return evaluate_state_dict(loaded, torch.load(model, weights_only=True), center=run_center(loaded, model.parent.name))

