"""Secure inference benchmark: mpcfl against raw CrypTen, same processes, same run.

    python benchmarks/inference.py [--repeats 5] [--batch 64] [--device cuda]

Runs with 2 parties (model owner, data owner) plus the TTP dealer on this
machine. For an MLP 784-128-128-10 and a LeNet-5 on a batch of 1x28x28 inputs,
each side does the whole job per batch: share the weights, share the inputs,
run the network, reveal the outputs to the data owner. Raw CrypTen imports the
model with ``crypten.nn.from_pytorch`` (through mpcfl's compat patches; it does
not import on current torch otherwise). Prints median seconds per batch, and
bytes and rounds summed over both parties, per batch. The two ways run batch by batch in turn
(measure_alternating), so a change of load on a shared machine falls on both alike.

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten
from mpcfl.launch.local import launch_script
from mpcfl.mpc.session import all_gather_public, communication_stats
from mpcfl.models.zoo import lenet5, mlp_784

PARTIES = ["model_owner", "data_owner"]
MODELS = {"mlp": ("MLP 784-128-128-10", mlp_784), "lenet5": ("LeNet-5", lenet5)}  # --models keys


def mpcfl_batch(model: torch.nn.Module, x: torch.Tensor | None) -> torch.Tensor | None:
    """The predictions on the data owner, None elsewhere."""
    return mpcfl.secure_predict(model, x, model_owner="model_owner", data_owner="data_owner", batch_size=x.shape[0] if x is not None else 64)


def raw_crypten_batch(
    model: torch.nn.Module, x: torch.Tensor | None, shape: tuple[int, ...], device: str, crypten=None
) -> torch.Tensor | None:
    """The predictions on rank 1 (the data owner), None elsewhere. ``crypten``: the module to
    use (default: mpcfl's patched import; benchmarks/suite.py passes CrypTen as shipped)."""
    crypten = crypten or import_crypten()
    secure = crypten.nn.from_pytorch(model, torch.zeros(1, *shape[1:])).encrypt(src=0)
    if device == "cuda":
        secure = secure.cuda()
    secure.eval()
    with crypten.no_grad():
        x_enc = crypten.cryptensor(x if x is not None else torch.zeros(*shape), src=1, device=device)
        return secure(x_enc).get_plain_text(dst=1)


def measure(run, repeats: int, stats=communication_stats, gather=all_gather_public) -> dict[str, float]:
    """Median seconds per batch, and bytes and rounds of both parties together (``per_party``: each
    party's). ``stats`` and ``gather`` default to mpcfl's; benchmarks/suite.py passes CrypTen's own."""
    return measure_alternating({"run": run}, repeats, stats, gather)["run"]


def measure_alternating(runs: dict, repeats: int, stats=communication_stats, gather=all_gather_public,
                        around: dict | None = None, warm_up: bool = True) -> dict[str, dict]:
    """:func:`measure` for several ways in the same processes, one batch of each in turn (the order
    rotating each repeat), so that a change of load on a shared machine falls on every way alike.
    ``around`` maps a way to a context-manager factory entered around each of its timed batches
    (not the warm-up): benchmarks/suite.py's profiler. ``warm_up=False`` times the first calls too
    (benchmarks/transformer_shapes.py on models too slow to run twice). Each way's ``first_seconds``
    is its first call's time (the warm-up's, or the first timed call's): what a served way pays once."""
    first: dict[str, float] = {}
    for name, run in runs.items() if warm_up else ():
        started = time.perf_counter()
        run()  # warm-up: first calls pay for imports and allocator growth
        first[name] = time.perf_counter() - started
    samples: dict[str, list] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            before = stats()
            with (around or {}).get(name, contextlib.nullcontext)():
                started = time.perf_counter()
                runs[name]()
                seconds = time.perf_counter() - started
            after = stats()
            samples[name].append((seconds, gather([after["bytes"] - before["bytes"], after["rounds"] - before["rounds"]])))
    return {name: {**_summary(taken), "first_seconds": first.get(name, taken[0][0])} for name, taken in samples.items()}


def _summary(samples: list) -> dict[str, float]:
    """Medians over (seconds, [[bytes, rounds] per party]) samples."""
    per_party = [both for _, both in samples]
    return {
        "seconds": statistics.median(s for s, _ in samples),
        "bytes": statistics.median(sum(b for b, _ in both) for both in per_party),
        "rounds": statistics.median(sum(r for _, r in both) for both in per_party),
        "per_party": [
            {"bytes": statistics.median(p[r][0] for p in per_party), "rounds": statistics.median(p[r][1] for p in per_party)}
            for r in range(len(per_party[0]))
        ],
    }


def party(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    shape = (args.batch, 1, 28, 28)
    with mpcfl.join() as me:
        rows = []
        for key in args.models:
            name, make = MODELS[key]
            model = make().eval()
            x = torch.rand(*shape) if me.name == "data_owner" else None
            both = measure_alternating({"mpcfl": lambda: mpcfl_batch(model, x),
                                        "raw": lambda: raw_crypten_batch(model, x, shape, me.session.device)}, args.repeats)
            rows.append((name, both["mpcfl"], both["raw"]))
    if me.name != "data_owner":
        return
    print(f"\nsecure inference on {me.session.device}, batch of {args.batch} x 1x28x28, 2 parties + TTP dealer, "
          f"{torch.get_num_threads()} thread(s) per party, median of {args.repeats}")
    print("| model | mpcfl s/batch | raw CrypTen s/batch | ratio | mpcfl MB | raw MB | mpcfl rounds | raw rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ours, raw in rows:
        print(f"| {name} | {ours['seconds']:.3f} | {raw['seconds']:.3f} | {ours['seconds'] / raw['seconds']:.2f} | "
              f"{ours['bytes'] / 1e6:.2f} | {raw['bytes'] / 1e6:.2f} | {ours['rounds']:.0f} | {raw['rounds']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="which models to run (default: all)")
    args = parser.parse_args()
    if os.environ.get("MPCFL_PARTY"):
        party(args)
        return 0
    return launch_script([os.path.abspath(__file__), *sys.argv[1:]], parties=PARTIES, timeout_s=300, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
