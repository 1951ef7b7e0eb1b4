"""DP soundness: preprocessing that no other record moves, and LR gradients bounded whatever the weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import dp_demo, write_job
from mpcfl.data.files import DataError
from mpcfl.data.party import load_party_data, standardize_locally
from mpcfl.dp.clipping import clip_rows
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import TrainJob, load_job
from mpcfl.models.build import build_torch_model, to_crypten
from mpcfl.models.heads import head_of
from mpcfl.models.spec import ModelSpec
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal
from mpcfl.tasks.train.baseline import prepared_data
from mpcfl.tasks.train.dataset import prepare
from mpcfl.tasks.train.dp_sgd import _APPROXIMATION_MARGIN, bounded_gradients, error_bound
from mpcfl.tasks.train.steps import PlainSgd


def test_dp_refuses_statistics_of_the_private_rows(tmp_path: Path) -> None:
    spec = dp_demo()
    spec["data"] = {"standardize": True}
    with pytest.raises(ConfigError) as caught:
        load_job(write_job(tmp_path, spec))
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'job.yaml'}: ") and "data.standardize: with dp, statistics of the private" in text
    assert "set standardize: false and declare public constants in data.scaling" in text and "\n" not in text


def test_dp_refuses_features_of_unknown_scale(tmp_path: Path) -> None:
    """Neither scaled nor declared bounded: clipping flattens raw features, and the model may learn nothing."""
    spec = dp_demo()
    spec["data"] = {"standardize": False}
    with pytest.raises(ConfigError) as caught:
        load_job(write_job(tmp_path, spec))
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'job.yaml'}: ") and "\n" not in text
    assert "data.scaling: with dp, features need a known scale: declare public constants in data.scaling" in text
    assert "or data.max_abs: the bound the raw values lie within" in text
    spec["data"]["max_abs"] = 5000.0  # a declared bound on the raw values
    assert load_job(write_job(tmp_path, spec)).data.max_abs == 5000.0
    del spec["dp"], spec["data"]["max_abs"]
    assert load_job(write_job(tmp_path, spec)).dp is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"standardize": False, "scaling": {"mean_radius": [15, 0]}},
         "data.scaling: column 'mean_radius': [center, scale] must be finite with scale > 0, got [15, 0]"),
        ({"standardize": False, "scaling": {"mean_radius": [15]}}, "data.scaling.mean_radius.1: Field required"),
        ({"scaling": {"mean_radius": [15, 15]}},
         "data: scaling replaces standardisation with public constants; set data.standardize: false"),
    ],
)
def test_scaling_config_errors(tmp_path: Path, data: dict, message: str) -> None:
    spec = dp_demo()
    del spec["dp"]
    spec["data"] = data
    with pytest.raises(ConfigError) as caught:
        load_job(write_job(tmp_path, spec))
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def _prepared(job: TrainJob, party: str, change_first_row: bool) -> np.ndarray:
    data = load_party_data(job, party)
    if change_first_row:
        data.train.x[0] *= 7.0
    prepare(job, data, feature_counts=[20, 10], standardize=standardize_locally, check=lambda _: None)
    return data.train.x


def test_public_scaling_lets_one_record_move_only_its_own_row(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, dp_demo()))
    assert job.data.scaling is not None and not job.data.standardize
    raw = load_party_data(job, "hospital_a").train
    center, scale = (np.array([job.data.scaling[c][i] for c in raw.columns]) for i in (0, 1))
    scaled = _prepared(job, "hospital_a", change_first_row=False)
    np.testing.assert_allclose(scaled, clip_rows((raw.x - center) / scale, 1 / math.sqrt(2)))
    # A neighbouring data set (one patient's values changed) differs in that row only.
    moved = _prepared(job, "hospital_a", change_first_row=True)
    assert np.array_equal(scaled[1:], moved[1:]) and not np.array_equal(scaled[0], moved[0])
    # Standardisation by the rows' own statistics, what a DP job refuses, moves every row.
    spec = dp_demo()
    del spec["dp"]
    spec["data"] = {"standardize": True}
    plain = load_job(write_job(tmp_path, spec, "plain.yaml"))
    assert (_prepared(plain, "hospital_a", False)[1:] != _prepared(plain, "hospital_a", True)[1:]).any(axis=1).all()


def test_scaling_must_name_every_column_and_nothing_else(tmp_path: Path) -> None:
    spec = dp_demo()
    del spec["data"]["scaling"]["worst_area"]
    job = load_job(write_job(tmp_path, spec))
    with pytest.raises(DataError) as caught:
        prepared_data(job)
    text = str(caught.value)
    assert text.startswith("party hospital_b: ") and "hospital_b_train.csv: column 'worst_area' has no [center, scale] in" in text
    assert f"{tmp_path / 'job.yaml'}: data.scaling" in text and "\n" not in text
    spec = dp_demo()
    spec["data"]["scaling"]["worst_aera"] = [1, 1]
    with pytest.raises(DataError, match=r"job.yaml: data.scaling: 31 columns declared, the parties hold 30 feature columns"):
        prepared_data(load_job(write_job(tmp_path, spec)))


def _example_gradient_norm(
    classes: int, magnitude: float, clamp: bool, sigmoid: str = "crypten", error_clip: float | None = None,
) -> float:
    """One example of norm 1 whose logits are +-1.4 magnitude: its revealed gradient norm."""
    crypten = import_crypten()
    spec = ModelSpec(type="logistic_regression", num_classes=classes)
    head = head_of(spec, sigmoid)
    torch_model = build_torch_model(spec, n_features=2, seed=0)
    with torch.no_grad():
        outputs = torch_model[0].weight.shape[0]
        signs = torch.tensor([-1.0 if i % 2 == 0 else 1.0 for i in range(outputs)]).reshape(-1, 1)
        torch_model[0].weight.copy_(signs * magnitude)
        torch_model[0].bias.zero_()
    model = to_crypten(torch_model).encrypt(src=0)
    model.train()
    model.zero_grad()
    x = crypten.cryptensor(torch.tensor([[0.6, 0.8]]))
    # Logit 0 is the most negative: the true label is 1 (binary) or class 0, so |p - y| is near its bound.
    y = crypten.cryptensor(head.secure_targets(np.array([1 if classes == 2 else 0]), 1))
    if clamp:
        bounded_gradients(model, x, y, head, error_clip=error_clip)
    else:
        PlainSgd(head).step(model, torch_model, x, y)
    grads = [reveal(p.grad, to=[0], what="gradient test") for p in model.parameters()]
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


@pytest.mark.parametrize(("classes", "sigmoid"), [(2, "crypten"), (3, "crypten"), (2, "poly"), (2, "piecewise")])
def test_logit_clamp_bounds_each_gradient_whatever_the_weights(crypten_single: None, classes: int, sigmoid: str) -> None:
    head = head_of(ModelSpec(type="logistic_regression", num_classes=classes), sigmoid)
    bound = _APPROXIMATION_MARGIN * math.sqrt(1.0**2 + 1) * head.gradient_bound
    for magnitude in (1.0, 400.0, 600.0, 5000.0):  # logits up to 7,000: far beyond the sigmoid's +-500
        norm = _example_gradient_norm(classes, magnitude, clamp=True, sigmoid=sigmoid)
        assert norm <= bound, (magnitude, norm, bound)
    unclamped = _example_gradient_norm(classes, 5000.0, clamp=False, sigmoid=sigmoid)
    if head.bounded_error:
        # A cheap sigmoid clamps its own input, so DP needs no second clamp (bounded_gradients skips
        # it), and its bound is its own: |p - y| reaches 1.016 for poly, beyond CrypTen's 1.
        assert unclamped <= bound
        assert unclamped >= math.sqrt(2) * (head.gradient_bound - 1e-3)
    else:  # without the clamp, CrypTen's approximation breaks the bound the accountant relies on
        assert not unclamped <= bound


@pytest.mark.parametrize(("classes", "error_clip"), [(2, 0.2), (2, 0.05), (3, 0.2), (3, 0.5)])
def test_error_clip_bounds_each_gradient_by_its_own_bound(crypten_single: None, classes: int, error_clip: float) -> None:
    """dp.error_clip c: an example's gradient is within c sqrt(outputs) (the head's bound where smaller),
    whatever its logits, and a badly fitted example reaches it (the clamp is what bounds it)."""
    head = head_of(ModelSpec(type="logistic_regression", num_classes=classes))
    clipped = error_bound(head, error_clip)
    assert clipped == min(head.gradient_bound, error_clip * math.sqrt(head.output_size)) < head.gradient_bound
    bound = _APPROXIMATION_MARGIN * math.sqrt(1.0**2 + 1) * clipped
    for magnitude in (0.0, 1.0, 600.0, 5000.0):
        norm = _example_gradient_norm(classes, magnitude, clamp=True, error_clip=error_clip)
        assert norm <= bound, (magnitude, norm, bound)
    # At logits of +-1,400 every coordinate's |p - y| is 0 or 1: clamped to c, the norm is c times
    # sqrt(2) (x and the bias) times sqrt(coordinates in error), which the bound must not exceed by much.
    far = _example_gradient_norm(classes, 1000.0, clamp=True, error_clip=error_clip)
    assert far >= math.sqrt(2) * error_clip * min(2, head.output_size) ** 0.5 * 0.99
    assert _example_gradient_norm(classes, 1000.0, clamp=True) > bound  # without the clip: beyond it


def test_the_plaintext_replica_clamps_errors_as_the_secure_step_does(crypten_single: None) -> None:
    """`mpcfl baseline`'s DP simulation and the secure step compute the same error-clipped batch gradient."""
    from mpcfl.tasks.train.baseline import _clamped_error_backward

    crypten = import_crypten()
    spec = ModelSpec(type="logistic_regression", num_classes=2)
    head = head_of(spec)
    torch_model = build_torch_model(spec, n_features=3, seed=0)
    with torch.no_grad():
        torch_model[0].weight.copy_(torch.tensor([[3.0, -2.0, 1.0]]))
    x = torch.tensor([[0.5, 0.1, -0.2], [-0.4, 0.3, 0.1], [0.2, -0.5, 0.4], [0.0, 0.1, 0.0]])
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    expected_error = (torch.sigmoid(torch_model(x)) - y).detach().clamp(-0.2, 0.2)
    assert (expected_error.abs() == 0.2).any() and (expected_error.abs() < 0.2).any()  # both kinds of example
    _clamped_error_backward(torch_model, head.plain_loss, x, y, 0.2)
    plain = [p.grad.clone() for p in torch_model.parameters()]
    torch.testing.assert_close(plain[0], (expected_error * x).mean(0, keepdim=True))
    torch.testing.assert_close(plain[1], expected_error.mean(0))
    model = to_crypten(torch_model).encrypt(src=0)
    model.train()
    model.zero_grad()
    bounded_gradients(model, crypten.cryptensor(x), crypten.cryptensor(y), head, error_clip=0.2)
    secure = [reveal(p.grad, to=[0], what="gradient test") for p in model.parameters()]
    for ours, theirs in zip(secure, plain):
        torch.testing.assert_close(ours.float(), theirs, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    ("sampling", "sigmoid"), [("shuffle", "crypten"), ("poisson", "crypten"), ("shuffle", "piecewise"), ("poisson", "poly")]
)
def test_the_training_step_applies_the_error_clip_its_noise_is_calibrated_to(
    crypten_single: None, tmp_path: Path, sampling: str, sigmoid: str
) -> None:
    """The strategy a DP job trains with (not bounded_gradients alone): its noiseless summed gradient over
    badly fitted rows is each selected row's clamped error times [x, 1], within the sensitivity's bound."""
    from mpcfl.tasks.train.dp_sgd import FeatureClippedDpSgd, training_step

    crypten = import_crypten()
    spec = dp_demo()
    spec["dp"].update(error_clip=0.2, sampling=sampling)
    spec["training"].update(batch_size=4, sigmoid=sigmoid)
    job = load_job(write_job(tmp_path, spec))
    rows = 8
    strategy = training_step(job, 2, rows)
    assert isinstance(strategy, FeatureClippedDpSgd)
    strategy._add_noise = lambda value, sigma: None  # type: ignore[method-assign]  # the sum itself, not its noise
    model_spec = ModelSpec(type="logistic_regression", num_classes=2)
    torch_model = build_torch_model(model_spec, n_features=2, seed=0)
    with torch.no_grad():
        torch_model[0].weight.copy_(torch.tensor([[-900.0, -1200.0]]))  # logit -1,500 for a positive row
        torch_model[0].bias.zero_()
    model = to_crypten(torch_model).encrypt(src=0)
    model.train()
    model.zero_grad()
    x = torch.tensor([[0.6, 0.8]]).repeat(rows, 1)
    divisor: float = rows
    selected = rows
    if sampling == "poisson":
        assert strategy.secret_batches(rows, device="cpu") == 2
        selection = strategy._selections[0]
        selected = int(reveal(selection.bits, to=[0], what="test").sum())
        divisor = selection.expected
    strategy.step(model, torch_model, crypten.cryptensor(x), crypten.cryptensor(torch.ones(rows, 1)))
    grads = [reveal(p.grad, to=[0], what="gradient test").double() * divisor for p in model.parameters()]
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    per_example = 0.2 * math.sqrt(2)  # |p - y| = 1 clamped to 0.2, times |[x, 1]| = sqrt(2)
    assert norm == pytest.approx(selected * per_example, abs=1e-2 * max(selected, 1))
    assert norm <= selected * _APPROXIMATION_MARGIN * per_example
