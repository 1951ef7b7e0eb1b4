"""Writes the files of the two walkthroughs: tables as people hold them, and a regression.

``examples/data/clinics/``: the UCI breast-cancer patients as three clinics would hold them,
vertically partitioned and keyed by ``patient_id``: ``clinic_a`` the mean features (with
``mean_texture`` left blank for about 5% of patients), ``clinic_b`` the standard errors and
``size_band`` (small/medium/large, a categorical column), ``clinic_c`` the worst features and
the diagnosis as text (``benign``/``malignant``). Each clinic's file lists its patients in its
own order. 20% of the patients are held out as ``*_new.csv``: new rows split across the clinics
for ``mpcfl predict``, ``clinic_c``'s with the diagnosis, for metrics.

``examples/data/diabetes/``: the diabetes data (Efron et al., 2004; 442 patients, disease
progression after one year) split between a ``clinic`` (age, sex, BMI, blood pressure and the
progression, the target) and a ``lab`` (six blood serum measurements), lined up by position,
20% held out as test rows.

Run from anywhere: ``python examples/split_tables.py``. The output is deterministic and committed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SEED = 0
HELD_OUT = 0.2
MISSING = 0.05  # of clinic_a's mean_texture cells


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _held_out(n: int, rng: np.random.Generator) -> set[int]:
    return set(rng.permutation(n)[: round(n * HELD_OUT)].tolist())


def clinics() -> None:
    header, rows = _read(DATA / "wdbc.csv")
    rng = np.random.default_rng(SEED)
    ids = [f"P{1000 + i}" for i in range(len(rows))]
    column = {name: [r[header.index(name)] for r in rows] for name in header}
    area = np.array([float(v) for v in column["worst_area"]])
    low, high = np.quantile(area, [1 / 3, 2 / 3])
    column["size_band"] = ["small" if a <= low else "medium" if a <= high else "large" for a in area]
    column["diagnosis"] = ["malignant" if float(v) == 1 else "benign" for v in column["malignant"]]
    blank = set(rng.permutation(len(rows))[: round(len(rows) * MISSING)].tolist())
    column["mean_texture"] = ["" if i in blank else v for i, v in enumerate(column["mean_texture"])]
    owners = {
        "clinic_a": [c for c in header if c.startswith("mean_")],
        "clinic_b": [c for c in header if c.endswith("_error")] + ["size_band"],
        "clinic_c": [c for c in header if c.startswith("worst_")] + ["diagnosis"],
    }
    new = _held_out(len(rows), rng)
    for clinic, columns in owners.items():
        order = rng.permutation(len(rows)).tolist()  # each clinic lists its patients in its own order
        for which, members in (("train", [i for i in order if i not in new]), ("new", [i for i in order if i in new])):
            _write(
                DATA / "clinics" / f"{clinic}_{which}.csv", ["patient_id", *columns],
                [[ids[i], *(column[c][i] for c in columns)] for i in members],
            )
    print(f"wrote {DATA / 'clinics'}: {len(rows) - len(new)} training patients, {len(new)} new")


def diabetes() -> None:
    header, rows = _read(DATA / "diabetes.csv")
    test = _held_out(len(rows), np.random.default_rng(SEED))
    owners = {"clinic": ["age", "sex", "bmi", "bp", "progression"], "lab": ["s1", "s2", "s3", "s4", "s5", "s6"]}
    for party, columns in owners.items():
        index = [header.index(c) for c in columns]
        for which, members in (("train", [i for i in range(len(rows)) if i not in test]), ("test", sorted(test))):
            _write(DATA / "diabetes" / f"{party}_{which}.csv", columns, [[rows[i][j] for j in index] for i in members])
    print(f"wrote {DATA / 'diabetes'}: {len(rows) - len(test)} train rows, {len(test)} test rows")


if __name__ == "__main__":
    clinics()
    diabetes()
