"""Secure training of a ViT on the shipped digits, against plaintext torch trained identically.

    python benchmarks/vit_training.py [--steps 20] [--batch 32] [--dim 16] [--layers 1] [--device cuda] ...

Two parties plus the TTP dealer on this machine: ``p0`` owns the initial weights (public here:
both build them from ``--seed``, as a training job's parties do) and receives the trained ones;
``p1`` owns the images and labels of ``examples/data/digits8x8.csv`` (the first 1,500 rows train,
the rest test). Each step shares a batch, runs the ViT (``mpcfl.models.zoo.DigitsViT``, dropout 0)
forward and backward under CrypTen's autograd (attention, softmax, LayerNorm, GELU), and takes an
SGD step on the secret weights; the batch's mean cross-entropy is revealed to both parties. p0 then
prints the median seconds, bytes and rounds per step, the largest weight difference from plaintext
torch trained from the same weights on the same batches, and both models' test accuracy.
``--out FILE`` (p0) saves the revealed weights and losses (tests/models/test_transformer_training.py).

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import mpcfl
from mpcfl.launch.local import launch_script
from mpcfl.models.convert import trainable
from mpcfl.models.heads import MultiClassHead
from mpcfl.models.zoo import DigitsViT
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal
from mpcfl.mpc.session import communication_stats, prefetching, session_device

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "examples" / "data" / "digits8x8.csv"
PARTIES = ["p0", "p1"]  # p0: the weights, p1: the data
TRAIN_ROWS = 1500
FIRST = "forward, backward, SGD step"


def model_of(args: argparse.Namespace) -> DigitsViT:
    """The ViT both parties (and the plaintext baseline) start from: seeded, dropout off."""
    torch.manual_seed(args.seed)
    return DigitsViT(patch=args.patch, dim=args.dim, heads=args.heads, layers=args.layers, hidden=args.hidden,
                     dropout=0.0)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All rows: pixels scaled to [0, 1], and class labels."""
    data = np.loadtxt(DIGITS, delimiter=",", skiprows=1, dtype=np.float32)
    return torch.from_numpy(data[:, :64] / 16.0), torch.from_numpy(data[:, 64]).long()


def batches(args: argparse.Namespace) -> list[torch.Tensor]:
    """Row indices of each step's batch: a seeded shuffle of the training rows (public), cut into
    full batches (every step the same shape: its triples are prefetched after the first)."""
    order = torch.randperm(TRAIN_ROWS, generator=torch.Generator().manual_seed(args.seed))
    per_epoch = TRAIN_ROWS // args.batch
    return [order[(i % per_epoch) * args.batch:][: args.batch] for i in range(args.steps)]


def train_plaintext(args: argparse.Namespace) -> tuple[DigitsViT, list[float]]:
    """The same model, batches, loss and SGD in float torch."""
    model, (x, y) = model_of(args), digits()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses = []
    for rows in batches(args):
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


class _Meter:
    """Seconds, bytes sent and rounds of this party, by phase of a step."""

    def __init__(self) -> None:
        self.laps: dict[str, tuple[float, int, int]] = {}
        self._stats, self._time = communication_stats(), time.perf_counter()

    def lap(self, name: str) -> None:
        stats, now = communication_stats(), time.perf_counter()
        self.laps[name] = (now - self._time, stats["bytes"] - self._stats["bytes"], stats["rounds"] - self._stats["rounds"])
        self._stats, self._time = stats, now


def _step(secure: Any, optimizer: Any, head: MultiClassHead, x: torch.Tensor, y: torch.Tensor | None,
          rows: torch.Tensor) -> tuple[Any, Any]:
    """One SGD step on a batch p1 shares; returns the logits and targets (secret)."""
    crypten = import_crypten()
    device = session_device()  # mpcfl launch --device
    images = crypten.cryptensor(x[rows], src=1, device=device)
    targets = crypten.cryptensor(head.secure_targets(None if y is None else y[rows].numpy(), len(rows)), src=1,
                                 device=device)
    logits = secure(images)
    with crypten.no_grad():  # mean cross-entropy's gradient at the logits: (softmax - one-hot) / n
        error = head.output_error(logits, targets).div(len(rows))
    optimizer.zero_grad()
    logits.backward(error)
    optimizer.step()
    return logits, targets


def party(args: argparse.Namespace) -> None:
    with mpcfl.join() as me:
        crypten = import_crypten()
        head = MultiClassHead(10)
        x, y = digits() if me.name == "p1" else (torch.zeros(TRAIN_ROWS, 64), None)
        torch_model = model_of(args)
        secure = trainable(torch_model).encrypt(src=0).to(session_device())
        secure.train()
        optimizer = crypten.optim.SGD(secure.parameters(), lr=args.lr)
        losses, costs = [], []
        for step, rows in enumerate(batches(args)):
            meter = _Meter()
            with prefetching(("vit training step", args.batch), enabled=not args.no_prefetch):
                logits, targets = _step(secure, optimizer, head, x, y, rows)
            meter.lap(FIRST)
            if args.losses:
                with crypten.no_grad():
                    loss = head.secure_example_losses(logits, targets).mean()
                losses.append(float(reveal(loss, to=[0, 1], what=f"step {step} mean training loss")))
                meter.lap("loss (--losses)")
            costs.append(meter.laps)
        trained = {name: reveal(p, to=[0], what=f"trained {name}") for name, p in secure.named_parameters()}
    if me.name != "p0":
        return
    torch_model.load_state_dict(trained)
    plain, plain_losses = train_plaintext(args)
    if args.out:
        torch.save({"weights": trained, "losses": torch.tensor(losses), "plain_losses": torch.tensor(plain_losses)},
                   args.out)
    report(args, torch_model, plain, losses, plain_losses, costs)


def report(args: argparse.Namespace, secure: DigitsViT, plain: DigitsViT, losses: list[float],
           plain_losses: list[float], costs: list[dict[str, tuple[float, int, int]]]) -> None:
    x, y = digits()
    with torch.no_grad():
        accuracy = {name: float((m(x[TRAIN_ROWS:]).argmax(1) == y[TRAIN_ROWS:]).float().mean()) for name, m in
                    (("secure", secure), ("plaintext", plain))}
    plain_state = plain.state_dict()
    gap = max(float((value - plain_state[name]).abs().max()) for name, value in secure.state_dict().items())
    print(f"\nViT digits ({args.patch}x{args.patch} patches, width {args.dim}, {args.heads} heads, {args.layers} "
          f"layer(s), hidden {args.hidden}, {sum(p.numel() for p in plain.parameters())} parameters), {args.steps} SGD "
          f"steps of {args.batch} images, lr {args.lr}, 2 parties + TTP dealer, {torch.get_num_threads()} thread(s) per party")
    later = costs[1:] or costs  # the first step records the triples the later ones prefetch
    print(f"| phase of a step (p0, median of {len(later)}) | s | MB sent | rounds |")
    print("|---|---|---|---|")
    print(f"| first step | {costs[0][FIRST][0]:.2f} | {costs[0][FIRST][1] / 1e6:.2f} | {costs[0][FIRST][2]} |")
    for phase in costs[0]:
        seconds, sent, rounds = (statistics.median(c[phase][i] for c in later) for i in range(3))
        print(f"| {phase} | {seconds:.2f} | {sent / 1e6:.2f} | {rounds:.0f} |")
    if losses:
        print(f"loss first/last: secure {losses[0]:.4f}/{losses[-1]:.4f}, plaintext {plain_losses[0]:.4f}/"
              f"{plain_losses[-1]:.4f}; largest difference {max(abs(a - b) for a, b in zip(losses, plain_losses)):.2g}")
    print(f"largest weight difference from plaintext torch: {gap:.2g}")
    print(f"test accuracy ({len(y) - TRAIN_ROWS} images): secure {accuracy['secure']:.4f}, plaintext {accuracy['plaintext']:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", action="store_true", help="reveal each step's mean loss (costs a max and a log)")
    parser.add_argument("--no-prefetch", action="store_true", help="fetch each triple when used (see runtime.prefetch)")
    parser.add_argument("--out", default="", help="p0 saves the revealed weights and the losses here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the parties compute")
    args = parser.parse_args()
    if not os.environ.get("MPCFL_PARTY"):  # the launcher: this script again per party, and the dealer
        return launch_script([os.path.abspath(__file__), *sys.argv[1:]], parties=PARTIES, timeout_s=600,
                             device=args.device)
    party(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
