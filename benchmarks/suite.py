"""Benchmark suite: plaintext PyTorch, raw CrypTen and mpcfl on the same workloads, in one run.

    python benchmarks/suite.py [--quick] [--workloads w1 w2 w3 w4] [--providers ttp tfp]
                               [--repeats 3] [--rows 4096 --features 32 --parties 2]
                               [--device cpu|cuda] [--profile] [--json PATH]
                               [--sigmoid crypten|piecewise|poly] [--truncation auto|local|dealer]

Workloads
    w1  secure logistic-regression training. X is rows x features standard normal
        (numpy default_rng(0)), y = 1[X w_true > 0] with w_true ~ N(0, 1) (default_rng(1));
        a vertical split: the columns are cut into --parties contiguous blocks (2 parties:
        party 0 has columns 0-15, party 1 columns 16-31), the last party holds the labels.
        Full-batch gradient descent, 10 iterations, learning rate 1.0, no momentum, the
        gradient of the mean BCE loss (1/n), starting from mpcfl's seeded initial weights
        (torch.manual_seed(0), nn.Linear(features, 1): a weight vector and a bias) everywhere.
    w2  MLP 784-128-128-10 inference on a batch of 64 inputs of 1x28x28.
    w3  LeNet-5 inference on the same batch.
    w4  the breast-cancer demo end to end (configs/breast_cancer_lr.yaml, training.sigmoid from --sigmoid)
        against `mpcfl baseline`.

Ways
    plaintext     torch, the same math, in this process.
    raw           "CrypTen as shipped, no platform": 2 (--parties) party processes plus, under
                  TTP, CrypTen's own TTPServer as a third, all importing crypten with
                  ``import_crypten(stock=True)`` (the import fixes for current torch only: no
                  AES generators, no point-to-point openings, no dealer digests). W1: the script
                  encrypts each column block from its owner (src=), y from the label holder,
                  the weights as CrypTensors, and per iteration computes z = X w + b,
                  e = (sigmoid(z) - y) / n (CrypTen's default sigmoid, as its BCEWithLogits
                  backward does), w -= lr X^T e, b -= lr sum(e). W2/W3: benchmarks/inference.py's
                  raw_crypten_batch (``crypten.nn.from_pytorch``, share, run, reveal to rank 1).
    raw+patches   the same raw code run inside mpcfl's processes (``mpcfl.join`` via launch_script),
                  so with mpcfl's patches: the same trust model as mpcfl, and its packed comparison.
    mpcfl         W1: the real training path, in party processes started by launch_script: a
                  generated vertical job (CSV files per party, standardize off, shuffle off,
                  batch_size = rows, epochs 10, learning_rate 1.0, momentum 0, metrics_to none,
                  no test split, model_to the label holder, training.sigmoid from --sigmoid: default
                  CrypTen's), then load_party_data, share_dataset,
                  training_step and train() from mpcfl/tasks/train, as run_party does. An
                  iteration's time is the epoch's ``seconds`` from train()'s history: with one batch
                  per epoch and no metrics that is the batch plan, zero_grad, the CrypTen autograd
                  step (BCEWithLogitsLoss backward: (sigmoid - y) / n) and optimizer.step; the
                  checkpoint and the final model reveal are outside it. Calling the loop in-process
                  rather than through `mpcfl run` measures the same loop while letting the
                  party process report its own memory and profile. W2/W3: inference.py's
                  mpcfl_batch (secure_predict: input and model checks with the torch.fx trace,
                  2 agreement rounds, share, run, reveal). Both W2/W3 timers cover the whole job
                  from a plaintext model: raw's includes CrypTen's ONNX import, mpcfl's its trace.

W1: each way runs in its own launch, one after the other, so on a shared machine a change of load
between launches moves the ratios (W2's mpcfl/raw gave 0.34-1.52 under a load of 5-7 on 2 cores):
compare several runs. W2/W3: raw runs in its own launch (stock CrypTen cannot share a process with
the patched one); raw+patches and mpcfl share one launch, one batch of each in turn, so their ratio
(mpcfl/raw+patches) holds under a changing load, while mpcfl/raw still spans two launches.

Reported per way and provider: median seconds per iteration (W1: over all iterations of all
repeats; W2/W3: per batch, the whole job of inference.py), bytes and rounds per iteration per
party (CrypTen's counters: they see party-to-party traffic and the dealer's broadcasts, not the
requests to the dealer or mpcfl's dealer digests), each party's peak RSS (ru_maxrss: includes
torch and crypten, about 300-400 MB of it before any data), accuracy on the W1 data and the
largest weight difference against plaintext, the largest logit difference for W2/W3, and the
ratios mpcfl/raw and mpcfl/plaintext.

Network model: predicted = measured loopback seconds + rounds x RTT + bytes x 8 / bandwidth,
taking the busiest party's rounds and bytes, for a LAN (1 Gbit/s, 0.2 ms) and a WAN
(100 Mbit/s, 40 ms). Loopback time already holds the local copies, so this is an upper bound
for compute, a lower one for the dealer's unseen traffic.

--profile (W1, W2, W3; every way): timers around every request to the triple provider (under TTP a
round trip to the dealer, and mpcfl's digests; under TFP local generation) and CrypTen's
communicator time, split into: dealer (its requests, with their communication), party-to-party
communication (the rest of the communicator's time, including waiting on the peer), and local
compute (the remainder of the iteration).

This file is the driver; each workload's code lies beside it (suite_w1.py, suite_w2_w3.py, suite_w4.py),
with what they share in suite_common.py. This folder is not a package: crypten's wheel installs a
top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from mpcfl.models.sigmoid import DEFAULT as SIGMOID_DEFAULT  # noqa: E402
from mpcfl.models.sigmoid import NAMES as SIGMOID_NAMES  # noqa: E402
from suite_common import LAN, STOCK_ENV, WAN  # noqa: E402  one file per workload, beside this one
from suite_w1 import NO_PREFETCH, mpcfl_w1, raw_w1, run_w1  # noqa: E402
from suite_w2_w3 import INFER_MODELS, infer, run_inference  # noqa: E402
from suite_w4 import run_w4  # noqa: E402


# ---------------------------------------------------------------- process entry points

def party_main(args: argparse.Namespace) -> None:
    """A process started by launch_script (mpcfl) or by launch_stock (raw CrypTen as shipped)."""
    from mpcfl.mpc.engine import import_crypten

    if os.environ.get(STOCK_ENV):
        crypten = import_crypten(stock=True)
        from crypten.config import cfg

        cfg.mpc.provider = args.provider.upper()
        cfg.communicator.verbose = True
        crypten.init()
        try:
            rank, world = crypten.comm.get().get_rank(), crypten.comm.get().get_world_size()
            if args.role == "stock-dealer":
                crypten.mpc.provider.ttp_provider.TTPServer()
                return
            result = raw_w1(crypten, rank, world, args) if args.role == "w1-raw" else infer(crypten, rank, args, ["raw"])
        finally:
            crypten.uninit()
    else:
        import mpcfl

        crypten = import_crypten()
        with mpcfl.join() as me:
            rank, world = me.rank, me.session.world_size
            if args.role == "w1-raw":
                result = raw_w1(crypten, rank, world, args)
            elif args.role == "w1-mpcfl":
                result = mpcfl_w1(me, args)
            else:  # infer-patched: raw CrypTen's code and mpcfl's, in turn in the same processes
                result = infer(crypten, rank, args, ["raw+patches", "mpcfl"])
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration

def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "crypten": version("crypten"),
            "python": platform.python_version(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None}


# ---------------------------------------------------------------- report

def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, crypten {m['crypten']}, python {m['python']}; "
             f"device {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; repeats {results['repeats']}", ""]
    rows = []
    if "w1" in results:
        w1 = results["w1"]
        rows.append(("W1 LR train " + f"{w1['rows']}x{w1['features']}, {w1['parties']} parties, mpcfl sigmoid "
                     f"{w1['sigmoid']}, truncation {w1['truncation']} (s/iter)", "plaintext", "-",
                     w1["plaintext"], None))
        for provider in results["providers"]:
            for way in ("raw", "raw+patches", "mpcfl", NO_PREFETCH):
                if way in w1[provider]:
                    rows.append(("W1", way, provider, w1[provider][way], w1[provider]["ratios"] if way == "mpcfl" else None))
    for w in ("w2", "w3"):
        if w in results:
            entry = results[w]
            rows.append((f"{w.upper()} {entry['model']} inference, {results['batch']} (s/batch)", "plaintext", "-", entry["plaintext"], None))
            for provider in results["providers"]:
                for way in ("raw", "raw+patches", "mpcfl"):
                    rows.append((w.upper(), way, provider, entry[provider][way], entry[provider]["ratios"] if way == "mpcfl" else None))
    lines.append("| workload | way | dealer | s (median) | MB/party | rounds/party | peak RSS MB/party | accuracy | max error "
                 "| mpcfl/raw | mpcfl/raw+patches | mpcfl/plain | LAN s | WAN s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, way, provider, row, ratios in rows:
        parties = row.get("per_party", [])
        sent = " / ".join(_mb(p.get("bytes_per_iter", p.get("bytes", 0))) for p in parties) or "-"
        rounds = " / ".join(f"{p.get('rounds_per_iter', p.get('rounds', 0)):.0f}" for p in parties) or "-"
        rss = " / ".join(f"{p['maxrss_mb']:.0f}" for p in parties) or "-"
        acc = f"{row['accuracy']:.2%}" if "accuracy" in row else "-"
        err = row.get("max_weight_error", row.get("max_error"))
        err = "-" if err is None else f"{err:.2g}"
        r = ratios or {}
        ratio = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        net = row.get("network", {})
        lines.append(f"| {name} | {way} | {provider} | {row['seconds']:.4g} | {sent} | {rounds} | {rss} | {acc} | {err} | "
                     f"{ratio('mpcfl/raw')} | {ratio('mpcfl/raw+patches')} | {ratio('mpcfl/plaintext') if r else '-'} | "
                     f"{net.get('LAN', float('nan')):.3g} | {net.get('WAN', float('nan')):.3g} |")
    if "w4" in results:
        w4 = results["w4"]
        lines += ["", f"W4 breast-cancer demo (TTP, mpcfl sigmoid {w4['sigmoid']}): wall {w4['wall_s']:.1f} s, {w4['seconds_per_epoch']:.2f} s/epoch (median of "
                  f"{w4['epochs']}), test accuracy {w4['test_accuracy']:.2%} vs plaintext baseline "
                  f"{w4['baseline_test_accuracy']:.2%}; MB/epoch per party "
                  + " / ".join(_mb(b) for b in w4["per_party_bytes_per_epoch"])]
    for w, unit in (("w1", "iteration"), ("w2", "batch"), ("w3", "batch")):
        if w not in results or not any("profile" in results[w][p].get("mpcfl", {}) for p in results["providers"]):
            continue
        lines += ["", f"{w.upper()} profile, ms per {unit} per party (dealer = requests to the triple provider incl. their "
                  "communication; comm = party-to-party; local = the rest):", "",
                  "| way | dealer | party | total | dealer | comm | local | provider requests |", "|---|---|---|---|---|---|---|---|"]
        for provider in results["providers"]:
            for way in ("raw", "raw+patches", "mpcfl", NO_PREFETCH):
                for rank, p in enumerate(results[w][provider].get(way, {}).get("profile", [])):
                    lines.append(f"| {way} | {provider} | {rank} | {p['total_s'] * 1e3:.1f} | {p['dealer_s'] * 1e3:.1f} | "
                                 f"{p['comm_s'] * 1e3:.1f} | {p['local_s'] * 1e3:.1f} | {p['provider_requests']:.0f} |")
    lines += ["", f"network model: loopback s + rounds x RTT + bytes / bandwidth, busiest party; "
              f"LAN {LAN['bandwidth_bps'] / 1e9:g} Gbit/s {LAN['rtt_s'] * 1e3:g} ms RTT, "
              f"WAN {WAN['bandwidth_bps'] / 1e6:g} Mbit/s {WAN['rtt_s'] * 1e3:g} ms RTT"]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=["w1", "w2", "w3", "w4"], default=["w1", "w2", "w3", "w4"])
    parser.add_argument("--providers", nargs="+", choices=["ttp", "tfp"], default=["ttp", "tfp"])
    parser.add_argument("--repeats", type=int, default=None, help="W1 trainings / W2-W3 batches per way (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--parties", type=int, default=2, help="W1 parties (the last holds the labels)")
    parser.add_argument("--batch", type=int, default=64, help="W2/W3 batch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--profile", action="store_true", help="W1/W2/W3: where an iteration's or batch's time goes")
    parser.add_argument("--prefetch-ablation", action="store_true",
                        help=f"W1 under TTP: also run mpcfl with runtime.prefetch off ({NO_PREFETCH!r}), right after mpcfl")
    parser.add_argument("--ways", nargs="+", choices=["raw", "raw+patches", "mpcfl"], default=["raw", "raw+patches", "mpcfl"],
                        help="W1: which ways to run (default all)")
    parser.add_argument("--sigmoid", choices=SIGMOID_NAMES, default=SIGMOID_DEFAULT,
                        help="W1 and W4, mpcfl way: the job's training.sigmoid (raw CrypTen keeps its own; "
                        "plaintext and `mpcfl baseline` the exact one)")
    parser.add_argument("--truncation", choices=("auto", "local", "dealer"), default="auto",
                        help="W1, mpcfl way: the job's runtime.truncation (raw CrypTen keeps its own)")
    parser.add_argument("--json", help="write the results here")
    # Internal: the party processes' role.
    for name in ("--role", "--out", "--provider", "--job"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(INFER_MODELS.values()), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.role:
        party_main(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("suite: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.features < args.parties:
        print("suite: --features must be at least --parties", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="mpcfl-bench-"))
    results: dict[str, Any] = {"machine": machine(args.device), "repeats": args.repeats, "providers": args.providers,
                               "batch": args.batch}
    def save() -> None:  # after every workload, so a late failure keeps the figures so far
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    try:
        if "w1" in args.workloads:
            results["w1"] = run_w1(args, work)
            save()
        infer_keys = [w for w in ("w2", "w3") if w in args.workloads]
        if infer_keys:
            results.update(run_inference(args, work, infer_keys))
            save()
        if "w4" in args.workloads:
            results["w4"] = run_w4(args, work)
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
