"""Comparisons in real processes: run by both parties under ``mpcfl launch --parties p0,p1``.

Each party compares the same secret values with zero through CrypTen's public API
(``x < 0``, ``relu``), which the patched ``_ltz`` serves from :mod:`mpcfl.mpc.comparison`,
and through crypten 0.4.1's own ``_ltz`` (kept as ``__wrapped__``). It prints whether both
match plaintext, the shapes (empty tensors included), and the bytes each way sent. Under the spy of ``tests/spy`` it
records its own share (``own``), for the test to look for at the peer and the dealer.
"""

import torch

import mpcfl
import sitecustomize
from mpcfl.mpc import comparison
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import communication_stats

EDGES = [0.0, 2.0**-16, -(2.0**-16), 0.5, -0.5, 1e4, -1e4, 2.0**40, -(2.0**40), 2.0**46, -(2.0**46)]


def sent() -> int:
    return communication_stats()["bytes"]


with mpcfl.join() as me:
    crypten = import_crypten()
    generator = torch.Generator().manual_seed(5)  # the same public test values at both parties
    scales = 10.0 ** torch.randint(-4, 9, (4099,), generator=generator)
    plain = torch.cat([torch.tensor(EDGES), torch.randn(4099, generator=generator) * scales])
    x = crypten.cryptensor(plain, src=0)
    sitecustomize._records["own"].append(("share", x._tensor.share.clone()))
    before = sent()
    sitecustomize.phase("compare")  # the test reads this phase's messages
    less = x < 0
    sitecustomize.phase("protocol")
    ours_bytes = sent() - before
    ours = less.get_plain_text()
    before = sent()
    theirs = crypten.mpc.MPCTensor._ltz.__wrapped__(x).get_plain_text()
    theirs_bytes = sent() - before
    truth = (x.encoder.encode(plain) < 0).float()  # values below 2^-16 in size encode to 0
    cube = crypten.cryptensor(plain[:60].reshape(3, 4, 5), src=1)
    relu = cube.relu().get_plain_text()
    scalar = (crypten.cryptensor(torch.tensor(-3.0), src=0) < 0).get_plain_text()
    # No message and no dealer request: the dealer refuses empty sizes (a product of an empty
    # tensor, e.g. its relu, still ends the session).
    empty = tuple((crypten.cryptensor(torch.empty(3, 0), src=0) < 0).get_plain_text().shape)
    # The sigmoid runs in lockstep between two parties only (mpcfl.mpc.logistic): 8 rounds fewer there,
    # crypten's own rounds with more parties.
    logits = x[:50]
    started = communication_stats()["rounds"]
    logits.sigmoid()
    middle = communication_stats()["rounds"]
    crypten.mpc.MPCTensor.sigmoid.__wrapped__(logits)
    sigmoid_rounds = (middle - started, communication_stats()["rounds"] - middle)
    # Past comparison.CHUNK elements a comparison runs in pieces (a public split, alike at every party):
    # a smaller CHUNK, the same at each party, puts the 4,110 values into 5 pieces, the last one short.
    saved, comparison.CHUNK = comparison.CHUNK, 1000
    pieces = torch.equal((x < 0).get_plain_text(), truth)
    comparison.CHUNK = saved
    print(
        f"comparison party {me.rank}: exact={torch.equal(ours, truth)} crypten_exact={torch.equal(theirs, truth)} "
        f"relu={torch.allclose(relu, plain[:60].reshape(3, 4, 5).relu(), atol=1e-4, rtol=1e-6)} "
        f"shapes={tuple(relu.shape)},{tuple(scalar.shape)} scalar={scalar.item()} empty={empty} "
        f"pieces={pieces} sigmoid_rounds={sigmoid_rounds[0]},{sigmoid_rounds[1]} bytes={ours_bytes},{theirs_bytes}",
        flush=True,
    )
