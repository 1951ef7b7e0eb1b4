"""Two secure_predict calls of three batches each in one session, run by p0 (model owner) and p1
(data owner) under ``mpcfl launch``: each call fixes the weights' masks and releases them, so the
second call fixes under the same bindings and its first batch is served from the first call's
prefetch recording. Each party prints the prefetch statistics, the masks the dealer keeps after
each call, the bytes each call sent and, on p1, how far the predictions are from plaintext.
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
    kept, sent, error = [], [], 0.0
    for reuse in (True, True, False):
        before = communication_stats()["bytes"]
        out = mpcfl.secure_predict(MODEL, INPUTS if me.rank == 1 else None, model_owner="p0", data_owner="p1",
                                   batch_size=3, mask_reuse=reuse)
        sent.append(communication_stats()["bytes"] - before)
        kept.append(provider.fixed_mask_room()[0])
        if out is not None:
            with torch.no_grad():
                error = max(error, float((out - MODEL(INPUTS)).abs().max()))
    print(f"serve twice party {me.rank}: kept={kept} sent={json.dumps(sent)} error={error:.2e} "
          f"stats={dict(sorted(_prefetch.stats.items()))}", flush=True)
