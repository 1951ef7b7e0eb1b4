"""The inference job (``task: inference``): one party's model on another party's inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mpcfl.jobs.schema.common import InferenceOutputSpec, JobBase, Name, PositiveInt, _Strict
from mpcfl.models.spec import FactorySpec

class ImportedModelSpec(FactorySpec):
    """A torch model from code plus a weights file only its owner reads."""

    weights: Path = Field(description="a state_dict saved with torch.save; read only by the owner")
    owner: Name
    approximations: Literal["exact", "mpc_friendly"] = Field(
        "exact",
        description="transformer operators: exact, or mpc_friendly (quadratic GELU, 2Quad softmax; "
        "faster, but the model must be distilled to them first; see docs/guides/transformers.md)",
    )


class InputSpec(_Strict):
    file: Path = Field(description=".npy or header-less numeric .csv; read only by the owner")
    owner: Name


class InferenceJob(JobBase):
    """Secure inference: one party's model on another party's inputs."""

    task: Literal["inference"]
    model: ImportedModelSpec
    inputs: InputSpec
    batch_size: PositiveInt = 64
    outputs: InferenceOutputSpec = InferenceOutputSpec()

    @property
    def summary(self) -> str:
        """What ``mpcfl validate`` says the job is."""
        return f"inference, model {self.model.factory}"

    def files(self, party: str | None = None) -> dict[str, Path]:
        found = super().files(party)
        if party in (None, self.model.owner):
            found["model.weights"] = self.model.weights
        if party in (None, self.inputs.owner):
            found["inputs.file"] = self.inputs.file
        return found

    @model_validator(mode="after")
    def _consistent(self) -> InferenceJob:
        self._check_party("model.owner", self.model.owner)
        self._check_party("inputs.owner", self.inputs.owner)
        if self.model.owner == self.inputs.owner:
            raise ValueError("inputs.owner: the data owner and the model owner must be different parties")
        for i, party in enumerate(self.parties):
            if party.data is not None:
                raise ValueError(f"parties.{i}.data: an inference job takes its files from model and inputs")
        return self
