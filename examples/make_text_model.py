"""The text example's data and model (``configs/text_inference.yaml``): a synthetic task that needs
attention, learnt in plaintext by a small BERT-shaped classifier (``examples/models/text_classifier.py``).

Sequences of 8 token ids from a vocabulary of 16; the label is 1 when the first token appears again
later in the sequence (half the sequences, by construction), so the model must compare tokens across
positions. It trains on 4,000 sequences and writes the bank's weights and 256 held-out sequences with
their labels for the clinic (``examples/data/text_lookup/``). Then, as ``make_digits_vit.py`` does,
distils a copy to the MPC-friendly operators (quadratic GELU, 2Quad softmax; run in plaintext by
``mpcfl.models.convert.emulate``), which the trained model does not survive as it is (54% on the
held-out sequences): ``bank_weights_mpc_friendly.pt``, for ``configs/text_friendly_inference.yaml``.
Deterministic (seeded, one thread). ``--distil-only`` distils the committed weights again.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from make_digits_model import write_inference_files  # this folder, as a script's
from mpcfl.models.convert import emulate

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "text_lookup"
SEED, TRAIN, HELD_OUT, EPOCHS = 0, 4000, 256, 40
DISTIL_EPOCHS = 30


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


def distil(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """A copy of ``model`` trained under the MPC-friendly operators on the trained model's logits
    (KL) and the labels: Adam, batches of 100, :data:`DISTIL_EPOCHS` epochs."""
    torch.manual_seed(SEED)
    with torch.no_grad():
        teacher = model(x)
    student = copy.deepcopy(model).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(DISTIL_EPOCHS):
        for rows in torch.randperm(len(x)).split(100):
            logits = emulate(student, x[rows].float(), "mpc_friendly")
            soft = nn.functional.kl_div(nn.functional.log_softmax(logits, 1), nn.functional.softmax(teacher[rows], 1),
                                        reduction="batchmean")
            opt.zero_grad()
            (soft + nn.functional.cross_entropy(logits, y[rows])).backward()
            opt.step()
    return student.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distil-only", action="store_true", help="distil the committed bank_weights.pt again")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    module = _module()
    rng = np.random.default_rng(SEED)
    x, y = sequences(rng, TRAIN + HELD_OUT, module.VOCAB, module.LENGTH)
    xt, yt = torch.tensor(x[:TRAIN]), torch.tensor(y[:TRAIN])
    model = module.text_classifier()
    if args.distil_only:
        model.load_state_dict(torch.load(OUT / "bank_weights.pt", weights_only=True))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(EPOCHS):
            for start in range(0, TRAIN, 100):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[start:start + 100]), yt[start:start + 100]).backward()
                opt.step()
        accuracy = write_inference_files(OUT, model, x[TRAIN:], y[TRAIN:])
        print(f"wrote {OUT}: held-out accuracy {accuracy:.4f} on {HELD_OUT} sequences")
    student = distil(model.eval(), xt, yt)
    torch.save(student.state_dict(), OUT / "bank_weights_mpc_friendly.pt")
    with torch.no_grad():
        held_out = torch.tensor(x[TRAIN:]).float()
        friendly = (emulate(student, held_out, "mpc_friendly").argmax(1).numpy() == y[TRAIN:]).mean()
        before = (emulate(model, held_out, "mpc_friendly").argmax(1).numpy() == y[TRAIN:]).mean()
    print(f"wrote {OUT / 'bank_weights_mpc_friendly.pt'}: held-out accuracy with the MPC-friendly operators "
          f"{friendly:.4f} after distillation ({before:.4f} before)")


if __name__ == "__main__":
    main()
