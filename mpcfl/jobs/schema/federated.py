"""The federated job (``task: federated``): the strategies, the rounds, client-level DP and outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from mpcfl.jobs.schema.common import _OUTPUTS_DIR, DataSpec, JobBase, LabelSpec, Name, PositiveInt, TrainModelField, _Strict
from mpcfl.models.spec import FactoryModelSpec

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
        if self.data.backbone is not None:
            raise ValueError("data.backbone: private fine-tuning trains the head under MPC (task: train); a federated "
                             "job's model.factory can hold the frozen layers itself")
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
