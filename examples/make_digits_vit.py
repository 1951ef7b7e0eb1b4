"""Builds the secure ViT demo's weights: a bank's vision transformer trained on the digits.

Trains ``mpcfl.models.zoo.digits_vit`` in plaintext on the same first 1,600 of the UCI 8x8
digits as ``make_digits_model.py`` (pixels scaled to [0, 1]); the other 197 are the clinic's
inputs, already under examples/data/digits_inference/. Writes
``examples/data/digits_vit/bank_weights.pt`` (the model owner's state_dict) for
``configs/digits_vit_inference.yaml``, and prints the plaintext accuracy on the clinic's images.

Run: ``python examples/make_digits_vit.py`` (deterministic on one machine; the output is committed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpcfl.models.zoo import digits_vit

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "digits_vit"
TRAIN_ROWS = 1600
EPOCHS = 60


def main() -> None:
    data = np.loadtxt(HERE / "data" / "digits8x8.csv", delimiter=",", skiprows=1, dtype=np.float32)
    x, y = torch.from_numpy(data[:, :64] / 16.0), torch.from_numpy(data[:, 64].astype(np.int64))
    torch.manual_seed(0)
    model = digits_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    for epoch in range(EPOCHS):
        model.train()
        for batch in torch.randperm(TRAIN_ROWS, generator=torch.Generator().manual_seed(epoch)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[TRAIN_ROWS:]).argmax(1) == y[TRAIN_ROWS:]).float().mean().item()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), OUT / "bank_weights.pt")
    print(f"wrote {OUT / 'bank_weights.pt'}; plaintext accuracy on the clinic's {len(x) - TRAIN_ROWS} images: {accuracy:.4f}")


if __name__ == "__main__":
    main()
