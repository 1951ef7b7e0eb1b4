"""Point-to-point transfer of CUDA shares between two parties: gloo through host memory against NCCL.

    python benchmarks/p2p_backends.py [--sizes 4096 131072 2097152] [--repeats 20] [--json PATH]

mpcfl opens shares point to point (``mpcfl/mpc/opening.py``): with gloo a CUDA share is copied
to the host, sent, received into host memory and copied back to the GPU. NCCL would move it
device to device. This measures both for the tensor sizes W1 opens (int64 elements: 4096 = one
column, 131072 = 4096 x 32, 2097152 = 65536 x 32), two processes on this machine, one round
trip per repeat (rank 0 sends, rank 1 sends back), and prints the median seconds and GB/s.

NCCL needs a GPU per rank on most versions; where both ranks share one GPU it may refuse
("Duplicate GPU detected"), and that is reported as the result. Not a package (see suite.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round_trip(tensor: torch.Tensor, rank: int, via_host: bool) -> None:
    """Rank 0 sends ``tensor`` to rank 1, which sends it back; via_host: through a host copy, as gloo needs it."""
    peer = 1 - rank
    buffer = tensor.cpu() if via_host else tensor
    first, second = (dist.send, dist.recv) if rank == 0 else (dist.recv, dist.send)
    first(buffer, peer)
    second(buffer, peer)
    if via_host:
        tensor.copy_(buffer.to(tensor.device))
    torch.cuda.synchronize()


def _party(rank: int, backend: str, port: int, sizes: list[int], repeats: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group(backend, rank=rank, world_size=2)
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        figures = {}
        for size in sizes:
            tensor = torch.arange(size, dtype=torch.int64, device=device)
            _round_trip(tensor, rank, backend == "gloo")  # warm-up: connections, allocator
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                _round_trip(tensor, rank, backend == "gloo")
                seconds.append(time.perf_counter() - started)
            median = statistics.median(seconds)
            figures[size] = {"median_s": median, "GB_per_s": 2 * size * 8 / median / 1e9}
        dist.destroy_process_group()
        queue.put((rank, figures))
    except Exception as err:  # reported as the result: NCCL refusing two ranks on one GPU is a finding
        queue.put((rank, {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}))


def measure(backend: str, sizes: list[int], repeats: int, timeout: float = 120.0) -> dict[str, Any]:
    """Both ranks' figures for one backend, or the error one of them hit."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_party, args=(r, backend, port, sizes, repeats, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = {}
    try:
        for _ in procs:
            rank, figures = queue.get(timeout=timeout)
            results[rank] = figures
    except Exception:
        results.setdefault("error", f"no answer within {timeout:.0f} s")
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return results.get(0, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 131072, 2097152])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    results = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        "gloo_via_host": measure("gloo", args.sizes, args.repeats),
        "nccl": measure("nccl", args.sizes, args.repeats),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
