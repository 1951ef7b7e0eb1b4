"""What a job may say about its model, and the one place that knows binary from multi-class.

Kept free of torch, so loading and validating a job stays light.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


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
        """Two classes: one logit, a sigmoid and BCE; otherwise one logit per class and softmax."""
        return self.num_classes == 2

    @property
    def output_size(self) -> int:
        """One logit for two classes, one per class otherwise."""
        return 1 if self.binary else self.num_classes
