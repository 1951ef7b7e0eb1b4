"""The sigmoids of ``training.sigmoid`` under MPC: rounds, bytes, seconds and error on N logits.

    python benchmarks/sigmoid.py [--values 4096] [--repeats 5] [--provider ttp] [--no-prefetch]

Two party processes plus the dealer (mpcfl's launcher) share N logits drawn uniformly
from [-20, 20] (a fixed seed) and compute each sigmoid of :mod:`mpcfl.models.sigmoid`
on them, as training's gradient does (under TTP with the step's triples prefetched,
as a training step fetches them; --no-prefetch: one dealer round trip per request),
--repeats times in turn (round robin, so a busy spell hits each alike).
Prints per sigmoid: the median seconds, the rounds and bytes party 0 counted
(CrypTen's counters: party-to-party traffic and the dealer's broadcasts), the largest
error against the exact sigmoid, and against the same approximation in plain float64
(the fixed-point part of the error).

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import mpcfl
from mpcfl.launch.local import launch_script
from mpcfl.models.sigmoid import NAMES, SIGMOIDS
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import Disclosure, reveal
from mpcfl.mpc.session import communication_stats, prefetching

PARTIES = ["p0", "p1"]


def party(args: argparse.Namespace) -> None:
    crypten = import_crypten()
    logits = torch.empty(args.values, 1, dtype=torch.float64).uniform_(-20, 20, generator=torch.Generator().manual_seed(0))
    with mpcfl.join() as me, Disclosure(None):
        z = crypten.cryptensor(logits.float(), src=0)
        seconds: dict[str, list[float]] = {name: [] for name in NAMES}
        counts: dict[str, dict[str, int]] = {}
        for _ in range(args.repeats):  # round robin, so a busy spell of the machine hits every sigmoid alike
            for name in NAMES:
                before = communication_stats()
                started = time.perf_counter()
                with prefetching(("sigmoid", name), enabled=args.prefetch):
                    SIGMOIDS[name].secure(z)
                seconds[name].append(time.perf_counter() - started)
                after = communication_stats()
                counts[name] = {key: after[key] - before[key] for key in ("rounds", "bytes")}
        rows = []
        for name in NAMES:
            opened = reveal(SIGMOIDS[name].secure(z), to=[0], what=f"{name} sigmoid of the benchmark's public logits")
            if me.rank == 0:
                opened = opened.double()
                rows.append((name, statistics.median(seconds[name]), counts[name]["rounds"], counts[name]["bytes"],
                             float((opened - torch.sigmoid(logits)).abs().max()),
                             float((opened - SIGMOIDS[name].plain(logits)).abs().max())))
        if me.rank == 0:
            print(f"{args.values} logits in [-20, 20], {args.provider}, prefetch {'on' if args.prefetch else 'off'}; "
                  "rounds and bytes: party 0, last repeat")
            print("| sigmoid | s (median) | rounds | MB | max error vs exact | max error vs plain float64 |")
            print("|---|---|---|---|---|---|")
            for name, s, r, b, err, fixed in rows:
                print(f"| {name} | {s:.4f} | {r} | {b / 1e6:.2f} | {err:.4f} | {fixed:.2g} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--provider", choices=["ttp", "tfp"], default="ttp")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    args = parser.parse_args()
    if os.environ.get("MPCFL_PARTY"):
        party(args)
        return 0
    return launch_script([os.path.abspath(__file__), *sys.argv[1:]], parties=PARTIES, timeout_s=120,
                         provider=args.provider)


if __name__ == "__main__":
    sys.exit(main())
