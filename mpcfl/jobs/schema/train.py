"""The training job (``task: train``): its training settings, differential privacy and outputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mpcfl.jobs.schema.common import _OUTPUTS_DIR, DataSpec, JobBase, LabelSpec, Name, PositiveInt, TrainModelField, _Strict
from mpcfl.models import sigmoid as sigmoids
from mpcfl.mpc import providers
from mpcfl.models.spec import REGRESSION_LOSSES, FactoryModelSpec, Regression

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
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False, description="noise scale over the metrics' sensitivity")
    loss_bound: float = Field(
        default=2.0, gt=0, allow_inf_nan=False, description="each example's loss is clipped to [0, loss_bound] inside MPC"
    )
    when: Literal["final", "every_epoch"] = Field(
        default="final",
        description="final: one release of the trained model's loss and accuracy, charged once; "
        "every_epoch: one per epoch, each charged",
    )


WEIGHT_BOUND = 4.0


class DPCenterSpec(_Strict):
    """Features centred on their mean over the training rows, released with Gaussian noise and charged."""

    bound: float = Field(
        gt=0, allow_inf_nan=False,
        description="each training row's features, after data.scaling (each value within data.max_abs), are clipped to "
        "L2 norm bound for the mean (each party clips its own slice to bound/sqrt(parties holding features)): "
        "the sum's sensitivity. About the rows' typical norm: a smaller bound biases the mean towards 0",
    )
    noise_multiplier: float = Field(
        default=16.0, gt=0, allow_inf_nan=False,
        description="the Gaussian noise on the summed rows over bound; the release is one Gaussian charge "
        "composed with DP-SGD's, which is calibrated to what is left of dp.epsilon",
    )


class DPSpec(_Strict):
    """Differential privacy for the trained model (DP-SGD under MPC) and, optionally, the metrics."""

    epsilon: float = Field(gt=0, allow_inf_nan=False, description="the privacy budget for the whole job")
    delta: float = Field(gt=0, allow_inf_nan=False, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    clip: float = Field(
        default=1.0,
        gt=0, allow_inf_nan=False,
        description="logistic_regression: bound on each example's feature-vector L2 norm (each party "
        "clips its own slice of a row to clip/sqrt(parties holding features)); mlp: bound on each "
        "example's gradient L2 norm, clipped inside MPC",
    )
    error_clip: float | None = Field(
        default=None,
        ge=0.01, allow_inf_nan=False,  # fixed point encodes it within 2^-17, inside the 1% margin the bound carries
        description="logistic_regression: each example's prediction error p - y (each class's, with several) is "
        "clamped to [-error_clip, error_clip] inside MPC before it enters the gradient, so an example's error "
        "is bounded by error_clip (binary) or error_clip x sqrt(classes) (several; refused unless below the "
        "softmax's sqrt(2)), and the noise shrinks with it; examples fitted within it keep their whole gradient, "
        "every other is capped (as a Huber loss caps a regression's). Unset: |p - y| up to 1 (sqrt(2))",
    )
    weight_bound: float = Field(
        default=WEIGHT_BOUND,
        gt=0, allow_inf_nan=False,
        description="mlp: every parameter is kept within [-weight_bound, weight_bound] (projected under MPC "
        "after each step), so the per-example clip holds for any weights the run reaches",
    )
    noise: Literal["parties", "dealer"] = Field(
        default="parties",
        description="who draws the DP-SGD noise. parties: each adds a share, sized by collusion_threshold, so DP "
        "holds against the dealer and any t parties. dealer (runtime.provider: ttp): the dealer draws it all and "
        "shares it, so no party knows any of it and half the noise of two parties' shares does; DP then holds "
        "against every coalition of parties, receivers included, but not against the dealer once it sees a "
        "release (it knows the noise)",
    )
    collusion_threshold: int | None = Field(
        default=None,
        ge=0,
        description="t, with dp.noise: parties: parties that may pool their noise shares (receivers included: at "
        "least 1 when anything is revealed); default n-1",
    )
    metrics: DPMetricsSpec | None = Field(
        default=None, description="release per-epoch metrics with noise, charged; without it they are not revealed"
    )
    center: DPCenterSpec | None = Field(
        default=None,
        description="logistic_regression, linear_regression: before the row clip, every party's features are "
        "centred on their noisy mean over the training rows (opened to every party with Gaussian noise drawn as "
        "dp.noise says, charged). Public ranges rarely centre the rows, and the clip then spends most of each "
        "row's norm on the offset they share; unset: no centring",
    )
    sampling: Literal["shuffle", "poisson"] = Field(
        default="shuffle",
        description="shuffle: disjoint batches from a public permutation each epoch, accounted without "
        "amplification by subsampling (a record's batch is public), under replace-one neighbours; "
        "poisson: each step includes each row with probability q = training.batch_size / rows "
        "(training.batch_size is then the expected batch), by bits drawn jointly under MPC and never "
        "opened, round(1/q) steps per epoch, accounted as Poisson-subsampled Gaussians under add/remove",
    )

    @field_validator("error_clip")
    @classmethod
    def _error_clip_below_one(cls, value: float | None) -> float | None:
        if value is not None and value >= 1:
            raise ValueError(
                f"must be below 1: |p - y| never exceeds 1, so a clamp at {value:g} bounds nothing and saves no noise"
            )
        return value


class OutputSpec(_Strict):
    dir: Path | None = Field(default=None, description=_OUTPUTS_DIR)
    model_to: list[Name] | Literal["none"] = "none"
    metrics_to: list[Name] | Literal["all", "none"] = "all"


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
        if self.partition == "horizontal" and "median" in (self.data.missing or {}).values():
            raise ValueError(
                "data.missing: in a horizontal job each party's own median would differ from the others', and a "
                "joint median under MPC is not built; fill with mean (over every party's rows, under MPC) or a constant"
            )
        self._check_backbone()
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

    def _check_backbone(self) -> None:
        backbone = self.data.backbone
        if backbone is None:
            return
        if backbone.parties != "all":
            if self.partition == "horizontal":
                raise ValueError("data.backbone.parties: in a horizontal job every party's rows go through the backbone; leave it out")
            for name in backbone.parties:
                self._check_party("data.backbone.parties", name)
        if self.partition == "horizontal" and "mean" in (self.data.missing or {}).values():
            raise ValueError(
                "data.missing: with data.backbone, each party's rows go through the backbone as it loads them, before a "
                "joint mean could fill them; fill with a constant"
            )

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
        if dp.center is not None and self.model.type not in ("logistic_regression", "linear_regression"):
            raise ValueError(
                "dp.center: centres the features that a logistic_regression's or linear_regression's row clip "
                "bounds; an mlp clips each example's gradient instead, so remove it"
            )
        if dp.error_clip is not None and self.model.type != "logistic_regression":
            fix = ("regression.loss: huber with regression.huber_delta clamps a regression's error the same way"
                   if self.model.type == "linear_regression" else "an mlp's dp.clip bounds each example's whole gradient")
            raise ValueError(f"dp.error_clip: clamps a logistic_regression's prediction errors; {fix}, so remove it")
        classes = self.model.num_classes
        if dp.error_clip is not None and classes > 2 and dp.error_clip * math.sqrt(classes) >= math.sqrt(2):
            # k clamped errors bound the error vector by c sqrt(k); the softmax's own bound is sqrt(2)
            raise ValueError(
                f"dp.error_clip: with {classes} classes the clamped errors' bound, {dp.error_clip:g} x sqrt({classes}), "
                f"is no tighter than the softmax's sqrt(2): it would cap gradients for no less noise; use an "
                f"error_clip below {math.sqrt(2 / classes):.3g}, or remove it"
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
        if dp.noise == "dealer" and not providers.get(self.runtime.provider).needs_dealer:
            raise ValueError(f"dp.noise: dealer needs a dealer process; runtime.provider {self.runtime.provider} has none "
                             "(use dp.noise: parties)")
        receives = self.outputs.model_to != "none" or self.outputs.metrics_to != "none" or dp.center is not None
        if receives and self.colluders < 1:
            raise ValueError(
                "dp.collusion_threshold: must be at least 1 when outputs.model_to or metrics_to names a "
                "receiver, or dp.center opens the mean to every party: a receiver knows its own noise share"
            )

    @property
    def colluders(self) -> int:
        """t for the DP noise: the job's collusion threshold, default n-1 (one honest party)."""
        assert self.dp is not None
        return self.world_size - 1 if self.dp.collusion_threshold is None else self.dp.collusion_threshold

    @property
    def noise_source(self) -> str:
        """Who draws DP-SGD's Gaussian noise: ``parties`` (shares) or ``dealer`` (no party knows it)."""
        assert self.dp is not None
        return self.dp.noise

    @property
    def noise_inflation(self) -> float:
        """The total noise's standard deviation over the one the accountant counts: sqrt(n / (n - t))
        for shares drawn by the parties (any n - t honest shares reach it), 1 for the dealer's."""
        if self.noise_source == "dealer":
            return 1.0
        return math.sqrt(self.world_size / (self.world_size - self.colluders))
