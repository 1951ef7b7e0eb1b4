"""Reading a party's own files: CSV tables and numeric .npy arrays, with one-line errors.

Every reader names the party and the file in its errors, refuses pickled arrays
and non-numbers, and reads nothing but the path it is given. A table may carry an
ID column (a vertical job's ``data.id_column``): its cells are kept as strings, apart
from the numbers, for private set intersection (:mod:`mpcfl.data.psi`).
"""

from __future__ import annotations

import csv
import hashlib
import unicodedata
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
    ids: list[str] | None = None  # the ID column's cells, one per row, when the table has one


def _csv_error(path: Path, party: str, skip: int | None = None) -> DataError:
    """Finds the first bad cell of a CSV that numpy refused, for a precise message.

    ``skip`` is the index of the ID column, whose cells need not be numbers.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                return DataError(
                    f"party {party}: {path}: line {line} has {len(row)} cells, the header has {len(header)}"
                )
            for index, (name, cell) in enumerate(zip(header, row)):
                if index == skip:
                    continue
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


def _id_index(columns: list[str], id_column: str, path: Path, party: str) -> int:
    if id_column not in columns:
        raise DataError(f"party {party}: {path}: no ID column {id_column!r} (data.id_column)")
    return columns.index(id_column)


def canonical_id(value: str) -> str:
    """The form IDs are compared in: Unicode NFC, surrounding spaces trimmed; otherwise exact
    ("007" and "7" differ)."""
    return unicodedata.normalize("NFC", value).strip()


def _csv_ids(path: Path, index: int) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader)
        return [canonical_id(row[index]) if index < len(row) else "" for row in reader]


def _npy_ids(values: np.ndarray, index: int, column: str, path: Path, party: str) -> list[str]:
    """A .npy table's ID column: whole numbers, as their decimal strings (as a CSV would write them)."""
    ids = values[:, index]
    if np.issubdtype(ids.dtype, np.integer):  # exact, even beyond float64's 2^53
        return [str(int(v)) for v in ids]
    bad = ~np.isfinite(ids) | (ids != np.round(ids))
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"party {party}: {path}: ID column {column!r}, data row {row + 1}: {ids[row]} is not a whole-number ID"
        )
    return [str(int(v)) for v in ids]


def check_ids(ids: list[str], column: str, path: Path, party: str) -> None:
    """Refuses an empty or repeated ID: rows are matched across parties by ID, so each must name one row.

    The message gives row numbers, never the ID itself, which may be personal data.

    Raises:
        DataError: names the party, the file, the column and the rows.
    """
    first: dict[str, int] = {}
    for row, value in enumerate(ids):
        if not value:
            raise DataError(f"party {party}: {path}: ID column {column!r}, data row {row + 1}: missing ID")
        if value in first:
            raise DataError(
                f"party {party}: {path}: ID column {column!r}: data rows {first[value] + 1} and {row + 1} "
                f"have the same ID; each ID must name one row"
            )
        first[value] = row


def load_table(path: Path, *, party: str, id_column: str | None = None) -> Table:
    """Reads a numeric CSV (with a header row) or a 2-D ``.npy`` file.

    Args:
        path: the file.
        party: the owning party, for error messages.
        id_column: a column of row IDs, taken out of the numbers (any text in a CSV,
            whole numbers in a ``.npy`` file, whose columns are named "0", "1", ...).

    Raises:
        DataError: missing, unreadable, empty, non-numeric, NaN or infinite data;
            a missing ID column, or an empty or repeated ID.
    """
    if not path.is_file():
        raise DataError(f"party {party}: {path}: data file not found")
    ids: list[str] | None = None
    try:
        if path.suffix == ".npy":
            values = load_array(path, party=party)
            if values.ndim != 2:
                raise DataError(f"party {party}: {path}: expected a 2-D array, got shape {values.shape}")
            columns = [str(i) for i in range(values.shape[1])]
            if id_column is not None:
                index = _id_index(columns, id_column, path, party)
                ids = _npy_ids(values, index, id_column, path, party)
                values = np.delete(values, index, axis=1)
                columns = [str(i) for i in range(values.shape[1])]
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), None)
            if not header:
                raise DataError(f"party {party}: {path}: empty file")
            columns = [c.strip() for c in header]
            index = None if id_column is None else _id_index(columns, id_column, path, party)
            numeric = [i for i in range(len(columns)) if i != index]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "no data": reported below
                    values = np.loadtxt(  # comments=None: a cell starting with '#' is data, not a comment
                        path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64, comments=None,
                        usecols=None if index is None else numeric,
                    )
            except ValueError:
                raise _csv_error(path, party, index) from None
            if values.size and values.shape[1] != len(numeric):
                raise _csv_error(path, party, index)
            if index is not None:
                ids = _csv_ids(path, index)
                if len(ids) != values.shape[0]:  # rows numpy and csv count differently: never pair them up
                    raise DataError(f"party {party}: {path}: {len(ids)} ID cells for {values.shape[0]} rows of numbers")
                columns = [columns[i] for i in numeric]
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
    if ids is not None:
        assert id_column is not None
        check_ids(ids, id_column, path, party)
    return Table(path=path, columns=columns, values=values, ids=ids)


def _row_digest(cells: list[str]) -> bytes:
    """One CSV row as :func:`rows_key` compares it: an all-numeric row as a ``.npy`` row of the same numbers
    (so the same rows in either format find one ledger), any other by its cells' texts, numbers by value."""
    numbers, texts = [], []
    for cell in cells:
        try:
            numbers.append(float(cell))
        except ValueError:
            texts.append("t:" + canonical_id(cell))
    if not texts:
        return _numbers_digest(np.array(numbers))
    canonical = [(number + 0.0).hex() for number in numbers] + texts  # + 0.0: -0 is 0
    return hashlib.sha256("\x1f".join(sorted(canonical)).encode()).digest()


def _numbers_digest(row: np.ndarray) -> bytes:
    return hashlib.sha256(np.sort(row.astype(np.float64) + 0.0).tobytes()).digest()


def rows_key(path: Path, *, party: str) -> str:
    """A data file's name in its owner's privacy ledgers (:mod:`mpcfl.dp.ledger`): a digest of its rows
    as a multiset, each row the multiset of its cells, numbers compared by value.

    Reordering rows or columns, renaming headers, writing numbers another way (a CSV or a ``.npy`` file
    of the same numbers), and any job's view of the file (which columns it takes, its label scaling,
    class order, categories or missing-cell fills) keep the name, so none of them opens a fresh budget;
    changing, adding or removing a row gives another.

    Raises:
        DataError: the file is missing or unreadable.
    """
    if path.suffix == ".npy":
        values = np.atleast_2d(load_array(path, party=party))
        digests = [_numbers_digest(row) for row in values.reshape(len(values), -1)]
    else:
        if not path.is_file():
            raise DataError(f"party {party}: {path}: data file not found")
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                next(reader, None)  # the header names columns; the rows are the data
                digests = [_row_digest(row) for row in reader if row]
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"party {party}: {path}: cannot read: {err}") from None
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()
