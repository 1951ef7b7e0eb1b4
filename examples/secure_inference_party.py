"""Secure inference from your own party script: one copy runs per party.

    mpcfl launch --parties bank,clinic examples/secure_inference_party.py

`mpcfl launch` starts this script once as `bank`, once as `clinic`, plus the
dealer, each with its role in the environment; on separate hosts, start each
copy yourself with MPCFL_PARTIES, MPCFL_PARTY, RANK, WORLD_SIZE and RENDEZVOUS
set. Each process reads only its own files: the bank its weights, the clinic its
inputs. Only the clinic receives the predictions.
"""

from pathlib import Path

import numpy as np
import torch

import mpcfl
from mpcfl.models.zoo import digits_mlp

DATA = Path(__file__).resolve().parent / "data" / "digits_inference"

with mpcfl.join() as me:
    model = digits_mlp()  # the architecture is public: every party builds it
    inputs = None
    if me.name == "bank":
        model.load_state_dict(torch.load(DATA / "bank_weights.pt", weights_only=True))
    if me.name == "clinic":
        inputs = torch.from_numpy(np.load(DATA / "clinic_inputs.npy"))
    predictions = mpcfl.secure_predict(model, inputs, model_owner="bank", data_owner="clinic")

if me.name == "clinic":
    labels = np.load(DATA / "clinic_labels.npy")
    print(f"clinic: {len(predictions)} predictions, accuracy {(predictions.argmax(1).numpy() == labels).mean():.4f}")
else:
    print(f"{me.name}: done; predictions went to the clinic only (received: {predictions})")
