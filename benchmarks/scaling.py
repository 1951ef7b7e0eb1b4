"""W1 scaling curves: rows, features and parties, raw CrypTen against mpcfl under the TTP dealer.

    python benchmarks/scaling.py [--out DIR] [--quick] [--repeats 3] [--point-timeout 900]
                                 [--rows 4096 8192 ...] [--features 32 64 ...] [--parties 2 3 ...]
                                 [--sigmoid crypten|piecewise|poly] [--device cpu|cuda]

Each axis is swept on its own from the base point (the first value of the other two axes):
rows 4,096 -> 65,536 (32 features, 2 parties), features 32 -> 512 (4,096 rows, 2 parties),
parties 2 -> 5 (4,096 rows, 32 features; the columns are cut into one contiguous block per
party, the last holds the labels). Each point is one run of ``benchmarks/suite.py --workloads
w1 --providers ttp --ways raw mpcfl`` in its own process group, killed after --point-timeout
seconds, so one slow or failing point is recorded as such and the sweep goes on.

Writes into --out (default ``scaling-<UTC time>``): scaling.json (every point's suite figures,
or its error), scaling.md (a table: seconds per iteration, MB and rounds per iteration per
party, peak RSS per party, accuracy, mpcfl/raw) and one PNG per axis (seconds per iteration,
the busiest party's MB per iteration, the largest peak RSS; raw and mpcfl). --quick sweeps
small sizes with one repeat, for a check in a few minutes on a laptop.

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import suite  # noqa: E402  benchmarks/suite.py: every point is one of its W1 runs

WAYS = ("raw", "mpcfl")
FULL = {"rows": [4096, 8192, 16384, 32768, 65536], "features": [32, 64, 128, 256, 512], "parties": [2, 3, 4, 5]}
QUICK = {"rows": [1024, 2048, 4096], "features": [32, 64, 128], "parties": [2, 3]}
AXES = tuple(FULL)


def plan(sweep: dict[str, list[int]]) -> list[dict[str, int]]:
    """The points: each axis varied alone from the base (every axis's first value), the base once."""
    base = {axis: values[0] for axis, values in sweep.items()}
    points = [dict(base)]
    for axis, values in sweep.items():
        points += [{**base, axis: value} for value in values[1:]]
    return points


def run_point(point: dict[str, int], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One suite.py W1 run at ``point``; its W1 figures, or {"error": ...} on failure or timeout."""
    out = work / ("w1-" + "-".join(f"{axis}{point[axis]}" for axis in AXES) + ".json")
    command = [sys.executable, str(HERE / "suite.py"), "--workloads", "w1", "--providers", "ttp",
               "--ways", *WAYS, "--repeats", str(args.repeats), "--sigmoid", args.sigmoid, "--device", args.device,
               "--json", str(out), *(arg for axis in AXES for arg in (f"--{axis}", str(point[axis])))]
    started = time.monotonic()
    # A process group of its own: on a timeout the suite's party and dealer processes go with it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        output, _ = process.communicate(timeout=args.point_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"error": f"timed out after {args.point_timeout:g} s"}
    if process.returncode != 0 or not out.is_file():
        return {"error": f"exit {process.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}"}
    w1 = json.loads(out.read_text())["w1"]
    return {"wall_s": time.monotonic() - started, "plaintext": w1["plaintext"], **w1["ttp"]}


def _busiest(row: dict[str, Any], key: str) -> float:
    return max(party[key] for party in row["per_party"])


def table(points: list[dict[str, Any]]) -> str:
    """The markdown table of every point and way."""
    lines = ["| rows | features | parties | way | s/iter | MB/iter per party | rounds/iter per party | "
             "peak RSS MB per party | accuracy (plaintext) | mpcfl/raw |", "|---|---|---|---|---|---|---|---|---|---|"]
    for point in points:
        head = f"| {point['rows']} | {point['features']} | {point['parties']} |"
        result = point["result"]
        if "error" in result:
            lines.append(f"{head} - | failed: {result['error']} | | | | | |")
            continue
        for way in WAYS:
            row = result[way]
            ratio = f"{result['ratios']['mpcfl/raw']:.2f}" if way == "mpcfl" else "-"
            lines.append(
                f"{head} {way} | {row['seconds']:.4g} | "
                + " / ".join(f"{p['bytes_per_iter'] / 1e6:.2f}" for p in row["per_party"]) + " | "
                + " / ".join(f"{p['rounds_per_iter']:.0f}" for p in row["per_party"]) + " | "
                + " / ".join(f"{p['maxrss_mb']:.0f}" for p in row["per_party"])
                + f" | {row['accuracy']:.2%} ({result['plaintext']['accuracy']:.2%}) | {ratio} |"
            )
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], sweep: dict[str, list[int]], folder: Path) -> list[Path]:
    """One PNG per axis: seconds per iteration, busiest party's MB per iteration, largest peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {axis: values[0] for axis, values in sweep.items()}
    panels = (("s / iteration", lambda row: row["seconds"]),
              ("MB / iteration (busiest party)", lambda row: _busiest(row, "bytes_per_iter") / 1e6),
              ("peak RSS MB (largest party)", lambda row: _busiest(row, "maxrss_mb")))
    written = []
    for axis in AXES:
        on_axis = [p for p in points if all(p[a] == base[a] for a in AXES if a != axis) and "error" not in p["result"]]
        on_axis.sort(key=lambda p: p[axis])
        figure, plots = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
        for ax, (label, value) in zip(plots, panels):
            for way in WAYS:
                ax.plot([p[axis] for p in on_axis], [value(p["result"][way]) for p in on_axis], marker="o", label=way)
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            if axis != "parties":
                ax.set_xscale("log", base=2)
            ax.set_xticks([p[axis] for p in on_axis], [str(p[axis]) for p in on_axis])
            ax.grid(alpha=0.3)
        plots[0].legend()
        others = ", ".join(f"{a} {base[a]}" for a in AXES if a != axis)
        figure.suptitle(f"W1 under TTP: scaling with {axis} ({others})")
        figure.tight_layout()
        path = folder / f"scaling-{axis}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default scaling-<UTC time> here)")
    parser.add_argument("--quick", action="store_true", help=f"small sizes, one repeat: {QUICK}")
    parser.add_argument("--repeats", type=int, help="trainings per way and point (default 3; --quick 1)")
    parser.add_argument("--point-timeout", type=float, default=900.0, help="seconds one point may take")
    for axis in AXES:
        parser.add_argument(f"--{axis}", type=int, nargs="+", help=f"the {axis} axis (first value: the base point); "
                            f"default {FULL[axis]}")
    parser.add_argument("--sigmoid", choices=suite.SIGMOID_NAMES, default=suite.SIGMOID_DEFAULT,
                        help="mpcfl's training.sigmoid")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.sweep = {axis: getattr(args, axis) or defaults[axis] for axis in AXES}
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    for axis, values in args.sweep.items():
        if min(values) < (2 if axis == "parties" else 1):
            parser.error(f"--{axis}: {min(values)} is too small")
    if min(args.sweep["features"]) < max(args.sweep["parties"]):
        parser.error("--features: every point needs at least one column per party")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    folder = args.out or Path(f"scaling-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": suite.machine(args.device), "repeats": args.repeats, "sweep": args.sweep,
                               "sigmoid": args.sigmoid, "points": []}
    with tempfile.TemporaryDirectory(dir=folder, prefix="points-") as work:
        for point in plan(args.sweep):
            print(f"scaling: {point} ...", flush=True)
            point["result"] = run_point(point, args, Path(work))
            results["points"].append(point)
            if "error" in point["result"]:
                print(f"scaling: {point['result']['error']}", flush=True)
            (folder / "scaling.json").write_text(json.dumps(results, indent=1))  # after each point
    m = results["machine"]
    header = (f"W1 scaling under TTP, {args.repeats} repeat(s), mpcfl sigmoid {args.sigmoid}; {m['cpu']}, {m['cores']} cores, "
              f"torch {m['torch']}, crypten {m['crypten']}, device {m['device']}")
    (folder / "scaling.md").write_text(header + "\n\n" + table(results["points"]) + "\n")
    pictures = plot(results["points"], args.sweep, folder)
    print(table(results["points"]))
    print(f"scaling: wrote {folder / 'scaling.json'}, {folder / 'scaling.md'} and "
          + ", ".join(str(p) for p in pictures))
    failed = sum("error" in p["result"] for p in results["points"])
    return 1 if failed == len(results["points"]) else 0


if __name__ == "__main__":
    sys.exit(main())
