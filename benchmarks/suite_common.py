"""What every workload of benchmarks/suite.py shares: the counters and the profiler its party
processes report with, how it launches them (mpcfl's launcher or CrypTen as shipped), and the
network model its figures are projected with. Not a package (see suite.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

SUITE = Path(__file__).resolve().parent / "suite.py"  # what the party processes run
LAN = {"name": "LAN", "bandwidth_bps": 1e9, "rtt_s": 0.2e-3}
WAN = {"name": "WAN", "bandwidth_bps": 100e6, "rtt_s": 40e-3}
STOCK_ENV = "MPCFL_BENCH_STOCK"  # set in the processes of the stock (no platform) runs


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


def _child_args(args: argparse.Namespace, role: str, out: Path, provider: str, job: Path | None = None) -> list[str]:
    argv = [str(SUITE), "--role", role, "--out", str(out), "--provider", provider,
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


def network_model(seconds: float, rounds: float, sent: float) -> dict[str, float]:
    return {net["name"]: seconds + rounds * net["rtt_s"] + sent * 8 / net["bandwidth_bps"] for net in (LAN, WAN)}
