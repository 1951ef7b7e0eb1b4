"""Secret Poisson subsampling for DP-SGD: bits never opened, drawn from the parties' generators at
rate q; the ledger equals dp-accounting's Poisson-subsampled Gaussians; the demo trains with it."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp

from conftest import SCRIPTS, assert_no_leftovers, dp_demo, mpcfl, run_job, spy_views, write_job
from mpcfl.dp import Budget
from mpcfl.jobs.schema import load_job
from mpcfl.mpc.prng import SecureGenerator
from mpcfl.mpc.sampling import threshold

SCRIPT = str(SCRIPTS / "poisson_party.py")
ROWS, STEPS, RATE = 4096, 4, 0.07  # as in the script
SCALE = 2**16
DEMO_ROWS = 456  # the demo's training rows (public)


def _sample(monkeypatch: pytest.MonkeyPatch, leak: str | None = None) -> tuple[dict, str]:
    for key in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    if leak:
        monkeypatch.setenv("POISSON_LEAK", leak)
    result = mpcfl("launch", "--timeout-s", "30", "--parties", "p0,p1", SCRIPT, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_leftovers(SCRIPT)
    return result.stdout


def _holds(seen: np.ndarray, pattern: np.ndarray) -> bool:
    """Whether ``pattern`` occurs in ``seen`` as consecutive values."""
    if seen.size < pattern.size:
        return False
    head = np.lib.stride_tricks.sliding_window_view(seen, 32)
    starts = np.flatnonzero((head[: seen.size - pattern.size + 1] == pattern[:32]).all(axis=1))
    return any(np.array_equal(seen[i : i + pattern.size], pattern) for i in starts)


def opened_selection(views: dict) -> list[str]:
    """What of the selection the other party or the dealer saw while the bits were drawn: a step's
    bits (as 0/1, or at fixed-point scale), or its batch size. Masked bits ``b ^ r`` (a bit
    conversion's opening) are 0/1 as well, but uniform: they never reproduce 4,096 bits."""
    bits = views["0"]["own_bits"].reshape(STEPS, ROWS)
    sizes = [int(k) for k in bits.sum(axis=1)]
    found = []
    for watcher in ("1", "2"):  # party 1 and the dealer
        seen = views[watcher].get("seen_sample", np.empty(0, dtype=np.int64))
        for scale in (1, SCALE):
            steps = [i for i, row in enumerate(bits) if _holds(seen, row * scale)]
            if steps:
                found.append(f"rank {watcher}: the bits of steps {steps} at scale {scale}")
            hits = [k for k in sizes if np.isin([k * scale], seen).any()]
            if hits:
                found.append(f"rank {watcher}: batch sizes {hits} at scale {scale}")
    return found


def test_inclusion_bits_stay_secret_come_from_the_generators_and_have_rate_q(spied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = _sample(monkeypatch)
    views = spy_views(spied)
    # Both parties computed the same bits (the control opening at the end).
    bits = views["0"]["own_bits"].reshape(STEPS, ROWS)
    assert np.array_equal(bits, views["1"]["own_bits"].reshape(STEPS, ROWS))
    assert set(np.unique(bits)) <= {0, 1}
    assert re.findall(r"poisson party \d: scale=1 ", stdout) and len(re.findall("scale=1 ", stdout)) == 2
    # The bits are exactly [r < t] for r the (wrapping) sum of what each party's AES-CTR generator drew:
    # they come from those draws, and from nothing else.
    r = views["0"]["own_draw"] + views["1"]["own_draw"]  # int64 addition wraps, as the ring does
    assert np.array_equal(bits.reshape(-1), (r < threshold(RATE)).astype(np.int64))
    # Neither party's draw reached the other or the dealer, and nothing in crypten drew from torch's generator.
    for rank, watchers in (("0", ("1", "2")), ("1", ("0", "2"))):
        draw = views[rank]["own_draw"]
        for watcher in watchers:
            seen = np.concatenate([v for k, v in views[watcher].items() if k.startswith("seen_")])
            assert not np.isin(draw, seen).any(), f"rank {watcher} holds party {rank}'s draw"
    assert not [d for view in views.values() for d in view["draws"] if d.startswith("sample:")]
    # Nothing of the selection was opened to the other party or the dealer.
    assert opened_selection(views) == []
    # Rate q: 16,384 independent bits, within 5 standard deviations (5 x 0.0020); sizes vary by step.
    assert abs(bits.mean() - RATE) < 5 * math.sqrt(RATE * (1 - RATE) / bits.size)
    sizes = bits.sum(axis=1)
    assert all(abs(k - RATE * ROWS) < 5 * math.sqrt(ROWS * RATE * (1 - RATE)) for k in sizes)
    assert len(set(sizes.tolist())) > 1


@pytest.mark.parametrize("leak", ["bits", "size"])
def test_the_spy_catches_a_sampler_that_opens_the_bits_or_the_batch_size(leak: str, spied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same check on a variant that opens the bits, or only a step's size, during sampling."""
    _sample(monkeypatch, leak)
    found = opened_selection(spy_views(spied))
    assert any(("bits" if leak == "bits" else "batch sizes") in line for line in found), found


def test_threshold_gives_rate_q_without_wrapping() -> None:
    """P(r < t) over the signed ring, checked in plaintext on uniform draws and at the edges."""
    r = SecureGenerator().ring((1 << 20,)).numpy()
    for q in (0.01, 0.07, 0.5, 0.93):
        t = threshold(q)
        assert Fraction(t + 2**63, 2**64) <= Fraction(q) < Fraction(t + 2**63 + 1, 2**64)  # floor(q 2^64) / 2^64
        assert abs((r < t).mean() - q) < 5 * math.sqrt(q * (1 - q) / r.size)
    with pytest.raises(ValueError):
        threshold(1.0)


def _poisson_demo(tmp_path: Path, **dp: object) -> Path:
    spec = dp_demo()
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["training"].update(batch_size=64, epochs=5)
    spec["dp"].update({"sampling": "poisson", **dp})
    return write_job(tmp_path, spec)


@pytest.mark.parametrize(("accountant", "reference"), [("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)])
def test_the_ledger_charges_the_poisson_subsampled_gaussians_it_calibrated_for(
    accountant: str, reference: type, tmp_path: Path
) -> None:
    from mpcfl.tasks.train.dp_sgd import calibration, training_step

    job = load_job(_poisson_demo(tmp_path, epsilon=1.0, accountant=accountant))
    engine = training_step(job, 30, DEMO_ROWS)
    assert isinstance(engine.coins, SecureGenerator)
    budget = Budget.create(epsilon=1.0, delta=1e-5, accountant=accountant)
    for epoch in range(5):
        budget.charge(f"epoch {epoch + 1}", engine.epoch_charge())
    # Independently: q = 64/456, round(456/64) = 7 steps an epoch, 35 subsampled Gaussians in all.
    z, sensitivity = engine.noise_multiplier, engine.sensitivity
    theirs = reference()
    theirs.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(64 / 456, dp_accounting.GaussianDpEvent(z)), 35))
    assert budget.spent() == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-6)
    assert 0.99 < budget.spent() <= 1.0
    # Add/remove: one example's bound, half the replace-one sensitivity of shuffled batches.
    shuffled = load_job(_poisson_demo(tmp_path, epsilon=1.0, accountant=accountant, sampling="shuffle"))
    assert sensitivity == pytest.approx(calibration(shuffled, 30)[1] / 2, rel=1e-3)  # each with its rounding


def test_the_demo_trains_with_secret_poisson_batches(tmp_path: Path) -> None:
    from mpcfl.tasks.train.baseline import evaluate_state_dict

    path = _poisson_demo(tmp_path, epsilon=1.0)
    run_job(path, timeout=300)
    job = load_job(path)
    latest = job.party_root("hospital_b") / "latest"
    privacy = json.loads((latest / "privacy.json").read_text())
    notes = privacy["notes"]["dp_sgd"]
    assert (notes["sampling"], notes["steps_per_epoch"]) == ("poisson", 7)
    assert notes["sampling_probability"] == pytest.approx(64 / 456)
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        64 / 456, dp_accounting.GaussianDpEvent(notes["noise_multiplier"])), 35))
    assert privacy["spent"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert [e["what"] for e in privacy["ledger"]] == [f"epoch {i} DP-SGD steps" for i in range(1, 6)] + ["trained model parameters"]
    state = torch.load(latest / "model.pt", weights_only=True)
    # A sane model at epsilon 1: the plaintext replica's median over 15 seeds is 90%, its worst 82%.
    assert evaluate_state_dict(job, state)["test_accuracy"] > 0.75


def test_an_mlp_trains_with_secret_poisson_batches(tmp_path: Path) -> None:
    """Per-example clipping with each example's factor times its secret bit (mpcfl.dp.clipping)."""
    from mpcfl.tasks.train.baseline import evaluate_state_dict

    spec = dp_demo()
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["model"] = {"type": "mlp", "hidden": [16]}
    spec["data"]["max_abs"] = 4.0  # a DP MLP's clip holds for features within it (mpcfl.dp.clipping)
    spec["training"].update(batch_size=64, epochs=2)
    spec["dp"].update(sampling="poisson", epsilon=3.0)
    path = write_job(tmp_path, spec)
    run_job(path, timeout=300)
    job = load_job(path)
    latest = job.party_root("hospital_b") / "latest"
    privacy = json.loads((latest / "privacy.json").read_text())
    notes = privacy["notes"]["dp_sgd"]
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        64 / 456, dp_accounting.GaussianDpEvent(notes["noise_multiplier"])), 14))
    assert privacy["spent"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert notes["sensitivity"] == pytest.approx(1.0 * 1.01**0.5, rel=5e-3)  # one example's clipped bound: add/remove (and rounding)
    state = torch.load(latest / "model.pt", weights_only=True)
    assert evaluate_state_dict(job, state)["test_accuracy"] > 0.7  # one run measured 86.73%
