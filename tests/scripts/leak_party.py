"""A party script for the confidentiality tests: opens values toward the last party only.

Run with ``mpcfl launch --parties p0,...,pK tests/scripts/leak_party.py`` and the spy of
``tests/spy`` on PYTHONPATH. Through mpcfl's chokepoint it opens, to the last
party only: an arithmetic share, a binary share, and secure-inference
predictions (model owned by p0). Tagged ``everyone``, it opens another value to every
party. Then, tagged ``control``, it opens the first arithmetic value with a plain gloo reduce,
as CrypTen does, and toward the last party and toward every party without
:func:`~mpcfl.mpc.reveal.reveal`'s fresh zero-sharing, to show the spy sees such leaks.
"""

import numpy as np
import torch
import torch.distributed as dist

import mpcfl
import sitecustomize
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal

SECRET = np.random.default_rng(7).uniform(-1000, 1000, size=1000)
SHARED = np.random.default_rng(8).uniform(-1000, 1000, size=1000)  # opened to every party

with mpcfl.join() as me:
    crypten = import_crypten()
    last = me.session.world_size - 1
    receiver = me.rank == last
    x = crypten.cryptensor(torch.from_numpy(SECRET) if me.rank == 0 else torch.zeros(1000), src=0)
    sitecustomize._records["own"].append(("protocol", x._tensor.share.clone()))  # for the test to look for elsewhere
    arithmetic = reveal(x, to=[last], what="arithmetic")
    x_binary = x.to(crypten.mpc.binary)
    sitecustomize._records["own"].append(("protocol", x_binary._tensor.share.clone()))
    binary = reveal(x_binary, to=[last], what="binary")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    inputs = torch.randn(32, 8) * 10 if receiver else None
    owner, data_owner = me.session.parties[0], me.session.parties[last]
    predictions = mpcfl.secure_predict(model, inputs, model_owner=owner, data_owner=data_owner)

    sitecustomize.phase("everyone")
    y = crypten.cryptensor(torch.from_numpy(SHARED) if me.rank == 0 else torch.zeros(1000), src=0)
    sitecustomize._records["own"].append(("everyone", y._tensor.share.clone()))
    together = reveal(y, to=list(range(me.session.world_size)), what="to every party")

    sitecustomize.phase("control")
    ring = x._tensor.share.clone()
    with sitecustomize.opening():
        dist.reduce(ring, last, group=crypten.comm.get().main_group)  # gloo's ring reduce: what CrypTen's get_plain_text(dst=) does
    x._tensor.reveal(dst=last)  # point-to-point, but without reveal's fresh zero-sharing: the shares as they stand
    x._tensor.reveal()  # toward every party (the exchange), the same

assert np.allclose(together.numpy(), SHARED, atol=1e-3), "the reveal to every party is wrong"
if receiver:
    assert np.allclose(arithmetic.numpy(), SECRET, atol=1e-3), f"arithmetic reveal is wrong: {np.abs(arithmetic.numpy() - SECRET).max()} {arithmetic.dtype} {arithmetic.shape}"
    assert np.allclose(binary.numpy(), SECRET, atol=1e-3), "binary reveal is wrong"
    expected = model(inputs).detach()
    assert torch.allclose(predictions, expected, atol=5e-2), "predictions are wrong"
    sitecustomize._records["opened"].append(("control", ring))
    print("receiver: all values correct")
else:
    assert arithmetic is None and binary is None and predictions is None
    print(f"{me.name}: received nothing")
