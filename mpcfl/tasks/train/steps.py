"""How one SGD step gets its gradients, and what training's reveals cost: the step strategy.

The training loop is the same with or without DP (as with Opacus, one engine is
attached and the loop is unchanged): it asks its :class:`TrainingStep` for each
batch's gradients and for the privacy of what it reveals. :class:`PlainSgd` is
the strategy without DP; :func:`mpcfl.tasks.train.dp_sgd.training_step` picks one
from the job.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import nn

from mpcfl.dp.accountant import Charge
from mpcfl.models.heads import Head
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import Privacy


class TrainingStep(abc.ABC):
    """Each batch's gradients, and the privacy of the reveals training makes. Without DP
    the reveals are free (None)."""

    loss_bound: float | None = None  # each example's loss is clipped to this in revealed metrics; None: unclipped

    @abc.abstractmethod
    def step(self, model: Any, torch_model: nn.Module, x: Any, y: Any) -> None:
        """Sets the (zeroed) gradients of ``model``'s parameters for one batch.

        Args:
            model: the encrypted crypten model.
            torch_model: its plain architecture (layer types), for strategies that need it.
            x, y: the batch's features and targets (CrypTensors).
        """

    def project(self, model: Any) -> None:
        """Keeps the parameters where the strategy's bounds need them, before the first step and
        after each update; by default they are left as they are."""

    def secret_batches(self, n_rows: int, *, device: Any) -> int | None:
        """Called as each epoch starts: the number of steps, when the strategy samples each step's
        batch itself, in secret (every step then gets all ``n_rows`` rows); None: the loop's public
        batches."""
        return None

    def epoch_charge(self) -> Charge | None:
        """The charge for one epoch of steps, made when the epoch completes; None: free."""
        return None

    def metrics_privacy(self) -> Privacy | None:
        """Noise and charge for one epoch's metrics reveal; None: revealed as they are."""
        return None

    def releases_metrics(self, epoch: int, epochs: int) -> bool:
        """Whether epoch ``epoch`` (from 0, of ``epochs``) reveals metrics to their receivers."""
        return True

    def metrics_release(self) -> dict[str, Any]:
        """How revealed metrics were obtained, for ``metrics.json``."""
        return {"released": "exact", "note": "no DP: the sums are opened as computed under MPC"}

    def model_privacy(self) -> Privacy | None:
        """The charge for revealing the trained model; None: free (no budget)."""
        return None

    def notes(self) -> dict[str, Any]:
        """Mechanism details to keep with the privacy ledger."""
        return {}


class PlainSgd(TrainingStep):
    """Gradients of the batch's mean loss: the head's ``(p - y) / B`` at the logits, pushed
    back through the model by CrypTen's autograd.

    That is the gradient of CrypTen's ``BCEWithLogitsLoss`` and ``CrossEntropyLoss``, whose
    ``backward()`` is not used: their loss (made by ``new(0)``) and its implicit gradient of
    one are encrypted on the CPU whatever the model's device, and that one is multiplied in
    under MPC: a Beaver multiplication per step for nothing, and on CUDA one across devices,
    which CrypTen refuses.
    """

    def __init__(self, head: Head) -> None:
        self._error = head.output_error

    def step(self, model: Any, torch_model: nn.Module, x: Any, y: Any) -> None:
        logits = model(x)
        with import_crypten().no_grad():
            error = self._error(logits, y).div(x.size(0))
        logits.backward(error)
