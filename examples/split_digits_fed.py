"""Splits the 8x8 digits (1,797 images) into the files three clinics would hold for
``configs/digits_fed.yaml``: each clinic its own images (pixels scaled to [0, 1] by the public
constant 16, and the label), in unequal shares, with a 20% test split of its own.

Run from anywhere: ``python examples/split_digits_fed.py``. The output is deterministic and
committed under examples/data/digits_fed/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "digits8x8.csv"
OUT = HERE / "data" / "digits_fed"
SHARES = {"clinic_a": 0.5, "clinic_b": 0.3, "clinic_c": 0.2}
TEST_FRACTION = 0.2
SEED = 0


def main() -> None:
    header = SOURCE.read_text().splitlines()[0]
    data = np.loadtxt(SOURCE, delimiter=",", skiprows=1)
    data[:, :64] /= 16.0  # pixels are 0..16 by the data set's definition: a public constant
    order = np.random.default_rng(SEED).permutation(len(data))
    cuts = np.round(np.cumsum([0.0, *SHARES.values()]) * len(order)).astype(int)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, start, stop in zip(SHARES, cuts, cuts[1:]):
        mine = data[np.sort(order[start:stop])]
        test = round(len(mine) * TEST_FRACTION)
        for which, rows in (("train", mine[test:]), ("test", mine[:test])):
            np.savetxt(OUT / f"{name}_{which}.csv", rows, delimiter=",", header=header, comments="", fmt="%.6g")
    print(f"wrote {OUT}: {', '.join(f'{name} {share:.0%}' for name, share in SHARES.items())} of the images")


if __name__ == "__main__":
    main()
