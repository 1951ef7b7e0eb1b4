"""Fixed-point rounding in the Skellam mechanism's sensitivity (issue 21 item 5): pure, no parties.

The noise lands on a value in units of 2^-16 that MPC computed with rounding; one record can move
it by the clip's sensitivity plus the rounding, about sqrt(d) units for d parameters. With 10^6
parameters and a clip of 0.1 that is no longer small against the clip's 0.2 x 2^16 units.

The independent computation here is Agarwal, Kairouz and Liu's Skellam RDP bound (NeurIPS 2021,
Theorem 3.5; mu the noise's variance in ring units), written out again below rather than imported,
with the ring sensitivities counted by hand from the code path: a federated round's sum of encoded
updates, where only the replaced party's encoding differs, by less than one unit per coordinate on
each side.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job

FED = Path(__file__).resolve().parents[2] / "configs" / "breast_cancer_fed.yaml"
SCALE = 2**16
ORDERS = list(range(2, 257))


def _skellam_epsilon(*, clip: float, dimension: int, std: float, rounds: int, delta: float, rounding: float) -> float:
    """(epsilon, delta) of ``rounds`` Skellam releases of a federated sum, noise ``std`` in real units."""
    l2 = 2 * clip * SCALE + rounding * math.sqrt(dimension)  # replace-one: 2 S, plus the rounding
    l1 = 2 * clip * SCALE * math.sqrt(dimension) + rounding * dimension
    mu = (std * SCALE) ** 2

    def rdp(alpha: int) -> float:
        return alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))

    return rdp_privacy_accountant.compute_epsilon(ORDERS, [rounds * rdp(a) for a in ORDERS], delta)[0]


def _gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    return rdp_privacy_accountant.compute_epsilon(ORDERS, [rounds * a / (2 * z**2) for a in ORDERS], delta)[0]


def _job(tmp_path: Path, *, clip: float, factory: str | None = None, epsilon: float = 4.0) -> Path:
    text = FED.read_text().replace("../runs/", f"{tmp_path}/runs/").replace("../", f"{FED.parent.parent}/").replace("standardize: true", "standardize: false\n  max_abs: 30.0")
    if factory is not None:
        text = text.replace("  type: logistic_regression", f"  factory: {factory}")
    text += f"dp:\n  epsilon: {epsilon}\n  delta: 1.0e-5\n  clip: {clip}\n"
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def _factory(tmp_path: Path, parameters: int) -> str:
    """A module of exactly ``parameters`` parameters (a Linear layer with 1000 outputs)."""
    module = tmp_path / "big.py"
    module.write_text(f"import torch\n\ndef build():\n    return torch.nn.Linear({parameters // 1000 - 1}, 1000)\n")
    return f"{module}:build"


@pytest.mark.parametrize(("parameters", "clip"), [(10**6, 0.1), (10**7, 0.01)])
def test_a_large_model_with_a_small_clip_is_refused_at_validation(tmp_path: Path, parameters: int, clip: float) -> None:
    """The issue's cases: noise calibrated to the clip alone would spend well over the stated epsilon 4
    (the independent Skellam bound agrees); the job file is refused, in one line naming the key and the fix."""
    path = _job(tmp_path, clip=clip, factory=_factory(tmp_path, parameters))
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "dp.clip: fixed-point rounding" in message and f"in each of {parameters} parameters" in message
    assert "raise the clip or use fewer parameters" in message
    # What main's noise (z x 2 S on the sum, nothing for rounding) really spends, by the Skellam bound:
    from mpcfl.dp.accountant import calibrate_noise_multiplier

    z = calibrate_noise_multiplier(epsilon=4.0, delta=1e-5, count=10, accountant="rdp")
    real = _skellam_epsilon(clip=clip, dimension=parameters, std=z * 2 * clip, rounds=10, delta=1e-5, rounding=2.0)
    assert real > 4.04
    print(f"d={parameters} S={clip}: noise calibrated to the clip alone spends epsilon {real:.4g} for a stated 4")


def test_a_small_model_is_accepted_and_its_noise_covers_rounding(tmp_path: Path) -> None:
    """The shipped federated model (31 parameters, clip 1): accepted, and each round's noise is z times
    a sensitivity above the clip's 2 S by at least the rounding (2 units per coordinate), and by less than 1%."""
    from mpcfl.tasks.federated.runner import _Privacy

    job = load_job(_job(tmp_path, clip=1.0))
    privacy = _Privacy(job, 31)
    least = 2.0 + 2 * math.sqrt(31) / SCALE
    assert least <= privacy.sensitivity < 2.0 * 1.01
    assert privacy.of_round(3, 3).scale == pytest.approx(privacy.noise_multiplier * privacy.sensitivity)


@pytest.mark.parametrize(("parameters", "clip"), [(31, 1.0), (10**4, 0.5), (10**5, 1.0)])
def test_the_skellam_bound_with_rounding_stays_within_the_stated_epsilon(tmp_path: Path, parameters: int, clip: float) -> None:
    """Independently: the Skellam RDP bound, with the rounding in both sensitivities and the noise the
    job adds, spends no more than the Gaussian charge the ledger records, at every integer order
    (so after any conversion), and that charge is the stated epsilon."""
    from mpcfl.tasks.federated.runner import _Privacy

    job = load_job(_job(tmp_path, clip=clip))
    privacy = _Privacy(job, parameters)
    z, std = privacy.noise_multiplier, privacy.noise_multiplier * privacy.sensitivity
    real = _skellam_epsilon(clip=clip, dimension=parameters, std=std, rounds=10, delta=1e-5, rounding=2.0)
    charged = _gaussian_epsilon(z, 10, 1e-5)
    assert real <= charged
    assert charged == pytest.approx(4.0, rel=0.02)  # dp-accounting's orders include fractional ones


def test_validate_with_a_party_judges_the_model_its_columns_give(tmp_path: Path) -> None:
    """An mlp on columns the job file does not list (no data.scaling): its size is known once the
    party's files are read, and ``mpcfl validate --party`` refuses it there, naming dp.clip."""
    from mpcfl.errors import MpcflError
    from mpcfl.tasks.federated.runner import check_party

    path = _job(tmp_path, clip=1e-4)
    path.write_text(path.read_text().replace("  type: logistic_regression", "  type: mlp\n  hidden: [64]"))
    job = load_job(path)  # 30 columns -> 64 -> 1: 2049 parameters, known only from the files
    with pytest.raises(MpcflError) as caught:
        check_party(job, "hospital_a")
    assert str(caught.value).startswith(f"{path}: dp.clip: fixed-point rounding") and "in each of 2049 parameters" in str(caught.value)


def _dp_sgd(tmp_path: Path, **changes: object) -> Path:
    """The DP demo (2 parties, data.scaling naming all 30 columns), with ``changes`` to its model and dp."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import dp_demo, write_job

    spec = dp_demo()
    spec["outputs"]["dir"] = str(tmp_path / "out")
    for key, value in changes.items():
        section, name = key.split(".")
        spec[section][name] = value
    if spec["model"]["type"] == "mlp":
        spec["data"]["max_abs"] = 4.0
    return write_job(tmp_path, spec)


@pytest.mark.parametrize(("model", "n_features", "clip"), [
    ({"type": "logistic_regression"}, 10**6, 1.0),  # ~3 units per weight against 2.8 x 2^16
    ({"type": "mlp", "hidden": [1000]}, 1000, 1.0),  # 1.0e6 parameters, 4 units per weight
    ({"type": "mlp", "hidden": [100]}, 30, 0.01),  # 3201 parameters, a clip of 0.01
])
def test_dp_sgd_refuses_rounding_that_moves_epsilon(tmp_path: Path, model: dict, n_features: int, clip: float) -> None:
    """DP-SGD's noise lands on a step's summed gradient; a model large against its clip is refused,
    naming the file, dp.clip and the fix."""
    from mpcfl.tasks.train.dp_sgd import calibration

    path = _dp_sgd(tmp_path, **{"model.type": model["type"], "dp.clip": clip})
    if "hidden" in model:
        path.write_text(path.read_text().replace("type: mlp", f"type: mlp\n  hidden: {model['hidden']}"))
    job = load_job(path)
    with pytest.raises(ConfigError) as caught:
        calibration(job, n_features)
    message = str(caught.value)
    assert message.startswith(f"{path}: dp.clip: fixed-point rounding") and "\n" not in message
    assert "raise the clip or use fewer parameters" in message


def test_dp_sgd_noise_covers_rounding_for_the_demo(tmp_path: Path) -> None:
    """The DP demo (logistic regression on 30 columns, 2 parties): accepted; the sensitivity is the
    clip's 2 x 1.01 sqrt(C^2 + 1) plus at least the rounding of 31 coordinates (a product's truncation,
    2 units, and the encoding of a feature times the error, 1.01 units, on each side), under 0.1% more."""
    from mpcfl.tasks.train.dp_sgd import calibration

    job = load_job(_dp_sgd(tmp_path))
    z, sensitivity = calibration(job, 30)
    clip_only = 2 * 1.01 * math.sqrt(2.0)
    assert clip_only + 2 * (2 + 1.01) * math.sqrt(30) / SCALE <= sensitivity < clip_only * 1.001
    assert z > 0


def test_validate_refuses_a_dp_sgd_model_its_scaling_sizes(tmp_path: Path) -> None:
    """data.scaling names every column, so ``mpcfl validate`` knows the model's size without any
    party's files: an mlp of 2.3e5 parameters with a clip of 0.1 is refused there, in one line."""
    from mpcfl.api import validate
    from mpcfl.errors import MpcflError

    path = _dp_sgd(tmp_path, **{"model.type": "mlp", "dp.clip": 0.1})
    path.write_text(path.read_text().replace("type: mlp", "type: mlp\n  hidden: [7500]"))
    with pytest.raises(MpcflError) as caught:
        validate(path)
    assert str(caught.value).startswith(f"{path}: dp.clip: fixed-point rounding")


@pytest.mark.parametrize("party", [None, "hospital_a"])
def test_validate_refuses_what_the_run_refuses_for_poisson_and_a_small_error_clip(tmp_path: Path, party: str | None) -> None:
    """A new user's job: Poisson sampling (the rows known from the files) and dp.error_clip 0.022,
    whose rounding moves epsilon by more than 1% for the whole model's 31 parameters. ``mpcfl validate``
    said "valid" (it judged only a party's 21, or skipped Poisson) and the run refused; now both refuse,
    naming dp.error_clip, with every file here and at hospital_a alone (data.scaling names every column)."""
    from mpcfl.api import validate
    from mpcfl.errors import MpcflError

    path = _dp_sgd(tmp_path, **{"dp.epsilon": 1.0, "dp.sampling": "poisson", "dp.error_clip": 0.022,
                                "training.batch_size": 228})
    with pytest.raises(MpcflError) as caught:
        validate(path, party)
    message = str(caught.value)
    assert message.startswith(f"{path}: dp.error_clip: fixed-point rounding") and "in each of 31 parameters" in message
    path = _dp_sgd(tmp_path, **{"dp.epsilon": 1.0, "dp.sampling": "poisson", "dp.error_clip": 0.03,
                                "training.batch_size": 228})
    assert validate(path, party)[-1].startswith(f"{path}: valid job")
