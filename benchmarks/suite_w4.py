"""W4 of benchmarks/suite.py: the breast-cancer demo end to end against `mpcfl baseline` (see
suite.py's docstring). Not a package (see suite.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run_w4(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import yaml

    config = REPO / "configs" / "breast_cancer_lr.yaml"
    job = yaml.safe_load(config.read_text())
    for party in job["parties"]:
        party["data"] = {k: str((config.parent / v).resolve()) for k, v in party["data"].items()}
    job["outputs"]["dir"] = str(work / "w4-runs")
    job.setdefault("runtime", {})["device"] = args.device
    job["training"]["sigmoid"] = args.sigmoid  # `mpcfl baseline` keeps the exact one
    path = work / "w4.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mpcfl", "run", str(path)], capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"w4: mpcfl run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    label_party = job["labels"]["party"]
    metrics = json.loads((work / "w4-runs" / label_party / "latest" / "metrics.json").read_text())
    base = subprocess.run([sys.executable, "-m", "mpcfl", "baseline", str(path)], capture_output=True, text=True, timeout=300)
    last = dict(item.split("=", 1) for item in base.stdout.strip().splitlines()[-1].split())
    history = metrics["history"]
    return {
        "sigmoid": args.sigmoid,
        "wall_s": wall,
        "seconds_per_epoch": statistics.median(h["seconds"] for h in history),
        "epochs": len(history),
        "test_accuracy": history[-1]["test_accuracy"],
        "baseline_test_accuracy": float(last["test_accuracy"]),
        "per_party_bytes_per_epoch": [statistics.median(h["bytes"] for h in json.loads(
            (work / "w4-runs" / p["name"] / "latest" / "metrics.json").read_text())["history"]) for p in job["parties"]],
    }
