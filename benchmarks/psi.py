"""Private set intersection benchmark: seconds and bytes to line up two parties' IDs.

    python benchmarks/psi.py [--sizes 10000 100000 1000000] [--overlap 0.8] [--json out.json]

Two party processes (plus the idle dealer) on this machine run mpcfl's PSI
(:mod:`mpcfl.data.psi`: OpenMined's ECDH-PSI, chained through the label holder,
then spread back) on N IDs each, of which ``overlap`` x N are common; the IDs
look like patient numbers. Prints, per size, the wall time of the protocol
and the bytes each party sent, as a markdown table (and JSON with ``--json``).

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import mpcfl
from mpcfl.data.psi import intersect, salted
from mpcfl.launch.local import launch_script
from mpcfl.mpc.session import all_gather_public

PARTIES = ["hospital_a", "hospital_b"]  # hospital_b plays the label holder (the hub)
SALT = b"benchmark salt"


def ids_of(rank: int, n: int, overlap: float) -> list[str]:
    """N patient numbers: the first overlap x N common to both parties, the rest this party's own."""
    common = round(overlap * n)
    own = range(common + rank * (n - common), common + (rank + 1) * (n - common))
    return [f"MRN-{i:09d}" for i in (*range(common), *own)]


def party(args: argparse.Namespace) -> None:
    with mpcfl.join() as me:
        results = []
        for n in args.sizes:
            items = salted(ids_of(me.rank, n, args.overlap), SALT)
            all_gather_public([0])  # start together
            started = time.perf_counter()
            rows, cost = intersect(items, names=PARTIES, hub=1, rank=me.rank, split=f"{n} IDs", max_ids=n)
            seconds = time.perf_counter() - started
            assert len(rows) == round(args.overlap * n), (len(rows), n)
            sent = all_gather_public([cost.bytes_sent])
            slowest = all_gather_public([round(seconds * 1000)])
            results.append({
                "ids_per_party": n, "common": len(rows), "seconds": max(s for (s,) in slowest) / 1000,
                "bytes_sent": {name: b for name, (b,) in zip(PARTIES, sent)},
            })
        if me.rank == 0:
            print("| IDs per party | common | seconds | MB sent by hospital_a | MB sent by hospital_b |")
            print("|---|---|---|---|---|")
            for r in results:
                a, b = (r["bytes_sent"][p] / 1e6 for p in PARTIES)
                print(f"| {r['ids_per_party']:,} | {r['common']:,} | {r['seconds']:.1f} | {a:.1f} | {b:.1f} |")
            if args.json:
                with open(args.json, "w", encoding="utf-8") as handle:
                    json.dump(results, handle, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--overlap", type=float, default=0.8)
    parser.add_argument("--json", help="also write the figures here (party 0 writes it)")
    args = parser.parse_args()
    if os.environ.get("MPCFL_PARTY"):
        party(args)
        return 0
    script = [os.path.abspath(__file__), *sys.argv[1:]]
    if args.json:
        script += ["--json", os.path.abspath(args.json)]
    return launch_script(script, parties=PARTIES, timeout_s=120)


if __name__ == "__main__":
    sys.exit(main())
