"""What every task's job shares: the strict base, names, parties, identities, runtime settings and
:class:`JobBase`; the data and label specs and the model field of the training tasks (train,
federated); the output folder of the tasks that write one file; and path resolution."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from mpcfl.errors import ConfigError, MpcflError
from mpcfl.models.spec import FactoryModelSpec, FactorySpec, ModelSpec
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


class BackboneSpec(FactorySpec):
    """``data.backbone``: a public, frozen torch module each party runs on its own rows, in plaintext,
    before sharing (:mod:`mpcfl.models.backbone`); its outputs are the features trained on under MPC."""

    weights: Path | None = Field(
        default=None,
        description="a state dict (torch.save of module.state_dict()) loaded into the factory's module; the "
        "fingerprint counts the module's values, not the file's path",
    )
    parties: list[Name] | Literal["all"] = Field(
        default="all",
        description="whose feature columns go through it: all (a horizontal job's only choice), or, in a vertical "
        "job, a list: each listed party runs it on its own columns, the others' columns enter as they are",
    )

    _built: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _weights_fit(self) -> BackboneSpec:
        if self.weights is not None:
            try:
                self.module()
            except MpcflError as err:
                raise ValueError(f"weights: {err}") from None
        return self

    def module(self) -> Any:
        """The module (:func:`mpcfl.models.backbone.build_backbone`), built once per loaded job: the
        fingerprint's digest and every run on the party's rows use this one instance, so a factory or
        weights file changed in between is never run under the fingerprint of the one before.

        Raises:
            MpcflError: the factory fails, or the weights are missing or do not fit it.
        """
        if self._built is None:
            from mpcfl.models.backbone import build_backbone  # torch: only for a job that has a backbone

            self._built = build_backbone(self.factory, self.weights)
        return self._built


class DataSpec(_Strict):
    standardize: bool = True
    backbone: BackboneSpec | None = Field(
        default=None,
        description="private fine-tuning: a public torch module {factory, weights, parties} each party runs on "
        "its own rows before sharing; its outputs replace that party's feature columns (backbone_0, ...; "
        "vertical: PARTY_backbone_0, ...), which every later step (scaling, DP clamping, training) sees",
    )
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
        "at its owner from its own training rows (mean, median) or by a constant; in a horizontal training job, "
        "mean is over every party's training rows, under MPC, and opened to every party (median is refused there); "
        "any other missing cell is refused",
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


# None only until validation: JobBase._default_outputs_dir sets runs/<job name>.
_OUTPUTS_DIR = "where the parties write, a folder each (default: runs/<job name>, beside the job file)"


class InferenceOutputSpec(_Strict):
    dir: Path | None = Field(default=None, description=_OUTPUTS_DIR)


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
        "batch (too many for one: in segments, each asked for as the step starts on the one before it), "
        "recorded on the first step (batch) of its size, instead of one round trip per triple",
    )
    mask_reuse: bool = Field(
        default=True,
        description="ttp: open the training features masked once and give every later product with them a "
        "triple whose first factor is that mask (SecureML), so a step opens O(n + d) elements, not O(n·d); "
        "inference of two or more batches: open each weight matrix masked once, so a batch opens only its activations",
    )
    truncation: Literal["auto", "dealer", "local"] = Field(
        default="auto",
        description="how a shared value is divided by a public integer (after every fixed-point product): dealer: "
        "an exact truncation pair from the dealer (ttp only; within 2 units, never a wrap; one dealer request and "
        "one opening per division); local: CrypTen's own (two parties divide their shares locally, which returns "
        "garbage with probability about |x| / 2^64 per entry); auto: dealer with three or more parties, local with two",
    )
    channel: Literal["auto", "plain", "tls"] = Field(
        default="auto",
        description="tls: every link between the job's processes is mutual TLS 1.3, each process's certificate "
        "made for this run from its runtime.identity key and pinned by its peers (needs runtime.identity); "
        "plain: gloo's links as they are, readable and changeable by the network, so across hosts every process "
        "must be started with --plain-network (inside a tunnel); auto: plain on loopback, tls across hosts",
    )

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, name: str) -> str:
        return providers.known(name)

    @model_validator(mode="after")
    def _dealer_truncation_needs_a_dealer(self) -> RuntimeSpec:
        if self.truncation == "dealer" and not providers.get(self.provider).needs_dealer:
            raise ValueError(f"truncation: dealer needs the dealer process; provider {self.provider} has none")
        return self

    @model_validator(mode="after")
    def _channel_needs_identities(self) -> RuntimeSpec:
        if self.channel == "tls" and self.identity is None:
            raise ValueError("channel: tls binds each link to a process's key: declare runtime.identity (mpcfl keygen)")
        return self


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
            model["factory"] = _by_contents(model["factory"])
        backbone = (data.get("data") or {}).get("backbone")
        if backbone is not None:
            # The backbone by what it computes: its code, architecture and weights, wherever each host keeps them.
            from mpcfl.models.backbone import backbone_digest

            backbone["factory"] = _by_contents(backbone["factory"])
            backbone["weights"] = backbone_digest(self.data.backbone.module())  # type: ignore[attr-defined]
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


def _by_contents(factory: str) -> str:
    """A factory file's contents, not where it lies: hosts keep it in different folders, and every party
    must run the same code (only this file: modules it imports are not covered)."""
    where, _, function = factory.rpartition(":")
    if where.endswith(".py") and Path(where).is_file():
        return f"sha256 {hashlib.sha256(Path(where).read_bytes()).hexdigest()}:{function}"
    return factory


def _model_kind(value: object) -> str:
    """A training model given by ``factory`` is a user's module; otherwise a spec."""
    given = isinstance(value, FactoryModelSpec) or (isinstance(value, dict) and "factory" in value)
    return "factory" if given else "spec"


# The tags name the union's members, not keys of the file (_format_error drops them).
_MODEL_TAGS = ("spec", "factory")
TrainModelField = Annotated[
    Union[Annotated[ModelSpec, Tag("spec")], Annotated[FactoryModelSpec, Tag("factory")]], Discriminator(_model_kind)
]


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

    parties = raw.get("parties")
    for party in parties if isinstance(parties, list) else []:  # anything else: the schema names the key
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
    data = raw.get("data")
    backbone = data.get("backbone") if isinstance(data, dict) else None
    for node in (raw.get("model"), backbone):
        if isinstance(node, dict) and isinstance(node.get("factory"), str):
            where, _, function = node["factory"].rpartition(":")
            if where.endswith(".py"):
                node["factory"] = f"{fix(where)}:{function}"
    if isinstance(backbone, dict) and "weights" in backbone:
        backbone["weights"] = fix(backbone["weights"])
    return raw
