"""Mask reuse on fixed data in real processes: run by every party under ``mpcfl launch --parties p0,p1``.

X (N x D: p0's columns, then p1's; values up to 100, so their ring encodings are telling)
is shared and fixed once (:func:`mpcfl.mpc.fixed_mask.fix`); then STEPS SGD steps of
linear regression go through CrypTen's autograd (forward X[rows]·w, backward X[rows]ᵀ·g),
first on all rows, then on a batch of rows, and the same steps again on ordinary triples
(``x[rows]``, not fixed). Each party prints the bytes it sent and received for the fix and
for each fixed step, how far the fixed steps' gradients are from plaintext's, and how far
the two trained weights are apart, in fixed-point units (2^-16). Under
the spy of ``tests/spy`` it records its share of X, its part of E = X - A and the opened E (``own``), for
the test to look for at the dealer.
"""

import contextlib
import json

import numpy as np
import torch

import mpcfl
import sitecustomize
from mpcfl.mpc import fixed_mask
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.providers.ttp import prefetched
from mpcfl.mpc.providers.ttp.party import _prefetch
from mpcfl.mpc.session import communication_stats, session_device

N, D, STEPS, LR = 512, 16, 3, 2.0**-14  # a learning rate fixed point holds exactly
X = np.random.default_rng(11).uniform(-100, 100, size=(N, D))
Y = np.random.default_rng(12).uniform(-1, 1, size=(N, 1))
W = np.random.default_rng(13).uniform(-0.01, 0.01, size=(1, D))
BATCH = np.random.default_rng(14).permutation(N)[:256]


def sent() -> int:
    return communication_stats()["bytes"]


with mpcfl.join() as me:
    crypten = import_crypten()
    device = session_device()  # mpcfl launch --device
    half = D // 2
    mine = torch.from_numpy(X[:, :half] if me.rank == 0 else X[:, half:]).float()
    x = crypten.cat([crypten.cryptensor(mine if me.rank == r else torch.zeros(N, half), src=r, device=device) for r in (0, 1)], dim=1)
    y = crypten.cryptensor(torch.from_numpy(Y).float(), src=1, device=device)
    sitecustomize._records["own"].append(("share", x._tensor.share.data.cpu().clone()))
    before = sent()
    fixed = fixed_mask.fix(x, fixed_mask.binding("fixed_mask_party", N, D))
    costs = {"fix": sent() - before, "steps": []}
    mask = vars(x)["_mpcfl_fixed_mask"].mask
    sitecustomize._records["own"].append(("opened", mask.opened.data.cpu().clone()))
    pad = getattr(mask.share, "share", mask.share)  # this party's share of A (+ E at party 0)
    if me.rank == 0:
        pad = pad - mask.opened.data
    sitecustomize._records["own"].append(("masked", (x._tensor.share.data - pad.data).cpu().clone()))  # its part of E
    # The same training twice, from the same weights: on the fixed x, and on ordinary triples.
    layers = []
    for _ in range(2):
        layer = crypten.nn.Linear(D, 1, bias=False)
        layer.set_parameter("weight", torch.from_numpy(W).float())
        layer.encrypt(src=0).to(device)
        layer.train()
        layers.append(layer)
    plain, worst = W.copy(), 0.0
    for index in [None] * STEPS + [BATCH] * STEPS:
        rows = (torch.arange(N) if index is None else torch.from_numpy(index)).to(device)
        for layer, data in zip(layers, (fixed_mask.rows(x, rows), x[rows])):
            before = sent()
            # The fixed steps' triples come prefetched after the first of each size, as in training.
            with prefetched(("fixed", len(rows))) if layer is layers[0] else contextlib.nullcontext():
                layer.zero_grad()
                out = layer(data)
                with crypten.no_grad():
                    error = (out - y[rows]).div(len(rows))
                out.backward(error)
            if layer is layers[0]:
                costs["steps"].append(sent() - before)
                grad = layer.weight.grad.get_plain_text().double().cpu().numpy()
            layer.update_parameters(LR, grad_threshold=None)  # its default zeroes gradients above 100
        xr, yr = X[rows.cpu().numpy()], Y[rows.cpu().numpy()]
        expected = (xr.T @ (xr @ plain.T - yr) / len(rows)).T
        worst = max(worst, float(np.abs(grad - expected).max() / np.abs(expected).max()))
        plain -= LR * expected
    reused, ordinary = (layer.weight.get_plain_text().double().cpu().numpy() for layer in layers)
    apart = float(np.abs(reused - ordinary).max() * 2**16)  # in fixed-point units
    print(
        f"fixed mask party {me.rank} on {device.type}: fixed={fixed} worst={worst:.2e} apart={apart:.0f} "
        f"prefetch={json.dumps(dict(_prefetch.stats))} costs={json.dumps(costs)}",
        flush=True,
    )
