"""W2/W3 of benchmarks/suite.py: MLP and LeNet-5 inference (see suite.py's docstring) with
benchmarks/inference.py's code, raw CrypTen's and mpcfl's. Not a package (see suite.py).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import inference  # benchmarks/inference.py (on sys.path: suite.py's folder)
from suite_common import Profiler, comm_stats, gather, launch_mpcfl, launch_stock, maxrss_mb, network_model

INFER_MODELS = {"w2": "mlp", "w3": "lenet5"}


# ---------------------------------------------------------------- in the party processes

def inference_cases(batch: int) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """The models and inputs, identical in every process (seeded)."""
    torch.manual_seed(0)
    cases = {}
    for key, (_, make) in inference.MODELS.items():
        model = make().eval()
        cases[key] = (model, torch.rand(batch, 1, 28, 28))
    return cases


def infer(crypten: Any, rank: int, args: argparse.Namespace, ways: list[str]) -> dict[str, Any]:
    """W2/W3 with inference.py's code; rank 0 owns the model, rank 1 the data. Several ways (raw+patches
    and mpcfl, which share mpcfl's processes) run batch by batch in turn."""
    cases = inference_cases(args.batch)
    out: dict[str, Any] = {"maxrss_before_mb": maxrss_mb()}
    for key in args.models:
        model, x_all = cases[key]
        x = x_all if rank == 1 else None
        runs = {
            way: (lambda: inference.mpcfl_batch(model, x)) if way == "mpcfl"
            else (lambda: inference.raw_crypten_batch(model, x, tuple(x_all.shape), args.device, crypten))
            for way in ways
        }
        with contextlib.ExitStack() as stack:
            profilers = {way: stack.enter_context(Profiler(crypten)) for way in runs} if args.profile else {}
            figures = inference.measure_alternating(runs, args.repeats, stats=lambda: comm_stats(crypten),
                                                    gather=lambda v: gather(crypten, v),
                                                    around={way: p.measuring for way, p in profilers.items()})
        for way, p in profilers.items():
            figures[way]["profile"] = p.breakdown(p.measured_s, p.measured_comm_s, p.measured)
        for way, run in runs.items():
            predictions = run()
            if predictions is not None:
                with torch.no_grad():
                    figures[way]["max_error"] = float((predictions.cpu().float() - model(x_all)).abs().max())
        out[key] = figures
    out["maxrss_mb"] = maxrss_mb()
    return out


# ---------------------------------------------------------------- orchestration

def run_inference(args: argparse.Namespace, work: Path, keys: list[str]) -> dict[str, Any]:
    args.models = [INFER_MODELS[k] for k in keys]
    cases = inference_cases(args.batch)
    plain = {}
    for key in args.models:
        model, x = cases[key]
        with torch.no_grad():
            model(x)  # warm-up, as measure() does for the secure ways
            seconds = []
            for _ in range(max(args.repeats, 3)):
                started = time.perf_counter()
                model(x)
                seconds.append(time.perf_counter() - started)
        plain[key] = statistics.median(seconds)
    result: dict[str, Any] = {}
    for provider in args.providers:
        launches = {
            "raw": launch_stock(args, work, "infer-raw", provider, 2),
            "patched": launch_mpcfl(args, work, "infer-patched", provider, inference.PARTIES),
        }
        ways = {"raw": launches["raw"], "raw+patches": launches["patched"], "mpcfl": launches["patched"]}
        for w, key in zip(keys, args.models):
            entry = result.setdefault(w, {"model": inference.MODELS[key][0], "plaintext": {"seconds": plain[key]}})
            rows = {}
            for way, ranks in ways.items():
                figures = ranks[1][key][way]
                rows[way] = {
                    "seconds": figures["seconds"],
                    "per_party": [{"bytes": figures["per_party"][r]["bytes"], "rounds": figures["per_party"][r]["rounds"],
                                   "maxrss_before_mb": ranks[r]["maxrss_before_mb"], "maxrss_mb": ranks[r]["maxrss_mb"]}
                                  for r in range(2)],
                    "max_error": figures.get("max_error"),
                    **({"profile": [ranks[r][key][way]["profile"] for r in range(2)]} if "profile" in figures else {}),
                    "network": network_model(figures["seconds"], max(p["rounds"] for p in figures["per_party"]),
                                             max(p["bytes"] for p in figures["per_party"])),
                }
            rows["ratios"] = {"mpcfl/raw": rows["mpcfl"]["seconds"] / rows["raw"]["seconds"],
                              "mpcfl/raw+patches": rows["mpcfl"]["seconds"] / rows["raw+patches"]["seconds"],
                              "mpcfl/plaintext": rows["mpcfl"]["seconds"] / plain[key]}
            entry[provider] = rows
    return result
