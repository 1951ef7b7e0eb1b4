"""Tables as people have them: label names, categorical columns and missing cells, made numeric at
the party that holds them, before anything is shared.

- **Label names**: with ``labels.classes: [benign, malignant]`` each cell of the label column is
  replaced by its index in that list; a name outside it is refused, naming the row.
- **Categorical columns**: ``data.categorical: {column: [category, ...]}`` (public lists) replaces the
  column by one 0/1 column per category, named ``column=category``; a value outside the list is
  refused naming the row, unless the list holds ``other``, which then takes it.
- **Missing cells** (empty, ``NA``, ``NaN``, ``null``): in a column named in ``data.missing`` they are
  kept as NaN here and filled by :func:`impute` (``mean`` or ``median`` of the party's own training
  rows, or a constant); anywhere else they are refused naming the row, as any non-number is.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpcfl.data.files import DataError
from mpcfl.models.preprocessed import MISSING_CELLS

OTHER = "other"


@dataclass(frozen=True)
class Encoding:
    """How one party's cells become numbers (the job's public declarations)."""

    label: str | None = None  # the label column, at a party that holds labels
    classes: tuple[str, ...] | None = None  # label names, index = class
    categorical: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    missing: Mapping[str, str | float] = field(default_factory=dict)
    values: bool = False  # the label column holds a regression's numbers, never class names

    @property
    def needed(self) -> bool:
        """Whether plain numeric reading will not do."""
        return bool(self.classes or self.categorical or self.missing)


def _number(cell: str, *, missing: bool, label: bool, where: str) -> float:
    text = cell.strip()
    if text.lower() in MISSING_CELLS:
        if missing:
            return math.nan
        raise DataError(f"{where}: the cell is empty or missing; declare the column in data.missing (mean, median or a constant)")
    try:
        return float(text)
    except ValueError:
        fix = "name the classes in labels.classes" if label else "declare the column in data.categorical if it names categories"
        raise DataError(f"{where}: {cell!r} is not a number; {fix}") from None


def read_encoded(path: Path, *, party: str, encoding: Encoding, keep: str | None = None) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Reads a CSV with a header row, applying ``encoding``; ``keep`` names a column returned as text
    (the ID column). Returns the numeric columns' names (categories expanded), their values (NaN
    where a declared column's cell is missing), and the kept column's cells.

    Raises:
        DataError: names the party, file, line and column of the first unusable cell.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0]:
        raise DataError(f"party {party}: {path}: empty file")
    header = [c.strip() for c in rows[0]]
    if keep is not None and keep not in header:
        raise DataError(f"party {party}: {path}: no ID column {keep!r}")
    names: list[str] = []
    for column in header:
        if column == keep:
            continue
        if column in encoding.categorical:
            names += [f"{column}={category}" for category in encoding.categorical[column]]
        else:
            names.append(column)
    values = np.empty((len(rows) - 1, len(names)))
    kept: list[str] | None = [] if keep is not None else None
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"party {party}: {path}: line {line} has {len(row)} cells, the header has {len(header)}")
        out = []
        for column, cell in zip(header, row):
            where = f"party {party}: {path}: line {line}, column {column!r}"
            if column == keep:
                assert kept is not None
                kept.append(cell)
            elif column in encoding.categorical:
                out += _one_hot(cell, encoding.categorical[column], where)
            elif column == encoding.label and encoding.classes is not None:
                if cell.strip() not in encoding.classes:
                    raise DataError(f"{where}: {cell!r} is not one of labels.classes {list(encoding.classes)}")
                out.append(float(encoding.classes.index(cell.strip())))
            else:
                out.append(_number(cell, missing=column in encoding.missing, label=column == encoding.label, where=where))
        values[line - 2] = out
    if not len(values):
        raise DataError(f"party {party}: {path}: no data rows")
    return names, values, kept


def _one_hot(cell: str, categories: tuple[str, ...], where: str) -> list[float]:
    value = cell.strip()
    if value not in categories:
        if OTHER not in categories:
            raise DataError(f"{where}: {cell!r} is not one of its declared categories {list(categories)} (add {OTHER!r} to take any other)")
        value = OTHER
    return [1.0 if value == category else 0.0 for category in categories]


def impute(columns: list[str], splits: list[np.ndarray], missing: Mapping[str, str | float], *, party: str) -> dict[str, float]:
    """Fills the declared columns' missing cells of every split, in place, from the first split (the
    training rows): its mean or median, or the declared constant. Returns each column's fill value.

    Raises:
        DataError: a column whose training cells are all missing (no mean or median to take).
    """
    fills: dict[str, float] = {}
    for column, how in missing.items():
        if column not in columns:
            continue  # another party's column (a vertical job declares every party's)
        index = columns.index(column)
        present = splits[0][:, index][~np.isnan(splits[0][:, index])]
        if isinstance(how, str):
            if not present.size:
                raise DataError(f"party {party}: column {column!r}: every training cell is missing; no {how} to fill with")
            fills[column] = float(np.mean(present) if how == "mean" else np.median(present))
        else:
            fills[column] = float(how)
        for split in splits:
            split[np.isnan(split[:, index]), index] = fills[column]
    return fills
