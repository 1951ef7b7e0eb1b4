"""Differential privacy: accounting against dp-accounting, budgets, joint noise on real processes."""

from __future__ import annotations

import copy
import io
import json
import math
import re
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp

from conftest import SCRIPTS, assert_no_leftovers, dp_demo, mpcfl, write_job
from mpcfl.jobs.schema import load_job
from mpcfl.launch.local import run_local
from mpcfl.dp import Budget, BudgetExceeded, Charge, calibrate_noise_multiplier, create_accountant
from mpcfl.dp.budget import is_release
from mpcfl.dp.noise import share_variance, skellam
from mpcfl.mpc.prng import numpy_generator
from mpcfl.dp.clipping import clip_rows
from mpcfl.errors import ConfigError, MpcflError

SCALE = 2**16


@pytest.mark.parametrize(("name", "reference"), [("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)])
def test_epsilon_equals_dp_accounting_for_the_same_events(name: str, reference: type) -> None:
    charges = [Charge("gaussian", 3.0, 10), Charge("gaussian", 8.0, 1)]
    ours = create_accountant(name)
    for charge in charges:
        ours.compose(charge)
    theirs = reference()
    theirs.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 10))
    theirs.compose(dp_accounting.GaussianDpEvent(8.0))
    assert ours.epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)
    restored = create_accountant(name)
    restored.load_state_dict(ours.state_dict())
    assert restored.epsilon(1e-5) == ours.epsilon(1e-5)


def test_calibration_meets_the_target_tightly() -> None:
    z = calibrate_noise_multiplier(epsilon=3.0, delta=1e-5, count=10, accountant="rdp")
    accountant = create_accountant("rdp")
    accountant.compose(Charge("gaussian", z, 10))
    assert 2.99 < accountant.epsilon(1e-5) <= 3.0


@pytest.mark.parametrize(("epsilon", "delta", "steps"), [(3.0, 1e-5, 10), (1.0, 1e-6, 100), (8.0, 1e-5, 1000), (0.5, 1e-5, 1)])
def test_pld_calibration_meets_the_target_by_dp_accounting(epsilon: float, delta: float, steps: int) -> None:
    """Under PLD the search used to start at z = 1e-3, where PLD's grid asked for 750 GiB; it now
    starts near the answer. The z found, recomputed by dp-accounting's own PLD accountant for the
    same events, spends the target (to 1e-3) and no more, and the run's budget takes it."""
    z = calibrate_noise_multiplier(epsilon=epsilon, delta=delta, count=steps, accountant="pld")
    reference = pld.PLDAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), steps))
    assert epsilon * (1 - 1e-3) < reference.get_epsilon(delta) <= epsilon
    budget = Budget.create(epsilon=epsilon, delta=delta, accountant="pld")
    assert budget.charge("the steps", Charge("gaussian", z, steps)) <= epsilon


@pytest.mark.parametrize(("when", "releases"), [("every_epoch", 10), ("final", 1)])
def test_pld_calibration_of_dp_sgd_with_charged_metrics(tmp_path: Path, when: str, releases: int) -> None:
    from mpcfl.tasks.train.dp_sgd import calibration

    spec = dp_demo()
    spec["dp"].update(accountant="pld", metrics={"mechanism": "laplace", "noise_multiplier": 20.0, "when": when})
    spec["outputs"]["metrics_to"] = "all"
    z, _ = calibration(load_job(write_job(tmp_path, spec)), 30)
    reference = pld.PLDAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 10))
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(20.0), releases))
    assert 2.997 < reference.get_epsilon(1e-5) <= 3.0


def test_budget_refuses_before_anything_is_spent() -> None:
    budget = Budget.create(epsilon=1.0, delta=1e-5, accountant="rdp")
    budget.charge("first", Charge("gaussian", 10.0, 1))
    spent = budget.spent()
    with pytest.raises(BudgetExceeded, match=r"reveal of second refused: it would spend epsilon .* beyond the budget of 1"):
        budget.charge("second", Charge("gaussian", 0.5, 1))
    assert [entry["what"] for entry in budget.ledger] == ["first"]
    assert budget.spent() == spent


def test_a_ledger_marks_secret_computation_and_rewinds_to_a_checkpoint() -> None:
    """An epoch's DP-SGD charge is marked computation, not a release; a charged reveal and a
    post-processing record are releases, a disclosure outside DP is not; rewinding to a saved state
    drops what followed it and restores the epsilon spent then."""
    budget = Budget.create(epsilon=3.0, delta=1e-5, accountant="rdp")
    budget.charge("epoch 1 DP-SGD steps", Charge("gaussian", 5.0, 1), computation=True)
    budget.charge("epoch 1 loss and accuracy", Charge("gaussian", 30.0, 1))
    saved, spent = copy.deepcopy(budget.state_dict()), budget.spent()
    budget.disclosed("the intersection")
    budget.charge("epoch 2 DP-SGD steps", Charge("gaussian", 5.0, 1), computation=True)
    budget.record("trained model parameters")
    assert [is_release(e) for e in budget.ledger] == [False, True, False, False, True]
    assert [e["what"] for e in budget.later(saved)] == ["the intersection", "epoch 2 DP-SGD steps", "trained model parameters"]
    assert budget.rewind(saved) == 3
    assert [e["what"] for e in budget.ledger] == ["epoch 1 DP-SGD steps", "epoch 1 loss and accuracy"]
    assert budget.spent() == spent and budget.later(saved) == []


def test_skellam_noise_is_integer_with_the_right_moments() -> None:
    variance = share_variance(0.5, parties=3, colluders=1, scale=SCALE)
    assert variance == pytest.approx((0.5 * SCALE) ** 2 / 2)
    noise = skellam((200_000,), variance, numpy_generator())
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < 4 * math.sqrt(variance / noise.size)
    assert noise.var() / variance == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="collusion threshold must be in 0..2"):
        share_variance(0.5, parties=3, colluders=3, scale=SCALE)


def test_skellam_stays_exact_at_large_variances_and_refuses_beyond() -> None:
    """numpy's Poisson drifts above a mean of 2^46 and loses low bits above 2^53: a large variance is
    drawn as a sum of smaller Poissons, its low bits stay random, and beyond 2^56 it is refused."""
    from mpcfl.dp.noise import MAX_VARIANCE

    generator = numpy_generator()
    for variance in (2.0**54.8, MAX_VARIANCE):
        draws = skellam((20_000,), variance, generator)
        assert draws.var() / variance == pytest.approx(1.0, abs=0.05)
        assert np.mean(draws % 2) == pytest.approx(0.5, abs=0.02)  # a multiple of 2 would be 0
    with pytest.raises(ValueError, match="outside"):
        skellam((4,), 2 * MAX_VARIANCE, generator)


def test_discrete_laplace_shares_sum_to_the_target() -> None:
    from mpcfl.dp.noise import noise_share

    b = 3.0 / SCALE  # a scale of 3 ring units
    honest = sum(
        noise_share("laplace", (400_000,), b, parties=4, colluders=1, fixed_point=SCALE, generator=numpy_generator())
        for _ in range(3)
    )
    expected = 2 * math.exp(-1 / 3) / (1 - math.exp(-1 / 3)) ** 2
    assert honest.dtype == np.int64
    assert honest.var() / expected == pytest.approx(1.0, abs=0.03)
    assert abs(honest.mean()) < 4 * math.sqrt(expected / honest.size)


def test_rows_are_clipped_exactly() -> None:
    x = np.array([[3.0, 4.0], [0.3, 0.4]])
    clipped = clip_rows(x, 1.0)
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.5])


def test_joint_noise_on_real_processes(tmp_path: Path) -> None:
    script = SCRIPTS / "dp_noise_party.py"
    done = mpcfl("launch", "--parties", "a,b,c", str(script), str(tmp_path), timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert_no_leftovers("dp_noise_party.py")
    n, t, sigma = 3, 1, 0.5
    target = sigma**2 * n / (n - t)  # every party adds sigma^2/(n-t); honest ones alone reach sigma^2
    through = np.load(tmp_path / "through_a.npy")
    assert abs(through.mean()) < 4 * math.sqrt(target / through.size)
    assert through.var() / target == pytest.approx(1.0, abs=0.05)
    # Integer support in the fixed-point encoding: every value is a whole number of 2^-16 units.
    units = through * SCALE
    assert np.abs(units - np.round(units)).max() < 1e-6
    # One party's view does not reconstruct the total: its own share explains about 1/n of it.
    total = np.load(tmp_path / "total_a.npy") * SCALE
    shares = [np.load(tmp_path / f"own_{p}.npy") for p in "abc"]
    np.testing.assert_allclose(total, sum(shares), atol=2)
    for own in shares:
        rest = total - own
        assert rest.var() / total.var() == pytest.approx((n - 1) / n, abs=0.05)
    # The budget refused the expensive reveal at every party, and its ledger never recorded it.
    for party in "abc":
        assert (tmp_path / f"refused_{party}.txt").read_text().startswith("reveal of too expensive refused")
    assert (tmp_path / "ledger.txt").read_text() == "['noise test', 'manual noise test']"


def test_the_dealer_draws_noise_that_no_party_knows(tmp_path: Path) -> None:
    """dp.noise: dealer. The revealed noise has the target variance sigma^2 (not the parties' n/(n-t)
    sigma^2), and each party's share of it is uniform on the ring: alone, it says nothing of the noise."""
    script = SCRIPTS / "dealer_noise_party.py"
    done = mpcfl("launch", "--parties", "a,b", str(script), str(tmp_path), timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert_no_leftovers("dealer_noise_party.py")
    sigma = 0.5
    through = np.load(tmp_path / "through.npy")
    assert abs(through.mean()) < 4 * math.sqrt(sigma**2 / through.size)
    assert through.var() / sigma**2 == pytest.approx(1.0, abs=0.05)
    units = through * SCALE
    assert np.abs(units - np.round(units)).max() < 1e-6
    total = np.round(np.load(tmp_path / "total.npy")).astype(np.int64)
    shares = [np.load(tmp_path / f"own_{p}.npy") for p in "ab"]
    np.testing.assert_array_equal(total, shares[0] + shares[1])  # the ring sum (int64 wraps as the ring does)
    assert np.abs(total).max() < 2**40  # the noise itself is small...
    for own in shares:  # ...each share is not: uniform on 2^64, so |share| < 2^40 with probability 2^-23
        assert np.mean(np.abs(own.astype(np.float64)) < 2**40) < 1e-3
        assert abs(np.corrcoef(own.astype(np.float64), total)[0, 1]) < 0.05


def test_the_dealer_refuses_a_noise_request_outside_its_table() -> None:
    from mpcfl.mpc.prng import SecureGenerator
    from mpcfl.mpc.providers.ttp.requests import DealerRequestRefused, Requests

    dealer = Requests([SecureGenerator(), SecureGenerator()])
    good = {"function": "noise", "device": None, "args": ((4, 3), 1.0e6), "kwargs": {}}
    handler, args, _ = dealer._check(good)
    assert handler(*args).shape == (4, 3)
    for args in [((4, 3), -1.0), ((4, 3), 0.0), ((4, 3), 1e30), ((4, 3), 100), ((4, 3),), ((1 << 29,), 1.0)]:
        with pytest.raises(DealerRequestRefused, match="noise"):
            dealer._check(good | {"args": args})


def test_dp_training_job_records_a_ledger_that_matches_dp_accounting(tmp_path: Path) -> None:
    spec = dp_demo()
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["outputs"]["metrics_to"] = ["hospital_b"]
    spec["training"]["epochs"] = 3
    spec["dp"]["metrics"] = {"mechanism": "laplace", "noise_multiplier": 20.0, "loss_bound": 2.0}
    path = write_job(tmp_path, spec)
    done = mpcfl("run", str(path), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    job = load_job(path)
    privacy = json.loads((job.party_root("hospital_b") / "latest" / "privacy.json").read_text())
    z = privacy["notes"]["dp_sgd"]["noise_multiplier"]
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 3))
    reference.compose(dp_accounting.LaplaceDpEvent(20.0))  # the final model's metrics, released once
    assert privacy["spent"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert 2.99 < privacy["spent"] <= 3.0
    whats = [e["what"] for e in privacy["ledger"]]
    steps = [f"epoch {i} DP-SGD steps" for i in (1, 2, 3)]
    assert whats == steps + ["epoch 3 loss and accuracy", "trained model parameters"]
    # The model is post-processing of the charged steps: it costs nothing more.
    assert privacy["ledger"][-1]["post_processing"] and privacy["ledger"][-1]["epsilon_after"] == privacy["spent"]
    # Both parties keep the same ledger; only the metric receiver sees the (noisy) metrics.
    assert json.loads((job.party_root("hospital_a") / "latest" / "privacy.json").read_text())["ledger"] == privacy["ledger"]
    metrics = json.loads((job.party_root("hospital_b") / "latest" / "metrics.json").read_text())
    assert [("test_accuracy" in row) for row in metrics["history"]] == [False, False, True]
    assert 0.0 <= metrics["final"]["test_accuracy"] <= 1.0
    release = metrics["metrics_release"]  # metrics.json says how its figures were obtained
    assert (release["released"], release["when"], release["mechanism"]) == ("noisy", "final", "laplace")
    assert release["noise_scale"] == pytest.approx(20.0 * 3.0)  # noise multiplier x (loss bound 2 + 1)
    others = json.loads((job.party_root("hospital_a") / "latest" / "metrics.json").read_text())["history"]
    assert all("loss" not in row for row in others)
    state = torch.load(job.party_root("hospital_b") / "latest" / "model.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": 0}, "dp.epsilon: Input should be greater than 0"),
        ({"epsilon": -1}, "dp.epsilon: Input should be greater than 0"),
        ({"delta": 1.5}, "dp.delta: Input should be less than 1"),
        ({"collusion_threshold": 2}, "dp.collusion_threshold: must be below the number of parties (2)"),
        ({"collusion_threshold": 0}, "dp.collusion_threshold: must be at least 1 when outputs.model_to or metrics_to"),
        ({"delta": 1.0}, "dp.delta: Input should be less than 1"),
        ({"metrics": {"noise_multiplier": 0}}, "dp.metrics.noise_multiplier: Input should be greater than 0"),
        ({"error_clip": 1.0}, "dp.error_clip: must be below 1: |p - y| never exceeds 1, so a clamp at 1 bounds nothing"),
        ({"error_clip": 1.5}, "dp.error_clip: must be below 1: |p - y| never exceeds 1, so a clamp at 1.5 bounds"),
        ({"error_clip": 0.001}, "dp.error_clip: Input should be greater than or equal to 0.01"),
    ],
)
def test_dp_config_errors(tmp_path: Path, change: dict, message: str) -> None:
    spec = dp_demo()
    spec["dp"].update(change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job(write_job(tmp_path, spec))


def test_the_parties_draw_the_noise_unless_the_job_asks_the_dealer_which_needs_one(tmp_path: Path) -> None:
    spec = dp_demo()
    spec["dp"].pop("noise", None)
    job = load_job(write_job(tmp_path, spec))
    assert job.noise_source == "parties" and job.noise_inflation == pytest.approx(math.sqrt(2))  # 2 parties, t = 1
    spec["dp"]["noise"] = "dealer"
    job = load_job(write_job(tmp_path, spec))
    assert job.noise_source == "dealer" and job.noise_inflation == 1.0
    spec["runtime"]["provider"] = "tfp"
    with pytest.raises(ConfigError, match="dp.noise: dealer needs a dealer process; runtime.provider tfp has none"):
        load_job(write_job(tmp_path, spec))


def test_dp_refuses_free_metrics(tmp_path: Path) -> None:
    spec = dp_demo()
    spec["outputs"]["metrics_to"] = "all"
    with pytest.raises(ConfigError, match="per-epoch metrics spend budget; set it to none, or add dp.metrics"):
        load_job(write_job(tmp_path, spec))


def test_dp_sgd_for_an_mlp_clips_each_example_inside_mpc(tmp_path: Path) -> None:
    """An MLP's DP job, with one patient's value far out of range: clamped at its own party, not
    refused, so the job finishes and the other party's logs and files show nothing of it."""
    from mpcfl.tasks.train.baseline import evaluate_state_dict, train_plaintext
    from mpcfl.dp.clipping import sensitivity

    spec = dp_demo()
    train = Path(spec["parties"][0]["data"]["train"])
    rows = train.read_text().splitlines()
    column = rows[0].split(",").index("mean_area")
    cells = rows[5].split(",")
    cells[column] = "60000"  # scaled (60000 - 1500) / 1500 = 39, beyond data.max_abs
    rows[5] = ",".join(cells)
    spec["parties"][0]["data"]["train"] = str(tmp_path / "hospital_a_train.csv")
    (tmp_path / "hospital_a_train.csv").write_text("\n".join(rows) + "\n")
    spec["model"] = {"type": "mlp", "hidden": [8]}
    spec["data"]["max_abs"] = 4.0
    spec["training"]["epochs"] = 2
    spec["dp"]["epsilon"] = 8.0
    spec["outputs"]["dir"] = str(tmp_path / "out")
    path = write_job(tmp_path, spec)
    done = mpcfl("run", str(path), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert any(line.startswith("[hospital_a]") and "clamped 1 feature values" in line for line in lines)
    others = [line for line in lines if line.startswith(("[hospital_b]", "[dealer]"))]
    assert others and not [line for line in others if "clamp" in line or "range" in line or "hospital_a failed" in line]
    files = [f for f in (tmp_path / "out" / "hospital_b").rglob("*") if f.is_file()]
    # (mean_area is named in model.json's copy of the job's public scaling: the job file names it too);
    # 60000 as a number of its own, not digits inside another (a duration's 2.3974815960000 once matched)
    value = re.compile(rb"(?<![0-9.])60000(?![0-9])")
    assert files and not [f for f in files if b"clamp" in f.read_bytes() or value.search(f.read_bytes())]
    job = load_job(path)
    privacy = json.loads((job.party_root("hospital_b") / "latest" / "privacy.json").read_text())
    # replace-one, plus 2 x 2 units of 2^-16 of truncation in each of the 248 weights (tests/dp/test_rounding.py)
    rounded = 2 * sensitivity(1.0) + 4 * 248**0.5 / 2**16
    assert privacy["notes"]["dp_sgd"]["sensitivity"] == pytest.approx(rounded, rel=1e-6)
    z = privacy["notes"]["dp_sgd"]["noise_multiplier"]
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 2))
    assert privacy["spent"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    state = torch.load(job.party_root("hospital_b") / "latest" / "model.pt", weights_only=True)
    assert max(float(t.abs().max()) for t in state.values()) <= 4.0 + 1e-3  # projected to dp.weight_bound
    release = json.loads((job.party_root("hospital_b") / "latest" / "metrics.json").read_text())["metrics_release"]
    assert release["released"] == "none" and "dp.metrics" in release["why"]
    assert evaluate_state_dict(job, state)["test_accuracy"] > 0.6
    assert len(train_plaintext(job).history) == 2  # the plaintext simulation clips per example too


def test_a_dp_mlp_whose_clip_could_wrap_is_refused_before_sharing(tmp_path: Path) -> None:
    spec = dp_demo()
    spec["model"] = {"type": "mlp", "hidden": [8]}
    spec["data"]["max_abs"] = 1e4  # the default: an example's squared gradient norm could wrap
    spec["outputs"]["dir"] = str(tmp_path / "out")
    done = mpcfl("run", str(write_job(tmp_path, spec)), timeout=120)
    assert done.returncode != 0
    assert "dp: layer 1 (Linear 30 -> 8)" in done.stderr and "lower data.max_abs or dp.weight_bound" in done.stderr


def test_metrics_that_alone_exceed_the_budget_are_refused(tmp_path: Path) -> None:
    from mpcfl.tasks.train.dp_sgd import calibration
    from mpcfl.errors import MpcflError

    spec = dp_demo()
    spec["outputs"]["metrics_to"] = "all"
    spec["dp"]["metrics"] = {"mechanism": "gaussian", "noise_multiplier": 0.2}
    job = load_job(write_job(tmp_path, spec))
    with pytest.raises(MpcflError, match=r"dp.metrics: the releases besides DP-SGD's steps alone spend epsilon .* of 3; raise dp.metrics.noise_multiplier"):
        calibration(job, 30)


def test_calibration_uses_the_replace_one_sensitivity(tmp_path: Path) -> None:
    """Replacing a record moves a step's clipped sum by up to 2C: our epsilon for the noise
    actually added (sigma = z x 2C) is dp-accounting's for Gaussians of multiplier sigma / 2C."""
    from mpcfl.tasks.train.dp_sgd import calibration

    job = load_job(write_job(tmp_path, dp_demo()))
    z, sensitivity = calibration(job, 30)
    bound = 1.01 * math.sqrt(job.dp.clip**2 + 1)  # one example's gradient norm, with the sigmoid margin
    # plus fixed point's rounding, a few units of 2^-16 per parameter (tests/dp/test_rounding.py)
    assert 2 * bound < sensitivity < 2 * bound * 1.001
    sigma = z * sensitivity
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / (2 * bound)), 10))
    ours = create_accountant("rdp")
    for _ in range(10):  # charged one epoch at a time, as a run does
        ours.compose(Charge("gaussian", z))
    assert reference.get_epsilon(1e-5) <= ours.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-3)
    assert 2.99 < ours.epsilon(1e-5) <= 3.0
    # Against add/remove-one accounting (sensitivity C) the same noise would claim far less epsilon.
    loose = rdp.RdpAccountant()
    loose.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / bound), 10))
    assert loose.get_epsilon(1e-5) < 0.6 * ours.epsilon(1e-5)


def test_error_clip_shrinks_the_sensitivity_and_only_a_logistic_regression_takes_it(tmp_path: Path) -> None:
    """dp.error_clip c: one example's gradient bound, and so the noise, is c times the unclipped one
    (binary: |p - y| <= 1); the noise multiplier (the budget's) is unchanged."""
    from mpcfl.tasks.train.dp_sgd import calibration

    plain = load_job(write_job(tmp_path, dp_demo(), "plain.yaml"))
    spec = dp_demo()
    spec["dp"]["error_clip"] = 0.2
    clipped = load_job(write_job(tmp_path, spec))
    (z, wide), (z_clipped, narrow) = calibration(plain, 30), calibration(clipped, 30)
    assert z_clipped == z
    bound = 1.01 * math.sqrt(2)
    assert 2 * bound * 0.2 < narrow < 2 * bound * 0.2 * 1.001 and 2 * bound < wide < 2 * bound * 1.001
    for model, fix in (({"type": "mlp", "hidden": [4]}, "an mlp's dp.clip bounds each example's whole gradient"),
                       ({"type": "linear_regression"}, "regression.loss: huber with regression.huber_delta")):
        spec["model"] = model
        spec["training"]["loss"] = "huber" if model["type"] == "linear_regression" else "bce"
        with pytest.raises(ConfigError) as caught:
            load_job(write_job(tmp_path, spec))
        text = str(caught.value)
        assert "dp.error_clip: clamps a logistic_regression's prediction errors; " in text and fix in text, text
        assert "\n" not in text
    # With k classes the clamped error vector is bounded by c sqrt(k): no use at or beyond the softmax's sqrt(2).
    spec["model"], spec["training"]["loss"] = {"type": "logistic_regression", "num_classes": 3}, "cross_entropy"
    assert load_job(write_job(tmp_path, spec)).dp.error_clip == 0.2
    spec["dp"]["error_clip"] = 0.9
    with pytest.raises(ConfigError, match=r"dp.error_clip: with 3 classes the clamped errors' bound, 0.9 x sqrt\(3\), "
                       r"is no tighter than the softmax's sqrt\(2\).*below 0.816, or remove it"):
        load_job(write_job(tmp_path, spec))
    # So small a clamp that fixed point's rounding would move epsilon by more than 1%: refused, naming it.
    spec = dp_demo()
    spec["dp"]["error_clip"] = 0.01
    with pytest.raises(ConfigError, match=r"dp.error_clip: fixed-point rounding .* raise error_clip\)$"):
        calibration(load_job(write_job(tmp_path, spec)), 30)


def test_a_receiver_without_counted_collusion_gets_less_noise() -> None:
    """Why t = 0 is refused: a receiver subtracts its own share, leaving (n-1)/n sigma^2."""
    z = calibrate_noise_multiplier(epsilon=3.0, delta=1e-5, count=10, accountant="rdp")
    n = 2
    receiver = create_accountant("rdp")
    receiver.compose(Charge("gaussian", z * math.sqrt((n - 1) / n), 10))
    assert receiver.epsilon(1e-5) > 4.0  # the 4.44 a t = 0 run would really have spent


def test_ledger_without_model_release_is_the_full_bound_and_resume_needs_it(tmp_path: Path) -> None:
    spec = dp_demo()
    spec["outputs"] = {"dir": str(tmp_path / "out"), "model_to": "none", "metrics_to": "none"}
    spec["training"]["epochs"] = 2
    path = write_job(tmp_path, spec)
    done = mpcfl("run", str(path), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    job = load_job(path)
    privacy_file = job.party_root("hospital_a") / "latest" / "privacy.json"
    privacy = json.loads(privacy_file.read_text())
    # Nothing was revealed, but the model's shares exist: the ledger bounds it all the same.
    assert [e["what"] for e in privacy["ledger"]] == ["epoch 1 DP-SGD steps", "epoch 2 DP-SGD steps"]
    assert 2.99 < privacy["spent"] <= 3.0
    # A finished run is never resumed; as if this one had failed after its last checkpoint, a
    # resume needs the ledger, and one that extends the checkpoint's.
    done = mpcfl("run", str(path), "--resume", timeout=120)
    assert done.returncode == 1 and "no unfinished run of job" in done.stderr, done.stderr
    for party in job.party_names:
        record = job.party_root(party) / "latest" / "run.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "status": "failed"}))
    privacy["ledger"] = privacy["ledger"][1:]
    privacy_file.write_text(json.dumps(privacy))
    done = mpcfl("run", str(path), "--resume", timeout=120)
    assert done.returncode == 1
    assert "does not extend the privacy ledger of the epoch 2 checkpoint; refusing to resume" in done.stderr
    privacy_file.unlink()
    done = mpcfl("run", str(path), "--resume", timeout=120)
    assert done.returncode == 1
    assert "privacy.json: missing; refusing to resume a dp job without its privacy ledger" in done.stderr


def test_implausible_budgets_are_refused_or_warned(tmp_path: Path) -> None:
    from mpcfl.dp.budget import check_parameters

    with pytest.raises(ValueError, match=r"delta 0.01 is at least 1/n = 0.01 for n = 100 rows"):
        check_parameters(epsilon=1.0, delta=0.01, n=100)
    assert check_parameters(epsilon=1.0, delta=1e-4, n=100) == []
    warnings = check_parameters(epsilon=11.0, delta=2e-3, n=100)
    assert warnings[0].startswith("delta 0.002 is above 1/(10 n)") and warnings[1].startswith("epsilon 11 is above 10")
    spec = dp_demo()
    spec["dp"].update(delta=0.0022, epsilon=1000)  # n = 456 training rows: 1/n = 0.00219
    path = write_job(tmp_path, spec)
    done = mpcfl("validate", str(path), "--party", "hospital_a", timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().endswith("dp.delta: delta 0.0022 is at least 1/n = 0.00219 for n = 456 rows: "
                                        "publishing one of them at random would meet it; use delta well below 1/n")
    spec["dp"]["delta"] = 5e-4  # below 1/n, above 1/(10 n)
    write_job(tmp_path, spec)
    done = mpcfl("validate", str(path), "--party", "hospital_a", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "dp: delta 0.0005 is above 1/(10 n)" in done.stderr and "dp: epsilon 1000 is above 10" in done.stderr


def test_the_budget_belongs_to_the_data_a_rerun_is_refused_until_the_ledger_is_reset(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two runs of an epsilon-3 job on the same data would give the receiver two models, composed
    epsilon 4.4, each run's privacy.json saying 3 of 3. The data owners' ledgers refuse the second
    run before anything is shared; after an explicit reset it runs, with fresh noise."""
    paths = []
    for run in ("one", "two"):
        spec = dp_demo()
        spec["training"]["epochs"] = 1
        spec["outputs"]["dir"] = str(tmp_path / run)
        paths.append(write_job(tmp_path / run, spec))
    done = mpcfl("run", str(paths[0]), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    refused = mpcfl("run", str(paths[1]), timeout=120)
    assert refused.returncode == 1
    assert "earlier runs spent epsilon 3 of its total 3 (delta 1e-05), and this run asks 3; refused" in refused.stderr
    second = load_job(paths[1])
    assert not (second.party_root("hospital_b") / "latest").exists()
    [folder] = [p for p in second.party_root("hospital_b").iterdir() if p.is_dir()]
    assert not (folder / "openings.jsonl").exists(), "something was opened before the refusal"
    # Found by an attacker: the same training rows without the test file, and a new run under the first
    # run's id (which party 0 proposes) in another folder, each opened a fresh budget.
    spec = dp_demo()
    spec["training"]["epochs"] = 1
    spec["outputs"]["dir"] = str(tmp_path / "no_test")
    for party in spec["parties"]:
        del party["data"]["test"]
    refused = mpcfl("run", str(write_job(tmp_path / "no_test", spec)), timeout=120)
    assert refused.returncode == 1 and "earlier runs spent epsilon 3 of its total 3" in refused.stderr, refused.stderr
    first_id = (load_job(paths[0]).party_root("hospital_b") / "latest").resolve().name
    capfd.readouterr()
    assert run_local(second, run_id=first_id, sink=io.StringIO()) != 0
    assert f"run id {first_id} has charged this dataset before; a new run takes a new id" in capfd.readouterr().err
    shown = mpcfl("ledger", "show", str(paths[1]), "--party", "hospital_b", timeout=60)
    assert "epsilon 3 spent of 3 at delta 1e-05 (rdp); 0 reset(s)" in shown.stdout, shown.stdout + shown.stderr
    assert shown.stdout.count(f"run {first_id}") == 2, shown.stdout  # the train file's ledger and the test file's
    assert "hospital_b_train.csv: dataset" in shown.stdout and "hospital_b_test.csv: dataset" in shown.stdout, shown.stdout
    for party in ("hospital_a", "hospital_b"):
        reset = mpcfl("ledger", "reset", str(paths[1]), "--party", party, "--reason", "test: a second model", timeout=60)
        assert reset.returncode == 0 and "started a fresh budget" in reset.stdout, reset.stderr
    done = mpcfl("run", str(paths[1]), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    # What the ledger prevents without a reset: the two releases together spend more than the total.
    both = create_accountant("rdp")
    for path in paths:
        privacy = json.loads((load_job(path).party_root("hospital_b") / "latest" / "privacy.json").read_text())
        for entry in privacy["accountant"]["history"]:
            both.compose(Charge(**entry))
    assert both.epsilon(1e-5) > 4.0
    states = [torch.load(load_job(path).party_root("hospital_b") / "latest" / "model.pt", weights_only=True) for path in paths]
    difference = max((states[0][k] - states[1][k]).abs().max().item() for k in states[0])
    assert difference > 1000 / SCALE  # truncation moves weights by a few units of 2^-16; the noise by far more


def test_a_dataset_ledger_composes_every_run_and_keeps_its_resets(tmp_path: Path) -> None:
    from mpcfl.dp.ledger import Binding, DatasetLedger, LedgerExhausted

    def opened() -> tuple[DatasetLedger, ...]:
        return (DatasetLedger.open("d" * 64, epsilon=3.0, delta=1e-5, accountant="rdp", folder=tmp_path),)

    def begin(run_id: str, asked: float, *, new: bool = True) -> Binding:
        return Binding.begin(opened(), run_id, job="j", party="p", asked=asked, new=new)

    z = calibrate_noise_multiplier(epsilon=2.0, delta=1e-5, count=10, accountant="rdp")
    first = Budget.create(epsilon=3.0, delta=1e-5, accountant="rdp")
    first.dataset = begin("run-1", 3.0)
    first.charge("epoch steps", Charge("gaussian", z, 10))
    [ledger] = opened()  # as the next run reads it from disk
    assert ledger.spent() == pytest.approx(2.0, rel=1e-3)
    begin("run-1", 3.0, new=False)  # a resume of run-1: its own charges are not counted twice
    with pytest.raises(LedgerExhausted, match=r"earlier runs spent epsilon 2 of its total 3 \(delta 1e-05\), and this run asks 3"):
        begin("run-2", 3.0)
    # Each charge is composed with every earlier run's: one that would take the dataset past 3 is refused.
    z1 = calibrate_noise_multiplier(epsilon=2.5, delta=1e-5, count=1, accountant="rdp")
    second = Budget.create(epsilon=2.5, delta=1e-5, accountant="rdp")  # its own budget allows the charge
    second.dataset = begin("run-2", 0.9)
    with pytest.raises(LedgerExhausted, match="party p: dataset dddddddddddddddd"):
        second.charge("a release", Charge("gaussian", z1, 1))
    assert "run-2" not in opened()[0].runs, "a refused charge was recorded"
    ledger.reset("test: start again")
    [again] = opened()
    assert again.spent() == 0.0 and again.resets[0]["reason"] == "test: start again"
    assert again.resets[0]["runs"]["run-1"]["charges"] == [{"mechanism": "gaussian", "noise_multiplier": z, "count": 10}]
    # An id that charged the ledger, before the reset too, is not a new run's: its charges would replace the earlier ones.
    with pytest.raises(MpcflError, match="run id run-1 has charged this dataset before; a new run takes a new id"):
        begin("run-1", 0.5)


def test_a_run_refused_before_its_first_charge_sets_no_total_and_a_reset_frees_it(tmp_path: Path) -> None:
    """Found by a new user: a DP run refused at run time (delta 0.01 >= 1/n) had already written each
    data file's ledger with its budget as the total, so the corrected run was checked against delta 0.01,
    and a reset kept that total. A run enters a ledger with its first charge; a reset ledger takes the
    next charging run's budget."""
    from mpcfl.dp.ledger import Binding, DatasetLedger, LedgerExhausted

    def opened(epsilon: float, delta: float) -> tuple[DatasetLedger, ...]:
        return (DatasetLedger.open("c" * 64, epsilon=epsilon, delta=delta, accountant="rdp", folder=tmp_path),)

    Binding.begin(opened(2.0, 0.01), "typo", job="j", party="p", asked=2.0, new=True).record([])  # then refused
    assert not (tmp_path / f"{'c' * 64}.json").exists(), "a run that charged nothing wrote the ledger"
    z = calibrate_noise_multiplier(epsilon=2.0, delta=1e-5, count=1, accountant="rdp")
    Binding.begin(opened(2.0, 1e-5), "fixed", job="j", party="p", asked=2.0, new=True).charge([], Charge("gaussian", z, 1))
    [ledger] = opened(8.0, 0.01)  # what a later job asks does not move a charged ledger's total
    assert (ledger.epsilon, ledger.delta) == (2.0, 1e-5) and ledger.spent() == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(LedgerExhausted, match=r"earlier runs spent epsilon 2 of its total 2 \(delta 1e-05\)"):
        Binding.begin(opened(8.0, 0.01), "more", job="j", party="p", asked=0.5, new=True)
    ledger.reset("test: the total was a typo")
    [fresh] = opened(1.0, 1e-6)  # nothing charged since the reset: the next run's budget is the total
    assert (fresh.epsilon, fresh.delta, fresh.spent()) == (1.0, 1e-6, 0.0)
    z1 = calibrate_noise_multiplier(epsilon=1.0, delta=1e-6, count=1, accountant="rdp")
    Binding.begin(opened(1.0, 1e-6), "after", job="j", party="p", asked=1.0, new=True).charge([], Charge("gaussian", z1, 1))
    assert json.loads((tmp_path / f"{'c' * 64}.json").read_text())["delta"] == 1e-6
    assert opened(5.0, 1e-5)[0].epsilon == 1.0 and len(opened(5.0, 1e-5)[0].resets) == 1


def test_a_ledger_read_before_another_run_charged_still_composes_with_it(tmp_path: Path) -> None:
    """Found by an attacker: each run read its ledger once, so of two runs at the same time the last
    writer's view won (two epsilon-3 models, the ledger saying 3 of 3). Every check rereads it under a lock."""
    from mpcfl.dp.ledger import Binding, DatasetLedger, LedgerExhausted

    def begin(run_id: str) -> Binding:
        ledgers = (DatasetLedger.open("e" * 64, epsilon=3.0, delta=1e-5, accountant="rdp", folder=tmp_path),)
        return Binding.begin(ledgers, run_id, job="j", party="p", asked=3.0, new=True)

    z = calibrate_noise_multiplier(epsilon=3.0, delta=1e-5, count=1, accountant="rdp")
    early, late = begin("early"), begin("late")  # both started before either charged: each alone fits
    early.charge([], Charge("gaussian", z, 1))
    with pytest.raises(LedgerExhausted, match="earlier runs spent epsilon 3 of its total 3"):
        late.charge([], Charge("gaussian", z, 1))
    [ledger] = (DatasetLedger.open("e" * 64, epsilon=3.0, delta=1e-5, accountant="rdp", folder=tmp_path),)
    assert "late" not in ledger.runs and len(ledger.runs["early"]["charges"]) == 1


def test_processes_charging_one_ledger_at_once_lose_no_charge(tmp_path: Path) -> None:
    """Real processes, started together, each charging its own run many times: every charge stays."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom pathlib import Path\nfrom mpcfl.dp import Charge\nfrom mpcfl.dp.ledger import Binding, DatasetLedger\n"
        "ledgers = (DatasetLedger.open('f' * 64, epsilon=1000.0, delta=1e-5, accountant='rdp', folder=Path(sys.argv[1])),)\n"
        "run = Binding.begin(ledgers, sys.argv[2], job='j', party='p', asked=1.0, new=True)\n"
        "charges = []\n"
        "for _ in range(20):\n"
        "    run.charge(charges, Charge('gaussian', 50.0, 1)); charges.append(Charge('gaussian', 50.0, 1))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"run-{i}"]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    state = json.loads((tmp_path / f"{'f' * 64}.json").read_text())
    assert {run: len(entry["charges"]) for run, entry in state["runs"].items()} == {f"run-{i}": 20 for i in range(4)}


def test_a_data_files_ledger_name_is_its_rows_not_their_order_format_or_job(tmp_path: Path) -> None:
    """Found by an attacker: the ledger was named by the rows as a job loaded them, so reversing the rows,
    renaming a header, dropping the test file or moving a job's label scaling by 0.001 opened a fresh budget."""
    from mpcfl.data.files import DataError, rows_key

    def key(text: str, name: str = "t.csv") -> str:
        path = tmp_path / name
        path.write_text(text)
        return rows_key(path, party="p")

    original = key("a,b,label\n1,2.5,0\n3,4,1\n-0.0,7,1\n")
    same = ["b,a,label\n2.5,1,0\n4,3,1\n7,0,1\n",  # columns swapped, -0 written 0
            "x,y,z\n3,4,1\n1,2.5,0\n0,7,1\n",  # rows reordered, headers renamed
            "a,b,label\n1.0,2.50,0e0\n 3 ,4,1\n0,7.0,1\n\n"]  # numbers written another way, a blank line
    assert all(key(text) == original for text in same)
    for changed in ("a,b,label\n1,2.5,0\n3,4,1\n", "a,b,label\n1,2.5,0\n3,4,1\n0,7,0\n", "a,b,label\n1,2.5,0\n3,4,1\n0,7,1\n0,7,1\n"):
        assert key(changed) != original  # a row removed, changed, or added twice
    np.save(tmp_path / "t.npy", np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.save(tmp_path / "u.npy", np.array([[4.0, 3.0], [2.0, 1.0]]))
    assert rows_key(tmp_path / "t.npy", party="p") == rows_key(tmp_path / "u.npy", party="p") == key("a,b\n1,2\n4,3\n")
    assert key("id,a\nx7,1\n") == key("a,id\n1.0,x7\n") != key("id,a\nx8,1\n")  # text cells too
    with pytest.raises(DataError, match="party p: .*missing.csv: data file not found"):
        rows_key(tmp_path / "missing.csv", party="p")


def test_an_earlier_versions_ledger_is_carried_into_each_files_ledger(tmp_path: Path) -> None:
    """Upgrading must not start a fresh budget by the way: the ledger named by the loaded rows' digest
    is carried into the ledger of each data file, once, with its total; its runs can be neither
    replaced by a later run of the same id nor dropped (both found by an attacker's review)."""
    from mpcfl.dp.ledger import Binding, LedgerExhausted, open_ledgers

    z = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, count=3, accountant="rdp")
    legacy = {"dataset": "0" * 64, "epsilon": 1.0, "delta": 1e-5, "accountant": "rdp", "spent": 1.0, "resets": [],
              "runs": {"old-run": {"job": "j", "party": "p", "charges": [{"mechanism": "gaussian", "noise_multiplier": z,
                                                                           "count": 3}], "updated": "then"}}}
    (tmp_path / f"{'0' * 64}.json").write_text(json.dumps(legacy))
    ledgers = open_ledgers(["1" * 64, "2" * 64], epsilon=10.0, delta=1e-6, accountant="rdp", legacy="0" * 64, folder=tmp_path)
    for ledger in ledgers:
        assert ledger.runs.keys() == {"legacy:old-run"} and ledger.spent() == pytest.approx(1.0, rel=1e-3)
        assert (ledger.epsilon, ledger.delta) == (1.0, 1e-5), "the old total was dropped"
        with pytest.raises(LedgerExhausted):
            Binding.begin((ledger,), "new-run", job="j", party="p", asked=0.5, new=True)
    assert not (tmp_path / f"{'0' * 64}.json").exists() and (tmp_path / f"{'0' * 64}.json.migrated").is_file()
    again = open_ledgers(["1" * 64], epsilon=8.0, delta=1e-6, accountant="rdp", legacy="0" * 64, folder=tmp_path)
    assert again[0].runs.keys() == {"legacy:old-run"}
    # A file's ledger that exists keeps its own total; a run that took the old run's id before the
    # carrying over (party 0 proposes ids) keeps its charges beside the old ones.
    (tmp_path / f"{'0' * 64}.json").write_text(json.dumps(legacy))
    Binding.begin(open_ledgers(["3" * 64], epsilon=10.0, delta=1e-5, accountant="rdp", folder=tmp_path), "old-run",
                  job="j2", party="p", asked=0.5, new=True).charge([], Charge("gaussian", z, 3))
    [merged] = open_ledgers(["3" * 64], epsilon=10.0, delta=1e-5, accountant="rdp", legacy="0" * 64, folder=tmp_path)
    assert merged.runs.keys() == {"old-run", "legacy:old-run"} and merged.epsilon == 10.0


def test_a_ledger_folder_readable_by_others_is_made_owner_only(tmp_path: Path) -> None:
    """The ledgers' names are digests of the data: a listing would confirm a guess of a party's rows."""
    from mpcfl.dp.ledger import Binding, open_ledgers

    folder = tmp_path / "ledgers"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    Binding.begin(open_ledgers(["4" * 64], epsilon=1.0, delta=1e-5, accountant="rdp", folder=folder), "r", job="j",
                  party="p", asked=0.5, new=True)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o077 == 0 for path in folder.iterdir())


def test_a_final_model_no_better_than_chance_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """The new user's 3-class DP model that predicted one class (33%) ran with no word of warning."""
    from mpcfl.models.heads import head_of
    from mpcfl.models.spec import ModelSpec
    from mpcfl.tasks.train.loop import _warn_if_chance

    head = head_of(ModelSpec(type="logistic_regression", num_classes=3))
    _warn_if_chance({"test_accuracy": 0.9}, head, noise=0.0, rows=100)
    _warn_if_chance({"test_accuracy": 0.45}, head, noise=1.0, rows=100)  # 0.45 is 1.35/3: beyond noise
    assert not caplog.records
    _warn_if_chance({"test_accuracy": 0.336}, head, noise=0.0, rows=113)
    assert "barely better than chance (accuracy 0.336 with 3 classes)" in caplog.text


def test_a_release_without_dp_from_data_with_a_ledger_is_noted_there(tmp_path: Path) -> None:
    """Found by a new user: after a DP run spent a file's whole budget, a training job without dp and a
    prediction of the test rows released exact models and outputs, and the ledger said nothing. They
    are not refused (the data owner chose a job without DP), but each is noted in the ledgers of the
    files it read, once a run, and its party's operator is warned; data never used under DP gets no ledger."""
    from mpcfl.dp.ledger import ledger_dir, note_outside_dp

    assert note_outside_dp(["9" * 64], "r", job="j", party="p", what="x") == []
    assert not (ledger_dir() / f"{'9' * 64}.json").exists(), "a ledger was made for data never used under DP"
    spec = dp_demo()
    spec["training"]["epochs"] = 1
    spec["outputs"]["dir"] = str(tmp_path / "dp")
    dp_job = write_job(tmp_path / "dp", spec)
    assert mpcfl("run", str(dp_job), timeout=240).returncode == 0
    del spec["dp"]
    spec["outputs"] = {"dir": str(tmp_path / "plain"), "model_to": ["hospital_b"], "metrics_to": ["hospital_b"]}
    plain = write_job(tmp_path / "plain", spec)
    done = mpcfl("run", str(plain), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "[hospital_a] WARNING mpcfl.tasks.train.runner: party hospital_a: 2 of its data files have privacy ledgers" in done.stdout
    shown = mpcfl("ledger", "show", str(dp_job), "--party", "hospital_a", timeout=60)
    run_id = (load_job(plain).party_root("hospital_a") / "latest").resolve().name
    noted = f"outside DP: run {run_id}  job breast-cancer-lr-dp  released a model and metrics trained without DP"
    assert shown.stdout.count(noted) == 2, shown.stdout  # the train file's ledger and the test file's
    rows = [f"{p['name']}={p['data']['test']}" for p in spec["parties"]]
    done = mpcfl("predict", str(plain), "--rows", *rows, "--to", "hospital_b", timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    shown = mpcfl("ledger", "show", str(dp_job), "--party", "hospital_b", timeout=60)
    assert shown.stdout.count("released predictions of its rows") == 1, shown.stdout  # the test file's ledger alone


def test_dropped_rdp_orders_do_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """At a sampling rate of 1/2 dp-accounting drops fractional RDP orders it cannot compute, one
    warning each (hundreds a calibration, read by a new user as an accounting fault); dropping an order
    only loosens the bound, so they are filtered. Other warnings of dp-accounting still show."""
    import logging

    from mpcfl.dp.accountant import calibrate_noise_multiplier

    with caplog.at_level(logging.WARNING):
        assert calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, count=20, accountant="rdp", sampling_probability=0.5) > 0
        logging.getLogger("absl").warning("another warning")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["another warning"]
