"""Builds the inference demo's files: a bank's trained model and a clinic's inputs.

Trains ``mpcfl.models.zoo.digits_mlp`` in plaintext on the first 1,600 of the UCI 8x8
digits (pixels scaled to [0, 1]) and keeps the other 197 as the data owner's
inputs. Writes, under examples/data/digits_inference/:

- ``bank_weights.pt``: the model owner's state_dict;
- ``clinic_inputs.npy``: the data owner's inputs, 197 x 64;
- ``clinic_labels.npy``: their true digits, to score the predictions.

Run: ``python examples/make_digits_model.py`` (deterministic; the outputs are committed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mpcfl.models.zoo import digits_mlp

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "digits_inference"
TRAIN_ROWS = 1600


def main() -> None:
    data = np.loadtxt(HERE / "data" / "digits8x8.csv", delimiter=",", skiprows=1, dtype=np.float32)
    x, y = data[:, :64] / 16.0, data[:, 64].astype(np.int64)
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    features, labels = torch.from_numpy(x[:TRAIN_ROWS]), torch.from_numpy(y[:TRAIN_ROWS])
    for epoch in range(30):
        for batch in torch.randperm(TRAIN_ROWS, generator=torch.Generator().manual_seed(epoch)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(features[batch]), labels[batch]).backward()
            optimizer.step()
    accuracy = write_inference_files(OUT, model, x[TRAIN_ROWS:], y[TRAIN_ROWS:])
    print(f"wrote {OUT}; plaintext accuracy on the clinic's {len(x) - TRAIN_ROWS} inputs: {accuracy:.4f}")


def write_inference_files(out: Path, model: torch.nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    """An inference demo's files in ``out``: the bank's weights, the clinic's inputs and their labels;
    returns the model's plaintext accuracy on them."""
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(inputs)).argmax(1).numpy() == labels).mean())
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "bank_weights.pt")
    np.save(out / "clinic_inputs.npy", inputs)
    np.save(out / "clinic_labels.npy", labels)
    return accuracy


if __name__ == "__main__":
    main()
