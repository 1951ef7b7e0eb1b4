"""BERT- and GPT-2-shaped transformers under MPC: mpcfl (exact, MPC-friendly) against raw CrypTen, same run.

    python benchmarks/transformer_shapes.py [--sizes tiny mini base] [--lengths 32 128] [--repeats 3]
        [--ways exact mpc_friendly raw] [--device cuda] [--sweep] [--gpt] [--serve K] [--json OUT] [--plots DIR]
    python benchmarks/transformer_shapes.py --from RUN/*-*.json [--plots DIR]   # report finished points again

Two parties (``owner`` holds the weights, ``client`` the token ids) plus the TTP dealer on this
machine, one launch per point (size, sequence length), so each point's peak RSS is its own.
BERT shapes (``SIZES``: layers, width; 4x width hidden, width/64 heads, vocabulary 30,522,
post-norm GELU encoder, learnt positions, embedding LayerNorm, tanh pooler on the first token, 2
classes), random weights from a fixed seed. Per inference (``--batch`` sequences, default 1; share
the weights, share the one-hot ids, run, reveal the logits to the client), the median seconds of
``--repeats`` and the bytes and rounds of both parties, for:

- mpcfl ``exact`` and ``mpc_friendly`` (``mpcfl.secure_predict``);
- raw CrypTen: ``crypten.nn.from_pytorch`` (recorded as the error it raises, or run if it imports),
  and the same model written by hand with CrypTensor ops as a CrypTen user would (:func:`raw_forward`:
  CrypTen's softmax, ``inv_sqrt`` and sigmoid; CrypTen has no GELU, so x sigmoid(1.702 x)).

Each way's peak RSS per party (VmHWM, reset before each of its runs) and its largest logit
difference from the plaintext model (the client rebuilds it from the seed, for scoring here only).
``--serve K`` adds, per mpcfl way, the way served (``mpcfl.serve``: the weights shared and their
masks fixed once, in the warm-up call, so each timed inference opens only its activations), raw
CrypTen keeping its weights shared between calls (the served ways' fair match: CrypTen has no mask
reuse, so each product still opens its weight's difference) and, for
K > 1, one call of K batches (the same ids K times), with the weights' masks fixed once for the call
(``mask_reuse``, the default) and without: the table gives its figures per batch, the first batch's
fixing included. Each way's first call is timed too (the warm-up's, or with ``--no-warm-up`` the
first timed call's), so a served way's one-time cost (its first call less a later one) and the
inferences it takes to repay it against one ``secure_predict`` call each (:func:`break_even`) are in
the table. ``--sweep`` adds the time-against-length (16-128, tiny) and -width (64-256, 2 layers, seq 32)
points; ``--gpt`` the decoder (Hugging Face's GPT-2 at ``--gpt-shape``, from a config): seconds,
bytes and rounds per generated token (``--prompt`` tokens, ``--generate`` greedy steps), one
``secure_predict`` per token (the whole prefix each time) against one ``mpcfl.serve`` server's
``generate``, with its key-value cache and without (:func:`gpt_point`); ``--sizes`` with no size
runs the decoder alone. ``--plots DIR`` draws the sweeps.

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PARTIES = ["owner", "client"]
SIZES = {"tiny": (2, 128), "mini": (4, 256), "base": (12, 768)}  # BERT's (layers, width)
VOCAB = 30522  # BERT's WordPiece vocabulary
GPT_VOCAB = 50257
WAYS = ("exact", "mpc_friendly", "raw CrypTen (by hand)")
RAW_SERVED = "raw CrypTen (by hand), weights shared once"
SWEEP_LENGTHS = [16, 32, 64, 128]  # at tiny
SWEEP_WIDTHS = [64, 128, 256]  # 2 layers, seq 32


class BertLike(nn.Module):
    """BERT's shape from torch's layers: what docs/guides/transformers.md says mpcfl runs."""

    def __init__(self, vocab: int, length: int, layers: int, width: int, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.norm(self.embed(ids) + self.position))
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


# ---------------------------------------------------------------- raw CrypTen, by hand


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    centred = x - x.mean(-1, keepdim=True)
    return centred * ((centred * centred).mean(-1, keepdim=True) + eps).inv_sqrt() * weight + bias


def _linear(x: Any, p: dict[str, Any], name: str) -> Any:
    return x.matmul(p[f"{name}.weight"].t()) + p[f"{name}.bias"]


def raw_forward(model: BertLike, p: dict[str, Any], onehot: Any) -> Any:
    """``model`` on one-hot ids with CrypTensor ops only, its parameters ``p`` (by name) shared."""
    h = onehot.matmul(p["embed.weight"]) + p["position"]
    h = _layer_norm(h, p["norm.weight"], p["norm.bias"], model.norm.eps)
    n, length, width = h.size()
    for i, layer in enumerate(model.encoder.layers):
        q = f"encoder.layers.{i}."
        heads = layer.self_attn.num_heads
        qkv = h.matmul(p[q + "self_attn.in_proj_weight"].t()) + p[q + "self_attn.in_proj_bias"]
        split = [qkv[:, :, j * width:(j + 1) * width].reshape(n, length, heads, width // heads).transpose(1, 2)
                 for j in range(3)]
        scores = split[0].matmul(split[1].transpose(-2, -1)) * (1.0 / math.sqrt(width // heads))
        context = scores.softmax(-1).matmul(split[2]).transpose(1, 2).reshape(n, length, width)
        h = _layer_norm(h + _linear(context, p, q + "self_attn.out_proj"), p[q + "norm1.weight"], p[q + "norm1.bias"],
                        layer.norm1.eps)
        hidden = _linear(h, p, q + "linear1")
        hidden = hidden * (hidden * 1.702).sigmoid()  # CrypTen has no GELU: its sigmoid form
        h = _layer_norm(h + _linear(hidden, p, q + "linear2"), p[q + "norm2.weight"], p[q + "norm2.bias"],
                        layer.norm2.eps)
    return _linear(_linear(h[:, 0], p, "pooler").tanh(), p, "classifier")


def raw_weights(model: BertLike, owner: int) -> dict[str, Any]:
    """The model's parameters as CrypTensors shared by ``owner``, by name."""
    from mpcfl.mpc.engine import import_crypten

    from mpcfl.mpc.session import session_device

    crypten = import_crypten()
    with crypten.no_grad():
        return {name: crypten.cryptensor(t.detach(), src=owner, device=session_device()) for name, t in model.named_parameters()}


def raw_batch(model: BertLike, ids: torch.Tensor | None, shape: tuple[int, int], owner: int, client: int,
              shared: dict[str, Any] | None = None) -> torch.Tensor | None:
    """Shares the weights (unless ``shared`` holds them, shared once for every call, as a raw CrypTen
    server would keep them) and the one-hot ids, runs :func:`raw_forward`, reveals to the client
    (CrypTen's own ``get_plain_text(dst=)``, as raw CrypTen users do)."""
    from mpcfl.mpc.engine import import_crypten

    from mpcfl.mpc.session import session_device

    crypten = import_crypten()
    vocab, device = model.embed.num_embeddings, session_device()
    with crypten.no_grad():
        p = shared if shared is not None else raw_weights(model, owner)
        onehot = nn.functional.one_hot(ids.long(), vocab).float() if ids is not None else torch.zeros(*shape, vocab)
        out = raw_forward(model, p, crypten.cryptensor(onehot, src=client, device=device)).get_plain_text(dst=client)
        return None if out is None else out.cpu()


def onnx_batch(model: nn.Module, ids: torch.Tensor | None, shape: tuple[int, int], owner: int, client: int) -> torch.Tensor | None:
    """CrypTen's converter (ONNX import) on the model, as ``crypten.nn.from_pytorch`` is meant to be used."""
    from mpcfl.mpc.engine import import_crypten

    from mpcfl.mpc.session import session_device

    crypten = import_crypten()
    device = session_device()
    secure = crypten.nn.from_pytorch(model, torch.zeros(*shape, dtype=torch.long)).encrypt(src=owner).to(device)
    secure.eval()
    with crypten.no_grad():
        x = crypten.cryptensor(ids.float() if ids is not None else torch.zeros(*shape), src=client, device=device)
        out = secure(x).get_plain_text(dst=client)
        return None if out is None else out.cpu()


# ---------------------------------------------------------------- party side


def shape_of(size: str) -> tuple[int, int]:
    """(layers, width) of a named size or of ``LAYERSxWIDTH``."""
    if size in SIZES:
        return SIZES[size]
    layers, width = size.split("x")
    return int(layers), int(width)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _with_peak(run: Callable[[], Any], peaks: dict[str, float], name: str) -> Callable[[], Any]:
    def measured() -> Any:
        _reset_peak()
        try:
            return run()
        finally:
            peaks[name] = max(peaks.get(name, 0.0), _peak_rss_mb())

    return measured


def _error(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def bert_point(args: argparse.Namespace, me: Any) -> dict[str, Any] | None:
    from inference import measure_alternating  # this folder's

    import mpcfl
    from mpcfl.mpc.session import all_gather_public

    layers, width = shape_of(args.size)
    torch.manual_seed(0)
    model = BertLike(args.vocab, args.length, layers, width).eval()  # same seed: the client rebuilds it to score
    client = me.name == "client"
    ids = torch.randint(0, args.vocab, (args.batch, args.length)) if client else None
    shape = (args.batch, args.length)
    owner_rank, client_rank = me.session.rank_of("owner"), me.session.rank_of("client")
    runs: dict[str, Callable[[], Any]] = {}
    batches: dict[str, int] = {}
    stack = contextlib.ExitStack()  # the served ways' servers, left (their masks released) after timing
    for mode in ("exact", "mpc_friendly"):
        if mode not in args.ways:
            continue
        runs[mode] = (lambda mode=mode: mpcfl.secure_predict(model, ids, model_owner="owner", data_owner="client",
                                                               batch_size=args.batch, approximations=mode))
        for reuse in (True, False) if args.serve > 1 else ():
            name = f"{mode}, {args.serve} batches per call" + ("" if reuse else ", no mask reuse")
            repeated = None if ids is None else ids.repeat(args.serve, 1)
            runs[name] = (lambda mode=mode, reuse=reuse, repeated=repeated: mpcfl.secure_predict(
                model, repeated, model_owner="owner", data_owner="client", batch_size=args.batch, approximations=mode,
                mask_reuse=reuse))
            batches[name] = args.serve
        if args.serve:  # the warm-up call shares the weights and fixes their masks; the timed calls reuse them
            server = stack.enter_context(mpcfl.serve(model, model_owner="owner", data_owner="client", approximations=mode))
            runs[f"{mode}, served (weights fixed once)"] = lambda server=server: server(ids, batch_size=args.batch)
    if "raw" in args.ways:
        runs["raw CrypTen (by hand)"] = lambda: raw_batch(model, ids, shape, owner_rank, client_rank)
        if args.serve:  # the fair match for a served way: raw CrypTen keeping its shared weights between calls
            shared = raw_weights(model, owner_rank)
            runs[RAW_SERVED] = lambda: raw_batch(model, ids, shape, owner_rank, client_rank, shared=shared)
    onnx_error = None
    try:  # CrypTen's converter exports to ONNX locally, before any message: every party fails alike
        if "raw" in args.ways:
            onnx_batch(model, ids, shape, owner_rank, client_rank)
            runs["raw CrypTen (from_pytorch)"] = lambda: onnx_batch(model, ids, shape, owner_rank, client_rank)
    except Exception as err:  # whatever CrypTen raises is the result
        onnx_error = _error(err)
    peaks: dict[str, float] = {}
    outputs: dict[str, Any] = {}

    def keep(name: str, run: Callable[[], Any]) -> Callable[[], Any]:
        def kept() -> Any:
            outputs[name] = run()
        return kept

    with stack:
        timed = measure_alternating({name: _with_peak(keep(name, run), peaks, name) for name, run in runs.items()},
                                    args.repeats, warm_up=not args.no_warm_up)
    rss = {name: [row[0] / 1024.0 for row in all_gather_public([int(peaks[name] * 1024)])] for name in runs}
    if not client:
        return None
    from mpcfl.models.convert import emulate

    with torch.no_grad():
        plain = {mode: emulate(model, ids, mode) for mode in ("exact", "mpc_friendly")}
    result: dict[str, Any] = {"size": args.size, "layers": layers, "width": width, "length": args.length,
                              "batch": args.batch, "vocab": args.vocab, "onnx_error": onnx_error, "ways": {}}
    for name, row in timed.items():
        reference = plain["mpc_friendly" if name.startswith("mpc_friendly") else "exact"]
        count = batches.get(name, 1)  # a served call's figures are its whole call's: K batches
        result["ways"][name] = {**row, "batches": count, "peak_rss_mb": rss[name],
                                "max_logit_diff": float((outputs[name].reshape(count, *reference.shape) - reference).abs().max())}
    return result


def gpt_model(vocab: int, context: int, layers: int, width: int) -> nn.Module:
    """GPT-2 (Hugging Face's, from a config: random weights, head tied to the token embedding) at this shape."""
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers,
                                     n_head=max(1, width // 64), bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


GPT_WAYS = ("one secure_predict per token", "served: tokens only, first call", "served: tokens only, again",
            "served: tokens only, no key-value cache, first call", "served: tokens only, no key-value cache, again",
            "served: logits to the client, again")


def gpt_point(args: argparse.Namespace, me: Any) -> dict[str, Any] | None:
    """Greedy generation of ``--generate`` tokens after a ``--prompt``-token prompt, each way in turn:
    a ``secure_predict`` of the whole prefix per token (the weights shared and opened each time, every
    position's logits to the client), and one ``mpcfl.serve`` server's ``generate`` calls (the weights
    shared and fixed once, in its first call; the argmax under MPC, or the logits opened; with the
    key-value cache, one new position per token, or without it, the whole prefix)."""
    import mpcfl
    from mpcfl.mpc.session import all_gather_public, communication_stats

    layers, width = args.gpt_shape
    torch.manual_seed(0)
    model = gpt_model(args.gpt_vocab, args.prompt + args.generate, layers, width)
    client = me.name == "client"
    prompt = torch.randint(0, args.gpt_vocab, (1, args.prompt)) if client else None
    options = {"model_owner": "owner", "data_owner": "client", "approximations": args.gpt_mode}

    def per_call() -> torch.Tensor | None:
        ids = prompt
        for _ in range(args.generate):
            logits = mpcfl.secure_predict(model, ids, batch_size=1, **options)
            if client:  # the client alone sees the logits and picks the next token in plaintext
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return ids

    figures, made = {}, {}
    _reset_peak()
    with mpcfl.serve(model, **options) as served:
        runs = dict(zip(GPT_WAYS, (per_call, lambda: served.generate(prompt, args.generate),
                                   lambda: served.generate(prompt, args.generate),
                                   lambda: served.generate(prompt, args.generate, key_value_cache=False),
                                   lambda: served.generate(prompt, args.generate, key_value_cache=False),
                                   lambda: served.generate(prompt, args.generate, reveal_logits=True))))
        for name, run in runs.items():
            before, started = communication_stats(), time.perf_counter()
            made[name] = run()
            seconds = time.perf_counter() - started
            after = communication_stats()
            both = all_gather_public([after["bytes"] - before["bytes"], after["rounds"] - before["rounds"]])
            figures[name] = {"seconds_per_token": seconds / args.generate,
                             "mb_per_token": sum(row[0] for row in both) / args.generate / 1e6,
                             "rounds_per_token": sum(row[1] for row in both) / args.generate}
    if not client:
        return None
    for name, ids in made.items():  # each chosen token against plaintext's logits on the same prefix
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits[:, args.prompt - 1 :]
        chosen = logits.gather(-1, ids[:, args.prompt :, None])[..., 0]
        figures[name]["argmax_agrees_with_plaintext"] = int((chosen == logits.max(-1).values).sum())
        figures[name]["largest_regret"] = float((logits.max(-1).values - chosen).max())
    return {"layers": layers, "width": width, "vocab": args.gpt_vocab, "prompt": args.prompt, "generate": args.generate,
            "mode": args.gpt_mode, "ways": figures, "client_peak_rss_mb": _peak_rss_mb()}


def gpt_table(point: dict[str, Any]) -> str:
    if "error" in point:
        return f"GPT-2-shaped decoder failed: {point['error'][:300]}"
    lines = [f"GPT-2 ({point['layers']} x {point['width']}, vocabulary {point['vocab']}, {point['mode']}): "
             f"{point['generate']} tokens after a {point['prompt']}-token prompt",
             "| way | s / token | MB / token | rounds / token | tokens = plaintext argmax | largest regret |",
             "|---|---|---|---|---|---|"]
    for name, row in point["ways"].items():
        lines.append(f"| {name} | {row['seconds_per_token']:.2f} | {row['mb_per_token']:.1f} | {row['rounds_per_token']:.0f} | "
                     f"{row['argmax_agrees_with_plaintext']} of {point['generate']} | {row['largest_regret']:.2g} |")
    return "\n".join(lines)


def party(args: argparse.Namespace) -> None:
    import mpcfl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(args.threads)
    with mpcfl.join() as me:
        result = gpt_point(args, me) if args.gpt_point else bert_point(args, me)
    if result is not None:
        Path(args.result).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- orchestration and report


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(size, length) points: the requested grid, then the sweeps (widths as ``2x<width>``), without repeats."""
    points = [(size, length) for size in args.sizes for length in args.lengths]
    if args.sweep:
        points += [("tiny", length) for length in SWEEP_LENGTHS]
        points += [(f"2x{width}" if width != 128 else "tiny", 32) for width in SWEEP_WIDTHS]
    return list(dict.fromkeys(points))


def _launch(args: argparse.Namespace, extra: list[str], work: Path, label: str) -> dict[str, Any]:
    from mpcfl.launch.local import launch_script

    out = work / f"{label}.json"
    log = work / f"{label}.log"
    argv = [os.path.abspath(__file__), "--repeats", str(args.repeats), "--batch", str(args.batch), "--vocab",
            str(args.vocab), "--threads", str(args.threads), "--result", str(out), *extra]
    with log.open("w") as sink:
        code = launch_script(argv, parties=PARTIES, timeout_s=args.point_timeout, sink=sink, device=args.device)
    if code != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-1500:]
        return {"error": f"exit {code}; log tail: {tail}"}
    return json.loads(out.read_text())


def break_even(name: str, ways: dict[str, dict[str, Any]]) -> str:
    """For a served way: after how many inferences its one-time cost (sharing the weights and fixing
    their masks: its first call less a later one) is repaid by what each saves against one
    ``secure_predict`` call of the same mode; "-" for any other way or without a first-call time."""
    mode, served, _ = name.partition(", served")
    row, single = ways[name], ways.get(mode)
    if not served or single is None or row.get("first_seconds") is None:
        return "-"
    saving = single["seconds"] - row["seconds"]
    once = row["first_seconds"] - row["seconds"]
    return "never" if saving <= 0 else str(max(1, math.ceil(once / saving)))


COLUMNS = ("shape", "seq", "way", "s / inference", "MB", "rounds", "peak RSS MB (owner / client)", "max logit diff",
           "raw (by hand) s / this s", "raw, weights shared once, s / this s", "first call s", "served: calls to break even")


def _short_row(*cells: Any) -> str:
    """A table row of ``cells`` left-aligned, padded with empty cells to the table's columns."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |" + "|" * (len(COLUMNS) - len(cells))


def table(points: list[dict[str, Any]]) -> str:
    lines = [_short_row(*COLUMNS), "|" + "---|" * len(COLUMNS)]
    for p in points:
        if "error" in p:
            lines.append(_short_row(p.get("size"), p.get("length"), f"failed: {p['error'][:200]}"))
            continue
        shape = f"{p['size']} ({p['layers']} x {p['width']})"
        raws = [p["ways"].get(name) for name in ("raw CrypTen (by hand)", RAW_SERVED)]
        for name, row in p["ways"].items():
            k = row.get("batches", 1)  # per inference: a served call's figures over its batches
            ratios = [f"{raw['seconds'] / (row['seconds'] / k):.2f}" if raw and row is not raw else "-" for raw in raws]
            first = row.get("first_seconds")
            lines.append(f"| {shape} | {p['length']} | {name} | {row['seconds'] / k:.2f} | {row['bytes'] / k / 1e6:.0f} | "
                         f"{row['rounds'] / k:.0f} | {' / '.join(f'{m:.0f}' for m in row['peak_rss_mb'])} | "
                         f"{row['max_logit_diff']:.3g} | {' | '.join(ratios)} | {'-' if first is None else f'{first:.2f}'} "
                         f"| {break_even(name, p['ways'])} |")
        if p["onnx_error"]:
            lines.append(_short_row(shape, p["length"], "raw CrypTen (from_pytorch)", f"fails: `{p['onnx_error']}`"))
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Seconds, bytes and peak RSS per inference against sequence length (2 layers, width 128) and width
    (2 layers, seq 32), one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in points if "error" not in p and p["layers"] == 2]
    axes = (("length", [p for p in done if p["width"] == 128], "transformer-length.png", "2 layers, width 128"),
            ("width", [p for p in done if p["length"] == 32], "transformer-width.png", "2 layers, seq 32"))
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for axis, on_axis, name, fixed in axes:
        on_axis.sort(key=lambda p: p[axis])
        if len(on_axis) < 2:
            continue
        panels = (("s / inference (batch 1)", lambda row: row["seconds"]), ("MB / inference (both parties)",
                  lambda row: row["bytes"] / 1e6), ("peak RSS MB (larger party)", lambda row: max(row["peak_rss_mb"])))
        figure, plots = plt.subplots(1, len(panels), figsize=(12.6, 3.4))
        for way in WAYS:
            xs = [p[axis] for p in on_axis if way in p["ways"]]
            for ax, (_, value) in zip(plots, panels):
                ax.plot(xs, [value(p["ways"][way]) for p in on_axis if way in p["ways"]], marker="o", label=way)
        for ax, (label, _) in zip(plots, panels):
            ax.set_xlabel("sequence length" if axis == "length" else "width")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.set_xticks([p[axis] for p in on_axis], [str(p[axis]) for p in on_axis])
            ax.grid(alpha=0.3)
        plots[0].legend(fontsize=8)
        vocab = on_axis[0]["vocab"]
        figure.suptitle(f"BERT-shaped encoder under MPC ({fixed}, vocabulary {vocab}), 2 parties + TTP dealer")
        figure.tight_layout()
        path = folder / name
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _machine(device: str) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {"cores": os.cpu_count(), "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "device": device, "gpu": gpu, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mini"],
                        help=f"of {list(SIZES)} or LAYERSxWIDTH (default tiny mini)")
    parser.add_argument("--lengths", nargs="*", type=int, default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="sequences per inference")
    parser.add_argument("--serve", type=int, default=0, metavar="K",
                        help="also each mpcfl way served (mpcfl.serve: weights shared and fixed once) and, for K > 1, "
                             "as one call of K batches, with and without mask reuse (figures per batch)")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--sweep", action="store_true", help="also time against length (tiny) and width")
    parser.add_argument("--gpt", action="store_true", help="also the GPT-2-shaped decoder")
    parser.add_argument("--gpt-shape", nargs=2, type=int, default=[2, 128], metavar=("LAYERS", "WIDTH"))
    parser.add_argument("--gpt-vocab", type=int, default=GPT_VOCAB)
    parser.add_argument("--gpt-mode", choices=["exact", "mpc_friendly"], default="exact")
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--generate", type=int, default=4)
    parser.add_argument("--ways", nargs="+", choices=["exact", "mpc_friendly", "raw"], default=["exact", "mpc_friendly", "raw"],
                        help="which ways to time (raw: CrypTen by hand, the slowest)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the parties compute")
    parser.add_argument("--no-warm-up", action="store_true", help="time the first inference too (for base at 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per party")
    parser.add_argument("--point-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, help="write every point here")
    parser.add_argument("--plots", type=Path, help="draw the sweeps into this folder (docs/figures/ for the docs)")
    parser.add_argument("--from", dest="points_from", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: report the point files of earlier runs (each launch's <size>-<length>.json)")
    # one point, inside the party processes
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gpt-point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.environ.get("MPCFL_PARTY"):
        party(args)
        return 0
    if args.points_from:
        points = [json.loads(path.read_text()) for path in args.points_from]
        print(table(points))
        for path in plot(points, args.plots) if args.plots else []:
            print(f"wrote {path}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="transformer-shapes-"))
    print(f"point files in {work}", flush=True)
    extra = ["--ways", *args.ways, "--serve", str(args.serve)] + (["--no-warm-up"] if args.no_warm_up else [])
    points = []
    for size, length in plan(args):
        started = time.perf_counter()
        point = _launch(args, ["--size", size, "--length", str(length), *extra], work, f"{size}-{length}")
        point.setdefault("size", size)
        point.setdefault("length", length)
        point["launch_s"] = time.perf_counter() - started
        points.append(point)
        print(f"{size} seq {length}: {'failed' if 'error' in point else 'done'} in {point['launch_s']:.0f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, Any] = {"machine": _machine(args.device), "points": points}
    if args.gpt:
        gpt = ["--gpt-point", "--gpt-shape", *map(str, args.gpt_shape), "--gpt-vocab", str(args.gpt_vocab),
               "--gpt-mode", args.gpt_mode, "--prompt", str(args.prompt), "--generate", str(args.generate)]
        results["gpt"] = _launch(args, gpt, work, "gpt")
    print(f"\n2 parties + TTP dealer, {args.threads} torch thread(s) per party, batch {args.batch}, median of "
          f"{args.repeats}; machine {results['machine']}")
    print(table(points))
    if args.gpt:
        print("\n" + gpt_table(results["gpt"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plots:
        for path in plot(points, args.plots):
            print(f"wrote {path}")
    failed = [p for p in points if "error" in p] + ([results["gpt"]] if args.gpt and "error" in results["gpt"] else [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
