"""What the TLS channel (``runtime.channel: tls``) costs: W1 and W2 with the channel on against plain
links in the same run, and the channel's own throughput and handshake time.

    python benchmarks/channel.py [--repeats 3] [--json PATH]

Jobs (every process on this machine, over loopback; ``plain`` and ``tls`` alternate, so load drifts
hit both alike; each job with an Ed25519 identity per process, so the only difference is the links):
    W1  benchmarks/suite.py's W1 as a job (4096 x 32, 2 parties + dealer, full batch, 10 iterations);
        the figure is the training's seconds (the sum of the label party's per-iteration seconds).
    W2  MLP 784-128-128-10 (mpcfl.models.zoo:mlp_784, seeded weights) on 64 images of 1x28x28 as a
        ``task: inference`` job; the figure is the data owner's seconds from joining to predictions,
        TLS handshakes included.
Link: one relay pair (as a job's processes run them) over loopback: the throughput of 256 MiB
pushed through it against a plain loopback TCP connection, and the median of 20 TLS handshakes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_w1 import write_w1_job  # noqa: E402  (benchmarks/ is not a package: see suite.py)

from mpcfl import api  # noqa: E402
from mpcfl.mpc import channel  # noqa: E402
from mpcfl.mpc.keys import generate  # noqa: E402
from mpcfl.models.zoo import mlp_784  # noqa: E402

MIB = 1 << 20
PUSHED = 256 * MIB


def _with_identities(spec: dict[str, Any], keys: Path, names: list[str]) -> dict[str, Any]:
    spec.setdefault("runtime", {})["identity"] = {"public_keys": {n: str(keys / f"{n}.pub") for n in [*names, "dealer"]}}
    return spec


def _jobs(work: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """W1 and W2 as job specs, with the parties whose keys they need."""
    w1_args = argparse.Namespace(rows=4096, features=32, parties=2, sigmoid="crypten", device="cpu")
    w1 = yaml.safe_load(write_w1_job(w1_args, work, ["p0", "p1"]).read_text())
    w1["outputs"]["metrics_to"] = ["p1"]  # the per-iteration seconds
    torch.manual_seed(0)
    torch.save(mlp_784().state_dict(), work / "w2_weights.pt")
    np.save(work / "w2_inputs.npy", torch.rand(64, 1, 28, 28).numpy())
    w2 = {
        "name": "bench-w2", "task": "inference", "parties": [{"name": "model_owner"}, {"name": "data_owner"}],
        "model": {"factory": "mpcfl.models.zoo:mlp_784", "weights": str(work / "w2_weights.pt"), "owner": "model_owner"},
        "inputs": {"file": str(work / "w2_inputs.npy"), "owner": "data_owner"}, "batch_size": 64,
        "outputs": {"dir": str(work / "w2-runs")}, "runtime": {"timeout_s": 300},
    }
    return {"W1": (w1, ["p0", "p1"]), "W2": (w2, ["model_owner", "data_owner"])}


def _seconds(workload: str, run: api.Run) -> float:
    if workload == "W1":
        return sum(row["seconds"] for row in run.record("p1")["history"])
    return run.record("data_owner")["seconds"]


def measure_jobs(work: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    keys = work / "keys"
    figures: dict[str, dict[str, list[float]]] = {}
    for workload, (spec, names) in _jobs(work).items():
        for name in [*names, "dealer"]:
            if not (keys / f"{name}.key").exists():  # the dealer's key serves both jobs
                generate(name, keys)
        _with_identities(spec, keys, names)
        figures[workload] = {"plain": [], "tls": []}
        for repeat in range(repeats):
            for mode in ("plain", "tls"):
                spec["runtime"]["channel"] = mode
                run = api.run(spec, key_dir=keys, echo=False)
                figures[workload][mode].append(_seconds(workload, run))
                print(f"{workload} {mode} #{repeat + 1}: {figures[workload][mode][-1]:.3f} s", flush=True)
    return figures


def _relay_pair() -> tuple[channel.Relay, channel.Relay]:
    names = ["p0", "p1"]
    keys = [Ed25519PrivateKey.generate() for _ in names]
    certs = [channel.certificate(k, rank=r, fingerprint="bench", run_id="bench") for r, k in enumerate(keys)]
    return tuple(channel.Relay(r, names, certs[r], keys[r], {1 - r: certs[1 - r]}, "127.0.0.1") for r in range(2))  # type: ignore[return-value]


def _sink() -> int:
    """A listener that reads and discards everything, then answers one byte: the receiving gloo."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < PUSHED and (data := conn.recv(MIB)):
                    got += len(data)
                conn.sendall(b"k")

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def _push(host: str, port: int) -> float:
    """Seconds to push :data:`PUSHED` bytes to ``host:port`` and hear the far end has them all."""
    block = bytes(MIB)
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        for _ in range(PUSHED // MIB):
            sock.sendall(block)
        sock.recv(1)
        return time.perf_counter() - start


def measure_link() -> dict[str, float]:
    plain = _push("127.0.0.1", _sink())
    sender, receiver = _relay_pair()
    try:
        host, port = sender.connect(1, "127.0.0.1", receiver.serve(_sink()))
        tls = _push(host, port)
        handshakes = []
        for _ in range(20):
            start = time.perf_counter()
            context = sender._context(False, [sender.peer_certs[1]])
            with context.wrap_socket(socket.create_connection(("127.0.0.1", receiver.serve(_sink())))) as link:
                handshakes.append(time.perf_counter() - start)
                with contextlib.suppress(ssl.SSLError):  # our close_notify sent; the relay hangs up without its own
                    link.unwrap()
    finally:
        sender.close(), receiver.close()
    return {"plain_gb_s": PUSHED / plain / 1e9, "tls_gb_s": PUSHED / tls / 1e9, "handshake_ms": 1e3 * statistics.median(handshakes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    link = measure_link()
    with tempfile.TemporaryDirectory(prefix="mpcfl-bench-channel-") as folder:
        jobs = measure_jobs(Path(folder), args.repeats)
    print(f"\nlink over loopback: TLS {link['tls_gb_s']:.2f} GB/s against plain TCP {link['plain_gb_s']:.2f} GB/s; "
          f"TLS handshake {link['handshake_ms']:.1f} ms (median of 20)\n")
    print("| workload | plain: median s | tls: median s | tls / plain |")
    print("|---|---|---|---|")
    for workload, modes in jobs.items():
        plain, tls = statistics.median(modes["plain"]), statistics.median(modes["tls"])
        print(f"| {workload} | {plain:.3f} | {tls:.3f} | {tls / plain:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"link": link, "jobs": jobs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
