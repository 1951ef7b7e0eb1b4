"""Benchmark suite: plaintext PyTorch, raw CrypTen and mpcfl on the same workloads, in one run.

    python benchmarks/suite.py [--quick] [--workloads w1 w2 w3 w4] [--providers ttp tfp]
                               [--repeats 3] [--rows 4096 --features 32 --parties 2]
                               [--device cpu|cuda] [--profile] [--json PATH]
                               [--sigmoid crypten|piecewise|poly]

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

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import inference  # noqa: E402  benchmarks/inference.py: W2/W3 reuse its code
from mpcfl.models.sigmoid import DEFAULT as SIGMOID_DEFAULT  # noqa: E402
from mpcfl.models.sigmoid import NAMES as SIGMOID_NAMES  # noqa: E402

ITERATIONS = 10
LEARNING_RATE = 1.0
LAN = {"name": "LAN", "bandwidth_bps": 1e9, "rtt_s": 0.2e-3}
WAN = {"name": "WAN", "bandwidth_bps": 100e6, "rtt_s": 40e-3}
INFER_MODELS = {"w2": "mlp", "w3": "lenet5"}
STOCK_ENV = "MPCFL_BENCH_STOCK"  # set in the processes of the stock (no platform) runs


# ---------------------------------------------------------------- helpers shared by every process

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


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def comm_stats(crypten: Any) -> dict[str, float]:
    stats = crypten.comm.get().get_communication_stats()
    return {"bytes": int(stats["bytes"]), "rounds": int(stats["rounds"]), "comm_time_s": float(stats["time"])}


def gather(crypten: Any, values: list[int]) -> list[list[int]]:
    """Small public integers from every party (both modes; mpcfl's all_gather_public does the same)."""
    return [t.tolist() for t in crypten.comm.get().all_gather(torch.tensor(values, dtype=torch.long))]


class Profiler:
    """Times the triple provider's requests and CrypTen's communicator while ``active``."""

    METHODS = ("generate_additive_triple", "square", "generate_binary_triple", "wrap_rng", "B2A_rng")

    def __init__(self, crypten: Any) -> None:
        self.crypten = crypten
        self.dealer_s = self.dealer_comm_s = 0.0
        self.requests = 0
        self.active = False
        self.measured_s = self.measured_comm_s = 0.0  # what measuring() timed
        self.measured = 0
        self._saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> "Profiler":
        provider = type(self.crypten.mpc.get_default_provider())
        for name in self.METHODS:
            original = getattr(provider, name, None)
            if original is None:
                continue
            self._saved.append((provider, name, original))
            setattr(provider, name, self._timed(original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for provider, name, original in self._saved:
            setattr(provider, name, original)

    def _timed(self, original: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            comm0, started = comm_stats(self.crypten)["comm_time_s"], time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.dealer_s += time.perf_counter() - started
                self.dealer_comm_s += comm_stats(self.crypten)["comm_time_s"] - comm0
                self.requests += 1

        return timed

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Active for one timed unit of work (a W2/W3 batch), whose wall and communicator time it adds up."""
        comm0, started = comm_stats(self.crypten)["comm_time_s"], time.perf_counter()
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.measured_s += time.perf_counter() - started
            self.measured_comm_s += comm_stats(self.crypten)["comm_time_s"] - comm0
            self.measured += 1

    def breakdown(self, total_s: float, comm_s: float, iterations: int) -> dict[str, float]:
        """Seconds per iteration: dealer, party-to-party communication, local compute."""
        peer = comm_s - self.dealer_comm_s
        return {
            "total_s": total_s / iterations,
            "dealer_s": self.dealer_s / iterations,
            "comm_s": peer / iterations,
            "local_s": (total_s - self.dealer_s - peer) / iterations,
            "provider_requests": self.requests / iterations,
        }


# ---------------------------------------------------------------- W1 in the party processes

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
    job = mpcfl.load_job(args.job).bound_to("w1")  # train() checkpoints into a run's folder: this one's
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


# ---------------------------------------------------------------- W2/W3 in the party processes

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


def _child_args(args: argparse.Namespace, role: str, out: Path, provider: str, job: Path | None = None) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--role", role, "--out", str(out), "--provider", provider,
            "--repeats", str(args.repeats), "--rows", str(args.rows), "--features", str(args.features),
            "--batch", str(args.batch), "--device", args.device, "--models", *args.models]
    if args.profile:
        argv.append("--profile")
    if job is not None:
        argv += ["--job", str(job)]
    return argv


def _collect(out: Path, ranks: int, log: Path, code: int, what: str) -> list[dict[str, Any]]:
    files = [out / f"rank{r}.json" for r in range(ranks)]
    if code != 0 or not all(f.is_file() for f in files):
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        raise RuntimeError(f"{what} failed (exit {code}); log tail:\n{tail}")
    return [json.loads(f.read_text()) for f in files]


def launch_mpcfl(args: argparse.Namespace, work: Path, role: str, provider: str, parties: list[str], job: Path | None = None) -> list[dict[str, Any]]:
    """Party processes (and the dealer) through mpcfl's launcher: mpcfl's patched engine."""
    from mpcfl.launch.local import launch_script

    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{role}-{provider}-"))
    log = out / "log.txt"
    with log.open("w") as sink:
        code = launch_script(_child_args(args, role, out, provider, job), parties=parties, timeout_s=300,
                             provider=provider, device=args.device, sink=sink)
    return _collect(out, len(parties), log, code, f"{role} under {provider}")


def launch_stock(args: argparse.Namespace, work: Path, role: str, provider: str, world: int) -> list[dict[str, Any]]:
    """CrypTen as shipped: world party processes plus, under TTP, CrypTen's TTPServer; no mpcfl launcher."""
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"stock-{role}-{provider}-"))
    log = out / "log.txt"
    rendezvous = f"file://{out}/rendezvous-{uuid.uuid4().hex}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MPCFL_") and k not in ("RANK", "WORLD_SIZE", "RENDEZVOUS")}
    processes = []
    with log.open("w") as sink:
        for rank in range(world + (1 if provider == "ttp" else 0)):
            env = dict(base, RANK=str(rank), WORLD_SIZE=str(world), RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo",
                       GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", **{STOCK_ENV: "1"})
            child_role = "stock-dealer" if rank == world else role
            processes.append(subprocess.Popen([sys.executable, *_child_args(args, child_role, out, provider)],
                                              env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        code = 0
        deadline = time.monotonic() + 600
        try:
            for p in processes:
                code = code or p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = 124
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return _collect(out, world, log, code, f"stock {role} under {provider}")


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


def network_model(seconds: float, rounds: float, sent: float) -> dict[str, float]:
    return {net["name"]: seconds + rounds * net["rtt_s"] + sent * 8 / net["bandwidth_bps"] for net in (LAN, WAN)}


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
        "runtime": {"timeout_s": 300, "device": args.device, "prefetch": prefetch},
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


NO_PREFETCH = "mpcfl (no prefetch)"


def run_w1(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    parties = [f"party{i}" for i in range(args.parties)]
    job = write_w1_job(args, work, parties)
    unprefetched = write_w1_job(args, work, parties, prefetch=False)
    plain = plaintext_w1(args)
    result: dict[str, Any] = {"plaintext": plain, "rows": args.rows, "features": args.features, "parties": args.parties,
                              "iterations": ITERATIONS, "sigmoid": args.sigmoid}
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
                     f"{w1['sigmoid']} (s/iter)", "plaintext", "-",
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
