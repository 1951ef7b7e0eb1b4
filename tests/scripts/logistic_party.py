"""CrypTen's sigmoid in lockstep (:mod:`mpcfl.mpc.logistic`) in real processes: run by both parties
under ``mpcfl launch --parties p0,p1``.

Each party takes the sigmoid of the same secret values through CrypTen's public API (``x.sigmoid()``,
which the patch serves from mpcfl.mpc.logistic) and through crypten 0.4.1's own (kept as
``__wrapped__``), and prints both errors against torch, and the rounds and bytes each took. Under the
spy of ``tests/spy`` it records its own share of x (``own``), for the test to look for elsewhere.
"""

import torch

import mpcfl
import sitecustomize
from mpcfl.mpc import comparison
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import communication_stats

with mpcfl.join() as me:
    crypten = import_crypten()
    generator = torch.Generator().manual_seed(7)  # the same public test values at both parties
    # Both signs, zero, the range where one of exp(x) and exp(-x) wraps the ring (|x| > ~32), up to 400.
    plain = torch.cat([torch.linspace(-60, 60, 2401), torch.tensor([0.0, 33.0, -33.0, 400.0, -400.0]),
                       torch.randn(1000, generator=generator) * 8])
    x = crypten.cryptensor(plain, src=0)
    sitecustomize._records["own"].append(("share", x._tensor.share.clone()))
    before = communication_stats()
    ours = x.sigmoid()
    middle = communication_stats()
    theirs = crypten.mpc.MPCTensor.sigmoid.__wrapped__(x)
    after = communication_stats()
    truth = torch.sigmoid(plain)
    ours_error = float((ours.get_plain_text() - truth).abs().max())
    theirs_error = float((theirs.get_plain_text() - truth).abs().max())
    # Through autograd and tanh too (tanh(x) = 2 sigmoid(2x) - 1 in crypten), on a small grid.
    small = torch.linspace(-4, 4, 33)
    w = crypten.cryptensor(small, src=1, requires_grad=True)
    w.sigmoid().sum().backward()
    grad_error = float((w.grad.get_plain_text() - torch.sigmoid(small) * (1 - torch.sigmoid(small))).abs().max())
    tanh_error = float((crypten.cryptensor(small, src=0).tanh().get_plain_text() - torch.tanh(small)).abs().max())
    # Past comparison.CHUNK elements (set small here, alike at both parties) crypten's own sigmoid runs:
    # the same values, in its own rounds (the stacked squarings would double the dealer's largest request).
    saved, comparison.CHUNK = comparison.CHUNK, 1024
    started = communication_stats()["rounds"]
    big = x.sigmoid()
    big_rounds = communication_stats()["rounds"] - started
    comparison.CHUNK = saved
    big_error = float((big.get_plain_text() - truth).abs().max())
    # An empty batch: no opening, no dealer request (the dealer refuses empty sizes and ends the session).
    empty = tuple(crypten.cryptensor(torch.empty(0, 3), src=0).sigmoid().get_plain_text().shape)
    print(
        f"logistic party {me.rank}: ours_error={ours_error:.5f} theirs_error={theirs_error:.5f} "
        f"grad_error={grad_error:.5f} tanh_error={tanh_error:.5f} empty={empty} big_error={big_error:.5f} big_rounds={big_rounds} "
        f"rounds={middle['rounds'] - before['rounds']},{after['rounds'] - middle['rounds']} "
        f"bytes={middle['bytes'] - before['bytes']},{after['bytes'] - middle['bytes']}",
        flush=True,
    )
