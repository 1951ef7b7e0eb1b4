"""Breast cancer, four ways, on the same train/test rows: accuracy and wall time.

    python examples/federated_compare.py [--parties 2 3 5] [--epsilons 1 4 16] [--rounds 10] [--runs 5]

1. centralised plaintext PyTorch (``mpcfl baseline configs/breast_cancer_lr.yaml``);
2. full-MPC training, the data vertically split across two hospitals (``mpcfl run configs/breast_cancer_lr.yaml``);
3. federated training with secure aggregation: the shipped three-hospital job (``configs/breast_cancer_fed.yaml``);
4. federated training with client-level DP: the same train rows split evenly across 2, 3 or 5 hospitals,
   with the public scaling constants of ``configs/breast_cancer_dp.yaml``, at each epsilon (delta 1e-5),
   next to the same split without DP; ``--runs`` times each, with ``federated.seed`` 0, 1, ... (initial
   weights and local batch order; the DP noise is fresh every run): the table and the figure give the
   median and the range, since one noisy run per point can show accuracy falling as epsilon rises.

Every model is scored on the same 113 held-out patients (for federated jobs, the final model on all
hospitals' test rows together: this script reads every file, as a measurement tool). Writes a markdown
table and ``runs/examples/federated_utility.png`` (``--update-figure``: the tracked ``docs/figures/federated_utility.png``). Each federated job runs its parties and dealer
as processes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _figures import add_figure_flags, figure_path
from mpcfl.jobs.schema import load_job
from mpcfl.models.heads import head_of
from mpcfl.tasks.federated.local import Rows, evaluate, initial_model
from mpcfl.tasks.federated.simulate import prepared_parties
from mpcfl.tasks.train.baseline import train_plaintext

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FED_DATA = REPO / "examples" / "data" / "breast_cancer_fed"


def run(job: Path) -> float:
    """``mpcfl run JOB``; returns its wall time."""
    started = time.perf_counter()
    # Each setting is one alternative release, measured on its own: a privacy ledger of its own (beside
    # its outputs), where a real deployment's every run on this data would charge the owners' one ledger.
    env = {**os.environ, "MPCFL_LEDGER_DIR": str(job.parent / "ledgers")}
    done = subprocess.run([sys.executable, "-m", "mpcfl", "run", str(job)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"mpcfl run {job} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def federated_accuracy(job_path: Path) -> float:
    """The final federated model's accuracy on every party's test rows together."""
    job = load_job(job_path)
    parts = prepared_parties(job)
    head = head_of(job.model)
    rows = [Rows.of(part.test, head) for part in parts]
    model = initial_model(job, parts[0].train.x.shape[1])
    model.load_state_dict(torch.load(job.party_root(job.party_names[0]) / "latest" / "model.pt", weights_only=True))
    pooled = Rows(torch.cat([r.x for r in rows]), torch.cat([r.y for r in rows]))
    return evaluate(model, pooled, head)[1]


def split_job(folder: Path, parties: int, rounds: int, epsilon: float | None, seed: int = 0) -> Path:
    """The shipped federated job over ``parties`` even splits of the same rows, with public scaling (and DP)."""
    base = yaml.safe_load((CONFIGS / "breast_cancer_fed.yaml").read_text())
    header = (FED_DATA / "hospital_a_train.csv").read_text().splitlines()[0]
    pooled = {which: np.vstack([np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2)
                                for p in sorted(FED_DATA.glob(f"*_{which}.csv"))]) for which in ("train", "test")}
    specs = []
    for i in range(parties):
        files = {}
        for which, rows in pooled.items():
            path = folder / f"h{i}_{which}.csv"
            np.savetxt(path, np.array_split(rows, parties)[i], delimiter=",", header=header, comments="", fmt="%.10g")
            files[which] = str(path)
        specs.append({"name": f"hospital_{i}", "data": files})
    base.update(parties=specs, outputs={"dir": str(folder / "out")})
    base["federated"].update(rounds=rounds, seed=seed)
    base["data"] = yaml.safe_load((CONFIGS / "breast_cancer_dp.yaml").read_text())["data"]
    if epsilon is not None:
        base["dp"] = {"epsilon": epsilon, "delta": 1e-5, "clip": 1.0}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5, help="runs per federated setting (seeds 0, 1, ...)")
    add_figure_flags(parser, "federated_utility.png")
    args = parser.parse_args()
    figure = figure_path(args, "federated_utility.png")
    table = []
    started = time.perf_counter()
    plain = train_plaintext(load_job(CONFIGS / "breast_cancer_lr.yaml")).history[-1]["test_accuracy"]
    table.append(("centralised plaintext", "-", plain, time.perf_counter() - started))
    mpc = CONFIGS / "breast_cancer_lr.yaml"
    seconds = run(mpc)
    metrics = json.loads((load_job(mpc).party_root("hospital_b") / "latest" / "metrics.json").read_text())
    table.append(("full MPC (vertical, 2 hospitals)", "-", metrics["final"]["test_accuracy"], seconds))
    fed = CONFIGS / "breast_cancer_fed.yaml"
    seconds = run(fed)
    table.append(("federated, secure aggregation (3 hospitals)", "-", federated_accuracy(fed), seconds))
    utility: dict[int, list[tuple[float, list[float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="mpcfl-fed-compare-") as tmp:
        for parties in args.parties:
            for epsilon in [None, *args.epsilons]:
                accuracies, times = [], []
                for seed in range(args.runs):
                    folder = Path(tmp) / f"{parties}-{epsilon}-{seed}"
                    folder.mkdir()
                    job = split_job(folder, parties, args.rounds, epsilon, seed)
                    times.append(run(job))
                    accuracies.append(federated_accuracy(job))
                label = f"federated{'' if epsilon is None else ' + DP'} ({parties} hospitals)"
                table.append((label, "-" if epsilon is None else f"{epsilon:g}", accuracies, float(np.median(times))))
                if epsilon is not None:
                    utility.setdefault(parties, []).append((epsilon, accuracies))
    print(f"| training | epsilon | test accuracy: median [min, max] of {args.runs} runs (one run above) | median wall s |")
    print("|---|---:|---:|---:|")
    for label, epsilon, accuracy, seconds in table:
        values = np.atleast_1d(accuracy)
        spread = f" [{values.min():.3f}, {values.max():.3f}]" if len(values) > 1 else ""
        print(f"| {label} | {epsilon} | {np.median(values):.3f}{spread} | {seconds:.1f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.5))
    for parties, points in utility.items():
        epsilons = [epsilon for epsilon, _ in points]
        runs = np.array([accuracies for _, accuracies in points])
        line = axis.plot(epsilons, np.median(runs, axis=1), marker="o", label=f"{parties} hospitals (median)")[0]
        axis.fill_between(epsilons, runs.min(axis=1), runs.max(axis=1), color=line.get_color(), alpha=0.15)
    axis.axhline(plain, color="grey", linestyle="--", label="centralised plaintext")
    axis.set(xscale="log", xlabel="epsilon (client-level, delta 1e-5)", ylabel="test accuracy",
             title=f"federated LR + DP, {args.rounds} rounds, {args.runs} runs (band: range)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")


if __name__ == "__main__":
    main()
