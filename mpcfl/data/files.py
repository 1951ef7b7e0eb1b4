"""Reading a party's own files: CSV tables and numeric .npy arrays, with one-line errors.

Every reader names the party and the file in its errors, refuses pickled arrays
and non-numbers, and reads nothing but the path it is given.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpcfl.errors import MpcflError


class DataError(MpcflError):
    """A party's data file cannot be used; the message names party, file and column."""


@dataclass(frozen=True)
class Table:
    """A numeric table read from one file."""

    path: Path
    columns: list[str]
    values: np.ndarray  # float64, shape (rows, len(columns))


def _csv_error(path: Path, party: str) -> DataError:
    """Finds the first bad cell of a CSV that numpy refused, for a precise message."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                return DataError(
                    f"party {party}: {path}: line {line} has {len(row)} cells, the header has {len(header)}"
                )
            for name, cell in zip(header, row):
                try:
                    float(cell)
                except ValueError:
                    return DataError(
                        f"party {party}: {path}: line {line}, column {name!r}: {cell!r} is not a number"
                    )
    return DataError(f"party {party}: {path}: not a numeric CSV file")


def load_array(path: Path, *, party: str, what: str = "data") -> np.ndarray:
    """Reads a numeric ``.npy`` file of any shape, refusing pickled objects.

    Raises:
        DataError: missing, unreadable or not numeric.
    """
    if not path.is_file():
        raise DataError(f"party {party}: {path}: {what} file not found")
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"party {party}: {path}: cannot read: {err}") from None
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"party {party}: {path}: expected numbers, got dtype {values.dtype}")
    return values


def load_table(path: Path, *, party: str) -> Table:
    """Reads a numeric CSV (with a header row) or a 2-D ``.npy`` file.

    Args:
        path: the file.
        party: the owning party, for error messages.

    Raises:
        DataError: missing, unreadable, empty, non-numeric, NaN or infinite data.
    """
    if not path.is_file():
        raise DataError(f"party {party}: {path}: data file not found")
    try:
        if path.suffix == ".npy":
            values = load_array(path, party=party)
            if values.ndim != 2:
                raise DataError(f"party {party}: {path}: expected a 2-D array, got shape {values.shape}")
            columns = [str(i) for i in range(values.shape[1])]
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), None)
            if not header:
                raise DataError(f"party {party}: {path}: empty file")
            columns = [c.strip() for c in header]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "no data": reported below
                    values = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
            except ValueError:
                raise _csv_error(path, party) from None
            if values.size and values.shape[1] != len(columns):
                raise _csv_error(path, party)
        else:
            raise DataError(f"party {party}: {path}: unsupported file type (use .csv or .npy)")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"party {party}: {path}: cannot read: {err}") from None
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] == 0:
        raise DataError(f"party {party}: {path}: no data rows")
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise DataError(
            f"party {party}: {path}: column {columns[col]!r}, data row {row + 1}: "
            f"{values[row, col]} is not a finite number"
        )
    return Table(path=path, columns=columns, values=values)
