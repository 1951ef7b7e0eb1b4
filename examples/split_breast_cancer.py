"""Splits the UCI breast-cancer data into the files two hospitals would hold.

Vertical partition: both hospitals saw the same 569 patients. Hospital A measured
the mean and standard-error features (20 columns); hospital B measured the
"worst" features (10 columns) and holds the diagnosis (`malignant`). A
stratified 20% test split is held out, with the same rows at both hospitals.

Run from anywhere: ``python examples/split_breast_cancer.py``. The output is
deterministic and committed under examples/data/breast_cancer/.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "wdbc.csv"
OUT = HERE / "data" / "breast_cancer"
LABEL = "malignant"
TEST_FRACTION = 0.2
SEED = 0


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    with SOURCE.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    labels = np.array([int(float(r[header.index(LABEL)])) for r in rows])
    rng = np.random.default_rng(SEED)
    test = set()
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        test.update(members[: round(len(members) * TEST_FRACTION)].tolist())
    split = {"train": [i for i in range(len(rows)) if i not in test], "test": sorted(test)}
    columns_a = [c for c in header if c.startswith("mean_") or c.endswith("_error")]
    columns_b = [c for c in header if c.startswith("worst_")] + [LABEL]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, columns in (("hospital_a", columns_a), ("hospital_b", columns_b)):
        index = [header.index(c) for c in columns]
        for which, members in split.items():
            _write(OUT / f"{name}_{which}.csv", columns, [[rows[i][j] for j in index] for i in members])
    print(f"wrote {OUT}: {len(split['train'])} train rows, {len(split['test'])} test rows")


if __name__ == "__main__":
    main()
