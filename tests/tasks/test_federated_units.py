"""Federated training without processes: the strategies' update rules, the job schema, and the
secure divisor's fixed-point arithmetic."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import DEMO
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import FederatedJob, FederatedSpec, StrategySpec, load_job
from mpcfl.mpc.reveal import Disclosure
from mpcfl.mpc.division import divisor_scale, scaled_reciprocal
from mpcfl.tasks.federated.aggregate import count_bound
from mpcfl.tasks.federated.strategies import STRATEGIES, strategy_of

FED = DEMO.parent / "breast_cancer_fed.yaml"


def spec_of(**strategy: Any) -> Any:
    return FederatedSpec.model_validate({"strategy": strategy}).strategy


def test_every_strategy_the_schema_names_is_registered() -> None:
    (union, _) = typing.get_args(StrategySpec)
    names = {typing.get_args(member.model_fields["name"].annotation)[0] for member in typing.get_args(union)}
    assert names == set(STRATEGIES)


def test_fedavg_and_fedprox_move_by_the_average() -> None:
    w, avg = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.equal(strategy_of(spec_of(name="fedavg")).apply(w, avg), w + avg)
    assert torch.equal(strategy_of(spec_of(name="fedavg", server_lr=0.5)).apply(w, avg), w + 0.5 * avg)
    prox = strategy_of(spec_of(name="fedprox", mu=0.2))
    assert torch.equal(prox.apply(w, avg), w + avg)
    local = torch.tensor([2.0, 0.0])
    assert float(prox.local_penalty(local, w.float())) == pytest.approx(0.5 * 0.2 * (1 + 4))
    assert strategy_of(spec_of(name="fedavg")).local_penalty(local, w.float()) is None


def test_fedavgm_keeps_a_velocity() -> None:
    strategy = strategy_of(spec_of(name="fedavgm", momentum=0.5, server_lr=2.0))
    w, a1, a2 = (torch.tensor([v], dtype=torch.float64) for v in (1.0, 0.1, 0.3))
    w1 = strategy.apply(w, a1)
    assert float(w1) == pytest.approx(1.0 + 2 * 0.1)
    w2 = strategy.apply(w1, a2)
    assert float(w2) == pytest.approx(1.2 + 2 * (0.5 * 0.1 + 0.3))
    # The state round-trips through a checkpoint's plain tensors.
    again = strategy_of(spec_of(name="fedavgm", momentum=0.5, server_lr=2.0))
    again.load_state_dict(strategy.state_dict())
    assert torch.equal(again.apply(w2, a1), strategy.apply(w2, a1))


def test_fedadam_follows_reddi_et_al() -> None:
    strategy = strategy_of(spec_of(name="fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = v = torch.zeros(2, dtype=torch.float64)
    for avg in (torch.tensor([0.2, -0.4], dtype=torch.float64), torch.tensor([0.1, 0.0], dtype=torch.float64)):
        m = 0.9 * m + 0.1 * avg
        v = 0.99 * v + 0.01 * avg**2
        expected = w + 0.1 * m / (v.sqrt() + 1e-3)
        w = strategy.apply(w, avg)
        assert torch.allclose(w, expected)


def _fed(tmp_path: Path, **changes: Any) -> Path:
    raw = yaml.safe_load(FED.read_text())
    for party in raw["parties"]:
        party["data"] = {k: str((FED.parent / v).resolve()) for k, v in party["data"].items()}
    raw["outputs"]["dir"] = str(tmp_path / "out")
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_shipped_job_and_the_mode_spelling(tmp_path: Path) -> None:
    job = load_job(FED)
    assert isinstance(job, FederatedJob) and job.partition == "horizontal" and job.min_parties == 3
    assert job.federated.strategy.name == "fedavg"
    same = load_job(_fed(tmp_path, task=None, mode="federated"))
    assert isinstance(same, FederatedJob) and same.fingerprint() != ""
    prox = load_job(_fed(tmp_path, **{"federated.strategy": {"name": "fedprox", "mu": 0.1}}))
    assert prox.federated.strategy.mu == 0.1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", "vertical", "mode: only `mode: federated` is known"),
        ("federated.strategy", "fedsgd", "federated.strategy: Input tag 'fedsgd' found using 'name' does not match"),
        ("federated.strategy", {"name": "fedavg", "mu": 0.1}, "federated.strategy.mu: unknown key"),
        ("model", {"type": "mlp"}, "model: model.hidden: an mlp needs at least one hidden layer size"),
        ("federated.min_parties", 2, "federated.min_parties: applies with federated.allow_dropouts: true"),
        ("federated.max_rows", 1 << 29, "federated.max_rows: 3 parties x 536870912 rows is beyond 2^30"),
        ("labels.party", "hospital_a", "labels.party: in a federated job every party holds its own labels"),
        ("dp", {"epsilon": 1.0, "delta": 1e-5}, "data.standardize: with dp, statistics of the parties' private rows"),
        ("outputs.model_to", ["nobody"], "outputs.model_to: 'nobody' is not a party of this job"),
        ("model", {"factory": "nowhere.py:make"}, "nowhere.py not found"),
    ],
)
def test_bad_federated_jobs_name_the_file_and_key(tmp_path: Path, key: str, value: Any, message: str) -> None:
    path = _fed(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_torch_module_factory_is_a_federated_model(tmp_path: Path) -> None:
    factory = tmp_path / "net.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(30, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))\n")
    job = load_job(_fed(tmp_path, model={"factory": f"{factory}:make"}))
    from mpcfl.tasks.federated.local import flat, initial_model

    # Seeded: every party builds the same public initial weights.
    assert torch.equal(flat(initial_model(job, 30)), flat(initial_model(job, 30)))
    assert flat(initial_model(job, 30)).numel() == 30 * 4 + 4 + 4 + 1


@pytest.mark.parametrize("rows", [1, 7, 380, 5000, 49_152])
def test_the_secure_divisor_is_exact_to_fixed_point_across_its_range(crypten_single: None, rows: int) -> None:
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    bound = count_bound(3, 1 << 14)
    scale = divisor_scale(bound)
    assert (scale - 1) ** 2 < bound <= scale**2
    y = scaled_reciprocal(crypten.cryptensor(torch.tensor([float(rows)])), bound).get_plain_text()
    # y = s/N to about 2^-16 (s/N + N/s) relative: x = N/s is encoded to 2^-16, and so is each step's y.
    assert float(y) == pytest.approx(scale / rows, rel=2 * 2**-16 * (scale / rows + rows / scale))


@pytest.mark.parametrize(
    ("allow", "flags", "mine", "outcome"),
    [
        (False, [1, 1, 1], None, [0, 1, 2]),
        (False, [1, 0, 1], None, "PeerFailure: party p1 failed its local training in round 4; see its log"),
        (False, [1, 0, 1], "own", "MpcflError: own"),
        (True, [1, 0, 1], "own", [0, 2]),
        (True, [0, 0, 1], None, "MpcflError: round 4: only 1 of 3 parties have an update (p0, p1 failed), below federated.min_parties=2"),
    ],
)
def test_who_takes_part_in_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow: bool, flags: list[int], mine: str | None, outcome: Any
) -> None:
    from mpcfl.errors import MpcflError
    from mpcfl.tasks.federated import runner

    job = load_job(_fed(tmp_path, **{"federated.allow_dropouts": allow}))
    job = job.model_copy(update={"parties": [p.model_copy(update={"name": f"p{i}"}) for i, p in enumerate(job.parties)]})
    monkeypatch.setattr(runner, "all_gather_public", lambda values: [[flag] for flag in flags])
    error = None if mine is None else MpcflError(mine)
    if isinstance(outcome, list):
        assert runner._who_takes_part(tuple(job.party_names), job, error, 4) == outcome
        return
    with pytest.raises(MpcflError) as caught:
        runner._who_takes_part(tuple(job.party_names), job, error, 4)
    assert f"{type(caught.value).__name__}: {caught.value}" == outcome


def test_under_dp_a_diverged_update_counts_as_zero_and_publishes_no_flag(tmp_path: Path) -> None:
    """The public "my update is usable" flag depends on a party's data; under client-level DP it
    would be a release outside the guarantee, so a non-finite update is clipped to zero instead of
    being refused (without DP it is still refused, naming the party)."""
    from mpcfl.errors import MpcflError
    from mpcfl.models.heads import head_of
    from mpcfl.tasks.federated.local import Rows, flat, initial_model, local_update

    dp = {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0}
    job = load_job(_fed(tmp_path, **{"data.standardize": False, "data.max_abs": 1e4, "federated.lr": 1e30, "dp": dp}))
    model, head = initial_model(job, 30), head_of(job.model)
    rows = Rows(x=torch.full((4, 30), 3e38), y=head.plain_targets(torch.tensor([0, 1, 0, 1]).numpy()))
    where = {"weights": flat(model), "round_index": 1, "rank": 0, "bound": 2.0**12, "who": "party p0: round 1"}
    strategy = strategy_of(job.federated.strategy)
    update, _ = local_update(job, model, rows, head, strategy, clip=1.0, **where)
    assert torch.equal(update, torch.zeros_like(update))
    with pytest.raises(MpcflError, match="party p0: round 1: the local update has a non-finite entry"):
        local_update(job, model, rows, head, strategy, clip=None, **where)


def test_a_session_reformed_without_a_dead_party_caps_the_dp_collusion_threshold(tmp_path: Path) -> None:
    from mpcfl.dp.noise import share_variance
    from mpcfl.tasks.federated.runner import _Privacy

    dp = {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0, "noise_multiplier": 2.0}
    privacy = _Privacy(load_job(_fed(tmp_path, **{"data.standardize": False, "data.max_abs": 1e4, "dp": dp})), 31)
    assert [privacy.of_round(n, n).colluders for n in (3, 2)] == [2, 1]  # n-1 of the job's 3, then of 2 survivors
    share_variance(1.0, parties=2, colluders=privacy.of_round(2, 2).colluders, scale=1)  # a valid threshold there


def test_client_level_dp_needs_features_of_a_known_scale(tmp_path: Path) -> None:
    dp = {"epsilon": 1.0, "delta": 1e-5}
    path = _fed(tmp_path, **{"data.standardize": False, "dp": dp})
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
    assert "data.scaling: with dp, features need a known scale: declare public constants in data.scaling" in str(caught.value)
    assert "or data.max_abs: the bound the raw values lie within" in str(caught.value)
    assert load_job(_fed(tmp_path, **{"data.standardize": False, "data.max_abs": 30.0, "dp": dp})).data.max_abs == 30.0
    assert load_job(_fed(tmp_path, **{"data.standardize": False})).dp is None  # without dp, raw features may train


@pytest.mark.parametrize(
    ("delta", "refused", "warned"),
    [(0.5, True, False), (1 / 3, True, False), (0.05, False, True), (1e-5, False, False)],  # 1/n = 1/3, 1/(10 n) = 1/30
)
def test_client_level_dp_judges_delta_per_party(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    delta: float, refused: bool, warned: bool,
) -> None:
    """The unit of client-level DP is a party: with 3 parties, delta >= 1/3 is met by publishing one
    party's whole data. Refused at validate and at run time (where the noise is calibrated), naming
    the file and dp.delta; warned above 1/(10 n)."""
    from mpcfl.cli import main
    from mpcfl.errors import MpcflError
    from mpcfl.tasks.federated.runner import _Privacy

    path = _fed(tmp_path, **{"data.standardize": False, "data.max_abs": 1e4, "dp": {"epsilon": 1.0, "delta": delta}})
    job = load_job(path)
    monkeypatch.setattr("mpcfl.cli._setup_logging", lambda debug: None)  # the process-wide logging and env of a CLI run
    assert main(["validate", str(path)]) == int(refused)
    line = capsys.readouterr().err.strip()
    if refused:
        expected = (f"{path}: dp.delta: delta {delta:g} is at least 1/n = 0.333 for n = 3 parties: "
                    "publishing one of them at random would meet it; use delta well below 1/n")
        assert line == f"mpcfl: error: {expected}"
        with pytest.raises(MpcflError) as caught:
            _Privacy(job, 31)
        assert str(caught.value) == expected
    else:
        assert _Privacy(job, 31).noise_multiplier > 0
    warning = f"{path}: dp: delta {delta:g} is above 1/(10 n) = 0.0333 for n = 3 parties"
    assert any(warning in record.getMessage() for record in caplog.records) == warned


def test_client_level_dp_calibrates_under_pld(tmp_path: Path) -> None:
    """Each round is one Gaussian on the clipped mean: the multiplier found under PLD, recomputed by
    dp-accounting's PLD accountant over the job's 10 rounds, spends the budget (to 1e-3) and no more."""
    import dp_accounting
    from dp_accounting import pld

    from mpcfl.tasks.federated.runner import _Privacy

    dp = {"epsilon": 4.0, "delta": 1e-5, "accountant": "pld"}
    z = _Privacy(load_job(_fed(tmp_path, **{"data.standardize": False, "data.max_abs": 1e4, "dp": dp})), 31).noise_multiplier
    reference = pld.PLDAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 10))
    assert 3.996 < reference.get_epsilon(1e-5) <= 4.0


@pytest.mark.parametrize(
    ("states", "refused"),
    [
        ([[1, 0], [1, 0]], False),  # both survivors at round 2, neither began opening it: redo it
        ([[1, 0], [1, 1]], True),  # one began opening round 2's average with the dead party in it
        ([[1, 0], [2, 0]], True),  # one finished round 2 (it holds that average)
    ],
)
def test_survivors_redo_a_round_only_if_none_began_opening_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, states: list[list[int]], refused: bool
) -> None:
    from mpcfl.errors import MpcflError
    from mpcfl.tasks.federated import runner

    job = load_job(_fed(tmp_path, **{"federated.allow_dropouts": True}))
    training = runner._Training(job, job.party_names[0], None, Disclosure())
    training.history, training.left = [{"round": 1}], [job.party_names[2]]
    monkeypatch.setattr(runner, "all_gather_public", lambda values: states)
    if not refused:
        training.resynchronise(tuple(job.party_names[:2]))
        return
    with pytest.raises(MpcflError, match=f"{job.party_names[2]} left during the opening of round 2's average"):
        training.resynchronise(tuple(job.party_names[:2]))


def test_validate_tells_only_this_party_which_columns_a_dp_run_will_clamp(tmp_path: Path) -> None:
    """Under DP a value beyond data.max_abs is clamped by its party, not refused: ``mpcfl validate
    --party`` (run by that party's operator alone) names the columns, never the values."""
    from mpcfl.tasks.federated.runner import check_party

    dp = {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0}
    job = load_job(_fed(tmp_path, **{"data.standardize": False, "data.max_abs": 30.0, "dp": dp}))
    lines = check_party(job, "hospital_a")  # raw areas reach the thousands
    [clamped] = [line for line in lines if "will be clamped" in line]
    assert clamped.startswith("values beyond data.max_abs=30 in ") and "'mean_area'" in clamped
    assert not any(ch.isdigit() for ch in clamped.split(" in ", 1)[1].replace("data.max_abs=30", ""))
    assert any(line.startswith("client-level dp over 31 parameters") for line in lines)
