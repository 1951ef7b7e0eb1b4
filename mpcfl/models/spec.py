"""What a job may say about its model.

Kept free of torch, so loading and validating a job stays light; what binary and
multi-class mean for outputs, targets and losses is :mod:`mpcfl.models.heads`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from mpcfl.errors import MpcflError

Classes = Annotated[int, Field(ge=2)]


def is_binary(num_classes: int) -> bool:
    """Two classes: one logit and BCE (any model spec, a layer list or a torch module, asks here)."""
    return num_classes == 2


class ModelSpec(BaseModel):
    """A job's ``model`` section for training: logistic or linear regression, or an MLP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["logistic_regression", "linear_regression", "mlp"]
    hidden: list[PositiveInt] = Field(default_factory=list)
    activation: Literal["relu", "sigmoid"] = "relu"
    num_classes: Classes = 2

    @model_validator(mode="after")
    def _hidden_matches_type(self) -> ModelSpec:
        if self.type == "mlp" and not self.hidden:
            raise ValueError("model.hidden: an mlp needs at least one hidden layer size")
        if self.type != "mlp" and self.hidden:
            raise ValueError(f"model.hidden: {self.type} has no hidden layers")
        if self.type == "linear_regression" and not self.binary:
            raise ValueError("model.num_classes: linear_regression predicts a value, not a class")
        return self

    @property
    def linear(self) -> bool:
        """One Linear layer (logistic or linear regression)."""
        return self.type != "mlp"

    @property
    def binary(self) -> bool:
        """Two classes (see :func:`mpcfl.models.heads.head_of`)."""
        return is_binary(self.num_classes)

    def parameter_count(self, n_features: int) -> int:
        """How many parameters the model has on ``n_features`` inputs (weights and biases of each
        Linear layer, as :func:`mpcfl.models.build.build_torch_model` builds it)."""
        sizes = [n_features, *self.hidden, 1 if self.binary else self.num_classes]
        return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes, sizes[1:]))


class FactorySpec(BaseModel):
    """A torch model from user code: ``model.factory``, a function called with no arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factory: str = Field(
        pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$",
        description="`package.module:function` or `path/to/file.py:function`, called with no arguments",
    )

    @field_validator("factory")
    @classmethod
    def _builds_a_module(cls, factory: str) -> str:
        # Importing and calling it runs its code: validation does what every party will do,
        # so a hostile or broken factory fails here as one line, not as a traceback per party.
        from mpcfl.models.factory import build_factory_model

        try:
            build_factory_model(factory)
        except MpcflError as err:
            raise ValueError(str(err)) from None
        return factory


class FactoryModelSpec(FactorySpec):
    """A training job's ``model`` given as a user's torch module (``model.factory``).

    The module's initial weights are the public starting point: every party calls the
    factory after seeding torch with the job's seed, so all build the same ones.
    """

    num_classes: Classes = 2

    @property
    def binary(self) -> bool:
        """Two classes (see :func:`mpcfl.models.heads.head_of`)."""
        return is_binary(self.num_classes)


REGRESSION_LOSSES = ("mse", "huber")


@dataclass(frozen=True)
class Regression:
    """What a regression job's head needs: its loss, and the public affine map from the
    targets the model learns back to the label column's units (``labels.scaling``)."""

    loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = 1.0
    center: float = 0.0
    scale: float = 1.0
    target_bound: float = 5.0  # |scaled target| at most this (labels.max_abs)


TrainModel = ModelSpec | FactoryModelSpec  # what a training job's ``model`` may be
