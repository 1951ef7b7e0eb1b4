"""Party script for tests/dp/test_clipping.py, started by `mpcfl launch` with two parties and the
dealer: DP-SGD's per-example clip on real shares, one row at a time, for the review's 30-16-1 MLP
with every weight at +-dp.weight_bound and inputs at +-data.max_abs (the case whose clipped
gradients came back with norms of 1e10). Rank 0 writes each example's clipped norm to argv[1]."""

import math
import sys
from pathlib import Path

import numpy as np
import torch

import mpcfl
from mpcfl.dp.clipping import clipped_gradient_sum
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.heads import head_of
from mpcfl.models.sigmoid import clamp_symmetric
from mpcfl.models.spec import ModelSpec
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import Disclosure, reveal

WEIGHT_BOUND, MAX_ABS, CLIP, ROWS = 4.0, 4.0, 1.0, 6

spec = ModelSpec(type="mlp", hidden=[16])
model = build_torch_model(spec, n_features=30, seed=0)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for param in model.parameters():  # public here: the test's adversary chooses them
        param.copy_(WEIGHT_BOUND * torch.sign(torch.rand(param.shape, generator=generator) - 0.25))
x = MAX_ABS * (2 * torch.rand(ROWS, 30, generator=generator) - 1)
x[0] = MAX_ABS * torch.sign(model[0].weight[0])  # logits far past the sigmoid's +-500
with torch.no_grad():
    y = (model(x) < 0).float()
with mpcfl.join() as me, Disclosure(None):
    crypten = import_crypten()
    secure = to_crypten(model).encrypt(src=0)
    norms = []
    for i in range(ROWS):
        with crypten.no_grad():
            sums = clipped_gradient_sum(
                secure, model, crypten.cryptensor(x[i : i + 1], src=1), crypten.cryptensor(y[i : i + 1], src=1),
                clip=CLIP, output_error=head_of(spec).output_error, clamp=clamp_symmetric, stack=crypten.stack,
            )
        opened = [reveal(v, to=[0], what="clip test") for v in sums.values()]
        if me.rank == 0:
            norms.append(math.sqrt(sum(float((v.double() ** 2).sum()) for v in opened)))
    if me.rank == 0:
        np.save(Path(sys.argv[1]) / "norms.npy", np.array(norms))
