"""Serving in one session, run by p0 (model owner) and p1 (data owner) under ``mpcfl launch``:
two secure_predict calls of three batches each (each call fixes the weights' masks and releases
them, so the second fixes under the same bindings and is prefetched from the first's recording),
one without mask reuse, then ``mpcfl.serve`` for two calls (the weights shared and fixed once), then
one served call with the roles swapped (p1 owns the model).
Each party prints the masks the dealer keeps after each call, the bytes each call moved, the
prefetch statistics and, on p1, how far the predictions are from plaintext.
"""

import json

import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.providers.ttp.party import _prefetch
from mpcfl.mpc.session import communication_stats

torch.manual_seed(0)
MODEL = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
INPUTS = torch.randn(9, 12)

with mpcfl.join() as me:
    provider = import_crypten().mpc.get_default_provider()
    mine = INPUTS if me.rank == 1 else None
    kept, moved, error = [], [], 0.0

    def measured(call):
        global error
        before = communication_stats()["bytes"]
        out = call()
        moved.append(communication_stats()["bytes"] - before)
        kept.append(len(provider.fixed_mask_room()[0]))
        if out is not None:
            with torch.no_grad():
                error = max(error, float((out - MODEL(INPUTS)).abs().max()))

    for reuse in (True, True, False):
        measured(lambda: mpcfl.secure_predict(MODEL, mine, model_owner="p0", data_owner="p1", batch_size=3,
                                              mask_reuse=reuse))
    with mpcfl.serve(MODEL, model_owner="p0", data_owner="p1") as served:
        for _ in range(2):
            measured(lambda: served(mine, batch_size=3))
    kept.append(len(provider.fixed_mask_room()[0]))
    stats = dict(sorted(_prefetch.stats.items()))
    # The model owner at rank 1: its one-sided products' b is drawn by rank 0, which asks the dealer.
    with mpcfl.serve(MODEL, model_owner="p1", data_owner="p0") as swapped:
        out = swapped(INPUTS if me.rank == 0 else None, batch_size=3)
    with torch.no_grad():
        swapped_error = None if out is None else float((out - MODEL(INPUTS)).abs().max())
    print(f"serve twice party {me.rank}: kept={kept} moved={json.dumps(moved)} error={error:.2e} "
          f"stats={stats} swapped={swapped_error}", flush=True)
