"""A party's training data: its own files split into features and labels, checked and scaled.

A party process calls :func:`load_party_data` on its own files only; nothing here
communicates. Sharing is the training task's (:mod:`mpcfl.tasks.train.dataset`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpcfl.data.encode import Encoding, impute, read_encoded
from mpcfl.data.files import DataError, Table, check_ids, load_table, rows_key
from mpcfl.errors import ConfigError, MpcflError

if TYPE_CHECKING:
    from mpcfl.jobs.schema import TrainJob
    from mpcfl.models.spec import Regression

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Features (and labels, if this party holds them) of one split."""

    path: Path
    columns: list[str]
    x: np.ndarray
    y: np.ndarray | None
    ids: list[str] | None = None  # row IDs (``data.id_column``), until PSI has aligned the rows

    def keep(self, rows: list[int]) -> None:
        """Keeps only ``rows``, in that order (the intersection's agreed order), in place, and
        drops the IDs, which have served: no ID outlives the alignment."""
        self.x = self.x[rows]
        self.y = None if self.y is None else self.y[rows]
        self.ids = None


@dataclass
class PartyData:
    """What one party holds: its train split, optional test split, and its scaler."""

    party: str
    train: Split
    test: Split | None
    scaler: dict[str, Any] = field(default_factory=dict)
    imputed: dict[str, float] = field(default_factory=dict)  # each filled column's value (data.missing)
    inputs: list[str] | None = None  # the columns its backbone took (data.backbone), when it ran one
    loaded: dict[str, bytes] | None = None  # :func:`contents` of the rows as read, before the backbone
    center: list[float] | None = None  # its columns' noisy mean, subtracted after scaling (dp.center)


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
        return Split(table.path, table.columns, table.values, None, table.ids)
    index = _label_index(table, job.labels.column, party)
    y = table.values[:, index]
    where = f"party {party}: {table.path}: label column {table.columns[index]!r}"
    regression = job.regression
    if regression is None:
        classes = job.model.num_classes
        bad = (y != np.round(y)) | (y < 0) | (y >= classes)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{where}, data row {row + 1}: {y[row]} is not a class label in 0..{classes - 1}")
        y = y.astype(np.int64)
    else:
        y = _targets(y, regression, dp=job.dp is not None, where=where)
    x = np.delete(table.values, index, axis=1)
    columns = [c for i, c in enumerate(table.columns) if i != index]
    if x.shape[1] == 0 and job.partition == "horizontal":
        raise DataError(f"party {party}: {table.path}: no feature columns besides the label")
    return Split(table.path, columns, x, y, table.ids)


def _targets(y: np.ndarray, regression: Regression, *, dp: bool, where: str) -> np.ndarray:
    """A regression's targets scaled by ``labels.scaling``, within ``labels.max_abs``: refused beyond it,
    or, under DP, clamped (a refusal would depend on one record, outside the guarantee)."""
    bad = np.isnan(y) if dp else ~np.isfinite(y)  # under DP an infinite target is clamped like any far one
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{where}, data row {row + 1}: {y[row]} is not a number")
    scaled = (y - regression.center) / regression.scale
    bound = regression.target_bound
    if dp:
        return np.clip(scaled, -bound, bound)
    beyond = np.abs(scaled) > bound
    if beyond.any():
        row = int(np.argmax(beyond))
        raise DataError(
            f"{where}, data row {row + 1}: {y[row]:g} scales to {scaled[row]:g}, beyond labels.max_abs={bound:g}; "
            "declare labels.scaling: [center, scale] (a typical target and spread) or raise labels.max_abs"
        )
    return scaled


def holds_labels(job: TrainJob, party: str) -> bool:
    return job.partition == "horizontal" or job.labels.party == party


def encoding_of(job: TrainJob, party: str) -> Encoding:
    """How ``party``'s cells become numbers: its label names, categorical columns and missing cells."""
    label = job.labels.column if holds_labels(job, party) and isinstance(job.labels.column, str) else None
    classes = job.labels.classes
    return Encoding(
        label=label, classes=None if classes is None or label is None else tuple(classes),
        categorical={k: tuple(v) for k, v in (job.data.categorical or {}).items()}, missing=dict(job.data.missing or {}),
        values=getattr(job, "regression", None) is not None,
    )


_LISTED_NAMES = 20  # a hint lists at most this many of a label column's names


def _classes_hint(path: Path, label: str) -> str:
    """The ``labels.classes`` line for a label column of names, as its owner's own file has them.

    The owner alone reads this (its process's error; peers hear only that it failed). Writing the
    names into the job is its decision to make them public: every party reads the job file. The
    order chosen there is the class order; the sorted one is only a suggestion.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        names = sorted({(row.get(label) or "").strip() for row in csv.DictReader(handle)} - {""})  # a short row has None
    listed = ", ".join(names[:_LISTED_NAMES]) + (", ..." if len(names) > _LISTED_NAMES else "")
    return (
        f"its {len(names)} names are classes: declare them in the job, e.g. labels.classes: [{listed}] "
        "(class i is the i-th name; the job file, and so the names, are public to every party)"
    )


def read_table(path: Path, *, party: str, id_column: str | None, encoding: Encoding) -> Table:
    """A party's table: numeric as it is, or through ``encoding`` when the job declares names,
    categories or missing cells (CSV only)."""
    try:
        if not encoding.needed or path.suffix != ".csv":
            return load_table(path, party=party, id_column=id_column)
        if not path.is_file():
            raise DataError(f"party {party}: {path}: data file not found")
        columns, values, ids = read_encoded(path, party=party, encoding=encoding, keep=id_column)
    except DataError as err:
        if encoding.label is not None and encoding.classes is None and f"column {encoding.label!r}: '" in str(err):
            reason = str(err).split("; ")[0]  # a cell of the label column that is not a number
            fix = "a regression's targets are numbers" if encoding.values else _classes_hint(path, encoding.label)
            raise DataError(f"{reason}; {fix}") from None
        raise
    if id_column is not None:
        assert ids is not None
        check_ids(ids, id_column, path, party)
    return Table(path=path, columns=columns, values=values, ids=ids)


def load_party_data(job: TrainJob, party: str) -> PartyData:
    """Loads and checks one party's own files (train, and test if the job has it), its categorical
    columns one-hot and its missing cells filled (:mod:`mpcfl.data.encode`).

    Raises:
        DataError: the files are unusable or disagree with each other.
    """
    spec = job.parties[job.rank_of(party)].data
    labels = holds_labels(job, party)
    id_column = job.id_column_of(party)
    encoding = encoding_of(job, party)

    def split(path: Path) -> Split:
        return _split(read_table(path, party=party, id_column=id_column, encoding=encoding), job=job, party=party, holds_labels=labels)

    train = split(spec.train)
    test = None
    if spec.test is not None:
        test = split(spec.test)
        if test.columns != train.columns:
            raise DataError(
                f"party {party}: {spec.test}: columns differ from the train file {spec.train}"
            )
    joint = filled_jointly(job)
    local = {column: how for column, how in encoding.missing.items() if column not in joint}
    imputed = impute(train.columns, [s.x for s in (train, test) if s is not None], local, party=party)
    for split_ in (train, test):
        if split_ is None:
            continue
        gaps = np.isnan(split_.x)
        gaps[:, [i for i, c in enumerate(split_.columns) if c in joint]] = False  # filled once the parties agree on the mean
        if gaps.any():
            row, col = map(int, np.argwhere(gaps)[0])
            raise DataError(f"party {party}: {split_.path}: column {split_.columns[col]!r}, data row {row + 1}: missing")
    for split in (train, test):
        if split is not None and split.ids is not None and len(split.ids) > job.data.max_ids:
            raise DataError(
                f"party {party}: {split.path}: {len(split.ids)} IDs in column {id_column!r}, beyond data.max_ids={job.data.max_ids}"
            )
    data = PartyData(party=party, train=train, test=test, imputed=imputed)
    if runs_backbone(job, party, train.x.shape[1]):
        data.inputs, data.loaded = train.columns, contents(data)  # the data, not a view of it, names its budget
        module = backbone_of(job)
        for split_ in (train, test):
            if split_ is not None:
                split_.x, split_.columns = through_backbone(job, party, module, split_)
    return data


def runs_backbone(job: TrainJob, party: str, n_columns: int) -> bool:
    """Whether ``party``'s feature columns go through the job's backbone: every party in a horizontal
    job; in a vertical one the listed parties (``all``: every party holding feature columns)."""
    backbone = job.data.backbone
    if backbone is None:
        return False
    return party in backbone.parties if backbone.parties != "all" else n_columns > 0


def backbone_of(job: TrainJob) -> Any:
    """The job's backbone module, the instance its fingerprint digested (:meth:`BackboneSpec.module`).

    Raises:
        ConfigError: the factory or the weights fail (naming the job file and the key).
    """
    spec = job.data.backbone
    assert spec is not None
    try:
        return spec.module()
    except MpcflError as err:
        raise ConfigError(f"{job.source}: data.backbone: {err}") from None


def through_backbone(job: TrainJob, party: str, module: Any, split: Split) -> tuple[np.ndarray, list[str]]:
    """A split's features through the backbone, in plaintext at its owner, and their column names
    (``backbone_i``; vertical: ``PARTY_backbone_i``, as a vertical job's columns are every party's together).

    Raises:
        DataError: the backbone fails on the rows or returns anything but finite float features,
            naming the party, the file and the key.
    """
    from mpcfl.models.backbone import run_backbone

    try:
        features = run_backbone(module, split.x, dp=job.dp is not None)
    except ValueError as err:
        raise DataError(f"party {party}: {split.path}: data.backbone: {err}") from None
    prefix = f"{party}_backbone_" if job.partition == "vertical" else "backbone_"
    return features, [f"{prefix}{i}" for i in range(features.shape[1])]


def filled_jointly(job: TrainJob) -> list[str]:
    """The columns whose missing cells a horizontal training job fills with the mean over every party's
    rows (``data.missing: {column: mean}``), computed under MPC (:mod:`mpcfl.tasks.train.dataset`):
    each party's own mean would differ from the others'."""
    if getattr(job, "task", None) != "train" or job.partition != "horizontal":
        return []
    return [column for column, how in (job.data.missing or {}).items() if how == "mean"]


def present_sums(data: PartyData, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per column, this party's sum of its present training cells and how many there are."""
    index = [data.train.columns.index(c) for c in columns]
    values = data.train.x[:, index]
    present = ~np.isnan(values)
    return np.where(present, values, 0.0).sum(axis=0), present.sum(axis=0).astype(np.float64)


def fill_missing(data: PartyData, fills: dict[str, float]) -> None:
    """Fills the named columns' missing cells of train and test with ``fills``, in place, and records them."""
    for column, value in fills.items():
        i = data.train.columns.index(column)
        for split in (data.train, data.test):
            if split is not None:
                split.x[np.isnan(split.x[:, i]), i] = value
    data.imputed.update(fills)


def contents(data: PartyData) -> dict[str, bytes]:
    """What a party's run is made from, by the job key naming each file, as loaded: columns, row IDs,
    values and labels. A run commits to these (:mod:`mpcfl.tasks.run`), not to the files' bytes, so a
    file changed after it was read cannot pass for the one the run used. With a backbone, the rows as read
    before it: the same data through another backbone is the same data (its privacy ledger included)."""
    if data.loaded is not None:
        return data.loaded
    parts = {}
    for key, split in (("data.train", data.train), ("data.test", data.test)):
        if split is not None:
            shapes = [split.x.shape, str(split.x.dtype), None if split.y is None else [split.y.shape, str(split.y.dtype)]]
            header = json.dumps([split.columns, split.ids, shapes]).encode()
            parts[key] = header + split.x.tobytes() + (b"" if split.y is None else split.y.tobytes())
    return parts


def dataset_digest(parts: dict[str, bytes]) -> str:
    """A digest of a party's rows as loaded (:func:`contents`): what earlier versions named its privacy
    ledger by (:func:`mpcfl.dp.ledger.open_ledgers` carries such a ledger into :func:`ledger_keys`')."""
    digest = hashlib.sha256()
    for key, value in sorted(parts.items()):
        digest.update(key.encode() + b"\0" + len(value).to_bytes(8, "big") + value)
    return digest.hexdigest()


def ledger_keys(job: TrainJob, party: str) -> dict[str, list[Path]]:
    """The names of ``party``'s privacy ledgers, each with its files: one per data file the job reads
    (train, and test if any), :func:`mpcfl.data.files.rows_key` each (files of the same rows share one).

    Raises:
        DataError: a file is missing or unreadable.
    """
    spec = job.parties[job.rank_of(party)].data
    keys: dict[str, list[Path]] = {}
    for path in (spec.train, spec.test):
        if path is not None:
            keys.setdefault(rows_key(path, party=party), []).append(path)
    return keys


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


def check_scaled_columns(data: PartyData, scaling: dict[str, tuple[float, float]], source: Path | None) -> None:
    """Refuses a feature column of this party that the job's ``data.scaling`` leaves out.

    Raises:
        DataError: names the party, its file, the job file, the key and the column.
    """
    for column in data.train.columns:
        if column not in scaling:
            raise DataError(
                f"party {data.party}: {data.train.path}: column {column!r} has no [center, scale] in "
                f"{source}: data.scaling; declare public constants for every feature column"
            )


def scale_publicly(data: PartyData, scaling: dict[str, tuple[float, float]], source: Path | None) -> None:
    """Scales this party's columns by the job's public constants, ``(x - center) / scale``, in place.

    Nothing about the rows goes in, so one record moves only its own row (what DP needs).

    Raises:
        DataError: as :func:`check_scaled_columns`.
    """
    check_scaled_columns(data, scaling, source)
    columns = data.train.columns
    if columns:
        center, scale = (np.array([scaling[c][i] for c in columns]) for i in (0, 1))
        apply_scaler(data, center, scale)


def check_scaling_covers(scaling: dict[str, tuple[float, float]], n_columns: int, source: Path | None) -> None:
    """Refuses entries that name no party's column (a typo): every party checked that its own
    columns have one, so the counts agree exactly when none is left over.

    Raises:
        DataError: names the file and the key.
    """
    if len(scaling) != n_columns:
        raise DataError(
            f"{source}: data.scaling: {len(scaling)} columns declared, the parties hold {n_columns} feature "
            f"columns; remove the entries that name no party's column"
        )


def _beyond(data: PartyData, limit: float) -> tuple[Split, str, float] | None:
    """The first split and column whose largest magnitude exceeds ``limit``, with that magnitude."""
    for split in (data.train, data.test):
        if split is None or not split.x.size:
            continue
        peak = np.abs(split.x).max(axis=0)
        worst = int(np.argmax(peak))
        if peak[worst] > limit:
            return split, split.columns[worst], float(peak[worst])
    return None


def check_range(data: PartyData, max_abs: float) -> None:
    """Refuses values that could overflow CrypTen's fixed-point ring.

    Raises:
        DataError: names the party, the file and the column.
    """
    if found := _beyond(data, max_abs):
        split, column, peak = found
        raise DataError(
            f"party {data.party}: {split.path}: column {column!r} reaches "
            f"{peak:.4g}, beyond data.max_abs={max_abs:g}; fixed point (16 fractional "
            f"bits, 64-bit ring) would overflow. Enable data.standardize or rescale the column"
        )


def columns_beyond(data: PartyData, max_abs: float) -> list[str]:
    """The feature columns holding a value beyond ``max_abs`` (train or test), by name: what a DP
    job may tell this party's own operator about :func:`clamp_range`, never its peers."""
    beyond: set[str] = set()
    for split in (data.train, data.test):
        if split is not None and split.x.size:
            beyond.update(c for c, out in zip(split.columns, (np.abs(split.x) > max_abs).any(axis=0)) if out)
    return sorted(beyond)


def clamp_range(data: PartyData, max_abs: float) -> int:
    """Clamps every train and test feature value to ``[-max_abs, max_abs]``, in place.

    What a DP job does instead of :func:`check_range`: a refusal would depend on one
    record and every peer would see the job stop, outside any budget. Clamping is part
    of the mechanism (it happens before sharing, at the party alone).

    Returns:
        How many values were clamped (for this party's own log only).
    """
    clamped = 0
    for split in (data.train, data.test):
        if split is not None and split.x.size:
            clamped += int((np.abs(split.x) > max_abs).sum())
            split.x = np.clip(split.x, -max_abs, max_abs)
    return clamped


# Joint standardisation shares each party's column sums and sums of squared deviations
# (computed in plaintext, divided by the row count): values that are only added, which
# wrap at 2^47. A squared deviation of raw values up to 2^22 is at most 2^46.
JOINT_STATS_MAX_ABS = 2.0**22


def check_joint_stats_range(data: PartyData) -> None:
    """Refuses raw values whose squared deviations could wrap in joint standardisation.

    Raises:
        DataError: names the party, the file and the column.
    """
    if found := _beyond(data, JOINT_STATS_MAX_ABS):
        split, column, peak = found
        raise DataError(
            f"party {data.party}: {split.path}: column {column!r} reaches {peak:.4g}, "
            f"beyond {JOINT_STATS_MAX_ABS:.0f} (2^22): joint standardisation would wrap fixed point on its "
            f"squared deviations; rescale the column"
        )


def columns_hash(columns: list[str]) -> int:
    """A public fingerprint of column names, as a signed 64-bit integer."""
    digest = hashlib.blake2b(json.dumps(columns).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)
