"""Federated rounds with 2, 5 and 10 parties: seconds and bytes per party per round.

    python benchmarks/federated.py [--parties 2 5 10] [--rounds 4] [--hidden 0] [--json PATH] [--figure PNG]

For each party count, the breast-cancer rows are split evenly across that many parties on this
machine (one process each, plus the TTP dealer) and ``mpcfl run`` trains a federated job (FedAvg,
one local epoch per round; logistic regression, or an MLP with ``--hidden``). Each party records,
per round, the wall time (local training, the exchange of flags, the secure average, the reveal)
and the bytes it sent. Printed: the medians over rounds after the first (which records the dealer's
batch) and over parties, as a markdown table; drawn: ``docs/figures/federated_scale.png``.

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
WDBC = REPO / "examples" / "data" / "wdbc.csv"


def write_job(folder: Path, parties: int, rounds: int, hidden: int) -> Path:
    """A federated job over ``parties`` even row splits of the breast-cancer data."""
    header = WDBC.read_text().splitlines()[0]
    values = np.loadtxt(WDBC, delimiter=",", skiprows=1)
    specs = []
    for i, rows in enumerate(np.array_split(values, parties)):
        path = folder / f"p{i}_train.csv"
        np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%.10g")
        specs.append({"name": f"p{i}", "data": {"train": str(path)}})
    model = {"type": "mlp", "hidden": [hidden]} if hidden else {"type": "logistic_regression"}
    job = {
        "name": f"fed-bench-{parties}", "task": "federated", "parties": specs, "labels": {"column": "malignant"},
        "model": model, "federated": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.1},
        "outputs": {"dir": str(folder / "out")}, "runtime": {"timeout_s": 120},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def measure(parties: int, rounds: int, hidden: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mpcfl-fed-bench-") as tmp:
        job = write_job(Path(tmp), parties, rounds, hidden)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mpcfl", "run", str(job)], capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{parties} parties: mpcfl run failed:\n{done.stderr[-3000:]}")
        seconds, sent = [], []
        for i in range(parties):
            history = json.loads((Path(tmp) / "out" / f"p{i}" / "latest" / "metrics.json").read_text())["history"]
            later = history[1:] or history
            seconds.append(statistics.median(row["seconds"] for row in later))
            sent.append(statistics.median(row["bytes_sent"] for row in later))
        return {
            "parties": parties, "seconds_per_round": statistics.median(seconds),
            "bytes_per_party_per_round": statistics.median(sent), "max_bytes_per_party_per_round": max(sent),
            "job_wall_s": wall,
        }


def plot(results: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parties = [r["parties"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(parties, [r["seconds_per_round"] for r in results], marker="o")
    left.set(xlabel="parties", ylabel="seconds per round (median)", title="round time")
    right.plot(parties, [r["bytes_per_party_per_round"] / 1e3 for r in results], marker="o", label="median party")
    right.plot(parties, [r["max_bytes_per_party_per_round"] / 1e3 for r in results], marker="x", label="busiest party")
    right.set(xlabel="parties", ylabel="kB sent per party per round", title="traffic")
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=0, help="an MLP with one hidden layer of this width (0: LR)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "federated_scale.png")
    args = parser.parse_args()
    results = [measure(n, args.rounds, args.hidden) for n in args.parties]
    print("| parties | s per round | kB sent per party per round (median / busiest) | job wall s |")
    print("|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['parties']} | {r['seconds_per_round']:.2f} | {r['bytes_per_party_per_round'] / 1e3:.1f} / "
              f"{r['max_bytes_per_party_per_round'] / 1e3:.1f} | {r['job_wall_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "hidden": args.hidden, "results": results}, indent=2))
    plot(results, args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
