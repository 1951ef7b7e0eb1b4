"""Splits the UCI breast-cancer data into the files two hospitals would hold.

Vertical partition: both hospitals saw the same 569 patients. Hospital A measured
the mean and standard-error features (20 columns); hospital B measured the
"worst" features (10 columns) and holds the diagnosis (`malignant`). A
stratified 20% test split is held out, with the same rows at both hospitals.

It also writes the same data as hospitals really hold it (``breast_cancer_psi/``):
each hospital saw about 474 of the 569 patients, 379 of them at both (80% of
each hospital's patients), keyed by a patient ID column, each file in its own
order. ``configs/breast_cancer_psi.yaml`` lines them up by private set intersection.

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
OUT_PSI = HERE / "data" / "breast_cancer_psi"
OUT_FED = HERE / "data" / "breast_cancer_fed"
FED_SHARES = {"hospital_a": 0.5, "hospital_b": 0.3, "hospital_c": 0.2}  # each hospital's share of the patients
LABEL = "malignant"
ID = "patient_id"
SHARED = 0.8  # the fraction of each hospital's patients that the other hospital also saw
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
    _write_keyed(rows, header, split, {"hospital_a": columns_a, "hospital_b": columns_b}, rng)
    _write_horizontal(rows, header, split)


def _write_keyed(
    rows: list[list[str]], header: list[str], split: dict[str, list[int]], columns: dict[str, list[str]],
    rng: np.random.Generator,
) -> None:
    """Each hospital's own patients, by ID, in its own order; the split is by patient, as before."""
    # Each hospital sees n patients, SHARED * n of them at both: 2n - SHARED * n = all patients.
    n = round(len(rows) / (2 - SHARED))
    order = rng.permutation(len(rows))
    both = order[: round(SHARED * n)]
    only = order[len(both):]
    seen = {
        "hospital_a": set(both.tolist()) | set(only[: n - len(both)].tolist()),
        "hospital_b": set(both.tolist()) | set(only[n - len(both):].tolist()),
    }
    ids = [f"MRN-{v:06d}" for v in rng.choice(1_000_000, size=len(rows), replace=False)]
    OUT_PSI.mkdir(parents=True, exist_ok=True)
    for name, cols in columns.items():
        index = [header.index(c) for c in cols]
        for which, members in split.items():
            mine = [i for i in rng.permutation(members).tolist() if i in seen[name]]
            _write(OUT_PSI / f"{name}_{which}.csv", [ID] + cols, [[ids[i]] + [rows[i][j] for j in index] for i in mine])
    shared = {w: sum(1 for i in m if i in seen["hospital_a"] and i in seen["hospital_b"]) for w, m in split.items()}
    print(f"wrote {OUT_PSI}: {len(seen['hospital_a'])} and {len(seen['hospital_b'])} patients, "
          f"{len(both)} at both ({shared['train']} train, {shared['test']} test)")


def _write_horizontal(rows: list[list[str]], header: list[str], split: dict[str, list[int]]) -> None:
    """Horizontal partition (``configs/breast_cancer_fed.yaml``): three hospitals, each with its own
    patients (all columns, diagnosis included), in unequal shares; the same train/test split as above."""
    rng = np.random.default_rng(SEED + 1)  # its own stream: the files above do not change
    OUT_FED.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum([0.0, *FED_SHARES.values()])
    for which, members in split.items():
        order = rng.permutation(members)
        cuts = np.round(bounds * len(order)).astype(int)
        for name, start, stop in zip(FED_SHARES, cuts, cuts[1:]):
            _write(OUT_FED / f"{name}_{which}.csv", header, [rows[i] for i in sorted(order[start:stop].tolist())])
    print(f"wrote {OUT_FED}: {', '.join(f'{name} {share:.0%}' for name, share in FED_SHARES.items())} of the patients")


if __name__ == "__main__":
    main()
