"""What a job may say about its model.

Kept free of torch, so loading and validating a job stays light; what binary and
multi-class mean for outputs, targets and losses is :mod:`mpcfl.models.heads`'s.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


def is_binary(num_classes: int) -> bool:
    """Two classes: one logit and BCE (any model spec, a layer list or a torch module, asks here)."""
    return num_classes == 2


class ModelSpec(BaseModel):
    """A job's ``model`` section for training: logistic regression or an MLP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["logistic_regression", "mlp"]
    hidden: list[PositiveInt] = Field(default_factory=list)
    activation: Literal["relu", "sigmoid"] = "relu"
    num_classes: Annotated[int, Field(ge=2)] = 2

    @model_validator(mode="after")
    def _hidden_matches_type(self) -> ModelSpec:
        if self.type == "mlp" and not self.hidden:
            raise ValueError("model.hidden: an mlp needs at least one hidden layer size")
        if self.type == "logistic_regression" and self.hidden:
            raise ValueError("model.hidden: logistic_regression has no hidden layers")
        return self

    @property
    def binary(self) -> bool:
        """Two classes (see :func:`mpcfl.models.heads.head_of`)."""
        return is_binary(self.num_classes)
