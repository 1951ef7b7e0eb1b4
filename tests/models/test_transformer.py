"""Transformer operators under MPC against float torch, over the input ranges a model reaches.

All cases run in one CrypTen process (world size 1); each reports its max abs error, and
the bounds here are the ones stated in docs/guides/transformers.md. The same operators between
two parties and the dealer, and what each party's buffers hold: tests/tasks/test_transformer_inference.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.models.convert import UnsupportedModelError, emulate, encode_inputs, encrypt_model, trace, trainable
from mpcfl.models import transformer
from mpcfl.models.transformer import approximations
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.reveal import reveal


class Fn(nn.Module):
    """A module whose forward is a function of its input (traced by fx like user code)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class MaskedScores(nn.Module):
    """Scores plus a public additive -inf mask (a buffer), then a softmax: as model code writes it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.full((n, n), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x + self.mask, dim=-1)


class Attention(nn.Module):
    """Self-attention by F.scaled_dot_product_attention over heads, causal or with a bool mask buffer."""

    def __init__(self, dim: int = 8, heads: int = 2, causal: bool = True) -> None:
        super().__init__()
        self.qkv, self.out, self.heads, self.causal = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, causal
        self.register_buffer("keep", (torch.rand(5, 5) > 0.3) | torch.eye(5, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep)
        return self.out(out.transpose(1, 2).reshape(n, length, dim))


class MHA(nn.Module):
    """Self-attention, unmasked, causal (a bool attn_mask buffer) or with padding (key_padding_mask)."""

    def __init__(self, batch_first: bool, masked: str = "") -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.register_buffer("mask", torch.ones(5, 5, dtype=torch.bool).triu(1))
        self.register_buffer("padding", torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
        self.masked = masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.masked == "causal":
            return self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]
        if self.masked == "padding":
            return self.attn(x, x, x, key_padding_mask=self.padding)[0]
        return self.attn(x, x, x)[0]


class TokenEncoder(nn.Module):
    """Token ids -> embedding + learnt positions -> encoder layer -> mean over tokens -> classes."""

    def __init__(self, vocab: int = 11, dim: int = 8, length: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.position).mean(1))


class EncoderDecoder(nn.Module):
    """An encoder over the sequence, then a causal decoder (a bool mask buffer) attending to it."""

    def __init__(self, norm_first: bool, layers: int = 1) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                           activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(8)) if layers > 1 else layer
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x), tgt_mask=self.causal)


class ClassToken(nn.Module):
    """A ViT's class token: a parameter expanded over the batch and concatenated before the tokens."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)
        return self.encoder(tokens)[:, 0]


def _encoder_layer(norm_first: bool, activation: str, batch_first: bool, bias: bool = True) -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, norm_first=norm_first,
                                      batch_first=batch_first, bias=bias)


def _ranges(low: float, high: float, shape: tuple[int, ...]) -> torch.Tensor:
    """Values spread evenly over [low, high] (both ends included), in ``shape``."""
    return torch.linspace(low, high, int(torch.tensor(shape).prod())).reshape(shape)


def _spread_layernorm_input() -> torch.Tensor:
    """Rows with variances from ~4e-3 to ~4e6: the range the rescaled inverse square root covers."""
    rows = torch.randn(12, 16)
    return rows * torch.logspace(-1, 3.3, 12)[:, None] + torch.linspace(-50, 50, 12)[:, None]


def _affine(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


# name -> (model, input, max abs error allowed); the errors measured are printed with -s
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], float]] = {
    "layernorm": (lambda: _affine(nn.Sequential(nn.LayerNorm(16))), _spread_layernorm_input, 1e-2),
    "f_layer_norm": (lambda: Fn(lambda x: F.layer_norm(x, (16,))), _spread_layernorm_input, 1e-2),
    "gelu": (lambda: nn.Sequential(nn.GELU()), lambda: _ranges(-40, 40, (4, 101)), 1e-2),
    "gelu_tanh": (lambda: nn.Sequential(nn.GELU(approximate="tanh")), lambda: _ranges(-40, 40, (4, 101)), 1e-2),
    "f_gelu": (lambda: Fn(F.gelu), lambda: _ranges(-6, 6, (4, 25)), 5e-3),
    "silu": (lambda: nn.Sequential(nn.SiLU()), lambda: _ranges(-100, 100, (4, 101)), 1e-2),
    "softmax_module": (lambda: nn.Sequential(nn.Softmax(dim=-1)), lambda: torch.randn(6, 16) * 8, 5e-3),
    "softmax_gap_300": (lambda: Fn(lambda x: F.softmax(x, dim=-1)), lambda: _ranges(-300, 300, (6, 16)), 5e-3),
    "softmax_1000": (lambda: Fn(lambda x: F.softmax(x, dim=-1)), lambda: torch.randn(3, 1000) * 0.5, 1e-4),
    "torch_softmax": (lambda: Fn(lambda x: torch.softmax(x, -1)), lambda: torch.randn(2, 3, 16) * 4, 5e-3),
    "tensor_softmax": (lambda: Fn(lambda x: x.softmax(dim=-1)), lambda: torch.randn(2, 3, 16) * 4, 5e-3),
    "softmax_additive_mask": (lambda: MaskedScores(6), lambda: torch.randn(3, 6, 6) * 4, 5e-3),
    "sdpa_causal": (lambda: Attention(causal=True), lambda: torch.randn(2, 5, 8), 1e-2),
    "sdpa_bool_mask": (lambda: Attention(causal=False), lambda: torch.randn(2, 5, 8), 1e-2),
    "mha_batch_first": (lambda: MHA(True), lambda: torch.randn(2, 5, 8), 1e-2),
    "mha_seq_first_masked": (lambda: MHA(False, "causal"), lambda: torch.randn(5, 2, 8), 1e-2),
    "mha_key_padding": (lambda: MHA(True, "padding"), lambda: torch.randn(2, 5, 8), 1e-2),
    "encoder_post_norm_relu": (lambda: _affine(_encoder_layer(False, "relu", True)), lambda: torch.randn(2, 5, 8), 2e-2),
    "encoder_pre_norm_gelu": (lambda: _affine(_encoder_layer(True, "gelu", False)), lambda: torch.randn(5, 2, 8), 2e-2),
    "encoder_without_bias": (lambda: _encoder_layer(True, "relu", True, bias=False), lambda: torch.randn(2, 5, 8), 2e-2),
    "encoder_stack": (
        lambda: _affine(nn.TransformerEncoder(_encoder_layer(True, "gelu", True), 2, norm=nn.LayerNorm(8),
                                              enable_nested_tensor=False)),
        lambda: torch.randn(2, 5, 8), 3e-2,
    ),
    "decoder_layer_post_norm": (lambda: _affine(EncoderDecoder(False)), lambda: torch.randn(2, 5, 8), 2e-2),
    "decoder_stack_pre_norm": (lambda: _affine(EncoderDecoder(True, 2)), lambda: torch.randn(2, 5, 8), 2e-2),
    "class_token": (ClassToken, lambda: torch.randn(2, 4, 8), 2e-2),
    "token_encoder": (TokenEncoder, lambda: torch.randint(0, 11, (3, 5)).float(), 2e-2),
}


def test_operators_match_float_torch(crypten_single: None) -> None:
    crypten = import_crypten()
    errors = {}
    for name, (make, inputs, tolerance) in CASES.items():
        torch.manual_seed(0)
        model, x = make().eval(), inputs()
        gm = trace(model)
        secure = encrypt_model(gm, src=0)
        out = reveal(secure(crypten.cryptensor(encode_inputs(gm, x), src=0)), to=[0], what=f"test {name}")
        with torch.no_grad():
            expected = model(x.long() if name == "token_encoder" else x)
        assert out.shape == expected.shape, name
        errors[name] = (out - expected).abs().max().item()
    print("max abs error per case:", {k: f"{v:.1e}" for k, v in errors.items()})
    failed = {k: v for k, v in errors.items() if not v < CASES[k][2]}
    assert not failed, f"beyond tolerance: {failed}"


def test_gelu_and_silu_compare_on_48_bits_and_the_softmax_on_64(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """GELU's and SiLU's comparisons decide from the low 48 bits (comparison.bounded); the softmax's
    scores may carry a model's large masking constants, so its comparisons keep all 64."""
    from mpcfl.mpc import comparison

    crypten, widths, bounded = import_crypten(), [], comparison.bounded
    monkeypatch.setattr(comparison, "bounded", lambda bits: widths.append(bits) or bounded(bits))
    x = crypten.cryptensor(torch.randn(2, 4))
    transformer.gelu(x)
    transformer.silu(x)
    assert widths == [48, 48]
    transformer.softmax(x)
    assert widths == [48, 48]


FRIENDLY = ("gelu", "softmax_module", "softmax_additive_mask", "mha_seq_first_masked", "encoder_stack", "token_encoder")


def test_mpc_friendly_operators_match_their_plaintext_emulation(crypten_single: None) -> None:
    """Quadratic GELU and 2Quad softmax under MPC against the same functions in float (emulate),
    and unlike the exact ones: the mode is in effect."""
    crypten = import_crypten()
    for name in FRIENDLY:
        make, inputs, _ = CASES[name]
        torch.manual_seed(0)
        model, x = make().eval(), inputs()
        if name == "gelu":
            x = x / 10  # Quad is fitted on [-4, 4]: past it the square grows without bound
        elif name.startswith("softmax"):
            x = x / 4  # 2Quad's reciprocal needs the row's mean of (x + 5)^2 below 256
        gm = trace(model)
        with approximations("mpc_friendly"):
            out = reveal(encrypt_model(gm, src=0)(crypten.cryptensor(encode_inputs(gm, x), src=0)), to=[0], what=name)
        with torch.no_grad():
            expected, exact = emulate(model, x, "mpc_friendly"), emulate(model, x, "exact")
        assert (out - expected).abs().max() < 1e-2, name
        assert (expected - exact).abs().max() > 1e-2, f"{name}: the MPC-friendly mode changed nothing"


def test_shapes_outside_the_fixed_point_ranges_are_refused_when_run(crypten_single: None) -> None:
    """Refusals that depend on the (public) input shape, raised at the same point at every party."""
    crypten = import_crypten()
    too_long = encrypt_model(trace(nn.Sequential(nn.Softmax(dim=-1))), src=0)
    with pytest.raises(MpcflError, match="softmax over 4097 entries: at most 4096"):
        too_long(crypten.cryptensor(torch.zeros(1, 4097), src=0))
    two_dims = encrypt_model(trace(Fn(lambda x: F.layer_norm(x, x.shape[-2:]))), src=0)
    with pytest.raises(MpcflError, match="layer_norm over 2 dims"):
        two_dims(crypten.cryptensor(torch.zeros(2, 3, 4), src=0))


def test_exact_emulation_is_the_model_itself() -> None:
    torch.manual_seed(0)
    for name in ("encoder_post_norm_relu", "encoder_stack", "mha_seq_first_masked", "token_encoder"):
        make, inputs, _ = CASES[name]
        model, x = make().eval(), inputs()
        with torch.no_grad():
            reference = model(x.long() if name == "token_encoder" else x)
            assert torch.allclose(emulate(model, x, "exact"), reference, atol=1e-5), name


class MaskLeaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.mask) * 2


class EmbedsHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x + 1)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Transformer(8, 2, 1, 1, 16, batch_first=True), r"layer '0' \(Transformer\) is not supported under MPC"),
        (nn.Sequential(nn.TransformerDecoderLayer(8, 2, activation=F.elu)), r"activation"),
        (nn.Sequential(nn.LayerNorm((2, 4))), r"LayerNorm over 2 dims"),
        (nn.Sequential(nn.Mish()), r"'0' \(Mish\) is not supported"),
        (nn.Sequential(nn.TransformerEncoderLayer(8, 2, activation=F.elu)), r"activation"),
        (MaskLeaks(), r"must go straight to a softmax"),
        (EmbedsHidden(), r"must take the model's input"),
    ],
)
def test_unsupported_transformer_parts_are_refused_by_name(model: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        trace(model)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
         r"layer '0' \(TransformerEncoderLayer\) has dropout > 0"),
        (nn.Sequential(nn.MultiheadAttention(8, 2, dropout=0.1)), r"\(MultiheadAttention\) has dropout > 0"),
        (Fn(lambda x: F.scaled_dot_product_attention(x, x, x, dropout_p=0.1)), r"with dropout_p > 0 cannot be trained"),
    ],
)
def test_training_attention_with_dropout_is_refused_by_name(model: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        trainable(model)


def test_token_ids_are_checked_before_one_hot_encoding() -> None:
    gm = trace(TokenEncoder())
    assert encode_inputs(gm, torch.tensor([[1.0, 10.0, 0.0, 2.0, 3.0]])).shape == (1, 5, 11)
    for bad in (torch.tensor([[11.0]]), torch.tensor([[-1.0]]), torch.tensor([[1.5]])):
        with pytest.raises(UnsupportedModelError, match=r"integers in \[0, 11\)"):
            encode_inputs(gm, bad)



def test_the_secret_argmax_is_torch_s_first_maximum(crypten_single: None) -> None:
    """``row_argmax`` on rows of every length up to 17, and 1,000 and 50,257 entries, with ties (drawn from
    few values, and a row of one value): each row's index of its first largest entry, exactly."""
    from mpcfl.models.transformer import row_argmax

    crypten = import_crypten()
    torch.manual_seed(0)
    rows = [torch.randint(-3, 4, (3, n)).float() / 4 for n in range(1, 18)]  # many ties
    rows += [torch.randn(2, n) * 50 for n in (5, 16, 1000, 50257)] + [torch.full((1, 9), 2.5)]
    rows.append(torch.randn(2, 3, 6))  # leading dims
    for x in rows:
        index = reveal(row_argmax(crypten.cryptensor(x, src=0)), to=[0], what="test argmax")
        assert torch.equal(index.round().long(), x.argmax(-1)), (x.shape, index, x.argmax(-1))
