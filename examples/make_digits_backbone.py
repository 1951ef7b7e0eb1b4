"""Private fine-tuning's example data and public backbone (``configs/digits_finetune.yaml``).

The UCI 8x8 digits are split by rows, stratified by digit: a PUBLIC third, on which a small MLP
(``examples/models/digits_backbone.py`` plus a 10-way linear layer) is trained in plaintext here,
and the rest, private, split between two clinics (train and test each). Its first layers, frozen,
are the public backbone (``examples/models/digits_backbone.pt``, a state dict); a finetuning job
trains only a new head on the clinics' private rows under MPC. Pixels are scaled from 0..16 to
[0, 1], a public constant.

Run from anywhere: ``python examples/make_digits_backbone.py``. The output is deterministic (seeded,
single-threaded) and committed under examples/data/digits_finetune/ and examples/models/.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "digits8x8.csv"
OUT = HERE / "data" / "digits_finetune"
WEIGHTS = HERE / "models" / "digits_backbone.pt"
CLINICS = ("clinic_a", "clinic_b")
PUBLIC_FRACTION, TEST_FRACTION = 1 / 3, 0.2  # of all rows; the test rows are private
SEED = 0


def _backbone() -> nn.Module:
    spec = importlib.util.spec_from_file_location("digits_backbone", HERE / "models" / "digits_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits_backbone()


def _write(path: Path, header: list[str], values: np.ndarray) -> None:
    np.savetxt(path, values, delimiter=",", header=",".join(header), comments="",
               fmt=["%.4g"] * (len(header) - 1) + ["%d"])


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    header = SOURCE.read_text(encoding="utf-8").splitlines()[0].split(",")
    data = np.loadtxt(SOURCE, delimiter=",", skiprows=1)
    data[:, :-1] /= 16.0
    labels = data[:, -1].astype(int)
    rng = np.random.default_rng(SEED)
    role = np.full(len(data), "train", dtype=object)
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        public, test = round(len(members) * PUBLIC_FRACTION), round(len(members) * TEST_FRACTION)
        role[members[:public]] = "public"
        role[members[public:public + test]] = "test"
    OUT.mkdir(parents=True, exist_ok=True)
    _write(OUT / "public.csv", header, data[role == "public"])
    for which in ("train", "test"):
        rows = rng.permutation(np.flatnonzero(role == which))
        for clinic, mine in zip(CLINICS, np.array_split(rows, len(CLINICS))):
            _write(OUT / f"{clinic}_{which}.csv", header, data[np.sort(mine)])
    public = data[role == "public"]
    x, y = torch.tensor(public[:, :-1], dtype=torch.float32), torch.tensor(public[:, -1], dtype=torch.long)
    backbone = _backbone()
    model = nn.Sequential(backbone, nn.Linear(backbone[-2].out_features, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):  # full batch: a few hundred rows
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    torch.save(backbone.state_dict(), WEIGHTS)
    print(f"wrote {OUT}: {len(public)} public rows (backbone trained on them, loss {loss.item():.3f}), "
          f"{int((role == 'train').sum())} private train and {int((role == 'test').sum())} test rows split "
          f"between {len(CLINICS)} clinics; backbone weights {WEIGHTS}")


if __name__ == "__main__":
    main()
