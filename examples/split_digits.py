"""Splits the UCI 8x8 digits by rows between two clinics, for ``configs/digits_cnn.yaml``.

A horizontal partition: each clinic holds its own images (64 pixel columns, scaled
from 0..16 to [0, 1], a public constant, so no statistics of the rows are needed)
and their digit (``target``). A stratified 20% of all rows is held out as test data,
split between the clinics the same way as the training rows.

Run from anywhere: ``python examples/split_digits.py``. The output is deterministic and
committed under examples/data/digits_cnn/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "digits8x8.csv"
OUT = HERE / "data" / "digits_cnn"
CLINICS = ("clinic_a", "clinic_b")
TEST_FRACTION = 0.2
SEED = 0


def main() -> None:
    header = SOURCE.read_text(encoding="utf-8").splitlines()[0].split(",")
    data = np.loadtxt(SOURCE, delimiter=",", skiprows=1)
    labels = data[:, -1].astype(int)
    rng = np.random.default_rng(SEED)
    test = np.zeros(len(data), dtype=bool)
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[: round(len(members) * TEST_FRACTION)]] = True
    OUT.mkdir(parents=True, exist_ok=True)
    for which, rows in (("train", np.flatnonzero(~test)), ("test", np.flatnonzero(test))):
        for clinic, mine in zip(CLINICS, np.array_split(rng.permutation(rows), len(CLINICS))):
            values = data[np.sort(mine)]
            values[:, :-1] /= 16.0
            np.savetxt(OUT / f"{clinic}_{which}.csv", values, delimiter=",", header=",".join(header),
                       comments="", fmt=["%.4g"] * (len(header) - 1) + ["%d"])
    print(f"wrote {OUT}: {int((~test).sum())} train rows, {int(test.sum())} test rows, split between {len(CLINICS)} clinics")


if __name__ == "__main__":
    main()
