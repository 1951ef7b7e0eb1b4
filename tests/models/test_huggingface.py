"""Hugging Face models (BERT, GPT-2, ViT, built from tiny configs with random weights: no download)
under MPC against the same models in float torch.

One CrypTen process for each model in both modes (a BERT classifier between two parties and the
dealer: tests/tasks/test_huggingface_inference.py, apart because this module's CrypTen stays up
while its tests run, and forked parties must not inherit it); the errors measured are printed
with -s and listed in docs/guides/transformers.md.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpcfl.models.convert import UnsupportedModelError, emulate, encode_inputs, encrypt_model, trace, trainable
from mpcfl.models.transformer import approximations, decoder_positions
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal

transformers = pytest.importorskip("transformers")
torch.fx.wrap("decoder_positions")  # a leaf in this module's models too, as in GPT-2's rewrite

VOCAB, LENGTH = 40, 6
#: 2 layers, width 32, 4 heads; initializer_range 0.1 (HF's 0.02 makes BERT's first LayerNorm see variances
#: near 1.2e-3, the edge of the range its inverse square root covers; trained embeddings are larger)
TINY = {"num_hidden_layers": 2, "num_attention_heads": 4, "initializer_range": 0.1}


def _bert(head: bool = True, **options: object) -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=16,
                                     num_labels=3, **TINY, **options)
    return (transformers.BertForSequenceClassification if head else transformers.BertModel)(config)


def _gpt2(head: bool = True, **options: object) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_positions=16, bos_token_id=0, eos_token_id=0,
                                     **TINY, **options)
    return (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config)


def _vit(head: bool = True) -> nn.Module:
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, intermediate_size=64,
                                    num_labels=10, **TINY)
    return (transformers.ViTForImageClassification if head else transformers.ViTModel)(config)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, LENGTH)).float()


def _pixels() -> torch.Tensor:
    return torch.rand(2, 1, 8, 8)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's own forward: the logits, or the last hidden state of a model without a head."""
    with torch.no_grad():
        out = model(x.long() if x.dim() == 2 else x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# name -> (model, input, max abs error allowed under MPC in the exact mode)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], float]] = {
    "bert_classifier": (_bert, _ids, 2e-2),
    "bert_model": (lambda: _bert(head=False), _ids, 3e-2),
    "gpt2_lm_head": (_gpt2, _ids, 2e-2),
    "gpt2_model_relu": (lambda: _gpt2(head=False, activation_function="relu"), _ids, 2e-2),
    "vit_classifier": (_vit, _pixels, 2e-2),
}


def _secure(model: nn.Module, x: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    gm = trace(model)
    with approximations(mode):
        out = encrypt_model(gm, src=0)(import_crypten().cryptensor(encode_inputs(gm, x), src=0))
    return reveal(out, to=[0], what="test huggingface")


def test_rewrites_are_the_models_themselves_in_plaintext() -> None:
    """What is traced computes what HF's forward does (the fx rewrite of each model)."""
    for name, (make, inputs, _) in MODELS.items():
        torch.manual_seed(0)
        model, x = make().eval(), inputs()
        with torch.no_grad():
            assert torch.allclose(emulate(model, x, "exact"), _reference(model, x), atol=1e-5), name


def test_models_match_float_torch_under_mpc(crypten_single: None) -> None:
    errors, friendly = {}, {}
    for name, (make, inputs, tolerance) in MODELS.items():
        torch.manual_seed(0)
        model, x = make().eval(), inputs()
        expected = _reference(model, x)
        out = _secure(model, x)
        assert out.shape == expected.shape, name
        errors[name] = (out - expected).abs().max().item()
        if name in ("bert_classifier", "gpt2_lm_head"):  # the MPC-friendly operators against their emulation
            with torch.no_grad():
                emulated = emulate(model, x, "mpc_friendly")
            friendly[name] = (_secure(model, x, "mpc_friendly") - emulated).abs().max().item()
            assert (emulated - expected).abs().max() > 1e-2, f"{name}: the MPC-friendly mode changed nothing"
    print("max abs error, exact:", {k: f"{v:.1e}" for k, v in errors.items()},
          "mpc_friendly vs emulate:", {k: f"{v:.1e}" for k, v in friendly.items()})
    assert not {k: v for k, v in errors.items() if not v < MODELS[k][2]}, errors
    assert all(v < 2e-2 for v in friendly.values()), friendly


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _bert(hidden_act="quick_gelu"),
         r"layer 'bert.encoder.layer.0.intermediate.intermediate_act_fn' \(QuickGELUActivation\) of "
         r"BertForSequenceClassification is not supported under MPC"),
        (lambda: transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, **TINY)),
         r"Hugging Face model BertForMaskedLM is not supported under MPC \(supported: BertForSequenceClassification"),
        (lambda: _gpt2(add_cross_attention=True), r"GPT2LMHeadModel with add_cross_attention=True"),
        (lambda: _bert(output_attentions=True), r"output_attentions=True: secure inference returns one tensor"),
        (lambda: nn.Sequential(nn.Linear(32, 32), _vit().vit.layers[0]),
         r"layer '1' \(ViTLayer\) is not supported under MPC: Hugging Face layers run only inside"),
    ],
)
def test_unsupported_huggingface_parts_are_refused_by_name(make: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        trace(make())


def test_training_huggingface_models_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedModelError, match=r"ViTForImageClassification: Hugging Face models run under MPC for "
                                                     r"inference only"):
        trainable(_vit())


@pytest.mark.parametrize("mode", ["exact", "mpc_friendly"])
def test_a_key_value_cache_gives_the_whole_prefix_s_logits_one_position_at_a_time(mode: str) -> None:
    """GPT-2 run on a prompt and then one token per call, its keys and values cached (positions continuing
    after them), gives the logits of one run on the whole sequence; the other models are not cacheable."""
    from mpcfl.models import transformer as tf

    torch.manual_seed(0)
    model, ids = _gpt2().eval(), _ids()
    assert tf.cacheable(trace(model)) and tf.cacheable(trace(_gpt2(head=False)))
    assert not any(tf.cacheable(trace(m)) for m in (_bert(), _vit(), nn.TransformerDecoderLayer(8, 2, batch_first=True)))

    class Mixing(nn.Module):  # GPT-2's positions and causal SDPA, and a mean over the positions the graph does not flag
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.positions = nn.Embedding(VOCAB, 8), nn.Parameter(torch.randn(16, 8))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            x = x + decoder_positions(self.positions, x.shape[1])
            x = x + x.mean(1, keepdim=True)
            return F.scaled_dot_product_attention(x, x, x, is_causal=True)

    assert not tf.cacheable(trace(Mixing()))  # its class does not declare key_value_cache
    with torch.no_grad():
        whole = emulate(model, ids, mode)
        cache, parts = tf.KeyValueCache(), []
        for start, end in ((0, 3), (3, 4), (4, 5), (5, 6)):
            with tf.decoding(cache, end - start):
                parts.append(emulate(model, ids[:, start:end], mode))
    assert cache.past == LENGTH and len(cache.entries) == 2  # one (keys, values) per layer
    assert cache.entries[0][0].shape == (2, 4, LENGTH, 8)  # N, heads, positions, head width
    assert (torch.cat(parts, dim=1) - whole).abs().max() < 1e-4
    if mode == "exact":  # the friendly mode's operators are other functions
        assert (whole - _reference(model, ids)).abs().max() < 1e-4
    # Positions past the model's table (a data owner that sent more than one id a step) are refused.
    with tf.decoding(cache, 11), pytest.raises(tf.UnsupportedOperationError, match="positions 6 to 16: the model has 16"):
        emulate(model, torch.zeros(2, 11))
    # Attention that is not causal would see later positions a cache has not run: refused.
    with tf.decoding(tf.KeyValueCache(), 1), pytest.raises(tf.UnsupportedOperationError, match="needs causal attention"):
        tf.scaled_dot_product_attention(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    # Query i of 2 after 3 cached keys sees keys 0 .. 3 + i; without a cache, torch's own causal mask.
    assert tf._causal(2, 5, 3).tolist() == [[True] * 4 + [False], [True] * 5]
    assert torch.equal(tf._causal(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
