"""Secure inference in one call, everything on this machine (for trying things out).

    python examples/secure_inference_local.py

`mpcfl.secure_predict_local` forks a model-owner process and a dealer, plays the
data owner itself, and returns the predictions computed under MPC.
"""

from pathlib import Path

import numpy as np
import torch

import mpcfl
from mpcfl.models.zoo import digits_mlp

DATA = Path(__file__).resolve().parent / "data" / "digits_inference"

model = digits_mlp()
model.load_state_dict(torch.load(DATA / "bank_weights.pt", weights_only=True))
model.eval()
inputs = torch.from_numpy(np.load(DATA / "clinic_inputs.npy"))
labels = np.load(DATA / "clinic_labels.npy")

secure = mpcfl.secure_predict_local(model, inputs)
with torch.no_grad():
    plain = model(inputs)

print(f"max |secure - plaintext| = {(secure - plain).abs().max():.2e}")
print(f"accuracy: secure {(secure.argmax(1).numpy() == labels).mean():.4f}, "
      f"plaintext {(plain.argmax(1).numpy() == labels).mean():.4f}")
