"""The text example's data and model (``configs/text_inference.yaml``): a synthetic task that needs
attention, learnt in plaintext by a small BERT-shaped classifier (``examples/models/text_classifier.py``).

Sequences of 8 token ids from a vocabulary of 16; the label is 1 when the first token appears again
later in the sequence (half the sequences, by construction), so the model must compare tokens across
positions. It trains on 4,000 sequences and writes the bank's weights and 256 held-out sequences with
their labels for the clinic (``examples/data/text_lookup/``). Deterministic (seeded, one thread).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from make_digits_model import write_inference_files  # this folder, as a script's

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "text_lookup"
SEED, TRAIN, HELD_OUT, EPOCHS = 0, 4000, 256, 40


def _module():
    spec = importlib.util.spec_from_file_location("text_classifier", HERE / "models" / "text_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sequences(rng: np.random.Generator, n: int, vocab: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences, half of them repeating their first token at a random later position."""
    ids = np.empty((n, length), dtype=np.int64)
    labels = np.arange(n) % 2
    for i, label in enumerate(labels):
        first, *rest = rng.permutation(vocab)[:length]  # distinct tokens: the first appears once
        row = [first, *rest]
        if label:
            row[rng.integers(1, length)] = first
        ids[i] = row
    order = rng.permutation(n)
    return ids[order], labels[order]


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    module = _module()
    rng = np.random.default_rng(SEED)
    x, y = sequences(rng, TRAIN + HELD_OUT, module.VOCAB, module.LENGTH)
    xt, yt = torch.tensor(x[:TRAIN]), torch.tensor(y[:TRAIN])
    model = module.text_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(EPOCHS):
        for start in range(0, TRAIN, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[start:start + 100]), yt[start:start + 100]).backward()
            opt.step()
    accuracy = write_inference_files(OUT, model, x[TRAIN:], y[TRAIN:])
    print(f"wrote {OUT}: held-out accuracy {accuracy:.4f} on {HELD_OUT} sequences")


if __name__ == "__main__":
    main()
