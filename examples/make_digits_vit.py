"""Builds the secure ViT demo's weights: a bank's vision transformer trained on the digits.

Trains ``mpcfl.models.zoo.digits_vit`` in plaintext on the same first 1,600 of the UCI 8x8
digits as ``make_digits_model.py`` (pixels scaled to [0, 1]); the other 197 are the clinic's
inputs, already under examples/data/digits_inference/. Then distils a copy of it to the
MPC-friendly operators (quadratic GELU, 2Quad softmax), run in plaintext by
``mpcfl.models.convert.emulate``: the copy learns the trained model's logits and the labels.
Writes, under examples/data/digits_vit/, the model owner's state_dicts:

- ``bank_weights.pt`` for ``configs/digits_vit_inference.yaml`` (exact operators);
- ``bank_weights_mpc_friendly.pt`` for ``configs/digits_vit_friendly_inference.yaml``;

and prints both models' plaintext accuracy on the clinic's images (the second as served).

Run: ``python examples/make_digits_vit.py`` (deterministic on one machine; the output is committed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpcfl.models.convert import emulate
from mpcfl.models.zoo import digits_vit

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "digits_vit"
TRAIN_ROWS = 1600
EPOCHS = 60
DISTIL_EPOCHS = 30


def _fit(model: torch.nn.Module, epochs: int, lr: float, loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """AdamW with a cosine schedule over the training rows in batches of 32; ``loss`` of a batch's rows."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(TRAIN_ROWS, generator=torch.Generator().manual_seed(epoch)).split(32):
            optimizer.zero_grad()
            loss(batch).backward()
            optimizer.step()
        schedule.step()
    model.eval()


def main() -> None:
    data = np.loadtxt(HERE / "data" / "digits8x8.csv", delimiter=",", skiprows=1, dtype=np.float32)
    x, y = torch.from_numpy(data[:, :64] / 16.0), torch.from_numpy(data[:, 64].astype(np.int64))
    test = slice(TRAIN_ROWS, None)
    torch.manual_seed(0)
    model = digits_vit()
    _fit(model, EPOCHS, 3e-3, lambda rows: F.cross_entropy(model(x[rows]), y[rows]))
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        teacher = model(x[:TRAIN_ROWS])
    # the student starts from the trained weights and learns them under the MPC-friendly operators
    student = copy.deepcopy(model)

    def distil(rows: torch.Tensor) -> torch.Tensor:
        logits = emulate(student, x[rows], "mpc_friendly")
        soft = F.kl_div(F.log_softmax(logits, 1), F.softmax(teacher[rows], 1), reduction="batchmean")
        return soft + F.cross_entropy(logits, y[rows])

    _fit(student, DISTIL_EPOCHS, 1e-3, distil)
    with torch.no_grad():
        friendly = (emulate(student, x[test], "mpc_friendly").argmax(1) == y[test]).float().mean().item()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), OUT / "bank_weights.pt")
    torch.save(student.state_dict(), OUT / "bank_weights_mpc_friendly.pt")
    print(f"wrote {OUT}; plaintext accuracy on the clinic's {len(x) - TRAIN_ROWS} images: {accuracy:.4f} exact, "
          f"{friendly:.4f} with the MPC-friendly operators after distillation")


if __name__ == "__main__":
    main()
