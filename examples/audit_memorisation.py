"""Membership inference against a memorising MLP on the 8x8 digits, without DP and with DP-SGD.

    python examples/audit_memorisation.py [--models 20] [--pool 600] [--epochs 100]

Each configuration trains ``--models`` MLPs (64-256-10, ReLU) in plaintext with
mpcfl's simulation of its DP-SGD (:func:`mpcfl.tasks.train.baseline.train_plaintext`:
the same per-example clipping and noise calibration as under MPC, taken from the
code), each on a random half of a fixed pool of ``--pool`` digits; the other half
are its non-members. Each model in turn is the target and the others its LiRA
shadows (Carlini et al.'s setup: every record is in about half the shadows), and
the scores are pooled over targets. Prints a Markdown table and writes
runs/examples/audit_memorisation.png (--update-figure: the tracked docs/figures/audit_memorisation.png).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from _figures import add_figure_flags, figure_path
from mpcfl.jobs.schema import TrainJob
from mpcfl.tasks.train.audit import AttackResult, plot_roc, pooled_attacks, train_on_subsets
from mpcfl.tasks.train.dp_sgd import calibration

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "digits8x8.csv"
DELTA = 1e-5
EPSILONS: dict[str, float | None] = {"no DP": None, "DP eps 8": 8.0, "DP eps 3": 3.0, "DP eps 1": 1.0}


def digits_job(epsilon: float | None, *, epochs: int, hidden: int, batch_size: int, learning_rate: float) -> TrainJob:
    """A horizontal two-party digits job; pixels are scaled by the public constant 16, not standardised."""
    spec = {
        "name": "digits-mlp-audit",
        "partition": "horizontal",
        "parties": [{"name": "a", "data": {"train": str(DATA)}}, {"name": "b", "data": {"train": str(DATA)}}],
        "labels": {"column": "target"},
        "data": {"standardize": False, "max_abs": 1.0},  # pixels / 16, in [0, 1]
        "model": {"type": "mlp", "hidden": [hidden], "num_classes": 10},
        "training": {
            "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
            "momentum": 0.9, "loss": "cross_entropy",
        },
        "outputs": {"dir": "unused", "metrics_to": "none"},
    }
    if epsilon is not None:
        spec["dp"] = {"epsilon": epsilon, "delta": DELTA, "clip": 1.0}
    return TrainJob.model_validate(spec)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = np.loadtxt(DATA, delimiter=",", skiprows=1, dtype=np.float32)
    return torch.from_numpy(data[:, :64] / 16.0), torch.from_numpy(data[:, 64].astype(np.int64))


def run(
    epsilon: float | None, x: torch.Tensor, y: torch.Tensor, *, models: int, seed: int, **training: float
) -> tuple[list[AttackResult], float, str]:
    """Both pooled attacks for one configuration, the median test accuracy, and the noise it used."""
    job = digits_job(epsilon, **training)
    trained = train_on_subsets(job, x, y, models=models, size=len(x) // 2, seed=seed)
    noise = "-" if job.dp is None else "{:.2f} x {:.3f}".format(*calibration(job, x.shape[1]))
    return pooled_attacks(trained, delta=DELTA), float(np.median(trained.accuracies)), noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20, help="models per configuration (each the target once)")
    parser.add_argument("--pool", type=int, default=600, help="digits attacked; each model trains on half")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    add_figure_flags(parser, "audit_memorisation.png")
    args = parser.parse_args()
    figure = figure_path(args, "audit_memorisation.png")
    torch.set_num_threads(1)  # one model at a time is too small to gain from threads
    x, y = load_digits()
    pool = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(x))[: args.pool])
    x, y = x[pool], y[pool]
    training = {"epochs": args.epochs, "hidden": args.hidden, "batch_size": args.batch_size, "learning_rate": args.learning_rate}
    start = time.monotonic()
    groups, rows = {}, []
    for label, epsilon in EPSILONS.items():
        results, accuracy, noise = run(epsilon, x, y, models=args.models, seed=args.seed, **training)
        groups[label] = results
        rows.append((label, results, accuracy, noise))
        print(f"{label}: done after {time.monotonic() - start:.0f} s", flush=True)
    first = groups["no DP"][0]
    print(f"\n{args.models} models, each on {args.pool // 2} of {args.pool} digits: {first.members} member and {first.non_members} non-member scores pooled")
    print("| model | test accuracy | noise multiplier x sensitivity | attack | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | empirical epsilon lower bound |")
    print("|---|---|---|---|---|---|---|---|")
    for label, results, accuracy, noise in rows:
        for r in results:
            print(f"| {label} | {accuracy:.1%} | {noise} | {r.name} | {r.auc:.3f} | {r.tpr_at_1pct:.3f} | {r.tpr_at_01pct:.4f} | {r.epsilon_lower_bound:.2f} |")
    print(f"\nrun time {time.monotonic() - start:.0f} s")
    plot_roc(figure, groups, title="digits MLP: membership inference, pooled")
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
