"""The training set under MPC: public shapes agreed, data prepared and range-checked, then shared.

Every party calls :func:`share_dataset` at the same point with its own
:class:`~mpcfl.data.party.PartyData`. What the other parties learn before sharing
is public shape metadata (row and column counts; in a horizontal job, a hash of
the column names). :func:`prepare` is the one order of preprocessing steps
(standardisation, DP feature clipping from :mod:`mpcfl.tasks.train.dp_sgd`, range and
fixed-point checks from :mod:`mpcfl.tasks.train.bounds`), shared by the secure run,
``mpcfl validate --party`` and the plaintext baseline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from mpcfl.data.files import DataError
from mpcfl.errors import ConfigError
from mpcfl.data.party import (
    PartyData, Split, apply_scaler, check_joint_stats_range, check_range, check_scaled_columns, check_scaling_covers,
    clamp_range, columns_hash, fill_missing, filled_jointly, present_sums, scale_publicly, standardize_locally,
)
from mpcfl.jobs.schema import TrainJob
from mpcfl.models.heads import job_head
from mpcfl.models.spec import FactoryModelSpec
from mpcfl.mpc.session import agreed, all_gather_public
from mpcfl.tasks.train.bounds import PRODUCT_LIMIT, check_model, dp_mlp_headroom, safe_input_norm, steps
from mpcfl.tasks.train.dp_sgd import (
    apply_center, bound_features, calibration, center_charge, center_noise, center_sums, check_plausible, clips_features,
    own_columns,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def prepare(
    job: TrainJob,
    data: PartyData,
    *,
    feature_counts: list[int],
    standardize: Callable[[PartyData], None],
    check: Callable[[PartyData], T],
    center: Callable[[PartyData], None] | None = None,
) -> T:
    """Preprocesses one party's data in place, in the order every path uses.

    Standardise first (``standardize``: this path's statistics, local or joint; or the
    job's public ``data.scaling`` constants), then, for DP, centre (``dp.center``: ``center``
    subtracts this path's noisy mean), clamp every value to ``data.max_abs`` and clip
    features (only DP logistic regression does), then ``check`` the values that will be
    shared: bounds hold for what goes into MPC, not for raw data.

    Args:
        feature_counts: every party's number of feature columns (public).
        center: required when the job has ``dp.center``.

    Returns:
        What ``check`` returns.
    """
    if job.data.standardize:
        standardize(data)
    elif job.data.scaling is not None:
        scale_publicly(data, job.data.scaling, job.source)
    if job.dp is not None and job.dp.center is not None:
        assert center is not None, "a dp.center job's preprocessing needs its mean"
        center(data)
    if job.dp is not None and (clamped := clamp_range(data, job.data.max_abs)):
        # this party's operator alone learns it: the peers see the same run either way
        log.warning("party %s: clamped %d feature values to data.max_abs=%g (DP: clamped, not refused)",
                    data.party, clamped, job.data.max_abs)
    bound_features(job, data, feature_counts)
    return check(data)


def check_bounds(job: TrainJob, data: PartyData, *, n_features: int, n_rows: int, metric_rows: int, share: float) -> float:
    """Refuses this party's features if training could wrap fixed point (:mod:`mpcfl.tasks.train.bounds`).

    The bound needs every example's feature-vector norm; a party knows only its own part
    of it, so each checks its part against ``share`` of the squared safe norm: its
    columns' fraction in a vertical split (the parts add up), 1 in a horizontal one
    (a row belongs to one party).

    Returns:
        The headroom: how many times the safe norm exceeds this party's (``inf`` with no features).

    Under DP the bound is public instead (:func:`_dp_headroom`): a refusal that depended on
    one record would tell every peer about it, outside the budget.

    Raises:
        DataError: names the party, file and column of the row that drives the bound.
        ConfigError: under DP, the job's bounds do not fit fixed point, whatever the data.
    """
    if job.dp is not None:
        return _dp_headroom(job, n_features=n_features, n_rows=n_rows, metric_rows=metric_rows)
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


def check_party(job: TrainJob, party: str) -> list[str]:
    """``mpcfl validate --party``: this party's files loaded and checked as its process would (:func:`check_alone`),
    and, where its files tell n, DP's plausibility."""
    from mpcfl.data.party import load_party_data
    from mpcfl.tasks.train.dp_sgd import check_plausible

    loaded = load_party_data(job, party)
    before = " before private set intersection" if job.keyed else ""
    lines = [f"{loaded.train.x.shape[0]} training rows{before}, {loaded.train.x.shape[1]} feature columns", check_alone(job, loaded)]
    if job.dp is not None:
        # Vertical: every party holds all n rows; horizontal: n is the parties' total, unknown here;
        # keyed by ID: n is the intersection's size, known only after PSI.
        check_plausible(job, loaded.train.x.shape[0] if job.partition == "vertical" and not job.keyed else None)
    return lines


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
    if joint := filled_jointly(job):  # as if this party's rows were all rows: its own means fill its gaps here
        sums, counts = present_sums(data, joint)
        fill_missing(data, {c: float(t / n) for c, t, n in zip(joint, sums, counts) if n})
    if job.data.standardize and job.partition == "horizontal":
        check_joint_stats_range(data)
        return "raw values fit joint standardisation; training bounds are checked at run time, after it"
    if job.partition == "vertical" and isinstance(job.model, FactoryModelSpec):
        check_range(data, job.data.max_abs)  # the module takes every party's columns, not this party's alone
        return "values in range; a factory model's input size and bounds are checked at run time, on all columns"
    rows = data.train.x.shape[0]
    test = 0 if data.test is None else data.test.x.shape[0]

    def checks(part: PartyData) -> float:
        check_range(part, job.data.max_abs)
        n_features = part.train.x.shape[1]
        return check_bounds(job, part, n_features=n_features, n_rows=rows, metric_rows=max(rows, test), share=1.0)

    def centre(part: PartyData) -> None:  # its own rows' mean, noiseless: nothing here leaves the party
        apply_center(part, center_sums(job, part, [part.train.x.shape[1]], 0) / max(rows, 1))

    headroom = prepare(
        job, data, feature_counts=[data.train.x.shape[1]], standardize=standardize_locally, check=checks, center=centre,
    )
    return f"fixed-point headroom {headroom:.3g}x on its own columns and rows (the run checks all parties together)"


def _dp_headroom(job: TrainJob, *, n_features: int, n_rows: int, metric_rows: int) -> float:
    """DP's fixed-point headroom from public bounds alone: feature-clipped logistic regression's
    rows have norm at most ``dp.clip``; an MLP's per-entry bounds are :func:`dp_mlp_headroom`'s.

    Raises:
        ConfigError: names the job file and the key to lower.
    """
    assert job.dp is not None
    # Refuses a model whose rounding would move epsilon by more than 1%: the whole model's size where
    # data.scaling names every column (a party of a vertical job holds only its own).
    calibration(job, n_features if job.data.scaling is None else len(job.data.scaling), n_rows)
    if not clips_features(job):
        return dp_mlp_headroom(job, n_features)
    allowed = safe_input_norm(job, n_features=n_features, n_rows=n_rows, metric_rows=metric_rows)
    if job.dp.clip > allowed:
        raise ConfigError(
            f"{job.source}: dp.clip: rows clipped to norm {job.dp.clip:g} can drive {steps(job, n_rows)} SGD steps "
            f"past fixed point's {PRODUCT_LIMIT:.3g} (2^31) products (at most {allowed:.4g} fits); lower dp.clip, "
            f"training.learning_rate or training.epochs"
        )
    return allowed / job.dp.clip


@dataclass
class SharedData:
    """Secret-shared features and labels of the whole (virtual) dataset."""

    x_train: Any
    y_train: Any
    x_test: Any | None
    y_test: Any | None
    n_features: int
    feature_counts: list[int]  # every party's number of feature columns (public), in rank order
    center: list[float] | None = None  # dp.center's noisy mean of every input, as opened to every party


def _public_shapes(job: TrainJob, data: PartyData) -> list[list[int]]:
    """Every party's public shape metadata (:func:`public_shape`), exchanged and checked (:func:`check_shapes`)."""
    shapes = all_gather_public(public_shape(job, data))
    check_shapes(job, shapes)
    return shapes


def public_shape(job: TrainJob, data: PartyData) -> list[int]:
    """A party's public shape metadata: [train rows, test rows, columns, hash].

    The hash of the column names goes out only in a horizontal job, where every
    party holds the same columns anyway; in a vertical one it would let a peer test
    guesses of this party's schema (an unsalted hash of, say, "hiv_status"), so 0
    is sent instead.
    """
    return [
        data.train.x.shape[0],
        -1 if data.test is None else data.test.x.shape[0],
        data.train.x.shape[1],
        columns_hash(data.train.columns) if job.partition == "horizontal" else 0,
    ]


def check_shapes(job: TrainJob, shapes: list[list[int]]) -> None:
    """Refuses parties whose shapes do not fit together: the same rows at every party (vertical), the
    same columns (horizontal).

    Raises:
        DataError: names the party that differs from the first.
    """
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


def joint_size(job: TrainJob, shapes: list[list[int]]) -> tuple[int, int, int]:
    """The model's input features, training rows and test rows, from every party's :func:`public_shape`:
    a vertical partition adds the parties' columns, a horizontal one their rows."""
    if job.partition == "vertical":
        return sum(s[2] for s in shapes), shapes[0][0], shapes[0][1]
    return shapes[0][2], sum(s[0] for s in shapes), sum(s[1] for s in shapes)


def _standardize_jointly(job: TrainJob, data: PartyData, shapes: list[list[int]], device: torch.device) -> None:
    """Horizontal partition: column statistics over all rows, computed under MPC on ``device``.

    Two passes (mean, then mean squared deviation) avoid the cancellation of
    E[x^2] - E[x]^2 in fixed point. Only the aggregate statistics are revealed.
    """
    from mpcfl.mpc.reveal import reveal
    from mpcfl.mpc.session import shared_sum

    total = sum(s[0] for s in shapes)
    everyone = list(range(job.world_size))

    def joint_sum(local: np.ndarray, what: str) -> np.ndarray:
        summed = shared_sum(torch.tensor(local / total), world=job.world_size, device=device)
        return reveal(summed, to=everyone, what=what).double().numpy()  # revealed values are on the host

    mean = joint_sum(data.train.x.sum(axis=0), "column means for standardisation")
    var = joint_sum(((data.train.x - mean) ** 2).sum(axis=0), "column variances for standardisation")
    apply_scaler(data, mean, np.sqrt(np.clip(var, 0.0, None)))


def _noisy_mean(job: TrainJob, data: PartyData, counts: list[int], n_rows: int, *, rank: int, device: torch.device) -> np.ndarray:
    """``dp.center``: the mean of the clipped training rows (:func:`~mpcfl.tasks.train.dp_sgd.center_sums`),
    summed under MPC and opened to every party with Gaussian noise (the job's ``dp.noise``), charged
    as one release; the division by the public row count is post-processing."""
    from mpcfl.mpc.reveal import Privacy, reveal
    from mpcfl.mpc.session import shared_sum

    charge = center_charge(job)
    assert charge is not None
    summed = shared_sum(torch.tensor(center_sums(job, data, counts, rank)), world=job.world_size, device=device)
    privacy = Privacy(charge=charge, scale=center_noise(job, summed.size(0)), colluders=job.colluders, source=job.noise_source)
    sums = reveal(summed, to=list(range(job.world_size)), what="feature sums for centring (dp.center)", privacy=privacy)
    return sums.double().numpy() / n_rows


def _impute_jointly(job: TrainJob, data: PartyData, columns: list[str], total: int, device: torch.device) -> None:
    """Horizontal partition, ``data.missing: {column: mean}``: the mean of every party's present cells,
    under MPC. Opened to every party (and recorded): first whether each column has a present cell at
    all (one bit each: the division needs a count of at least 1), then each column's mean, divided
    under MPC (:mod:`mpcfl.mpc.division`): neither a party's sums nor any count is opened.

    Raises:
        DataError: a present cell beyond :data:`MAX_IMPUTED` (fixed point's products), or a column
            with no present cell at any party.
    """
    from mpcfl.mpc.division import divisor_scale, scaled_reciprocal
    from mpcfl.mpc.reveal import reveal
    from mpcfl.mpc.session import shared_sum

    sums, counts = present_sums(data, columns)
    peaks = [np.nanmax(np.abs(data.train.x[:, data.train.columns.index(c)]), initial=0.0) for c in columns]
    agreed("imputation range check", job.party_names, lambda: _check_imputed(data, columns, peaks))
    everyone = list(range(job.world_size))
    shared = shared_sum(torch.tensor(np.concatenate([sums, counts])), world=job.world_size, device=device)
    total_sums, total_counts = shared[: len(columns)], shared[len(columns):]
    present = reveal(total_counts.gt(0.5), to=everyone, what="whether each column to fill has a present cell").cpu()
    empty = [c for c, bit in zip(columns, present.tolist()) if bit < 0.5]
    if empty:
        raise DataError(f"{job.source}: data.missing: column {empty[0]!r}: every training cell is missing at every party; no mean to fill with")
    means = total_sums.div(divisor_scale(total)) * scaled_reciprocal(total_counts, total)
    opened = reveal(means, to=everyone, what="column means for missing cells").double().cpu().numpy()
    fill_missing(data, {column: float(m) for column, m in zip(columns, opened)})


MAX_IMPUTED = 2.0**12  # |present cell| averaged under MPC: a product's truncation errs with probability |v| / 2^32


def _check_imputed(data: PartyData, columns: list[str], peaks: list[float]) -> None:
    for column, peak in zip(columns, peaks):
        if peak > MAX_IMPUTED:
            raise DataError(
                f"party {data.party}: {data.train.path}: column {column!r} reaches {peak:.4g}, beyond {MAX_IMPUTED:g}, the "
                "largest value a mean under MPC takes; fill it with a constant in data.missing, or rescale the column"
            )


def _crypten() -> Any:
    from mpcfl.mpc.engine import import_crypten

    return import_crypten()


def share_dataset(
    job: TrainJob, data: PartyData, *, rank: int, device: torch.device, center: list[float] | None = None,
) -> SharedData:
    """Agrees on shapes with the other parties, prepares the data and secret-shares it.

    ``center``: ``dp.center``'s mean as a resumed run's checkpoint holds it, reused (not opened again:
    the first opening is charged, and the checkpointed model was trained on it).

    Every party calls this at the same point with its own :class:`PartyData`. Features
    and labels (and the joint statistics of a horizontal job) are shared on ``device``,
    the party's :func:`~mpcfl.mpc.session.session_device`.

    Raises:
        DataError: shapes disagree across parties, or values are out of range.
    """
    crypten = _crypten()
    head = job_head(job)
    shapes = _public_shapes(job, data)
    vertical = job.partition == "vertical"
    n_features, n_rows, n_test = joint_size(job, shapes)
    # n_features is public and the same at every party: each refuses a model that does not fit it
    agreed("model check", job.party_names, lambda: check_model(job, n_features))
    if center is None and center_charge(job) is not None:
        # what public numbers refuse is refused before dp.center opens (and charges) the mean
        calibration(job, n_features, n_rows)
        check_plausible(job, n_rows)
        _dp_headroom(job, n_features=n_features, n_rows=n_rows, metric_rows=max(n_rows, n_test))
    scaling = job.data.scaling
    if scaling is not None:
        agreed("scaling check", job.party_names, lambda: check_scaled_columns(data, scaling, job.source))
        check_scaling_covers(scaling, n_features, job.source)

    if joint := filled_jointly(job):
        _impute_jointly(job, data, joint, n_rows, device)  # n_rows: every party's training rows, public

    def standardize(part: PartyData) -> None:
        if vertical:
            standardize_locally(part)
            return
        agreed("raw range check", job.party_names, lambda: check_joint_stats_range(part))
        _standardize_jointly(job, part, shapes, device)

    def checks(part: PartyData) -> None:
        check_range(part, job.data.max_abs)
        share = part.train.x.shape[1] / n_features if vertical else 1.0
        headroom = check_bounds(job, part, n_features=n_features, n_rows=n_rows, metric_rows=max(n_rows, n_test), share=share)
        log.info("fixed-point headroom: this party's feature norm may grow %.3g-fold before training could wrap", headroom)

    counts = [s[2] for s in shapes]
    opened: list[list[float]] = [] if center is None else [center]

    def centre(part: PartyData) -> None:
        if not opened:
            opened.append(_noisy_mean(job, part, counts, n_rows, rank=rank, device=device).tolist())
        apply_center(part, np.asarray(opened[0])[own_columns(job, counts, rank)])

    prepare(
        job, data, feature_counts=counts, standardize=standardize,
        check=lambda part: agreed("range check", job.party_names, lambda: checks(part)), center=centre,
    )

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
            y = head.secure_targets(local.y if rank == owner else None, rows)
            y_enc = crypten.cryptensor(y, src=owner, device=device)
            return x_enc, y_enc
        xs, ys = [], []
        for r, shape in enumerate(shapes):
            rows = shape[which]
            mine = r == rank
            x = torch.tensor(local.x, dtype=torch.float32) if mine else torch.zeros(rows, shape[2])
            xs.append(crypten.cryptensor(x, src=r, device=device))
            ys.append(crypten.cryptensor(head.secure_targets(local.y if mine else None, rows), src=r, device=device))
        return crypten.cat(xs, dim=0), crypten.cat(ys, dim=0)

    x_train, y_train = share(data.train, 0)
    x_test = y_test = None
    if shapes[0][1] >= 0:
        x_test, y_test = share(data.test, 1)
    log.info("shared %d training rows x %d features", x_train.size(0), n_features)
    return SharedData(x_train, y_train, x_test, y_test, n_features, counts, opened[0] if opened else None)
