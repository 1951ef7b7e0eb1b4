"""The job schema: one YAML file describes parties, data, model, the task and outputs.

A job's ``task`` is ``train`` (the default; :class:`TrainJob`) or ``inference``
(:class:`InferenceJob`). :func:`load_job` turns a file into an immutable job or raises a
:class:`~mpcfl.errors.ConfigError` that names the file and the key. Unknown keys
are errors, so typos are caught. Relative paths are resolved against the folder
of the job file, so a job runs the same from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from mpcfl import runs
from mpcfl.errors import ConfigError
from mpcfl.models import sigmoid as sigmoids
from mpcfl.models.spec import REGRESSION_LOSSES, FactoryModelSpec, FactorySpec, ModelSpec, Regression
from mpcfl.mpc import providers
from mpcfl.mpc.compat import DEFAULT_TIMEOUT_S
from mpcfl.mpc.keys import is_raw_key, read_public_key

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"  # job, party and process names
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PartyData(_Strict):
    """One party's own files; only that party's process reads them."""

    train: Path
    test: Path | None = None
    id_column: str | None = Field(
        default=None, min_length=1, description="vertical only: this party's column of row IDs (overrides data.id_column)"
    )


class PartySpec(_Strict):
    name: Name
    data: PartyData | None = None


class LabelSpec(_Strict):
    """Where the labels are: a CSV column name, or a column index for .npy files."""

    column: str | int
    party: Name | None = Field(
        default=None, description="vertical only: the one party that holds the labels"
    )
    classes: list[str] | None = Field(
        default=None, min_length=2,
        description="the label column's names of the classes, in class order (class i is classes[i]); "
        "model.num_classes and training.loss follow from it",
    )

    scaling: tuple[float, float] | None = Field(
        default=None,
        description="regression: public [center, scale]; the model learns (y - center) / scale, and its "
        "predictions and metrics are mapped back to the label column's units",
    )

    max_abs: float = Field(
        default=5.0, gt=0, le=2.0**15,
        description="regression: the largest scaled target |(y - center) / scale|; a target beyond it is refused "
        "(with dp, clamped to it). It bounds the error a gradient is computed from",
    )

    @field_validator("scaling")
    @classmethod
    def _positive_scale(cls, scaling: tuple[float, float] | None) -> tuple[float, float] | None:
        if scaling is not None and not (math.isfinite(scaling[0]) and math.isfinite(scaling[1]) and scaling[1] > 0):
            raise ValueError(f"[center, scale] must be finite with scale > 0, got [{scaling[0]:g}, {scaling[1]:g}]")
        return scaling

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str] | None) -> list[str] | None:
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError("each class name must appear once")
        return classes


# CrypTen encodes x as round(x * 2^16) in a signed 64-bit ring, so a product of two
# encoded values, (a * 2^16)(b * 2^16), wraps once |a * b| reaches 2^63 / 2^32 = 2^31.
# Features are multiplied by themselves (row norms under DP) and by weights, so a
# feature must satisfy x^2 <= 2^30: 2^15 keeps a factor of two in hand.
MAX_ABS_LIMIT = 2.0**15


class DataSpec(_Strict):
    standardize: bool = True
    id_column: str | None = Field(
        default=None,
        min_length=1,
        description="vertical only: the column of row IDs (a patient number) in every party's files; rows are "
        "then lined up by private set intersection, in any order and with partial overlap",
    )
    max_ids: PositiveInt = Field(
        default=1_000_000,
        le=1 << 24,
        description="with id_column: the most IDs a party may bring to the intersection (train and test each). "
        "It bounds what a peer may send and how long the others wait for it, and how many guessed IDs "
        "a party that cheats can test in one run",
    )
    min_intersection: PositiveInt = Field(
        default=10,
        description="refuse a private set intersection (train or test) with fewer rows: aggregates over a "
        "handful of people say too much about each",
    )
    scaling: dict[str, tuple[float, float]] | None = Field(
        default=None,
        description="public constants {column: [center, scale]}: each feature becomes (x - center) / scale; "
        "instead of standardize, and for every feature column of every party. A DP job needs them "
        "(or raw values): statistics of the private rows would be outside the guarantee",
    )
    categorical: dict[str, list[str]] | None = Field(
        default=None,
        description="{column: [category, ...]}: public category lists; each column becomes one 0/1 column per "
        "category (column=category) at its owner; a value outside the list is refused, unless it holds 'other'",
    )
    missing: dict[str, Literal["mean", "median"] | float] | None = Field(
        default=None,
        description="{column: mean | median | constant}: how a column's missing cells (empty, NA, NaN) are filled, "
        "at its owner from its own training rows (mean, median) or by a constant; any other missing cell is refused",
    )
    max_abs: float = Field(
        default=1e4,
        gt=0,
        description="refuse feature values beyond this (after standardisation); with dp, each party clamps "
        "its values to it instead (a refusal would depend on one record). At most 2^15 = 32768: "
        "fixed point (16 fractional bits, signed 64-bit ring) wraps on a product above 2^31, and a "
        "feature is multiplied by itself and by weights, so x^2 must stay below 2^31 with a margin",
    )

    @field_validator("categorical")
    @classmethod
    def _categories(cls, categorical: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for column, categories in (categorical or {}).items():
            if not categories or len(set(categories)) != len(categories):
                raise ValueError(f"{column}: list each category once, at least one")
        return categorical

    @field_validator("max_abs")
    @classmethod
    def _fits_fixed_point(cls, max_abs: float) -> float:
        if max_abs > MAX_ABS_LIMIT:
            raise ValueError(
                f"{max_abs:g} is beyond {MAX_ABS_LIMIT:g} (2^15), the largest feature magnitude fixed point "
                "can multiply without wrapping; standardize or rescale the data"
            )
        return max_abs

    @field_validator("scaling")
    @classmethod
    def _positive_scales(cls, scaling: dict[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]] | None:
        for column, (center, scale) in (scaling or {}).items():
            if not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
                raise ValueError(f"column {column!r}: [center, scale] must be finite with scale > 0, got [{center:g}, {scale:g}]")
        return scaling

    @model_validator(mode="after")
    def _one_scaling(self) -> DataSpec:
        if self.standardize and self.scaling is not None:
            raise ValueError("scaling replaces standardisation with public constants; set data.standardize: false")
        return self

    def check_dp_scale(self) -> None:
        """Refuses features of unknown size under DP: with neither a scaling nor a declared bound,
        clipping each row or gradient to ``dp.clip`` flattens them, and the model may learn nothing
        (a 3-class job on raw features predicted one class, with no warning).

        Raises:
            ValueError: naming the keys that fix it.
        """
        if not (self.standardize or self.scaling is not None or "max_abs" in self.model_fields_set):
            raise ValueError(
                "data.scaling: with dp, features need a known scale: declare public constants in "
                "data.scaling: {column: [center, scale]}, or data.max_abs: the bound the raw values lie within"
            )


class TrainingSpec(_Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 32
    learning_rate: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    loss: Literal["bce", "cross_entropy", "mse", "huber"] = Field(
        default="bce",
        description="bce (two classes), cross_entropy (more), or, for regression, mse or huber; follows from "
        "model.num_classes, labels.classes and model.type linear_regression (mse) unless set",
    )
    huber_delta: float = Field(
        default=1.0, gt=0,
        description="loss huber: quadratic within +-delta of the target, linear beyond (in the scaled target's units)",
    )
    sigmoid: str = Field(
        default=sigmoids.DEFAULT,
        description="two classes: the sigmoid of the gradient under MPC (metrics and `mpcfl baseline` stay exact): "
        "crypten (CrypTen's, error ~2e-3, 18 rounds with prefetched triples: its sign and exp in the same rounds), piecewise (clamp(z/4 + 1/2, 0, 1): one comparison, "
        "error 0.12), poly (degree-9 polynomial on logits clamped to +-8: one comparison and 4 products, error 0.016)",
    )
    seed: int = 0
    shuffle: bool = True

    @field_validator("sigmoid")
    @classmethod
    def _known_sigmoid(cls, name: str) -> str:
        if name not in sigmoids.NAMES:
            raise ValueError(f"unknown sigmoid {name!r}; choose one of {', '.join(sigmoids.NAMES)}")
        return name


class DPMetricsSpec(_Strict):
    """Metrics released with output perturbation, charged to the budget."""

    mechanism: Literal["gaussian", "laplace"] = "gaussian"
    noise_multiplier: float = Field(gt=0, description="noise scale over the metrics' sensitivity")
    loss_bound: float = Field(
        default=2.0, gt=0, description="each example's loss is clipped to [0, loss_bound] inside MPC"
    )
    when: Literal["final", "every_epoch"] = Field(
        default="final",
        description="final: one release of the trained model's loss and accuracy, charged once; "
        "every_epoch: one per epoch, each charged",
    )


WEIGHT_BOUND = 4.0


class DPSpec(_Strict):
    """Differential privacy for the trained model (DP-SGD under MPC) and, optionally, the metrics."""

    epsilon: float = Field(gt=0, description="the privacy budget for the whole job")
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    clip: float = Field(
        default=1.0,
        gt=0,
        description="logistic_regression: bound on each example's feature-vector L2 norm (each party "
        "clips its own slice of a row to clip/sqrt(parties holding features)); mlp: bound on each "
        "example's gradient L2 norm, clipped inside MPC",
    )
    weight_bound: float = Field(
        default=WEIGHT_BOUND,
        gt=0,
        description="mlp: every parameter is kept within [-weight_bound, weight_bound] (projected under MPC "
        "after each step), so the per-example clip holds for any weights the run reaches",
    )
    collusion_threshold: int | None = Field(
        default=None,
        ge=0,
        description="t: parties that may pool their noise shares (receivers included: at least 1 when "
        "anything is revealed); default n-1",
    )
    metrics: DPMetricsSpec | None = Field(
        default=None, description="release per-epoch metrics with noise, charged; without it they are not revealed"
    )
    sampling: Literal["shuffle", "poisson"] = Field(
        default="shuffle",
        description="shuffle: disjoint batches from a public permutation each epoch, accounted without "
        "amplification by subsampling (a record's batch is public), under replace-one neighbours; "
        "poisson: each step includes each row with probability q = training.batch_size / rows "
        "(training.batch_size is then the expected batch), by bits drawn jointly under MPC and never "
        "opened, round(1/q) steps per epoch, accounted as Poisson-subsampled Gaussians under add/remove",
    )


# None only until validation: JobBase._default_outputs_dir sets runs/<job name>.
_OUTPUTS_DIR = "where the parties write, a folder each (default: runs/<job name>, beside the job file)"


class OutputSpec(_Strict):
    dir: Path | None = Field(default=None, description=_OUTPUTS_DIR)
    model_to: list[Name] | Literal["none"] = "none"
    metrics_to: list[Name] | Literal["all", "none"] = "all"


class IdentitySpec(_Strict):
    """Per-process Ed25519 identities: each process proves its own rank with its own private key."""

    public_keys: dict[Name, str] = Field(
        description="every process's public key by name (each party, and `dealer`): the base64 raw key "
        "or a path to a .pub/PEM file; loaded into base64 form, so the fingerprint covers the keys"
    )

    @field_validator("public_keys")
    @classmethod
    def _load(cls, keys: dict[str, str]) -> dict[str, str]:
        loaded = {}
        for name, value in keys.items():
            try:
                loaded[name] = read_public_key(value)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return loaded


class RuntimeSpec(_Strict):
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, description="process-group timeout")
    device: Literal["cpu", "cuda"] = "cpu"
    provider: str = Field(
        default=providers.DEFAULT,
        description=f"where Beaver triples come from: {', '.join(providers.NAMES)} (ttp: a dealer process; "
        "tfp: party 0 generates every triple and can see all secrets, for tests only)",
    )
    secret_file: Path | None = Field(
        default=None,
        description="the job secret every process must prove it knows (else $MPCFL_JOB_SECRET); mode 0600",
    )
    identity: IdentitySpec | None = Field(
        default=None, description="per-process Ed25519 identities instead of the shared secret"
    )
    prefetch: bool = Field(
        default=True,
        description="ttp: fetch each training step's (inference: each batch's) triples from the dealer in one "
        "batch, recorded on the first step (batch) of its size, instead of one round trip per triple",
    )
    mask_reuse: bool = Field(
        default=True,
        description="ttp: open the training features masked once and give every later product with them a "
        "triple whose first factor is that mask (SecureML), so a step opens O(n + d) elements, not O(n·d)",
    )


    @field_validator("provider")
    @classmethod
    def _known_provider(cls, name: str) -> str:
        return providers.known(name)


class JobBase(_Strict):
    """What every job has: a name, the parties in rank order, and runtime settings."""

    name: Name
    parties: list[PartySpec] = Field(min_length=2)
    runtime: RuntimeSpec = RuntimeSpec()
    source: Path | None = Field(default=None, exclude=True)
    run_id: str | None = Field(default=None, exclude=True)  # set by bound_to, never by the file

    @model_validator(mode="before")
    @classmethod
    def _default_outputs_dir(cls, raw: Any) -> Any:
        """``outputs.dir`` defaults to ``runs/<name>`` (a loaded file's is beside it: :func:`resolve_paths`),
        so after validation it is never None."""
        return default_outputs_dir(raw) if isinstance(raw, dict) else raw

    @field_validator("parties")
    @classmethod
    def _unique_names(cls, parties: list[PartySpec]) -> list[PartySpec]:
        seen: set[str] = set()
        for party in parties:
            if party.name in seen:
                raise ValueError(f"duplicate party name {party.name!r}")
            if party.name == providers.DEALER:
                # The dealer's process, its key in runtime.identity and its log prefix use this name.
                raise ValueError(f"party name {party.name!r} is reserved for the triple dealer's process")
            seen.add(party.name)
        return parties

    @model_validator(mode="after")
    def _every_process_has_a_key(self) -> JobBase:
        if self.runtime.identity is None:
            return self
        listed = set(self.runtime.identity.public_keys)
        processes = providers.get(self.runtime.provider).processes(self.party_names)
        for name in processes:
            if name not in listed:
                raise ValueError(f"runtime.identity.public_keys: no public key for {name}")
        extra = sorted(listed - set(processes))
        if extra:
            raise ValueError(f"runtime.identity.public_keys.{extra[0]}: not a process of this job")
        return self

    def _check_party(self, key: str, name: str) -> None:
        if name not in self.party_names:
            raise ValueError(f"{key}: {name!r} is not a party of this job")

    @property
    def party_names(self) -> list[str]:
        return [p.name for p in self.parties]

    @property
    def world_size(self) -> int:
        """Number of data parties (the dealer is one more process, rank world_size)."""
        return len(self.parties)

    @property
    def survivors_needed(self) -> int | None:
        """The fewest parties that go on when others' processes die; ``None``: a lost process ends the job."""
        return None

    def rank_of(self, name: str) -> int:
        """Rank of a party, in job order.

        Raises:
            ConfigError: no party has that name.
        """
        try:
            return self.party_names.index(name)
        except ValueError:
            raise ConfigError(
                f"{self.source}: no party named {name!r} (parties: {', '.join(self.party_names)})"
            ) from None

    def ranks(self, names: list[str] | str) -> list[int]:
        """Ranks for a receiver list: names, ``all`` or ``none``."""
        if names == "all":
            return list(range(self.world_size))
        if names == "none":
            return []
        return [self.rank_of(n) for n in names]

    def fingerprint(self) -> str:
        """A digest of what every party's copy of the job must agree on.

        Local paths (data files, weights, inputs, outputs, the secret file) may differ
        between hosts and are left out; a factory file counts by its contents.
        """
        data = self.model_dump(mode="json")
        for party in data["parties"]:
            party.pop("data", None)
        data["outputs"].pop("dir", None)
        data["runtime"].pop("secret_file", None)
        for section, key in (("model", "weights"), ("inputs", "file")):
            if isinstance(data.get(section), dict):
                data[section].pop(key, None)
        model = data.get("model")
        if isinstance(model, dict) and isinstance(model.get("factory"), str):
            # The factory file's contents, not where it lies: hosts keep it in different folders, and
            # every party must run the same code (only this file: modules it imports are not covered).
            where, _, function = model["factory"].rpartition(":")
            if where.endswith(".py") and Path(where).is_file():
                model["factory"] = f"sha256 {hashlib.sha256(Path(where).read_bytes()).hexdigest()}:{function}"
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def files(self, party: str | None = None) -> dict[str, Path]:
        """The files ``party`` reads (every party's when None), by the job key naming each."""
        found = {}
        for i, spec in enumerate(self.parties):
            if spec.data is not None and party in (None, spec.name):
                found[f"parties.{i}.data.train"] = spec.data.train
                if spec.data.test is not None:
                    found[f"parties.{i}.data.test"] = spec.data.test
        if self.runtime.secret_file is not None:
            found["runtime.secret_file"] = self.runtime.secret_file
        return found

    def party_root(self, name: str) -> Path:
        """The folder only this party writes to: its runs, and ``latest`` (see :mod:`mpcfl.runs`)."""
        return self.outputs.dir / name  # type: ignore[attr-defined]

    def party_dir(self, name: str) -> Path:
        """This party's folder of the run the job is bound to (:meth:`bound_to`)."""
        if self.run_id is None:
            raise RuntimeError("party_dir of a job not bound to a run")
        return self.party_root(name) / self.run_id

    def bound_to(self, run_id: str) -> JobBase:
        """This job, its outputs going to run ``run_id``'s folders."""
        return self.model_copy(update={"run_id": run_id})


def _model_kind(value: object) -> str:
    """A training model given by ``factory`` is a user's module; otherwise a spec."""
    given = isinstance(value, FactoryModelSpec) or (isinstance(value, dict) and "factory" in value)
    return "factory" if given else "spec"


# The tags name the union's members, not keys of the file (_format_error drops them).
_MODEL_TAGS = ("spec", "factory")
TrainModelField = Annotated[
    Union[Annotated[ModelSpec, Tag("spec")], Annotated[FactoryModelSpec, Tag("factory")]], Discriminator(_model_kind)
]


class TrainJob(JobBase):
    """A secure training job. Build it with :func:`load_job`."""

    task: Literal["train"] = "train"
    partition: Literal["vertical", "horizontal"]
    labels: LabelSpec
    data: DataSpec = DataSpec()
    model: TrainModelField
    training: TrainingSpec = TrainingSpec()
    outputs: OutputSpec = OutputSpec()
    dp: DPSpec | None = None

    @property
    def summary(self) -> str:
        """What ``mpcfl validate`` says the job is."""
        kind = self.model.factory if isinstance(self.model, FactoryModelSpec) else self.model.type
        return f"{self.partition} partition, {kind}"

    @model_validator(mode="before")
    @classmethod
    def _classes_decide(cls, raw: Any) -> Any:
        """``labels.classes`` gives ``model.num_classes``, and the number of classes ``training.loss``,
        unless the file sets them (then they must agree)."""
        if not isinstance(raw, dict):
            return raw
        labels, model, training = raw.get("labels"), raw.get("model"), raw.get("training")
        if isinstance(labels, dict) and isinstance(labels.get("classes"), list) and isinstance(model, dict) and "factory" not in model:
            raw = dict(raw, model=dict(model))
            raw["model"].setdefault("num_classes", len(labels["classes"]))
        model = raw.get("model")
        if isinstance(model, dict) and (training is None or isinstance(training, dict)) and "loss" not in (training or {}):
            classes = model.get("num_classes", 2)
            if model.get("type") == "linear_regression":
                raw = dict(raw, training={**(training or {}), "loss": "mse"})
            elif isinstance(classes, int) and classes > 2:
                raw = dict(raw, training={**(training or {}), "loss": "cross_entropy"})
        return raw

    @property
    def regression(self) -> Regression | None:
        """The regression head's numbers (``training.loss`` mse or huber), or None for a classifier."""
        if self.training.loss not in REGRESSION_LOSSES:
            return None
        center, scale = self.labels.scaling or (0.0, 1.0)
        return Regression(
            loss=self.training.loss, huber_delta=self.training.huber_delta, center=center, scale=scale,  # type: ignore[arg-type]
            target_bound=self.labels.max_abs,
        )

    def _check_head(self) -> None:
        """The loss, the model and the labels agree on classification or regression."""
        kind = None if isinstance(self.model, FactoryModelSpec) else self.model.type
        if self.training.loss in REGRESSION_LOSSES:
            if kind == "logistic_regression":
                raise ValueError(
                    f"training.loss: {self.training.loss} fits a value; use model.type: linear_regression "
                    "(logistic_regression classifies)"
                )
            if not self.model.binary or self.labels.classes is not None:
                raise ValueError("model.num_classes, labels.classes: a regression (loss mse or huber) predicts a value, not classes")
            if self.training.sigmoid != sigmoids.DEFAULT:
                raise ValueError("training.sigmoid: a regression has no sigmoid; leave it out")
            if self.dp is not None and self.training.loss == "mse":
                raise ValueError(
                    "training.loss: with dp, mse's gradient grows with the error, unbounded; use huber, whose "
                    "gradient is at most training.huber_delta"
                )
            return
        if kind == "linear_regression":
            raise ValueError(f"training.loss: linear_regression fits a value with mse or huber, not {self.training.loss}")
        for key in ("scaling", "max_abs"):  # compared with the defaults: a job re-validated from its dump sets every key
            if getattr(self.labels, key) != LabelSpec.model_fields[key].default:
                raise ValueError(f"labels.{key}: bounds and scales a regression's targets; a classifier's labels are classes")
        binary = self.model.binary
        if binary and self.training.loss != "bce":
            raise ValueError("training.loss: two classes train with 'bce'")
        if not binary and self.training.loss != "cross_entropy":
            raise ValueError("training.loss: more than two classes train with 'cross_entropy'")
        if not binary and self.training.sigmoid != sigmoids.DEFAULT:
            raise ValueError("training.sigmoid: more than two classes train with a softmax, not a sigmoid; leave it out")

    @model_validator(mode="after")
    def _consistent(self) -> TrainJob:
        for i, party in enumerate(self.parties):
            if party.data is None:
                raise ValueError(f"parties.{i}.data: a training job gives every party its data files")
        classes = self.labels.classes
        if classes is not None and not isinstance(self.model, FactoryModelSpec) and self.model.num_classes != len(classes):
            raise ValueError(f"model.num_classes: {self.model.num_classes}, but labels.classes names {len(classes)}")
        if self.data.missing and self.partition == "horizontal" and any(isinstance(v, str) for v in self.data.missing.values()):
            raise ValueError(
                "data.missing: in a horizontal job each party's own mean or median would differ from the others'; "
                "fill with a constant (joint statistics under MPC are not built yet)"
            )
        if self.partition == "vertical":
            if self.labels.party is None:
                raise ValueError("labels.party: a vertical job names the party that holds the labels")
            self._check_party("labels.party", self.labels.party)
        elif self.labels.party is not None:
            raise ValueError("labels.party: in a horizontal job every party holds its own labels")
        for key in ("model_to", "metrics_to"):
            value = getattr(self.outputs, key)
            if isinstance(value, list):
                for name in value:
                    self._check_party(f"outputs.{key}", name)
        self._check_ids()
        given = [p.data.test is not None for p in self.parties]
        if any(given) and not all(given):
            missing = given.index(False)
            raise ValueError(f"parties.{missing}.data.test: give test data for every party or for none")
        self._check_head()
        if self.dp is not None:
            self._check_dp(self.dp)
        return self

    def _check_ids(self) -> None:
        keyed = [self.id_column_of(p.name) is not None for p in self.parties]
        if not any(keyed):
            return
        if self.partition == "horizontal":
            where = "data.id_column" if self.data.id_column else f"parties.{keyed.index(True)}.data.id_column"
            raise ValueError(
                f"{where}: IDs line up the rows of a vertical job; in a horizontal one each party's rows are its own"
            )
        if not all(keyed):
            raise ValueError(f"parties.{keyed.index(False)}.data.id_column: give every party an ID column, or none")
        holder = self.labels.party
        if self.labels.column == self.id_column_of(holder):
            raise ValueError(f"labels.column: {self.labels.column!r} is {holder}'s ID column, not its labels")

    def id_column_of(self, party: str) -> str | None:
        """The column of ``party``'s row IDs, or None when rows are lined up by position."""
        spec = self.parties[self.rank_of(party)].data
        own = None if spec is None else spec.id_column
        return own or self.data.id_column

    @property
    def keyed(self) -> bool:
        """Whether rows are lined up by ID (private set intersection) rather than by position."""
        return self.id_column_of(self.party_names[0]) is not None

    def _check_dp(self, dp: DPSpec) -> None:
        if isinstance(self.model, FactoryModelSpec):
            # DP-SGD bounds each example's gradient by clipping features (logistic regression) or
            # per-example gradients of Linear layers (mpcfl.dp.clipping); neither covers conv layers
            # or arbitrary graphs, and unclipped gradients would void the guarantee.
            raise ValueError(
                "dp: DP-SGD trains the logistic_regression, linear_regression and mlp model types; a model.factory module "
                "cannot train with dp (drop dp, or use model.type: mlp)"
            )
        if "weight_bound" in dp.model_fields_set and self.model.type != "mlp":
            raise ValueError(
                "dp.weight_bound: bounds an mlp's parameters; a linear model's clip holds whatever its "
                "weights (its features are clipped), so remove it"
            )
        if self.outputs.metrics_to != "none" and dp.metrics is None:
            raise ValueError(
                "outputs.metrics_to: with dp, per-epoch metrics spend budget; set it to none, or add dp.metrics"
            )
        if self.data.standardize:
            raise ValueError(
                "data.standardize: with dp, statistics of the private training rows rescale every row (one record "
                "moves every gradient), outside the guarantee; set standardize: false and declare public "
                "constants in data.scaling: {column: [center, scale]}"
            )
        if any(isinstance(v, str) for v in (self.data.missing or {}).values()):
            raise ValueError(
                "data.missing: with dp, a mean or median of the private rows fills every missing cell (one record "
                "moves them all), outside the guarantee; fill with public constants"
            )
        self.data.check_dp_scale()
        if dp.collusion_threshold is not None and dp.collusion_threshold >= self.world_size:
            raise ValueError(
                f"dp.collusion_threshold: must be below the number of parties ({self.world_size}), "
                "or no party's noise is honest"
            )
        # A coalition A of at most t parties knows |A| noise shares of variance sigma^2/(n - t) each,
        # so the rest still has (n - |A|) sigma^2/(n - t) >= sigma^2. A receiver always knows its own
        # share, so it is a coalition of one: with any receiver t must be at least 1 (t = 0 leaves it
        # (n - 1)/n sigma^2). Receivers that pool count as that many colluders, which t >= 1 covers
        # only up to t of them.
        receives = self.outputs.model_to != "none" or self.outputs.metrics_to != "none"
        if receives and self.colluders < 1:
            raise ValueError(
                "dp.collusion_threshold: must be at least 1 when outputs.model_to or metrics_to names a "
                "receiver, who knows its own noise share"
            )

    @property
    def colluders(self) -> int:
        """t for the DP noise: the job's collusion threshold, default n-1 (one honest party)."""
        assert self.dp is not None
        return self.world_size - 1 if self.dp.collusion_threshold is None else self.dp.collusion_threshold


class ImportedModelSpec(FactorySpec):
    """A torch model from code plus a weights file only its owner reads."""

    weights: Path = Field(description="a state_dict saved with torch.save; read only by the owner")
    owner: Name


class InputSpec(_Strict):
    file: Path = Field(description=".npy or header-less numeric .csv; read only by the owner")
    owner: Name


class InferenceOutputSpec(_Strict):
    dir: Path | None = Field(default=None, description=_OUTPUTS_DIR)


class InferenceJob(JobBase):
    """Secure inference: one party's model on another party's inputs."""

    task: Literal["inference"]
    model: ImportedModelSpec
    inputs: InputSpec
    batch_size: PositiveInt = 64
    outputs: InferenceOutputSpec = InferenceOutputSpec()

    @property
    def summary(self) -> str:
        """What ``mpcfl validate`` says the job is."""
        return f"inference, model {self.model.factory}"

    def files(self, party: str | None = None) -> dict[str, Path]:
        found = super().files(party)
        if party in (None, self.model.owner):
            found["model.weights"] = self.model.weights
        if party in (None, self.inputs.owner):
            found["inputs.file"] = self.inputs.file
        return found

    @model_validator(mode="after")
    def _consistent(self) -> InferenceJob:
        self._check_party("model.owner", self.model.owner)
        self._check_party("inputs.owner", self.inputs.owner)
        if self.model.owner == self.inputs.owner:
            raise ValueError("inputs.owner: the data owner and the model owner must be different parties")
        for i, party in enumerate(self.parties):
            if party.data is not None:
                raise ValueError(f"parties.{i}.data: an inference job takes its files from model and inputs")
        return self


class FedAvgSpec(_Strict):
    """FedAvg: the global model moves by the revealed average update (times ``server_lr``)."""

    name: Literal["fedavg"]
    server_lr: float = Field(default=1.0, gt=0)


class FedProxSpec(_Strict):
    """FedProx: FedAvg, with mu/2 ||w - w_global||^2 added to each party's local loss."""

    name: Literal["fedprox"]
    server_lr: float = Field(default=1.0, gt=0)
    mu: float = Field(default=0.01, gt=0, description="weight of the proximal term")


class FedAvgMSpec(_Strict):
    """FedAvgM: server-side momentum on the revealed average update."""

    name: Literal["fedavgm"]
    server_lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)


class FedAdamSpec(_Strict):
    """FedAdam (Reddi et al. 2021): Adam on the server, the revealed average update as its gradient."""

    name: Literal["fedadam"]
    server_lr: float = Field(default=0.01, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, description="adaptivity: added to sqrt(v)")


StrategySpec = Annotated[Union[FedAvgSpec, FedProxSpec, FedAvgMSpec, FedAdamSpec], Field(discriminator="name")]


class FederatedSpec(_Strict):
    """Rounds of local plaintext training at each party, their updates averaged under MPC."""

    rounds: PositiveInt = 10
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 32
    lr: float = Field(default=0.1, gt=0, description="each party's local learning rate")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1, description="local sgd momentum")
    seed: int = Field(default=0, description="the public initial weights; each party's local batch order")
    strategy: StrategySpec = FedAvgSpec(name="fedavg")
    max_rows: PositiveInt = Field(
        default=1 << 14,
        description="public bound on any party's training rows: row counts stay secret, and the average's "
        "divisor is computed under MPC, scaled by parties x max_rows (a party with more rows is refused)",
    )
    allow_dropouts: bool = Field(
        default=False,
        description="a party whose local round fails (its update is not finite or out of the fixed-point "
        "bounds, its local training errs) sits the round out and the others average without it, and a party "
        "whose process dies during the rounds is left behind: the others re-form the session and go on "
        "(local launcher, file:// rendezvous); without this the job stops, naming the party",
    )
    min_parties: int | None = Field(
        default=None, ge=2,
        description="with allow_dropouts: the fewest parties a round may average (default and least 2: an "
        "average of one party is its update)",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _by_name(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value


class FederatedDPSpec(_Strict):
    """Client-level DP: each party's update clipped to ``clip``, joint noise on the sum before the reveal."""

    epsilon: float = Field(gt=0, description="the privacy budget for the whole job")
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    clip: float = Field(default=1.0, gt=0, description="S: each party's update is clipped to L2 norm S")
    noise_multiplier: float | None = Field(
        default=None,
        gt=0,
        description="noise std over the sensitivity 2S; default: the smallest that fits every round in the budget",
    )
    collusion_threshold: int | None = Field(
        default=None, ge=1, description="t: parties that may pool their noise shares; default n-1"
    )


class FederatedOutputSpec(_Strict):
    dir: Path | None = Field(default=None, description=_OUTPUTS_DIR)
    model_to: list[Name] | Literal["all"] = Field(
        default="all",
        description="who writes model.pt; every party receives each round's average, so each can compute "
        "the model anyway: this is not a confidentiality control",
    )


class FederatedJob(JobBase):
    """Federated training over a horizontal partition: updates averaged under MPC, only the average revealed."""

    task: Literal["federated"]
    labels: LabelSpec
    data: DataSpec = DataSpec()
    model: TrainModelField
    federated: FederatedSpec = FederatedSpec()
    outputs: FederatedOutputSpec = FederatedOutputSpec()
    dp: FederatedDPSpec | None = None

    @property
    def partition(self) -> str:
        """Every party holds rows with the same columns, and their labels."""
        return "horizontal"

    @property
    def regression(self) -> None:
        """Federated training classifies (regression is refused by the validator)."""
        return None

    @property
    def summary(self) -> str:
        """What ``mpcfl validate`` says the job is."""
        model = getattr(self.model, "type", None) or self.model.factory
        dp = ", client-level dp" if self.dp is not None else ""
        return f"federated {self.federated.strategy.name}, {self.federated.rounds} rounds, {model}{dp}"

    def id_column_of(self, party: str) -> None:
        """Rows are each party's own: nothing lines them up."""
        return None

    @property
    def keyed(self) -> bool:
        return False

    @property
    def min_parties(self) -> int:
        """The fewest parties a round averages: all of them unless dropouts are allowed."""
        if not self.federated.allow_dropouts:
            return self.world_size
        return self.federated.min_parties or 2

    @property
    def survivors_needed(self) -> int | None:
        return self.min_parties if self.federated.allow_dropouts else None

    @property
    def colluders(self) -> int:
        """t for the DP noise: the job's collusion threshold, default n-1 (one honest party)."""
        assert self.dp is not None
        return self.world_size - 1 if self.dp.collusion_threshold is None else self.dp.collusion_threshold

    def parameter_count(self) -> int | None:
        """The model's parameters, where the job alone tells them: a factory's module, or a spec
        whose inputs are the columns ``data.scaling`` names (it must name every one); else None."""
        if isinstance(self.model, FactoryModelSpec):
            from mpcfl.models.factory import build_factory_model

            return sum(p.numel() for p in build_factory_model(self.model.factory).parameters())
        return None if self.data.scaling is None else self.model.parameter_count(len(self.data.scaling))

    def dp_calibration(self, parameters: int) -> tuple[float, float]:
        """Client-level DP's noise multiplier z and the sensitivity, in real units, of the sum its noise
        lands on, for a model of ``parameters`` parameters: one party's clipped update replaced by
        another (2 ``dp.clip``) plus fixed point's rounding (:mod:`mpcfl.dp.rounding`). Each round's
        noise has standard deviation z times it.

        Raises:
            ValueError: the rounding would move epsilon by more than 1%; names ``dp.clip`` and the fix.
        """
        from mpcfl.dp import rounding
        from mpcfl.dp.accountant import calibrate_noise_multiplier, replace_one

        dp = self.dp
        assert dp is not None
        rounds = self.federated.rounds
        z = dp.noise_multiplier or calibrate_noise_multiplier(
            epsilon=dp.epsilon, delta=dp.delta, count=rounds, accountant=dp.accountant
        )
        try:
            sensitivity = rounding.check_rounding(
                epsilon=dp.epsilon, delta=dp.delta, accountant=dp.accountant, noise_multiplier=z, count=rounds,
                l2=replace_one(dp.clip), rounding=rounding.encoded_sum(parameters), dimension=parameters,
            )
        except ValueError as err:
            raise ValueError(f"dp.clip: {err} (dp.clip={dp.clip:g}: each party's update is clipped to it)") from None
        return z, sensitivity

    @model_validator(mode="after")
    def _consistent(self) -> FederatedJob:
        for i, party in enumerate(self.parties):
            if party.data is None:
                raise ValueError(f"parties.{i}.data: a federated job gives every party its data files")
            if party.data.id_column is not None:
                raise ValueError(f"parties.{i}.data.id_column: a federated job's rows are each party's own")
        if self.labels.party is not None:
            raise ValueError("labels.party: in a federated job every party holds its own labels")
        if self.data.id_column is not None:
            raise ValueError("data.id_column: a federated job's rows are each party's own; nothing lines them up")
        if getattr(self.model, "type", None) == "linear_regression" or self.labels.scaling is not None:
            raise ValueError("model.type: federated training classifies; regression trains with task: train (not built for federated yet)")
        if isinstance(self.outputs.model_to, list):
            for name in self.outputs.model_to:
                self._check_party("outputs.model_to", name)
        given = [p.data.test is not None for p in self.parties]
        if any(given) and not all(given):
            raise ValueError(f"parties.{given.index(False)}.data.test: give test data for every party or for none")
        spec = self.federated
        if self.world_size * spec.max_rows > 1 << 30:
            # The divisor's Newton steps multiply the count by B / count: an encoded product wraps at 2^31.
            raise ValueError(
                f"federated.max_rows: {self.world_size} parties x {spec.max_rows} rows is beyond 2^30, what fixed "
                "point can count; lower it"
            )
        if spec.min_parties is not None:
            if not spec.allow_dropouts:
                raise ValueError("federated.min_parties: applies with federated.allow_dropouts: true")
            if spec.min_parties > self.world_size:
                raise ValueError(f"federated.min_parties: {spec.min_parties} is more than the job's {self.world_size} parties")
        if self.dp is not None:
            if self.data.standardize:
                raise ValueError(
                    "data.standardize: with dp, statistics of the parties' private rows rescale every row, outside "
                    "the guarantee; set standardize: false and declare public constants in data.scaling"
                )
            self.data.check_dp_scale()
            if self.dp.collusion_threshold is not None and self.dp.collusion_threshold >= self.world_size:
                raise ValueError(
                    f"dp.collusion_threshold: must be below the number of parties ({self.world_size}), "
                    "or no party's noise is honest"
                )
            # Where the model's size is known here, rounding is judged now; else at run time, before sharing.
            if (parameters := self.parameter_count()) is not None:
                self.dp_calibration(parameters)
        return self


class PredictJob(JobBase):
    """Secure prediction with a trained model: new rows, each party holding its own columns of them as
    it did in training, scored by the model of one of the training job's runs."""

    task: Literal["predict"]
    train_job: Path = Field(description="the training job file whose run's model predicts")
    model_run: str = Field(default="latest", description="that job's run: its id, or latest (the last finished)")
    rows: dict[Name, Path] = Field(
        description="each party's file of new rows: its training feature columns (and its ID column when the "
        "training job has one; the label owner may add the label column, for metrics)"
    )
    predictions_to: list[Name] = Field(min_length=1, description="the parties that receive the predictions")
    outputs: InferenceOutputSpec = InferenceOutputSpec()
    train: TrainJob | None = Field(default=None, exclude=True)  # the loaded training job

    @model_validator(mode="before")
    @classmethod
    def _from_training(cls, raw: Any) -> Any:
        """Takes the parties and runtime of the training job unless given: the same processes predict."""
        if not isinstance(raw, dict) or not isinstance(raw.get("train_job"), (str, Path)):
            return raw
        try:
            train = load_job(raw["train_job"])
        except ConfigError as err:
            raise ValueError(f"train_job: {err}") from None
        if not isinstance(train, TrainJob):
            raise ValueError(f"train_job: {raw['train_job']} is a {train.summary.split(',')[0]} job, not a training job")
        raw = dict(raw, train=train)
        raw.setdefault("name", f"{train.name}-predict")
        raw.setdefault("parties", [{"name": name} for name in train.party_names])
        raw.setdefault("runtime", train.runtime.model_dump(exclude_unset=True))
        outputs = raw.get("outputs", {})
        if isinstance(outputs, dict) and outputs.get("dir") is None:  # as `mpcfl predict` does
            raw["outputs"] = dict(outputs, dir=str(train.outputs.dir / "predictions"))
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> PredictJob:
        assert self.train is not None
        if self.party_names != self.train.party_names:
            raise ValueError(f"parties: must be the training job's, in its order ({', '.join(self.train.party_names)})")
        for i, party in enumerate(self.parties):
            if party.data is not None:
                raise ValueError(f"parties.{i}.data: a predict job takes each party's new rows from rows")
        for name in [*self.rows, *self.predictions_to]:
            self._check_party("rows" if name in self.rows else "predictions_to", name)
        if self.model_run != "latest" and not runs.is_run_id(self.model_run):
            raise ValueError(f"model_run: {self.model_run!r} is neither latest nor a run id like 20261203-081502-3fa94c0e12ab")
        if self.train.partition == "horizontal" and len(self.rows) != 1:
            raise ValueError("rows: in a horizontal job each row lies at one party: give one party's file")
        return self

    @property
    def summary(self) -> str:
        """What ``mpcfl validate`` says the job is."""
        assert self.train is not None
        return f"predict with a model of job {self.train.name} (run {self.model_run}) for {', '.join(self.predictions_to)}"

    def files(self, party: str | None = None) -> dict[str, Path]:
        found = super().files(party)
        found.update({f"rows.{name}": path for name, path in self.rows.items() if party in (None, name)})
        return found

    def fingerprint(self) -> str:
        """The training job's fingerprint stands for it; the files of new rows are local paths."""
        assert self.train is not None
        data = self.model_dump(mode="json", exclude={"rows", "train_job", "outputs"})
        for party in data["parties"]:
            party.pop("data", None)
        data["runtime"].pop("secret_file", None)
        data["train"] = self.train.fingerprint()
        data["rows"] = sorted(self.rows)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


Job = Annotated[Union[TrainJob, InferenceJob, FederatedJob, PredictJob], Field(discriminator="task")]
_JOB = TypeAdapter(Job)


def default_outputs_dir(raw: dict) -> dict:
    """``raw`` with ``outputs.dir`` set to ``runs/<name>`` where the job names itself and gives no folder."""
    outputs = raw.get("outputs", {})
    if isinstance(raw.get("name"), str) and isinstance(outputs, dict) and outputs.get("dir") is None:
        raw = dict(raw, outputs=dict(outputs, dir=str(Path("runs") / raw["name"])))
    return raw


def resolve_paths(base: Path, raw: dict) -> dict:
    """Makes the job's relative paths relative to the job file's folder (``outputs.dir``'s default too)."""
    raw.update(default_outputs_dir(raw))

    def fix(value: object) -> object:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    for party in raw.get("parties") or []:
        data = party.get("data") if isinstance(party, dict) else None
        if isinstance(data, dict):
            for key in ("train", "test"):
                if key in data:
                    data[key] = fix(data[key])
    if isinstance(raw.get("train_job"), str):
        raw["train_job"] = fix(raw["train_job"])
    if isinstance(raw.get("rows"), dict):
        raw["rows"] = {name: fix(value) for name, value in raw["rows"].items()}
    for section, key in (("outputs", "dir"), ("model", "weights"), ("inputs", "file"), ("runtime", "secret_file")):
        node = raw.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = fix(node[key])
    runtime = raw.get("runtime")
    identity = runtime.get("identity") if isinstance(runtime, dict) else None
    if isinstance(identity, dict) and isinstance(identity.get("public_keys"), dict):
        keys = identity["public_keys"]
        for name, value in keys.items():
            if isinstance(value, str) and not is_raw_key(value):
                keys[name] = fix(value)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("factory"), str):
        where, _, function = model["factory"].rpartition(":")
        if where.endswith(".py"):
            model["factory"] = f"{fix(where)}:{function}"
    return raw


# The tags pydantic puts in an error's location under these keys.
_NESTED_TAGS = {
    "strategy": tuple(typing.get_args(spec.model_fields["name"].annotation)[0] for spec in typing.get_args(typing.get_args(StrategySpec)[0])),
}

# Keys a job file may no longer use, and what took their place.
_REPLACED = {("runtime", "insecure_dealer"): "runtime.provider: tfp"}


def _error_line(error: Any) -> str:
    """One pydantic error as ``key: message``, the key as the job file spells it."""
    loc = list(error["loc"])
    if loc[:1] in (["train"], ["federated"]) and loc[1:2] == ["model"] and len(loc) > 2 and loc[2] in _MODEL_TAGS:
        del loc[2]  # a training model's kind, not a key of the file
    if loc and loc[0] in ("train", "inference", "federated", "predict"):
        loc = loc[1:]  # the union's tag, not a key of the file
    # Nested unions' tags are not keys of the file either: federated.strategy.fedavg.mu is strategy.mu.
    loc = [part for i, part in enumerate(loc) if not (i and part in _NESTED_TAGS.get(str(loc[i - 1]), ()))]
    if error["type"].startswith("union_tag") and not loc:
        loc = ["task"]
    key = ".".join(str(part) for part in loc) or "(top level)"
    message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}"


def _format_error(path: Path, err: ValidationError) -> str:
    """Every error of ``err``, one line each, ``path: key: message``, in the order pydantic found them."""
    for error in err.errors():
        loc = tuple(str(part) for part in error["loc"] if part not in ("train", "inference", "federated"))
        if error["type"] == "extra_forbidden" and loc in _REPLACED:
            return f"{path}: {'.'.join(loc)} was replaced by {_REPLACED[loc]}"
    lines = dict.fromkeys(_error_line(error) for error in err.errors())  # a union's members may repeat one
    return "\n".join(f"{path}: {line}" for line in lines)


#: Job attributes the program sets, never a job file.
INTERNAL_KEYS = ("source", "run_id", "train")


def load_job(path: str | Path) -> TrainJob | InferenceJob | FederatedJob | PredictJob:
    """Reads and validates a job file.

    Args:
        path: the YAML job file.

    Returns:
        The validated, immutable job.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a valid job;
            the message names the file and every offending key, one line each.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read job file: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file is a YAML mapping of keys, got {type(raw).__name__}")
    for key in INTERNAL_KEYS:
        if key in raw:
            raise ConfigError(f"{path}: {key}: unknown key")
    raw = resolve_paths(path.resolve().parent, raw)
    mode = raw.pop("mode", None)
    if mode is not None:  # the spelling: `mode: federated` is `task: federated`
        if mode != "federated" or raw.get("task", "federated") != "federated":
            raise ConfigError(f"{path}: mode: only `mode: federated` is known (the same as `task: federated`)")
        raw["task"] = "federated"
    raw.setdefault("task", "train")
    try:
        job = _JOB.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None
    return job.model_copy(update={"source": path})
