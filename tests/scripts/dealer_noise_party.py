"""Party script for tests/dp/test_dp.py, started by `mpcfl launch` (TTP: with a dealer process): DP noise
the dealer draws.

Writes into the folder given as argv[1]:
- through.npy (rank 0): the noise revealed through `reveal(..., privacy=Privacy(..., source="dealer"))`
  on a vector of zeros;
- own_<party>.npy: this party's share (ring units) of a second dealer draw, and total.npy (rank 0):
  that draw revealed, in ring units.
"""

import sys
from pathlib import Path

import numpy as np
import torch

import mpcfl
from mpcfl.dp import Budget, Charge
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import Disclosure, Privacy, reveal

OUT = Path(sys.argv[1])
N, SIGMA = 20000, 0.5

with mpcfl.join() as me, Disclosure(Budget.create(epsilon=10.0, delta=1e-5, accountant="rdp")):
    crypten = import_crypten()
    zeros = crypten.cryptensor(torch.zeros(N), src=0)
    through = reveal(zeros, to=[0], what="dealer noise", privacy=Privacy(Charge("gaussian", 2.0, 1), scale=SIGMA, source="dealer"))
    manual = crypten.cryptensor(torch.zeros(N), src=0)
    own = crypten.mpc.get_default_provider().generate_noise((N,), float((SIGMA * manual.encoder.scale) ** 2))
    manual.share = manual.share + own
    total = reveal(manual, to=[0], what="manual dealer noise", privacy=Privacy(Charge("gaussian", 50.0, 1)))
    np.save(OUT / f"own_{me.name}.npy", own.numpy())
    if me.rank == 0:
        np.save(OUT / "through.npy", through.numpy())
        np.save(OUT / "total.npy", total.numpy() * manual.encoder.scale)
