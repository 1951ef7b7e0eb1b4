"""Division of shares by public integers in real processes: run by every party under
``mpcfl launch --parties p0,p1[,p2]``.

Party 0 shares N ring values spread over (-2^62, 2^62) (edges included), and every party
divides them by D in each truncation mode (:mod:`mpcfl.mpc.truncation`): ``local`` (crypten's
own, which errs on about |x| / 2^64 of the entries) and ``dealer`` (truncation pairs), then
``auto``. It prints, per mode, the worst distance from floor(x / D) in ring units, how many
entries are off by more than 2, and the rounds and bytes the division took; then the worst
error of a fixed-point product under dealer mode, against plaintext. Under the spy of
``tests/spy`` it records the values divided and its share of them (``own``), for the test to look
for at the dealer.
"""

import json

import torch

import mpcfl
import sitecustomize
from mpcfl.mpc import truncation
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import communication_stats

N, D = 4096, 1 << 16
LIMIT = (1 << 62) - 1
EDGES = [0, 1, -1, D - 1, -D, D, LIMIT, -LIMIT, LIMIT - D, -LIMIT + D]

with mpcfl.join() as me:
    crypten = import_crypten()
    shares = crypten.mpc.primitives.ArithmeticSharedTensor
    generator = torch.Generator().manual_seed(7)  # the same public test values at every party
    plain = torch.cat([torch.tensor(EDGES), torch.randint(-LIMIT, LIMIT, (N - len(EDGES),), generator=generator)])
    exact = plain.div(D, rounding_mode="floor")
    sitecustomize._records["own"].append(("plain", plain.clone()))
    report = {}
    for mode in ("local", "dealer", "auto"):
        truncation.set_mode(mode)
        x = shares(plain, precision=0, src=0)
        sitecustomize._records["own"].append(("share", x.share.clone()))
        before = communication_stats()
        divided = x.div_(D)
        after = communication_stats()
        error = (divided.reveal() - exact).abs()
        report[mode] = {
            "worst": int(error.max()), "wrong": int((error > 2).sum()),
            "rounds": after["rounds"] - before["rounds"], "bytes": after["bytes"] - before["bytes"],
        }
    truncation.set_mode("dealer")
    # Factors in (-8, 8) that fixed point holds exactly, so the error is the truncation's alone
    # (the decoded float32 holds the product to 2^-18).
    a, b = (torch.randint(-(1 << 19), 1 << 19, (N,), generator=generator) / 2**16 for _ in range(2))
    product = (crypten.cryptensor(a, src=0) * crypten.cryptensor(b, src=1)).get_plain_text()
    report["product"] = float((product.double() - a.double() * b.double()).abs().max() * 2**16)  # in fixed-point units
    print(f"truncation party {me.rank}: {json.dumps(report)}", flush=True)
