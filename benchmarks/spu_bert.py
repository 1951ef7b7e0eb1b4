"""The BERT shapes of transformer_shapes.py under SPU (PUMA's engine), in SPU's own simulator.

    /tmp/spu-venv/bin/python benchmarks/spu_bert.py [--sizes tiny mini] [--lengths 32 128] [--repeats 1] [--puma]

Not part of mpcfl's environment: it needs ``spu`` (0.9.5, CPU wheel) and jax in a venv of their
own (``python -m venv /tmp/spu-venv && /tmp/spu-venv/bin/pip install spu``). The same shape as
``transformer_shapes.BertLike`` (post-norm, GELU, learnt positions, embedding LayerNorm, tanh
pooler, one-hot ids times the embedding table), written in jax with random weights; every
input (weights, one-hot ids) secret. SPU's ``Simulator`` runs each party as a thread of one
process over in-memory links: no sockets and no separate dealer, so its seconds are not those of
separate processes. Prints median seconds per inference (batch 1, after one warm-up that compiles)
and the largest logit difference from jax in plaintext.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import spu.libspu as libspu
import spu.utils.simulation as spsim

SIZES = {"tiny": (2, 128), "mini": (4, 256), "base": (12, 768)}
PROTOCOLS = {"semi2k": (2, libspu.ProtocolKind.SEMI2K), "aby3": (3, libspu.ProtocolKind.ABY3)}


def params(rng: np.random.Generator, vocab: int, length: int, layers: int, width: int) -> dict:
    def dense(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        bound = 1 / np.sqrt(n_in)
        return (rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32),
                rng.uniform(-bound, bound, n_out).astype(np.float32))

    ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
    return {"embed": rng.standard_normal((vocab, width)).astype(np.float32),
            "position": (rng.standard_normal((length, width)) * 0.02).astype(np.float32), "norm": (ones, zeros),
            "layers": [{"qkv": dense(width, 3 * width), "out": dense(width, width), "norm1": (ones, zeros),
                        "up": dense(width, 4 * width), "down": dense(4 * width, width), "norm2": (ones, zeros)}
                       for _ in range(layers)],
            "pooler": dense(width, width), "classifier": dense(width, 2)}


def _fit(degree: int, low: float, high: float) -> np.ndarray:
    """Least-squares coefficients (highest power first) of GELU on [low, high]."""
    x = np.linspace(low, high, 2001)
    gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return np.polyfit(x, gelu, degree)


# PUMA's GELU as its paper describes it (Dong et al. 2023, section 4): 0 below -4, a cubic on
# [-4, -1.95], a degree-6 polynomial on [-1.95, 3], x above 3; the coefficients are our own fit.
_LOW, _MID = _fit(3, -4.0, -1.95), _fit(6, -1.95, 3.0)


def puma_gelu(x: jnp.ndarray) -> jnp.ndarray:
    below, low, high = x < -4.0, x < -1.95, x > 3.0
    in_low = jnp.logical_and(low, jnp.logical_not(below))
    in_mid = jnp.logical_not(jnp.logical_or(low, high))
    return high * x + in_low * jnp.polyval(_LOW, x) + in_mid * jnp.polyval(_MID, x)


def puma_softmax(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """PUMA's softmax: the row's maximum subtracted, exp of gaps below -14 taken as 0."""
    gaps = x - jnp.max(x, axis, keepdims=True)
    powers = jnp.exp(gaps) * (gaps > -14)
    return powers / jnp.sum(powers, axis, keepdims=True)


def forward(p: dict, onehot: jnp.ndarray, *, puma: bool = False) -> jnp.ndarray:
    def norm(x: jnp.ndarray, wb: tuple) -> jnp.ndarray:
        centred = x - x.mean(-1, keepdims=True)
        return centred * jax.lax.rsqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * wb[0] + wb[1]

    def linear(x: jnp.ndarray, wb: tuple) -> jnp.ndarray:
        return x @ wb[0] + wb[1]

    h = norm(onehot @ p["embed"] + p["position"], p["norm"])
    n, length, width = h.shape
    heads = max(1, width // 64)
    for layer in p["layers"]:
        q, k, v = (t.reshape(n, length, heads, width // heads).transpose(0, 2, 1, 3)
                   for t in jnp.split(linear(h, layer["qkv"]), 3, axis=-1))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
        context = ((puma_softmax if puma else jax.nn.softmax)(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(n, length, width)
        h = norm(h + linear(context, layer["out"]), layer["norm1"])
        h = norm(h + linear((puma_gelu if puma else jax.nn.gelu)(linear(h, layer["up"])), layer["down"]), layer["norm2"])
    return linear(jnp.tanh(linear(h[:, 0], p["pooler"])), p["classifier"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mini"])
    parser.add_argument("--lengths", nargs="*", type=int, default=[32, 128])
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="semi2k")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--puma", action="store_true", help="PUMA's GELU and softmax (our fit of its paper's pieces)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = functools.partial(forward, puma=args.puma)
    name = f"SPU {args.protocol}{', PUMA operators' if args.puma else ''}"
    world, kind = PROTOCOLS[args.protocol]
    simulator = spsim.Simulator.simple(world, kind, libspu.FieldType.FM64)
    rows = []
    for size in args.sizes:
        layers, width = SIZES[size]
        for length in args.lengths:
            rng = np.random.default_rng(0)
            p = params(rng, args.vocab, length, layers, width)
            onehot = np.eye(args.vocab, dtype=np.float32)[rng.integers(0, args.vocab, (1, length))]
            secure = spsim.sim_jax(simulator, model)
            started = time.perf_counter()
            out = secure(p, onehot)  # compiles, then runs
            first = time.perf_counter() - started
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                out = secure(p, onehot)
                seconds.append(time.perf_counter() - started)
            diff = float(np.abs(np.asarray(out) - np.asarray(forward(p, onehot))).max())  # against exact GELU, softmax
            rows.append({"size": size, "layers": layers, "width": width, "length": length, "protocol": args.protocol, "puma": args.puma,
                         "first_s": first, "seconds": statistics.median(seconds), "max_logit_diff": diff})
            print(f"| {size} ({layers} x {width}) | {length} | {name} ({world} parties, simulator) | "
                  f"{rows[-1]['seconds']:.2f} | {diff:.3g} | load {os.getloadavg()[0]:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as sink:
            json.dump({"load_average": list(os.getloadavg()), "points": rows}, sink, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
