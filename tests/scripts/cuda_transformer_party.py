"""Transformers on the session's device, run by every party under
``mpcfl launch --device cuda --parties p0,p1,p2`` (tests/tasks/test_cuda.py; ``--device cpu`` runs it
anywhere).

1. Division of shares by 2^16 (the truncation after every fixed-point product) of 4,096 values up to
   2^62, in modes ``local`` (CrypTen's own) and ``dealer`` (:mod:`mpcfl.mpc.truncation`), the shares on
   the device: how many entries are off by more than 2 units, and where the quotient's share lives.
2. A Hugging Face BERT classifier (tiny config, random weights from a seed every party shares; p0's are
   the ones used) served from p0 to p1's token ids, ``exact`` and ``mpc_friendly``: p1's largest
   difference from HF's float forward (exact) and from the plaintext emulation (friendly).

Each party prints ``cuda party RANK: {json}``.
"""

import json

import torch

import mpcfl
from mpcfl.models.convert import emulate
from mpcfl.mpc import truncation
from mpcfl.mpc.device import to_host
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import session_device

N, D = 4096, 1 << 16
LIMIT = (1 << 62) - 1

with mpcfl.join() as me:
    crypten = import_crypten()
    device = session_device()
    report: dict = {"device": str(device)}
    generator = torch.Generator().manual_seed(7)  # the same public test values at every party
    plain = torch.randint(-LIMIT, LIMIT, (N,), generator=generator)
    exact = plain.div(D, rounding_mode="floor")
    for mode in ("local", "dealer"):
        truncation.set_mode(mode)
        x = crypten.mpc.primitives.ArithmeticSharedTensor(plain.to(device), precision=0, src=0, device=device)
        divided = x.div_(D)
        error = (to_host(divided.reveal()) - exact).abs()
        report[mode] = {"wrong": int((error > 2).sum()), "share_on": divided.share.device.type}
    truncation.set_mode("auto")

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3, initializer_range=0.1)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 40, (4, 8)) if me.name == "p1" else None
    for mode in ("exact", "mpc_friendly"):
        logits = mpcfl.secure_predict(model, None if ids is None else ids.float(), model_owner="p0", data_owner="p1",
                                      batch_size=4, approximations=mode)
        if ids is not None:
            with torch.no_grad():
                expected = model(ids).logits if mode == "exact" else emulate(model, ids.float(), mode)
            report[f"bert_{mode}"] = {"error": float((logits - expected).abs().max()), "on": logits.device.type}
    print(f"cuda party {me.rank}: {json.dumps(report)}", flush=True)
