"""Party-local data: loading, validation, standardisation, and sharing by partition.

A party process calls :func:`load_party_data` on its own files only. What the
other parties learn before sharing is public shape metadata (row and column
counts, a hash of the column names), exchanged by :func:`share_dataset`, which
then secret-shares the features and labels into CrypTen.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpcfl.errors import MpcflError
from mpcfl.mpc.session import agreed, all_gather_public

if TYPE_CHECKING:
    from mpcfl.jobs.schema import TrainJob

log = logging.getLogger(__name__)


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


@dataclass
class Split:
    """Features (and labels, if this party holds them) of one split."""

    path: Path
    columns: list[str]
    x: np.ndarray
    y: np.ndarray | None


@dataclass
class PartyData:
    """What one party holds: its train split, optional test split, and its scaler."""

    party: str
    train: Split
    test: Split | None
    scaler: dict[str, Any] = field(default_factory=dict)


def _label_index(table: Table, column: str | int, party: str) -> int:
    if isinstance(column, int):
        if not -len(table.columns) <= column < len(table.columns):
            raise DataError(
                f"party {party}: {table.path}: label column index {column} is out of range "
                f"({len(table.columns)} columns)"
            )
        return column % len(table.columns)
    if column not in table.columns:
        raise DataError(f"party {party}: {table.path}: no label column {column!r}")
    return table.columns.index(column)


def _split(table: Table, *, job: TrainJob, party: str, holds_labels: bool) -> Split:
    if not holds_labels:
        return Split(table.path, table.columns, table.values, None)
    index = _label_index(table, job.labels.column, party)
    y = table.values[:, index]
    classes = job.model.num_classes
    bad = (y != np.round(y)) | (y < 0) | (y >= classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"party {party}: {table.path}: label column {table.columns[index]!r}, data row {row + 1}: "
            f"{y[row]} is not a class label in 0..{classes - 1}"
        )
    x = np.delete(table.values, index, axis=1)
    columns = [c for i, c in enumerate(table.columns) if i != index]
    if x.shape[1] == 0 and job.partition == "horizontal":
        raise DataError(f"party {party}: {table.path}: no feature columns besides the label")
    return Split(table.path, columns, x, y.astype(np.int64))


def holds_labels(job: TrainJob, party: str) -> bool:
    return job.partition == "horizontal" or job.labels.party == party


def load_party_data(job: TrainJob, party: str) -> PartyData:
    """Loads and checks one party's own files (train, and test if the job has it).

    Raises:
        DataError: the files are unusable or disagree with each other.
    """
    spec = job.parties[job.rank_of(party)].data
    labels = holds_labels(job, party)
    train = _split(load_table(spec.train, party=party), job=job, party=party, holds_labels=labels)
    test = None
    if spec.test is not None:
        test = _split(load_table(spec.test, party=party), job=job, party=party, holds_labels=labels)
        if test.columns != train.columns:
            raise DataError(
                f"party {party}: {spec.test}: columns differ from the train file {spec.train}"
            )
    return PartyData(party=party, train=train, test=test)


def _column_stats(data: PartyData) -> tuple[np.ndarray, np.ndarray]:
    mean = data.train.x.mean(axis=0)
    std = data.train.x.std(axis=0)
    return mean, std


def apply_scaler(data: PartyData, mean: np.ndarray, std: np.ndarray) -> None:
    """Standardises train and test with the given statistics, in place.

    A constant column (std 0) is only centred.
    """
    std = np.where(std > 0, std, 1.0)
    for split in (data.train, data.test):
        if split is not None and split.x.shape[1]:
            split.x = (split.x - mean) / std
    data.scaler = {"columns": data.train.columns, "mean": mean.tolist(), "std": std.tolist()}


def standardize_locally(data: PartyData) -> None:
    """Vertical partition: a party owns whole columns, so its own statistics are exact."""
    if data.train.x.shape[1]:
        apply_scaler(data, *_column_stats(data))


def check_range(data: PartyData, max_abs: float) -> None:
    """Refuses values that could overflow CrypTen's fixed-point ring.

    Raises:
        DataError: names the party, the file and the column.
    """
    for split in (data.train, data.test):
        if split is None or not split.x.size:
            continue
        peak = np.abs(split.x).max(axis=0)
        worst = int(np.argmax(peak))
        if peak[worst] > max_abs:
            raise DataError(
                f"party {data.party}: {split.path}: column {split.columns[worst]!r} reaches "
                f"{peak[worst]:.4g}, beyond data.max_abs={max_abs:g}; fixed point (16 fractional "
                f"bits, 64-bit ring) would overflow. Enable data.standardize or rescale the column"
            )


# Joint standardisation shares each party's column sums and sums of squared deviations
# (computed in plaintext, divided by the row count): values that are only added, which
# wrap at 2^47. A squared deviation of raw values up to 2^22 is at most 2^46.
JOINT_STATS_MAX_ABS = 2.0**22


def check_joint_stats_range(data: PartyData) -> None:
    """Refuses raw values whose squared deviations could wrap in joint standardisation.

    Raises:
        DataError: names the party, the file and the column.
    """
    for split in (data.train, data.test):
        if split is None or not split.x.size:
            continue
        peak = np.abs(split.x).max(axis=0)
        worst = int(np.argmax(peak))
        if peak[worst] > JOINT_STATS_MAX_ABS:
            raise DataError(
                f"party {data.party}: {split.path}: column {split.columns[worst]!r} reaches {peak[worst]:.4g}, "
                f"beyond {JOINT_STATS_MAX_ABS:.0f} (2^22): joint standardisation would wrap fixed point on its "
                f"squared deviations; rescale the column"
            )


def check_bounds(job: TrainJob, data: PartyData, *, n_features: int, n_rows: int, metric_rows: int, share: float) -> float:
    """Refuses this party's features if training could wrap fixed point (:mod:`mpcfl.tasks.train.bounds`).

    The bound needs every example's feature-vector norm; a party knows only its own part
    of it, so each checks its part against ``share`` of the squared safe norm: its
    columns' fraction in a vertical split (the parts add up), 1 in a horizontal one
    (a row belongs to one party).

    Returns:
        The headroom: how many times the safe norm exceeds this party's (``inf`` with no features).

    Raises:
        DataError: names the party, file and column of the row that drives the bound.
    """
    from mpcfl.tasks.train.bounds import PRODUCT_LIMIT, safe_input_norm, steps

    splits = [s for s in (data.train, data.test) if s is not None and s.x.size]
    if not splits:
        return math.inf
    norms = [np.linalg.norm(s.x, axis=1) for s in splits]
    which = int(np.argmax([n.max() for n in norms]))
    split, row = splits[which], int(np.argmax(norms[which]))
    mine = float(norms[which][row])
    allowed = safe_input_norm(job, n_features=n_features, n_rows=n_rows, metric_rows=metric_rows) * math.sqrt(share)
    if mine > allowed:
        column = split.columns[int(np.argmax(np.abs(split.x[row])))]
        raise DataError(
            f"party {data.party}: {split.path}: column {column!r} (data row {row + 1}) drives this party's "
            f"features to norm {mine:.4g}, beyond the {allowed:.4g} that keeps {steps(job, n_rows)} SGD steps "
            f"below fixed point's {PRODUCT_LIMIT:.3g} (2^31) products; set data.standardize: true, rescale "
            f"the column, or lower training.learning_rate or training.epochs"
        )
    return math.inf if mine == 0 else allowed / mine


def check_alone(job: TrainJob, data: PartyData) -> str:
    """``mpcfl validate --party``: the range and bound checks one party can do without its peers.

    It prepares its data as its party process would, and bounds training as if its
    columns and rows were the whole job. A refusal here is (up to the random initial
    weights) a refusal in the run; passing is not a promise, as the run also counts
    the other parties' columns and rows.

    Returns:
        A one-line summary of the headroom.

    Raises:
        DataError: as :func:`check_range`, :func:`check_joint_stats_range` or :func:`check_bounds`.
    """
    if job.data.standardize and job.partition == "horizontal":
        check_joint_stats_range(data)
        return "raw values fit joint standardisation; training bounds are checked at run time, after it"
    if job.data.standardize:
        standardize_locally(data)
    if job.dp is not None:
        from mpcfl.tasks.train.dp_sgd import clip_party_features, clips_features

        if clips_features(job):
            clip_party_features(job, data, [data.train.x.shape[1]])
    check_range(data, job.data.max_abs)
    rows = data.train.x.shape[0]
    test = 0 if data.test is None else data.test.x.shape[0]
    headroom = check_bounds(
        job, data, n_features=data.train.x.shape[1], n_rows=rows, metric_rows=max(rows, test), share=1.0
    )
    return f"fixed-point headroom {headroom:.3g}x on its own columns and rows (the run checks all parties together)"


def columns_hash(columns: list[str]) -> int:
    """A public fingerprint of column names, as a signed 64-bit integer."""
    digest = hashlib.blake2b(json.dumps(columns).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass
class SharedData:
    """Secret-shared features and labels of the whole (virtual) dataset."""

    x_train: Any
    y_train: Any
    x_test: Any | None
    y_test: Any | None
    n_features: int


def _public_shapes(job: TrainJob, data: PartyData) -> list[list[int]]:
    """Every party's public shape metadata: [train rows, test rows, columns, hash].

    The hash of the column names goes out only in a horizontal job, where every
    party holds the same columns anyway; in a vertical one it would let a peer test
    guesses of this party's schema (an unsalted hash of, say, "hiv_status"), so 0
    is sent instead.
    """
    mine = [
        data.train.x.shape[0],
        -1 if data.test is None else data.test.x.shape[0],
        data.train.x.shape[1],
        columns_hash(data.train.columns) if job.partition == "horizontal" else 0,
    ]
    shapes = all_gather_public(mine)
    names = job.party_names
    if job.partition == "vertical":
        for r, other in enumerate(shapes):
            for i, what in ((0, "train"), (1, "test")):
                if other[i] != shapes[0][i]:
                    raise DataError(
                        f"party {names[r]}: its {what} file has {other[i]} rows, party {names[0]} has "
                        f"{shapes[0][i]}; a vertical partition needs the same rows at every party"
                    )
    else:
        for r, other in enumerate(shapes):
            if other[2:] != shapes[0][2:]:
                raise DataError(
                    f"party {names[r]}: its columns differ from party {names[0]}'s; a horizontal "
                    f"partition needs the same columns at every party"
                )
    return shapes


def _standardize_jointly(job: TrainJob, data: PartyData, shapes: list[list[int]]) -> None:
    """Horizontal partition: column statistics over all rows, computed under MPC.

    Two passes (mean, then mean squared deviation) avoid the cancellation of
    E[x^2] - E[x]^2 in fixed point. Only the aggregate statistics are revealed.
    """
    crypten = _crypten()
    from mpcfl.mpc.reveal import reveal

    total = sum(s[0] for s in shapes)
    everyone = list(range(job.world_size))

    def joint_sum(local: np.ndarray, what: str) -> np.ndarray:
        summed = None
        for r in everyone:
            part = crypten.cryptensor(torch.tensor(local / total), src=r)
            summed = part if summed is None else summed + part
        return reveal(summed, to=everyone, what=what).double().numpy()

    mean = joint_sum(data.train.x.sum(axis=0), "column means for standardisation")
    var = joint_sum(((data.train.x - mean) ** 2).sum(axis=0), "column variances for standardisation")
    apply_scaler(data, mean, np.sqrt(np.clip(var, 0.0, None)))


def _crypten() -> Any:
    from mpcfl.mpc.compat import import_crypten

    return import_crypten()


def _targets(job: TrainJob, y: np.ndarray | None, rows: int) -> torch.Tensor:
    """Labels as the loss wants them: a column of 0/1, or one-hot rows."""
    if job.model.num_classes == 2:
        out = torch.zeros(rows, 1)
        if y is not None:
            out[:, 0] = torch.from_numpy(y).float()
        return out
    out = torch.zeros(rows, job.model.num_classes)
    if y is not None:
        out[torch.arange(rows), torch.from_numpy(y)] = 1.0
    return out


def share_dataset(job: TrainJob, data: PartyData, *, rank: int, device: str = "cpu") -> SharedData:
    """Agrees on shapes with the other parties, prepares the data and secret-shares it.

    Every party calls this at the same point with its own :class:`PartyData`.

    Raises:
        DataError: shapes disagree across parties, or values are out of range.
    """
    crypten = _crypten()
    shapes = _public_shapes(job, data)
    if job.data.standardize:
        if job.partition == "vertical":
            standardize_locally(data)
        else:
            agreed("raw range check", job.party_names, lambda: check_joint_stats_range(data))
            _standardize_jointly(job, data, shapes)
    if job.dp is not None:
        from mpcfl.tasks.train.dp_sgd import clip_party_features, clips_features

        if clips_features(job):
            clip_party_features(job, data, [s[2] for s in shapes])
    vertical = job.partition == "vertical"
    n_features = sum(s[2] for s in shapes) if vertical else shapes[0][2]
    n_rows = shapes[0][0] if vertical else sum(s[0] for s in shapes)
    n_test = shapes[0][1] if vertical else sum(s[1] for s in shapes)

    def checks() -> None:
        check_range(data, job.data.max_abs)
        share = data.train.x.shape[1] / n_features if vertical else 1.0
        headroom = check_bounds(job, data, n_features=n_features, n_rows=n_rows, metric_rows=max(n_rows, n_test), share=share)
        log.info("fixed-point headroom: this party's feature norm may grow %.3g-fold before training could wrap", headroom)

    agreed("range check", job.party_names, checks)

    def share(local: Split | None, which: int) -> tuple[Any, Any]:
        if job.partition == "vertical":
            rows = shapes[0][which]
            parts = []
            for r, shape in enumerate(shapes):
                if shape[2] == 0:
                    continue
                x = torch.tensor(local.x, dtype=torch.float32) if r == rank else torch.zeros(rows, shape[2])
                parts.append(crypten.cryptensor(x, src=r, device=device))
            x_enc = crypten.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            owner = job.rank_of(job.labels.party)
            y = _targets(job, local.y if rank == owner else None, rows)
            y_enc = crypten.cryptensor(y, src=owner, device=device)
            return x_enc, y_enc
        xs, ys = [], []
        for r, shape in enumerate(shapes):
            rows = shape[which]
            mine = r == rank
            x = torch.tensor(local.x, dtype=torch.float32) if mine else torch.zeros(rows, shape[2])
            xs.append(crypten.cryptensor(x, src=r, device=device))
            ys.append(crypten.cryptensor(_targets(job, local.y if mine else None, rows), src=r, device=device))
        return crypten.cat(xs, dim=0), crypten.cat(ys, dim=0)

    x_train, y_train = share(data.train, 0)
    x_test = y_test = None
    if shapes[0][1] >= 0:
        x_test, y_test = share(data.test, 1)
    log.info("shared %d training rows x %d features", x_train.size(0), n_features)
    return SharedData(x_train, y_train, x_test, y_test, n_features)
