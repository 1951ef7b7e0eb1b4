"""Test accuracy against epsilon for DP-SGD under MPC on the breast-cancer demo.

    python examples/dp_utility.py [--runs 3]

Runs configs/breast_cancer_dp.yaml (2 hospitals + the TTP dealer, logistic
regression) at epsilon = inf (no DP), 8, 3 and 1 with delta = 1e-5, several times
each since the noise is random, and scores the model hospital B receives on the
held-out patients (reading every party's test file: a measurement, not part of a
secure run). Prints a Markdown table and writes runs/dp_utility/accuracy.png.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
from pathlib import Path

import torch
import yaml

from mpcfl.tasks.train.baseline import evaluate_state_dict
from mpcfl.jobs.schema import load_job
from mpcfl.dp.ledger import ENV_DIR
from mpcfl.launch.local import run_local
from mpcfl.outputs import atomic_write

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "configs" / "breast_cancer_dp.yaml"
OUT = REPO / "runs" / "dp_utility"
EPSILONS = [math.inf, 8.0, 3.0, 1.0]


def job_file(epsilon: float, run: int) -> Path:
    spec = yaml.safe_load(JOB.read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((JOB.parent / v).resolve()) for k, v in party["data"].items()}
    spec["outputs"]["dir"] = str(OUT / f"eps_{epsilon}_run_{run}")
    if math.isinf(epsilon):
        del spec["dp"]
    else:
        spec["dp"]["epsilon"] = epsilon
    path = OUT / f"eps_{epsilon}_run_{run}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for epsilon in EPSILONS:
        accuracies, multiplier = [], None
        for run in range(args.runs):
            job = load_job(job_file(epsilon, run))
            # Each run is one alternative release, measured on its own: it gets a privacy ledger of its
            # own, where a real deployment's every run on this data would charge the owners' one ledger.
            os.environ[ENV_DIR] = str(OUT / "ledgers" / f"eps_{epsilon}_run_{run}")
            if run_local(job, sink=io.StringIO()) != 0:
                raise SystemExit(f"the run at epsilon {epsilon} failed; rerun `mpcfl run {job.source}` to see why")
            receiver = job.party_root("hospital_b") / "latest"
            state = torch.load(receiver / "model.pt", weights_only=True)
            accuracies.append(evaluate_state_dict(job, state)["test_accuracy"])
            if job.dp is not None:
                multiplier = json.loads((receiver / "privacy.json").read_text())["notes"]["dp_sgd"]["noise_multiplier"]
        rows.append((epsilon, accuracies, multiplier))
    print("| epsilon | test accuracy, median | min - max | noise multiplier |")
    print("|---|---|---|---|")
    for epsilon, accuracies, multiplier in rows:
        label = "inf (no DP)" if math.isinf(epsilon) else f"{epsilon:g}"
        noise = "-" if multiplier is None else f"{multiplier:.2f}"
        print(f"| {label} | {statistics.median(accuracies):.2%} | {min(accuracies):.2%} - {max(accuracies):.2%} | {noise} |")
    _plot(rows)


def _plot(rows: list[tuple[float, list[float], float | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ["inf" if math.isinf(e) else f"{e:g}" for e, _, _ in rows]
    ax.boxplot([a for _, a, _ in rows], tick_labels=labels)
    ax.set(xlabel="epsilon (delta = 1e-5)", ylabel="test accuracy", title="DP-SGD under MPC, breast cancer, LR")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(OUT / "accuracy.png", lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(fig)


if __name__ == "__main__":
    main()
