"""Party script for tests/test_dp.py, started by `mpcfl launch`: joint noise on real processes.

Writes into the folder given as argv[1], one file per party:
- total_<party>.npy (rank 0 only): the noise revealed through `reveal(..., privacy=...)`
  on a vector of zeros, and the total of the parties' manual shares revealed plainly;
- own_<party>.npy: this party's own share in the manual round;
- refused_<party>.txt: the message of the reveal refused by the budget.
"""

import sys
from pathlib import Path

import numpy as np
import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten
from mpcfl.dp import Budget, BudgetExceeded, Charge
from mpcfl.dp.noise import add_noise_share, share_variance, skellam
from mpcfl.mpc.prng import numpy_generator
from mpcfl.mpc.reveal import Disclosure, Privacy, reveal

OUT = Path(sys.argv[1])
N, SIGMA, COLLUDERS = 20000, 0.5, 1

budget = Budget.create(epsilon=10.0, delta=1e-5, accountant="rdp")
with mpcfl.join() as me, Disclosure(budget):
    crypten = import_crypten()
    world = me.session.world_size
    # A: noise through the chokepoint, charged to the budget.
    zeros = crypten.cryptensor(torch.zeros(N), src=0)
    charge = Charge("gaussian", 2.0, 1)
    through = reveal(zeros, to=[0], what="noise test", privacy=Privacy(charge, scale=SIGMA, colluders=COLLUDERS))
    # B: the same mechanism by hand, keeping this party's own share.
    manual = crypten.cryptensor(torch.zeros(N), src=0)
    variance = share_variance(SIGMA, parties=world, colluders=COLLUDERS, scale=manual.encoder.scale)
    own = skellam((N,), variance, numpy_generator())
    add_noise_share(manual, own)
    total = reveal(manual, to=[0], what="manual noise test", privacy=Privacy(Charge("gaussian", 50.0, 1)))
    np.save(OUT / f"own_{me.name}.npy", own)
    # C: a reveal past the budget is refused before anything opens.
    try:
        reveal(zeros, to=[0], what="too expensive", privacy=Privacy(Charge("gaussian", 0.1, 100)))
        (OUT / f"refused_{me.name}.txt").write_text("NOT REFUSED")
    except BudgetExceeded as err:
        (OUT / f"refused_{me.name}.txt").write_text(str(err))
    if me.rank == 0:
        np.save(OUT / f"through_{me.name}.npy", through.numpy())
        np.save(OUT / f"total_{me.name}.npy", total.numpy())
        (OUT / "ledger.txt").write_text(repr([entry["what"] for entry in budget.ledger]))
