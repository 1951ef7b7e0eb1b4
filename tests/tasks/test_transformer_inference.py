"""Transformers served securely between real processes: the shipped ViT, token ids, and what
each party's buffers hold (the recorder of tests/spy, as in tests/mpc/test_confidentiality.py)."""

from __future__ import annotations

import json
import re

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, assert_no_leftovers, mpcfl, party_lines, spy_views, write_job
from mpcfl.models.convert import emulate, trace
from mpcfl.models.zoo import digits_vit
from mpcfl.tasks.inference import _architecture

VIT_WEIGHTS = REPO / "examples" / "data" / "digits_vit" / "bank_weights.pt"
VIT_FRIENDLY_WEIGHTS = REPO / "examples" / "data" / "digits_vit" / "bank_weights_mpc_friendly.pt"
CLINIC_IMAGES = REPO / "examples" / "data" / "digits_inference" / "clinic_inputs.npy"
DEMO = REPO / "configs" / "digits_vit_inference.yaml"
SMALLEST_TELLING = 1 << 12  # ring values below this can be public small integers (shapes, flags)


def _vit(weights: Path = VIT_WEIGHTS) -> torch.nn.Module:
    model = digits_vit()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


@pytest.mark.parametrize(("weights", "mode"), [(VIT_WEIGHTS, "exact"), (VIT_FRIENDLY_WEIGHTS, "mpc_friendly")])
def test_vit_between_two_parties_and_the_dealer_matches_plaintext(weights: Path, mode: str) -> None:
    """The shipped ViT on real processes (secret x secret products with dealer triples): same classes
    as in plaintext with the same operators (0.048 and 0.097 the largest logit differences on all 197)."""
    import mpcfl as api

    model = _vit(weights)
    images = torch.from_numpy(np.load(CLINIC_IMAGES)[:6])
    secure = api.secure_predict_local(model, images, batch_size=6, timeout_s=60, approximations=mode)
    with torch.no_grad():
        expected = emulate(model, images, mode)
    assert torch.equal(secure.argmax(1), expected.argmax(1))
    assert (secure - expected).abs().max() < 0.2


def test_token_ids_are_one_hot_encoded_at_their_owner_between_two_parties() -> None:
    import mpcfl as api

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 8),
        torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        torch.nn.Flatten(),
        torch.nn.Linear(40, 3),
    ).eval()
    ids = torch.randint(0, 11, (3, 5))
    secure = api.secure_predict_local(model, ids.float(), batch_size=3, timeout_s=60)
    with torch.no_grad():
        assert (secure - model(ids)).abs().max() < 2e-2


def _ring(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Values as CrypTen encodes them (2^16 units), the telling ones only, with +-2 units of rounding."""
    encoded = np.round(np.asarray(values, dtype=np.float64).reshape(-1) * 2**16).astype(np.int64)
    telling = encoded[np.abs(encoded) >= SMALLEST_TELLING]
    return np.unique(np.concatenate([telling + delta for delta in range(-2, 3)]))


def _assert_masked(opened: np.ndarray, secrets: np.ndarray) -> None:
    """The model owner multiplies with its own weights (one-sided products): what is opened to it alone is
    each activation x - B, padded by the data owner's uniform B, so it looks uniform over the ring (|v| < 2^48
    has probability 2^-15 there; activations, pixels, token ids and logits are far smaller) and holds none of
    the data owner's ``secrets`` (ring values)."""
    assert opened.size > 0 and float(np.mean(np.abs(opened) < 2**48)) < 1e-3, "the model owner received unmasked values"
    assert int(np.isin(opened, secrets).sum()) == 0, "the model owner was opened a value of the data owner's"


def test_the_vit_job_shows_the_bank_no_pixel_or_prediction_and_the_clinic_no_weight(tmp_path: Path, spied: Path) -> None:
    images = np.random.default_rng(0).uniform(0.05, 1.0, size=(4, 64)).astype(np.float32)  # distinct ring values
    np.save(tmp_path / "images.npy", images)
    spec = yaml.safe_load(DEMO.read_text())
    spec["model"]["weights"] = str(VIT_WEIGHTS)
    spec["inputs"]["file"] = str(tmp_path / "images.npy")
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["batch_size"] = 2  # two batches: the weights' masks are fixed (runtime.mask_reuse), E = W - A opened once
    job = write_job(tmp_path, spec)
    done = mpcfl("run", str(job), timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"\[clinic\] INFO mpcfl.mpc.fixed_mask: fixed the masks of \d+ weight matrices", done.stdout), done.stdout[-3000:]
    views = spy_views(spied)  # rank 0: bank (model owner), 1: clinic (data owner), 2: the dealer
    predictions = np.load(tmp_path / "out" / "clinic" / "latest" / "predictions.npy")
    opened = views["1"]["opened_protocol"]
    encoded = np.round(predictions.astype(np.float64).reshape(-1) * 2**16).astype(np.int64)
    assert np.isin(encoded, opened).all(), "the predictions were not opened to the clinic"
    weights = np.concatenate([t.reshape(-1).numpy() for t in _vit().state_dict().values()])
    for rank in ("0", "2"):
        seen = views[rank]["seen_protocol"]
        assert seen.size > 0
        assert int(np.isin(seen, _ring(images)).sum()) == 0, f"rank {rank} holds the clinic's pixels"
        assert int(np.isin(seen, opened).sum()) == 0, f"rank {rank} holds values opened to the clinic"
    received = views["2"].get("received_protocol", np.zeros(0, dtype=np.int64))
    assert int(received.sum()) == 0, "the dealer received data during an opening"
    _assert_masked(views["0"]["opened_protocol"], np.concatenate([_ring(images), opened]))
    for rank, who in (("1", "the clinic"), ("2", "the dealer")):  # the dealer knows A: E = W - A would be W to it
        assert int(np.isin(views[rank]["seen_protocol"], _ring(weights)).sum()) == 0, f"{who} holds the bank's weights"
    assert_no_leftovers(str(job))



def test_generation_opens_only_the_tokens_to_their_owner_and_the_weights_once(spied: Path) -> None:
    """tests/scripts/generate_party.py: a served GPT-2 generates 3 tokens for 2 prompts (the argmax under
    MPC, with the key-value cache), the same without the cache and with it again, then 2 with the logits
    opened to p1, then refuses parties that ask for different steps."""
    lines = party_lines("generate_party.py", 2, "generate party")
    found = {rank: re.fullmatch(r"got=(.*) moved=(.*) kept=\[([\d, ]+)\] regrets=(.*) refused=(.*)", line)
             for rank, line in lines.items()}
    assert all(found.values()), lines
    tokens, prefix, cached, logits = json.loads(found["1"].group(1))
    assert json.loads(found["0"].group(1)) == [None] * 4, "the model owner got tokens"
    assert [len(row) for row in tokens + prefix + cached] == [6] * 6 and [len(row) for row in logits] == [5, 5]
    # Each token plaintext's argmax on the same prefix, or within fixed point's error of a near tie:
    # with the cache (one new position per token) as without it (the whole prefix).
    assert max(json.loads(found["1"].group(4))) < 0.02, lines["1"]
    # The weights were shared and their masks fixed in the first generation: the same one again moves
    # less; with the cache, a token shares and runs one position, not the prefix (2.3x fewer bytes here).
    first, whole_prefix, again, opened_logits = json.loads(found["1"].group(2))
    assert again < first and 2 * again < whole_prefix and opened_logits / 2 < first / 3, lines["1"]
    # The dealer kept the weights' masks through every generation (released when the server closed).
    kept = found["1"].group(3).split(", ")
    assert len(set(kept)) == 1 and kept[0] != "0", "the weights' masks were not kept for every generation"
    for rank in ("0", "1"):
        refused = found[rank].group(5)
        assert "asked for different steps (p0 2, p1 3); every party must pass the same" in refused, lines[rank]

    views = spy_views(spied)  # rank 0: p0 (model owner), 1: p1 (data owner), 2: the dealer
    generated = np.array([row[3:] for row in tokens], dtype=np.int64)
    opened = views["1"]["opened_protocol"]
    # Only the 6 token ids were opened to p1 in each tokens-only generation, never a logit: exactly id x 2^16
    # (the comparison bits have scale 1: nothing on the index path truncates).
    assert opened.size == generated.size, opened.size
    assert np.array_equal(np.sort(opened), np.sort(generated.reshape(-1) * 2**16)), opened
    for phase, ids in (("prefix", prefix), ("cached", cached)):
        again = np.array([row[3:] for row in ids], dtype=np.int64).reshape(-1) * 2**16
        assert np.array_equal(np.sort(views["1"][f"opened_{phase}"]), np.sort(again)), phase
    # Nor did any process hold a tokens-only generation's logits in plaintext (opened to all, say), with
    # the cache or without it: plaintext's, within 2^10 ring units (MPC's error is under 2^9 here).
    module = _generating_module()
    for phase, ids in (("protocol", tokens), ("prefix", prefix), ("cached", cached)):
        with torch.no_grad():
            logits = np.concatenate([module.MODEL(torch.tensor(ids)[:, :end]).logits[:, -1].numpy().reshape(-1)
                                     for end in range(3, 6)])
        encoded = np.round(logits.astype(np.float64) * 2**16).astype(np.int64)
        encoded = encoded[np.abs(encoded) >= SMALLEST_TELLING + 2**10]
        for rank in ("0", "1", "2"):  # the dealer runs no script: its records all carry the first phase
            seen = np.sort(views[rank][f"seen_{phase}"] if rank != "2" else
                           np.concatenate([views[rank][key] for key in views[rank] if key.startswith("seen_")]))
            near = np.searchsorted(seen, encoded + 2**10, side="right") - np.searchsorted(seen, encoded - 2**10)
            assert int(near.sum()) == 0, f"rank {rank} holds a logit of the {phase} tokens-only generation"
    assert views["1"]["opened_logits"].size == 2 * 2 * 40  # then 2 steps of 2 rows of 40 logits, as asked
    prompt_and_tokens = _ring(np.array(tokens + prefix + cached, dtype=np.float64))
    for rank in ("0", "2"):
        seen = np.concatenate([views[rank][key] for key in views[rank] if key.startswith("seen_")])
        assert int(np.isin(seen, prompt_and_tokens).sum()) == 0, f"rank {rank} holds p1's tokens"
    phases = ("protocol", "prefix", "cached", "logits")
    received = np.concatenate([views["2"].get(f"received_{phase}", np.zeros(0, dtype=np.int64)) for phase in phases])
    assert int(received.sum()) == 0, "the dealer received data during an opening"
    _assert_masked(np.concatenate([views["0"].get(f"opened_{phase}", np.zeros(0, dtype=np.int64)) for phase in phases]),
                   prompt_and_tokens)
    weights = _ring(np.concatenate([t.reshape(-1).numpy() for t in _generating_module().MODEL.state_dict().values()]))
    for rank, who in (("1", "p1"), ("2", "the dealer")):
        seen = np.concatenate([views[rank][key] for key in views[rank] if key.startswith("seen_")])
        assert int(np.isin(seen, weights).sum()) == 0, f"{who} holds p0's weights"


def test_generate_refuses_before_sharing_a_head_that_is_not_next_token_logits_and_a_bad_prompt() -> None:
    """A flattened head (N·L, V) would have every position opened: it is refused in plaintext, on zeros
    of the longest prefix, as is a prompt longer than the model's positions or not N x L integer ids."""
    from mpcfl.errors import MpcflError
    from mpcfl.tasks.inference import _check_next_token_logits, _check_prompt

    class Head(torch.nn.Module):
        def __init__(self, flat: bool) -> None:
            super().__init__()
            self.flat, self.embed, self.head = flat, torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out = self.head(self.embed(ids))
            return out.flatten(0, 1) if self.flat else out

    _check_next_token_logits(trace(Head(False)), 3, 4, 2, where="party p0", data_owner="party p1")
    with pytest.raises(MpcflError, match=r"party p0: generate needs next-token logits.*gives \(10, 10\)"):
        _check_next_token_logits(trace(Head(True)), 3, 4, 2, where="party p0", data_owner="party p1")
    gpt2 = _generating_module().MODEL  # 12 positions
    with pytest.raises(MpcflError, match=r"party p0: generate: the 13 positions of party p1's prompt of 3 tokens and 11 steps do not fit the model"):
        _check_next_token_logits(trace(gpt2), 2, 3, 11, where="party p0", data_owner="party p1")
    for bad in ([[1, 2], [3]], torch.tensor([1, 2]), torch.tensor([[1.5, 2.0]]), torch.tensor([[-1, 2]]), "12"):
        with pytest.raises(MpcflError, match=r"party p1: generate: the prompt"):
            _check_prompt(bad, "party p1")
    assert _check_prompt(np.array([[1, 2, 3]]), "party p1").dtype == torch.int64


def _generating_module() -> Any:
    """tests/scripts/generate_party.py as a module: its model and prompt, built from its seed (its
    session runs only as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_party", REPO / "tests" / "scripts" / "generate_party.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_fingerprint_the_parties_compare_covers_approximations_and_mask_values() -> None:
    """What the parties compare before sharing: a different mode or mask is refused, not run."""
    model = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    exact = _architecture(trace(model), "exact")
    assert exact == _architecture(trace(model), "exact")
    assert exact != _architecture(trace(model), "mpc_friendly")

    class Causal(torch.nn.Module):
        def __init__(self, keep: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("keep", keep)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=self.keep)

    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert _architecture(trace(Causal(causal))) != _architecture(trace(Causal(~causal | torch.eye(4, dtype=torch.bool))))


def test_the_text_example_s_friendly_weights_are_distilled_to_their_operators() -> None:
    """configs/text_friendly_inference.yaml serves weights distilled to the MPC-friendly operators
    (examples/make_text_model.py): under them, in plaintext, within a point of the exact model on the
    256 held-out sequences (99.61% and 98.44% measured), where the exact weights fall to about chance
    (54%). The secure runs of both configs match plaintext (docs/guides/transformers.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("text_classifier", REPO / "examples" / "models" / "text_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    folder = REPO / "examples" / "data" / "text_lookup"
    ids = torch.from_numpy(np.load(folder / "clinic_inputs.npy")).float()
    labels = torch.from_numpy(np.load(folder / "clinic_labels.npy"))
    accuracy = {}
    for weights, mode in (("bank_weights.pt", "exact"), ("bank_weights_mpc_friendly.pt", "mpc_friendly"),
                          ("bank_weights.pt", "mpc_friendly")):
        model = module.text_classifier()
        model.load_state_dict(torch.load(folder / weights, weights_only=True))
        with torch.no_grad():
            accuracy[weights, mode] = float((emulate(model.eval(), ids, mode).argmax(1) == labels).float().mean())
    exact = accuracy["bank_weights.pt", "exact"]
    assert exact > 0.95 and accuracy["bank_weights_mpc_friendly.pt", "mpc_friendly"] >= exact - 0.01, accuracy
    assert accuracy["bank_weights.pt", "mpc_friendly"] < 0.7, accuracy  # distilling is what it takes
