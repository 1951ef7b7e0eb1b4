from __future__ import annotations

import pytest
import torch

from mpcfl.models.spec import ModelSpec
from mpcfl.errors import MpcflError
from mpcfl.models.build import build_torch_model, to_crypten


def test_mlp_layers_and_seeded_init() -> None:
    spec = ModelSpec(type="mlp", hidden=[8, 4], num_classes=3)
    model = build_torch_model(spec, n_features=5, seed=1)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model[-1].out_features == 3
    again = build_torch_model(spec, n_features=5, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_logistic_regression_has_one_logit() -> None:
    model = build_torch_model(ModelSpec(type="logistic_regression"), n_features=7, seed=0)
    assert len(model) == 1 and model[0].out_features == 1


def test_crypten_model_has_the_same_names_and_outputs() -> None:
    model = build_torch_model(ModelSpec(type="mlp", hidden=[6], activation="sigmoid"), n_features=4, seed=0)
    secure = to_crypten(model)
    assert [n for n, _ in secure.named_parameters()] == list(model.state_dict())
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(secure(x), model(x), atol=1e-6)


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(MpcflError, match=r"layer '1' \(ELU\) is not supported"):
        to_crypten(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ELU()))


@pytest.mark.parametrize("classes", [2, 3])
def test_head_agrees_with_plain_torch(crypten_single: None, classes: int) -> None:
    """Output size, targets, loss and correct count: the secure head against torch's own."""
    import numpy as np

    from mpcfl.models.heads import head_of
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.reveal import reveal

    crypten = import_crypten()
    spec = ModelSpec(type="mlp", hidden=[4], num_classes=classes)
    head = head_of(spec)
    assert head.output_size == (1 if classes == 2 else 3)
    assert head.loss_name == ("bce" if classes == 2 else "cross_entropy")
    assert build_torch_model(spec, n_features=5, seed=0)[-1].out_features == head.output_size
    labels = np.array([0, 1, classes - 1, 1, 0, 1])
    torch.manual_seed(0)
    logits = torch.randn(len(labels), head.output_size) * 3
    plain_y = head.plain_targets(labels)
    secure_y = head.secure_targets(labels, len(labels))
    if classes == 2:
        expected_loss = torch.nn.BCEWithLogitsLoss(reduction="none")(logits, plain_y).squeeze(1)
        expected_correct = ((logits > 0).long().squeeze(1) == torch.from_numpy(labels)).sum()
        assert torch.equal(secure_y, plain_y)
    else:
        expected_loss = torch.nn.CrossEntropyLoss(reduction="none")(logits, plain_y)
        expected_correct = (logits.argmax(1) == torch.from_numpy(labels)).sum()
        assert torch.equal(secure_y, torch.nn.functional.one_hot(plain_y, classes).float())
    assert torch.allclose(head.plain_loss(logits, plain_y, reduction="none").reshape(-1), expected_loss)
    assert int(head.plain_hits(logits, plain_y).sum()) == int(expected_correct)
    assert head.secure_targets(None, 4).shape == (4, head.output_size)  # a party without labels shares zeros
    enc_logits, enc_y = crypten.cryptensor(logits), crypten.cryptensor(secure_y)
    losses = reveal(head.secure_example_losses(enc_logits, enc_y), to=[0], what="losses")
    correct = reveal(head.secure_summaries(enc_logits, enc_y).sum(), to=[0], what="correct")
    assert torch.allclose(losses, expected_loss, atol=2e-2), (losses, expected_loss)
    assert round(float(correct)) == int(expected_correct)
    # The output error is the gradient of the summed loss at the logits.
    grad_logits = logits.clone().requires_grad_()
    head.plain_loss(grad_logits, plain_y, reduction="sum").backward()
    error = reveal(head.output_error(enc_logits, enc_y), to=[0], what="error")
    assert torch.allclose(error, grad_logits.grad, atol=1e-2)
    assert float(grad_logits.grad.norm(dim=1).max()) <= head.gradient_bound


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_regression_head_agrees_with_plain_torch(crypten_single: None, loss: str) -> None:
    """Loss, absolute errors and the output error of a regression head against torch's losses, and
    its scores mapped back to the label's units by labels.scaling."""
    import numpy as np

    from mpcfl.models.heads import head_of, regression_scores
    from mpcfl.models.spec import Regression
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.reveal import reveal

    crypten = import_crypten()
    spec = Regression(loss=loss, huber_delta=0.5, center=150.0, scale=80.0)
    head = head_of(ModelSpec(type="linear_regression"), regression=spec)
    assert head.output_size == 1 and not head.classifies and head.loss_name == loss
    targets = np.array([-1.5, 0.2, 0.0, 2.5, -0.3])
    torch.manual_seed(0)
    logits = torch.randn(len(targets), 1) * 2
    plain_y = head.plain_targets(targets)
    torch_loss = torch.nn.HuberLoss(reduction="none", delta=0.5) if loss == "huber" else torch.nn.MSELoss(reduction="none")
    expected = torch_loss(logits, plain_y).squeeze(1)
    assert torch.allclose(head.plain_loss(logits, plain_y, reduction="none"), expected)
    enc_logits, enc_y = crypten.cryptensor(logits), crypten.cryptensor(head.secure_targets(targets, len(targets)))
    losses = reveal(head.secure_example_losses(enc_logits, enc_y), to=[0], what="losses")
    assert torch.allclose(losses, expected, atol=1e-2), (losses, expected)
    errors = reveal(head.secure_summaries(enc_logits, enc_y), to=[0], what="errors")
    assert torch.allclose(errors, (logits - plain_y).abs().squeeze(1), atol=1e-3)
    grad_logits = logits.clone().requires_grad_()
    head.plain_loss(grad_logits, plain_y, reduction="sum").backward()
    error = reveal(head.output_error(enc_logits, enc_y), to=[0], what="error")
    assert torch.allclose(error, grad_logits.grad, atol=1e-3)
    if loss == "huber":  # bounded for any output, as DP-SGD needs
        assert head.bounded_error and float(grad_logits.grad.abs().max()) <= head.gradient_bound
    # an error far beyond any sane prediction is clamped before it is squared: reported huge, never wrapped
    far = reveal(head.secure_errors(crypten.cryptensor(torch.tensor([[1e5], [-1e5]])), crypten.cryptensor(torch.zeros(2, 1))), to=[0], what="far")
    assert far.flatten().tolist() == [2.0**15, -(2.0**15)]
    scores = head.plain_scores(logits, plain_y)
    in_units = regression_scores((logits * 80 + 150).squeeze(1).double(), (plain_y * 80 + 150).squeeze(1).double())
    assert scores == pytest.approx(in_units)
    assert scores["mae"] == pytest.approx(80 * float((logits - plain_y).abs().mean()), rel=1e-5)


def test_a_loaded_model_encodes_raw_cells_as_training_did() -> None:
    """Preprocessed.encode: categories one-hot (unknown ones to `other`), blanks filled with the training fill."""
    from mpcfl.models.preprocessed import Preprocessed

    scorer = Preprocessed(
        torch.nn.Identity(), ["age", "size=small", "size=large", "size=other"], [0.0] * 4, [1.0] * 4,
        imputed={"age": 50.0}, classes=["benign", "malignant"],
    )
    table = {"age": ["61", "", "NA"], "size": ["large", "small", "huge"]}
    assert scorer.encode(table).tolist() == [[61, 0, 1, 0], [50, 1, 0, 0], [50, 0, 0, 1]]
    strict = Preprocessed(torch.nn.Identity(), ["age", "size=small", "size=large"], [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match=r"column 'size': 'huge' is none of its categories \['large', 'small'\]"):
        strict.encode({"age": ["1"], "size": ["huge"]})
    with pytest.raises(ValueError, match="column 'age': a missing cell, and training filled none"):
        strict.encode({"age": [""], "size": ["small"]})
    with pytest.raises(ValueError, match="no column 'size'"):
        strict.encode({"age": ["1"]})
    with pytest.raises(ValueError, match="column 'age': 'old' is not a number"):
        strict.encode({"age": ["old"], "size": ["small"]})
