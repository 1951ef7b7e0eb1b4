"""W1 of benchmarks/suite.py: secure logistic-regression training (see suite.py's docstring), in
plaintext, as raw CrypTen's script and through mpcfl's training path. Not a package (see suite.py).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from suite_common import Profiler, comm_stats, launch_mpcfl, launch_stock, maxrss_mb, network_model

ITERATIONS = 10
LEARNING_RATE = 1.0
NO_PREFETCH = "mpcfl (no prefetch)"


# ---------------------------------------------------------------- in the party processes

def w1_data(rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((rows, features)).astype(np.float32)
    w_true = np.random.default_rng(1).standard_normal(features).astype(np.float32)
    return x, (x @ w_true > 0).astype(np.float32)


def column_blocks(features: int, parties: int) -> list[np.ndarray]:
    return np.array_split(np.arange(features), parties)


def initial_weights(features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mpcfl's initial weights for logistic regression (build_torch_model with seed 0)."""
    from mpcfl.jobs.schema import ModelSpec
    from mpcfl.models.build import build_torch_model

    layer = build_torch_model(ModelSpec(type="logistic_regression"), n_features=features, seed=0)[0]
    return layer.weight.detach().reshape(-1).clone(), layer.bias.detach().clone()


def raw_w1(crypten: Any, rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """The raw CrypTen training script; every party runs it (stock or patched crypten)."""
    x_all, y_all = w1_data(args.rows, args.features)
    n = args.rows
    device = args.device
    blocks = column_blocks(args.features, world)
    parts = []
    for r, cols in enumerate(blocks):
        mine = torch.from_numpy(x_all[:, cols]) if r == rank else torch.zeros(n, len(cols))
        parts.append(crypten.cryptensor(mine, src=r, device=device))
    x = crypten.cat(parts, dim=1)
    labels = torch.from_numpy(y_all).unsqueeze(1) if rank == world - 1 else torch.zeros(n, 1)
    y = crypten.cryptensor(labels, src=world - 1, device=device)
    w0, b0 = initial_weights(args.features)
    seconds: list[float] = []
    comm_total = {"bytes": 0, "rounds": 0, "comm_time_s": 0.0}
    weights = None
    rss_before = maxrss_mb()
    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(Profiler(crypten)) if args.profile else None
        for _ in range(args.repeats):
            w = crypten.cryptensor(w0.reshape(-1, 1), src=0, device=device)
            b = crypten.cryptensor(b0, src=0, device=device)
            for _ in range(ITERATIONS):
                before = comm_stats(crypten)
                if prof:
                    prof.active = True
                started = time.perf_counter()
                z = x.matmul(w) + b
                err = (z.sigmoid() - y).div(n)
                w = w - x.t().matmul(err).mul(LEARNING_RATE)
                b = b - err.sum(dim=0).mul(LEARNING_RATE)
                seconds.append(time.perf_counter() - started)
                if prof:
                    prof.active = False
                after = comm_stats(crypten)
                for key in comm_total:
                    comm_total[key] += after[key] - before[key]
            weights = torch.cat([w.get_plain_text().reshape(-1), b.get_plain_text().reshape(-1)]).tolist()
    iterations = args.repeats * ITERATIONS
    out = {
        "seconds": seconds,
        "bytes_per_iter": comm_total["bytes"] / iterations,
        "rounds_per_iter": comm_total["rounds"] / iterations,
        "maxrss_before_mb": rss_before,
        "maxrss_mb": maxrss_mb(),
        "weights": weights,
    }
    if prof:
        out["profile"] = prof.breakdown(sum(seconds), comm_total["comm_time_s"], iterations)
    return out


def mpcfl_w1(me: Any, args: argparse.Namespace) -> dict[str, Any]:
    """mpcfl's training path on the generated job, as run_party calls it."""
    import mpcfl
    from mpcfl.data.party import load_party_data
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.reveal import Disclosure
    from mpcfl.mpc.session import session_device
    from mpcfl.tasks.train.dataset import share_dataset
    from mpcfl.tasks.train.dp_sgd import training_step
    from mpcfl.tasks.train.loop import train

    crypten = import_crypten()
    from mpcfl.mpc import truncation

    job = mpcfl.load_job(args.job).bound_to("w1")  # train() checkpoints into a run's folder: this one's
    truncation.set_mode(job.runtime.truncation)  # as a job's session sets it (this is a script session)
    seconds, sent, rounds, comm_s = [], [], [], 0.0
    weights = None
    with Disclosure(None):
        data = load_party_data(job, me.name)
        device = session_device()
        shared = share_dataset(job, data, rank=me.rank, device=device)
        engine = training_step(job, shared.n_features, shared.x_train.size(0))
        rss_before = maxrss_mb()
        with contextlib.ExitStack() as stack:
            prof = stack.enter_context(Profiler(crypten)) if args.profile else None
            for _ in range(args.repeats):
                if prof:
                    prof.active = True
                comm0 = comm_stats(crypten)["comm_time_s"]
                result = train(job, shared, engine=engine, rank=me.rank, party=me.name, device=device)
                comm_s += comm_stats(crypten)["comm_time_s"] - comm0
                if prof:
                    prof.active = False
                seconds += [h["seconds"] for h in result.history]
                sent += [h["bytes"] for h in result.history]
                rounds += [h["rounds"] for h in result.history]
                if result.state_dict is not None:
                    weights = torch.cat([result.state_dict["0.weight"].reshape(-1), result.state_dict["0.bias"]]).tolist()
    out = {
        "seconds": seconds,
        "bytes_per_iter": statistics.median(sent),
        "rounds_per_iter": statistics.median(rounds),
        "maxrss_before_mb": rss_before,
        "maxrss_mb": maxrss_mb(),
        "weights": weights,
    }
    if prof:
        # The counters ran over whole train() calls: the iterations plus one model reveal
        # (one small opening) each; the checkpoints use no communication.
        out["profile"] = prof.breakdown(sum(seconds), comm_s, len(seconds))
    return out


# ---------------------------------------------------------------- orchestration

def plaintext_w1(args: argparse.Namespace) -> dict[str, Any]:
    x, y = (torch.from_numpy(a).to(args.device) for a in w1_data(args.rows, args.features))
    y = y.unsqueeze(1)
    w0, b0 = initial_weights(args.features)
    n, seconds = args.rows, []
    for _ in range(max(args.repeats, 3)):
        w, b = w0.reshape(-1, 1).to(args.device), b0.to(args.device)
        for _ in range(ITERATIONS):
            started = time.perf_counter()
            err = (torch.sigmoid(x @ w + b) - y) / n
            w = w - LEARNING_RATE * (x.t() @ err)
            b = b - LEARNING_RATE * err.sum(dim=0)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
    weights = torch.cat([w.reshape(-1), b.reshape(-1)]).cpu()
    return {"seconds": statistics.median(seconds), "weights": weights.tolist(), "accuracy": accuracy(args, weights.tolist())}


def accuracy(args: argparse.Namespace, weights: list[float]) -> float:
    x, y = w1_data(args.rows, args.features)
    w = np.asarray(weights, dtype=np.float64)
    return float(np.mean(((x @ w[:-1] + w[-1]) > 0) == (y > 0.5)))


def write_w1_job(args: argparse.Namespace, work: Path, parties: list[str], *, prefetch: bool = True) -> Path:
    import yaml

    x, y = w1_data(args.rows, args.features)
    entries = []
    for name, cols in zip(parties, column_blocks(args.features, args.parties)):
        frame = x[:, cols]
        header = [f"f{c}" for c in cols]
        if name == parties[-1]:
            frame, header = np.column_stack([frame, y]), header + ["label"]
        path = work / f"{name}.csv"
        np.savetxt(path, frame, delimiter=",", header=",".join(header), comments="", fmt="%.9g")
        entries.append({"name": name, "data": {"train": str(path)}})
    job = {
        "name": "bench-w1", "task": "train", "partition": "vertical", "parties": entries,
        "labels": {"party": parties[-1], "column": "label"},
        "data": {"standardize": False},
        "model": {"type": "logistic_regression"},
        "training": {"epochs": ITERATIONS, "batch_size": args.rows, "learning_rate": LEARNING_RATE, "momentum": 0.0,
                     "loss": "bce", "sigmoid": args.sigmoid, "seed": 0, "shuffle": False},
        "outputs": {"dir": str(work / "w1-runs"), "model_to": [parties[-1]], "metrics_to": "none"},
        "runtime": {"timeout_s": 300, "device": args.device, "prefetch": prefetch, "truncation": args.truncation},
    }
    path = work / ("w1.yaml" if prefetch else "w1-no-prefetch.yaml")
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def summarise_w1(args: argparse.Namespace, ranks: list[dict[str, Any]], plain: dict[str, Any]) -> dict[str, Any]:
    weights = next(r["weights"] for r in reversed(ranks) if r.get("weights") is not None)
    seconds = statistics.median(s for r in ranks for s in r["seconds"])
    row = {
        "seconds": seconds,
        "per_party": [{k: r[k] for k in ("bytes_per_iter", "rounds_per_iter", "maxrss_before_mb", "maxrss_mb")} for r in ranks],
        "accuracy": accuracy(args, weights),
        "max_weight_error": float(np.max(np.abs(np.asarray(weights) - np.asarray(plain["weights"])))),
        "weights": weights,
    }
    row["network"] = network_model(seconds, max(r["rounds_per_iter"] for r in ranks), max(r["bytes_per_iter"] for r in ranks))
    if "profile" in ranks[0]:
        row["profile"] = [r["profile"] for r in ranks]
    return row


def run_w1(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    parties = [f"party{i}" for i in range(args.parties)]
    job = write_w1_job(args, work, parties)
    unprefetched = write_w1_job(args, work, parties, prefetch=False)
    plain = plaintext_w1(args)
    result: dict[str, Any] = {"plaintext": plain, "rows": args.rows, "features": args.features, "parties": args.parties,
                              "iterations": ITERATIONS, "sigmoid": args.sigmoid,
                              "truncation": args.truncation}
    for provider in args.providers:
        ways = {
            "raw": lambda: launch_stock(args, work, "w1-raw", provider, args.parties),
            "raw+patches": lambda: launch_mpcfl(args, work, "w1-raw", provider, parties),
            "mpcfl": lambda: launch_mpcfl(args, work, "w1-mpcfl", provider, parties, job),
        }
        if args.prefetch_ablation and provider == "ttp":  # the same job with runtime.prefetch off, right after
            ways[NO_PREFETCH] = lambda: launch_mpcfl(args, work, "w1-mpcfl", provider, parties, unprefetched)
        result[provider] = {way: summarise_w1(args, run(), plain) for way, run in ways.items()
                            if way in args.ways or (way == NO_PREFETCH and "mpcfl" in args.ways)}
        if "mpcfl" not in result[provider]:
            continue
        ours = result[provider]["mpcfl"]["seconds"]
        result[provider]["ratios"] = {f"mpcfl/{way}": ours / result[provider][way]["seconds"]
                                      for way in ("raw", "raw+patches") if way in result[provider]}
        result[provider]["ratios"]["mpcfl/plaintext"] = ours / plain["seconds"]
    return result
