"""Secure ViT inference on the shipped digits: mpcfl's converter against raw CrypTen, same run.

    python benchmarks/vit_digits.py [--repeats 3] [--batch 64] [--truncation local|dealer] [--modes exact mpc_friendly]

Two parties (the bank owns the weights under ``examples/data/digits_vit/``, the clinic the 197
images of ``examples/data/digits_inference/clinic_inputs.npy``) plus the TTP dealer on this
machine. For each mode, exact (``bank_weights.pt``) and MPC-friendly (quadratic GELU, 2Quad
softmax; ``bank_weights_mpc_friendly.pt``, distilled to them), reports on the clinic: secure
and plaintext accuracy on all 197 images (plaintext run with the mode's operators,
``mpcfl.models.convert.emulate``) and the agreement of their classes; then median seconds,
bytes and rounds per batch of ``--batch`` images (share the weights, share the images, run,
reveal to the clinic), for both modes and for raw CrypTen (``crypten.nn.from_pytorch``), or
the error that stops CrypTen's converter. ``--truncation`` divides every product's shares locally
(CrypTen's own, the 2-party default) or through the dealer's exact truncation pairs
(:mod:`mpcfl.mpc.truncation`).

This folder is not a package: crypten's wheel installs a top-level `benchmarks`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mpcfl
from mpcfl.launch.local import launch_script
from mpcfl.mpc import truncation
from mpcfl.models.convert import emulate
from mpcfl.models.zoo import digits_vit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import measure_alternating, raw_crypten_batch  # noqa: E402  (this folder, not crypten's)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = {"exact": REPO / "examples" / "data" / "digits_vit" / "bank_weights.pt",
           "mpc_friendly": REPO / "examples" / "data" / "digits_vit" / "bank_weights_mpc_friendly.pt"}
IMAGES = REPO / "examples" / "data" / "digits_inference"
PARTIES = ["bank", "clinic"]


def _predict(model: torch.nn.Module, x: torch.Tensor | None, batch: int, mode: str) -> torch.Tensor | None:
    return mpcfl.secure_predict(model, x, model_owner="bank", data_owner="clinic", batch_size=batch, approximations=mode)


def _model(mode: str, owner: bool) -> torch.nn.Module:
    model = digits_vit().eval()
    if owner:
        model.load_state_dict(torch.load(WEIGHTS[mode], weights_only=True))
    return model


def party(args: argparse.Namespace) -> None:
    with mpcfl.join() as me:
        truncation.set_mode(args.truncation)
        clinic = me.name == "clinic"
        models = {mode: _model(mode, me.name == "bank") for mode in args.modes}
        images = torch.from_numpy(np.load(IMAGES / "clinic_inputs.npy")) if clinic else None
        secure, whole = {}, {}
        for mode, model in models.items():
            started = time.perf_counter()
            secure[mode] = _predict(model, images, args.batch, mode)
            whole[mode] = time.perf_counter() - started
        x = images[: args.batch] if clinic else None
        shape = (args.batch, 64)
        runs = {mode: (lambda m=model, mode=mode: _predict(m, x, args.batch, mode)) for mode, model in models.items()}
        raw = _model("exact", me.name == "bank")
        try:  # CrypTen's converter runs locally (ONNX export) before any message: every party fails alike
            raw_crypten_batch(raw, x, shape, "cpu")
            runs["raw CrypTen"] = lambda: raw_crypten_batch(raw, x, shape, "cpu")
            raw_error = None
        except Exception as err:  # report whatever CrypTen raises: that is the result
            raw_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        timed = measure_alternating(runs, args.repeats)
    if not clinic:
        return
    labels = np.load(IMAGES / "clinic_labels.npy")
    print(f"\nViT digits (2x2 patches, 2 layers, width 32), {len(labels)} images, 2 parties + TTP dealer, "
          f"{torch.get_num_threads()} thread(s) per party, truncation {args.truncation}")
    for mode in args.modes:
        with torch.no_grad():  # the clinic scores against the plaintext model here only
            plain = emulate(_model(mode, True), images, mode)
        ours, theirs = secure[mode].argmax(1).numpy(), plain.argmax(1).numpy()
        print(f"{mode}: plaintext accuracy {np.mean(theirs == labels):.4f}, secure accuracy {np.mean(ours == labels):.4f}, "
              f"classes agree on {np.mean(ours == theirs):.2%}, largest logit difference "
              f"{(secure[mode] - plain).abs().max().item():.3g}; all {len(labels)} images in {whole[mode]:.1f} s")
    print("| way | s/batch | MB/batch | rounds/batch |")
    print("|---|---|---|---|")
    for name, row in timed.items():
        print(f"| {name} (batch {args.batch}) | {row['seconds']:.2f} | {row['bytes'] / 1e6:.1f} | {row['rounds']:.0f} |")
    if raw_error:
        print(f"raw CrypTen (crypten.nn.from_pytorch) fails: {raw_error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--truncation", choices=("local", "dealer"), default="local")
    parser.add_argument("--modes", nargs="+", choices=list(WEIGHTS), default=list(WEIGHTS))
    args = parser.parse_args()
    if os.environ.get("MPCFL_PARTY"):
        party(args)
        return 0
    return launch_script([os.path.abspath(__file__), *sys.argv[1:]], parties=PARTIES, timeout_s=600)


if __name__ == "__main__":
    sys.exit(main())
