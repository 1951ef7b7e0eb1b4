"""The predict job (``task: predict``): new rows scored by the model of a training job's run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mpcfl import runs
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema.common import InferenceOutputSpec, JobBase, Name
from mpcfl.jobs.schema.train import TrainJob

class PredictJob(JobBase):
    """Secure prediction with a trained model: new rows, each party holding its own columns of them as
    it did in training, scored by the model of one of the training job's runs."""

    task: Literal["predict"]
    train_job: Path = Field(description="the training job file whose run's model predicts")
    model_run: str = Field(default="latest", description="that job's run: its id, or latest (the last finished)")
    rows: dict[Name, Path] = Field(
        description="each party's file of new rows: its training feature columns (and its ID column when the "
        "training job has one; the label owner may add the label column, for metrics)"
    )
    predictions_to: list[Name] = Field(min_length=1, description="the parties that receive the predictions")
    outputs: InferenceOutputSpec = InferenceOutputSpec()
    train: TrainJob | None = Field(default=None, exclude=True)  # the loaded training job

    @model_validator(mode="before")
    @classmethod
    def _from_training(cls, raw: Any) -> Any:
        """Takes the parties and runtime of the training job unless given: the same processes predict."""
        if not isinstance(raw, dict) or not isinstance(raw.get("train_job"), (str, Path)):
            return raw
        from mpcfl.jobs.schema import load_job  # the package's loader, which dispatches over every task (this one too)

        try:
            train = load_job(raw["train_job"])
        except ConfigError as err:
            raise ValueError(f"train_job: {err}") from None
        if not isinstance(train, TrainJob):
            raise ValueError(f"train_job: {raw['train_job']} is a {train.summary.split(',')[0]} job, not a training job")
        raw = dict(raw, train=train)
        raw.setdefault("name", f"{train.name}-predict")
        raw.setdefault("parties", [{"name": name} for name in train.party_names])
        raw.setdefault("runtime", train.runtime.model_dump(exclude_unset=True))
        outputs = raw.get("outputs", {})
        if isinstance(outputs, dict) and outputs.get("dir") is None:  # as `mpcfl predict` does
            raw["outputs"] = dict(outputs, dir=str(train.outputs.dir / "predictions"))
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> PredictJob:
        assert self.train is not None
        if self.party_names != self.train.party_names:
            raise ValueError(f"parties: must be the training job's, in its order ({', '.join(self.train.party_names)})")
        for i, party in enumerate(self.parties):
            if party.data is not None:
                raise ValueError(f"parties.{i}.data: a predict job takes each party's new rows from rows")
        for name in [*self.rows, *self.predictions_to]:
            self._check_party("rows" if name in self.rows else "predictions_to", name)
        if self.model_run != "latest" and not runs.is_run_id(self.model_run):
            raise ValueError(f"model_run: {self.model_run!r} is neither latest nor a run id like 20261203-081502-3fa94c0e12ab")
        if self.train.partition == "horizontal" and len(self.rows) != 1:
            raise ValueError("rows: in a horizontal job each row lies at one party: give one party's file")
        return self

    @property
    def summary(self) -> str:
        """What ``mpcfl validate`` says the job is."""
        assert self.train is not None
        return f"predict with a model of job {self.train.name} (run {self.model_run}) for {', '.join(self.predictions_to)}"

    def files(self, party: str | None = None) -> dict[str, Path]:
        found = super().files(party)
        found.update({f"rows.{name}": path for name, path in self.rows.items() if party in (None, name)})
        return found

    def fingerprint(self) -> str:
        """The training job's fingerprint stands for it; the files of new rows are local paths."""
        assert self.train is not None
        data = self.model_dump(mode="json", exclude={"rows", "train_job", "outputs"})
        for party in data["parties"]:
            party.pop("data", None)
        data["runtime"].pop("secret_file", None)
        data["train"] = self.train.fingerprint()
        data["rows"] = sorted(self.rows)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
