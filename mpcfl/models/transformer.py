"""Transformer operators on CrypTensors: LayerNorm, GELU, SiLU, masked softmax, attention,
``nn.MultiheadAttention``, ``nn.TransformerEncoder(Layer)`` and ``nn.TransformerDecoder(Layer)``,
in exact mode and in an MPC-friendly one.

Each function takes secret-shared activations (CrypTensors) and, where a layer has them, its
secret-shared tensors by local name. Masks are public (plain torch tensors, the same at
every party: they are part of the architecture). Fixed point has 16 fractional bits in a
64-bit ring: a product of two secrets must stay below about 2^31 in magnitude or it wraps
silently, and CrypTen's iterative functions return garbage outside their ranges, so each
function clamps or rescales its input into the range where it is accurate and states the
range it is valid on. The errors against float torch are measured in
``tests/models/test_transformer.py`` and listed in ``docs/guides/transformers.md``.

Each operator also trains under CrypTen's autograd (``mpcfl.models.convert.trainable``): the
comparisons (signs, clamps' tests, the softmax's row max) run on detached copies, and LayerNorm's
normalisation is one autograd function with its closed-form backward. The gradients against
torch's are measured in ``tests/models/test_transformer_training.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.mpc import comparison, compat, lockstep
from mpcfl.mpc.division import inverse_power, inverse_power_near_one
from mpcfl.mpc.engine import import_crypten

#: Softmax differences below this are clamped: exp(-64) < 2^-16 is zero in fixed point, and
#: CrypTen's exp, (1 + x/256)^256, turns into garbage (a large positive number) below -256.
SOFTMAX_FLOOR = 64.0
#: Subtracted from masked entries: far below any kept logit, far inside the ring (2^20 * 2^16 < 2^63).
MASK_OFFSET = float(2**20)
#: After the max is subtracted a softmax denominator s lies in [1, length]; its reciprocal covers
#: s up to 2 * 4^6 = 8192 (_SUM_EXPONENTS), and a row of scores is length^2 shares per head.
MAX_SOFTMAX_LENGTH = 4096
#: GELU's and SiLU's |x| are clamped here inside the sigmoid (exact to 2^-16 beyond:
#: GELU(x) = SiLU(x) = relu(x) there), keeping x^3 and the exp's argument in range.
GELU_CLAMP = 8.0
SILU_CLAMP = 64.0
#: GELU's and SiLU's comparisons decide from the low 48 bits of their inputs
#: (:func:`mpcfl.mpc.comparison.bounded`, 0.75x the bytes): exact for |x| below 2^31 - 64, beyond
#: the 2^30 where the products that make their inputs (a linear layer's output) hold, and far beyond
#: the 2^15 where the LayerNorm after them holds. The softmax keeps all 64 bits: its scores may
#: carry a model's own large masking constants (-1e12, -2^32), which are not products.
ACTIVATION_BITS = 48
#: LayerNorm's variance is brought into (1/2, 2] by a secret power of 4 (mpcfl.mpc.division.inverse_power),
#: found by comparisons against 2 * 4^k for k in these exponents: variances from 2 * 4^-6 ~ 5e-4
#: (below, fixed point's 2^-16 resolution dominates: at 5e-4 the variance's encoding alone is off by
#: 1.5%) to 2 * 4^12 ~ 3.4e7 (above, x - mean nears the 2^15 where its square wraps the ring; near the
#: top the square's own two-party truncation errs on about 1 element in 128). The scaled variance
#: v * 4^(12 - j) is about 2^40 in ring units whatever v is, so its two-party local division errs on
#: about one LayerNorm row in 2^23 (as the powers of 16 before; runtime.truncation: dealer makes it exact).
_VARIANCE_EXPONENTS = range(-5, 12)
#: Softmax's denominator: a sum of exps of at most 0 with one exp(0), so in [1, MAX_SOFTMAX_LENGTH]
#: (a fully masked row's 0 gives 0); 2Quad's: the row's mean of (x + 5)^2, in [5e-4, 512].
_SUM_EXPONENTS = range(0, 6)
_QUAD_MEAN_EXPONENTS = range(-5, 4)


Approximations = Literal["exact", "mpc_friendly"]
#: ``exact``: the operators above. ``mpc_friendly`` (MPCFormer, Li et al., ICLR 2023): GELU as the
#: quadratic 0.125 x^2 + 0.25 x + 0.5 and softmax as "2Quad", (x + c)^2 / sum (x + c)^2 with c = 5:
#: no comparison at all, but a different function, so the model needs distilling to it first
#: (:func:`mpcfl.models.convert.emulate` runs it in plaintext, differentiably). LayerNorm stays exact.
_APPROXIMATIONS: contextvars.ContextVar[str] = contextvars.ContextVar("approximations", default="exact")
QUAD_SOFTMAX_SHIFT = 5.0


@contextlib.contextmanager
def approximations(mode: Approximations) -> Iterator[None]:
    """Runs the operators in ``mode`` inside the block."""
    if mode not in ("exact", "mpc_friendly"):
        raise UnsupportedOperationError(f"approximations must be 'exact' or 'mpc_friendly', not {mode!r}")
    token = _APPROXIMATIONS.set(mode)
    try:
        yield
    finally:
        _APPROXIMATIONS.reset(token)


def _friendly() -> bool:
    return _APPROXIMATIONS.get() == "mpc_friendly"


@dataclass
class KeyValueCache:
    """A causal decoder's keys and values of the positions already run, kept secret-shared between
    calls, so that each generated token runs the model on that one new position only.

    Inside :func:`decoding`, every causal attention call (in graph order) appends its new keys and
    values to its entry and attends over all of them, and :func:`decoder_positions` continues at
    ``past``. Nothing is opened: the entries are the attention's own shares.
    """

    past: int = 0  # positions run so far: public, as every shape is
    entries: list[tuple[Any, Any]] = field(default_factory=list)  # (keys, values) per attention call
    _calls: int = 0

    def extend(self, k: Any, v: Any) -> tuple[Any, Any]:
        """This call's keys and values after the cached ones, along the sequence dim (-2)."""
        if self._calls < len(self.entries):
            old_k, old_v = self.entries[self._calls]
            k, v = cat([old_k, k], dim=-2), cat([old_v, v], dim=-2)
            self.entries[self._calls] = (k, v)
        else:
            self.entries.append((k, v))
        self._calls += 1
        return k, v


_CACHE: contextvars.ContextVar[KeyValueCache | None] = contextvars.ContextVar("key_value_cache", default=None)


@contextlib.contextmanager
def decoding(cache: KeyValueCache, length: int) -> Iterator[None]:
    """Runs one call of a cacheable decoder (:func:`cacheable`) on ``length`` new positions, after ``cache.past``."""
    cache._calls = 0
    token = _CACHE.set(cache)
    try:
        yield
    finally:
        _CACHE.reset(token)
    cache.past += length


def decoder_positions(table: Any, length: int) -> Any:
    """Rows ``past .. past + length - 1`` of a learnt position table: ``past`` is 0 but inside
    :func:`decoding`. A leaf under torch.fx (:mod:`mpcfl.models.huggingface` wraps it), so a decoder
    that uses it runs with a :class:`KeyValueCache`."""
    cache = _CACHE.get()
    past = 0 if cache is None else cache.past
    if past + length > table.size(0):  # a slice would quietly come out short, and broadcast
        raise UnsupportedOperationError(f"positions {past} to {past + length - 1}: the model has {table.size(0)}")
    return table[past : past + length]


def cacheable(gm: torch.fx.GraphModule) -> bool:
    """Whether the traced model runs one position at a time with a :class:`KeyValueCache`: its class says
    its positions mix only through causal SDPA (``key_value_cache = True``, which
    :func:`mpcfl.models.convert.trace` records in ``gm.meta``: Hugging Face's GPT-2 rewrite alone), its
    positions come from :func:`decoder_positions`, and every attention is causal SDPA without a mask.
    The graph alone cannot show it: a mean over the positions, or attention written out by hand,
    would mix them unseen."""
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    sdpa = [node for node in calls if node.target is F.scaled_dot_product_attention]
    attending = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer,
                 nn.TransformerDecoder)  # attention the cache does not see
    return (gm.meta.get("key_value_cache") is True and any(node.target is decoder_positions for node in calls) and bool(sdpa)
            and all(node.kwargs.get("is_causal") is True and node.kwargs.get("attn_mask") is None and len(node.args) <= 3
                    for node in sdpa)
            and not any(node.op == "call_module" and isinstance(gm.get_submodule(node.target), attending)
                        for node in gm.graph.nodes))


class UnsupportedOperationError(MpcflError):
    """A setting or a (public) input shape that an operator does not support under MPC."""


def _crypten() -> Any:
    return import_crypten()


def _gated(x: Any, argument: Callable[[Any], Any], bound: float) -> Any:
    """x * sigmoid(argument(x)) for an odd, increasing ``argument``, as relu(x) - |x| sigmoid(-argument(|x|)).

    The sigmoid's argument is known to be <= 0, so its own sign test is not needed, and |x| is
    clamped to ``bound`` (exact: beyond it sigmoid(-argument) < 2^-16), which keeps CrypTen's exp,
    (1 + t/256)^256, in [-256, 0] and any cube inside the ring. Both need only the signs of x,
    x - bound and x + bound, taken in one comparison (8 rounds; a sign and then a clamp's relu took
    17): with the bits p = [x > 0], a = [x > bound], i = [x > -bound], relu(x) = x p and the clamped
    |x| = x (2p - a - i) + bound (1 + a - i), both products in one round. 1 / (1 + exp)
    lies in [1/2, 1], where a fitted quadratic and two Newton steps give it (5 rounds; CrypTen's
    reciprocal took 8).

    The bits come from a detached copy: piecewise constants, their derivative is 0 almost
    everywhere, and CrypTen's autograd would otherwise record the comparison's inner arithmetic and
    send a wrong gradient through it; so training differentiates the smooth parts only.
    """
    crypten = _crypten()
    plain = x.detach()
    with comparison.bounded(ACTIVATION_BITS):
        positive, above, inside = crypten.stack([plain, plain - bound, plain + bound]).gt(0)  # 0/1 at scale 1: exact products
    relu, signed = lockstep.products([(x, positive), (x, positive * 2 - above - inside)])
    clamped = signed + (above - inside + 1) * bound
    low = argument(clamped).neg().exp()  # exp(-argument(|x|)) in (0, 1]
    sigmoid_low = low * inverse_power_near_one(low + 1, 1)
    return relu - (relu * 2 - x) * sigmoid_low  # |x| = 2 relu(x) - x


def gelu(x: Any, approximate: str = "none") -> Any:
    """GELU as x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) (the tanh form).

    The tanh form differs from the erf form (``approximate='none'``) by at most 4.7e-4
    (CrypTen's erf is a Taylor series, garbage beyond |x| ~ 2.5). Valid for |x| below 2^31 - 8
    (its comparisons' 48 bits, :data:`ACTIVATION_BITS`); beyond |x| = 8 it is exactly relu(x) (the
    sigmoid is below e^-49 there).
    """
    if approximate not in ("none", "tanh"):
        raise UnsupportedOperationError(f"GELU with approximate={approximate!r}")
    if _friendly():  # MPCFormer's "Quad": one product, no comparison
        return x.square().mul(0.125) + x.mul(0.25) + 0.5
    if torch.is_tensor(x):  # plaintext emulation (convert.emulate)
        return F.gelu(x, approximate=approximate)
    # t (1 + 0.044715 t^2): no product past 64 in magnitude, where t^2 * t reached 512 (a two-party
    # truncation goes wrong with probability ~|a b| / 2^32, so large products are avoided)
    return _gated(x, lambda t: t.mul(t.square().mul(0.044715) + 1).mul(2 * math.sqrt(2 / math.pi)), GELU_CLAMP)


def silu(x: Any) -> Any:
    """x sigmoid(x); exactly relu(x) beyond |x| = 64 (CrypTen's sigmoid is garbage past 500). Valid
    for |x| below 2^31 - 64 (its comparisons' 48 bits, :data:`ACTIVATION_BITS`)."""
    if torch.is_tensor(x):  # plaintext emulation (convert.emulate)
        return F.silu(x)
    return _gated(x, lambda t: t, SILU_CLAMP)


class _Normalise:
    """(x - mean) / sqrt(var + eps) over the last dim as one CrypTen autograd function, with the
    closed-form backward dx = (g - mean(g) - xhat mean(g xhat)) / sigma, which reuses the
    forward's 1/sigma factors: CrypTen cannot differentiate the inverse square root (it runs
    in place), and a second one would cost as much again."""

    @staticmethod
    def forward(ctx: Any, x: Any, eps: float) -> Any:
        centred = x - x.mean(-1, keepdim=True)
        variance = centred.square().mean(-1, keepdim=True) + eps
        inverse, normalised = inverse_power(variance, 0.5, _VARIANCE_EXPONENTS, times=centred)
        ctx.save_multiple_for_backward([normalised, inverse])
        return normalised

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        normalised, inverse = ctx.saved_tensors
        inner = grad - grad.mean(-1, keepdim=True) - normalised * (grad * normalised).mean(-1, keepdim=True)
        return inverse.times(inner)


class _Ratio:
    """numerator / denominator, the denominator a sum along ``dim`` (kept), as one CrypTen autograd
    function: :func:`mpcfl.mpc.division.inverse_power` forward, the closed-form backward
    (g / d, and -sum(g out) / d for the denominator) from the same factors."""

    @staticmethod
    def forward(ctx: Any, numerator: Any, denominator: Any, exponents: range, dim: int) -> Any:
        inverse, out = inverse_power(denominator, 1, exponents, times=numerator)
        ctx.save_multiple_for_backward([out, inverse, dim])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Any) -> tuple[Any, Any]:
        out, inverse, dim = ctx.saved_tensors
        return inverse.times(grad), inverse.times((grad * out).sum(dim, keepdim=True)).neg()


def layer_norm(x: Any, p: dict[str, Any], eps: float) -> Any:
    """LayerNorm over the last dim. Valid while the variance (plus eps) lies in [5e-4, 3.4e7]
    and |x - mean| < 2^15; relative error of the normalisation ~3e-3 for variances above ~1e-2."""
    if torch.is_tensor(x):  # plaintext emulation (convert.emulate)
        return F.layer_norm(x, x.shape[-1:], p.get("weight"), p.get("bias"), eps)
    out = compat.apply_function(_Normalise, x, eps)
    if "weight" in p:
        out = out * p["weight"]
    return out + p["bias"] if "bias" in p else out


def cat(tensors: Any, dim: int = 0) -> Any:
    """torch.cat on CrypTensors, or on plain tensors in emulation (crypten.cat drops ``dim`` for those)."""
    tensors = list(tensors)
    if all(torch.is_tensor(t) for t in tensors):
        return torch.cat(tensors, dim=dim)
    return _crypten().cat(tensors, dim=dim)


def split(x: Any, size: int | list[int], dim: int = 0) -> tuple[Any, ...]:
    """``x.split`` by ``narrow``: CrypTen's own split (and slicing with ``[]``, which Python looks
    up on the type) record no gradient; narrow does, given a dim counted from the front (its
    backward pads by it)."""
    dim %= x.dim()
    length = x.size(dim)
    sizes = list(size) if isinstance(size, (list, tuple)) else [min(size, length - i) for i in range(0, length, size)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(x.narrow(dim, start, n) for start, n in zip(starts, sizes))


def is_public_mask(t: Any) -> bool:
    """A bool tensor or one holding -inf: an attention mask, public; never secret-shared
    (fixed point cannot encode -inf)."""
    return torch.is_tensor(t) and (t.dtype == torch.bool or bool(torch.isneginf(t).any()))


@dataclass
class MaskedScores:
    """Secret scores plus a public additive mask holding -inf: only a softmax may consume them."""

    scores: Any
    keep: torch.Tensor | None
    bias: torch.Tensor | None


def add_public_mask(scores: Any, mask: torch.Tensor) -> MaskedScores:
    """``scores + mask`` for a float mask with -inf entries, kept apart until the softmax."""
    keep, bias = public_mask(mask, true_means_keep=True)
    return MaskedScores(scores, keep, bias)


def row_max(x: Any, dim: int) -> Any:
    """The maximum along ``dim`` (kept as a dim of size 1) by a tree of pairwise maxima:
    n - 1 comparisons per row in ceil(log2 n) rounds. CrypTen's ``max(dim)`` also builds the
    argmax (an equality test on every entry, and a random tie-break): several times the traffic."""
    crypten = _crypten()
    while x.size(dim) > 1:
        n = x.size(dim)
        half = n // 2
        a, b = x.narrow(dim, 0, half), x.narrow(dim, half, half)
        paired = b + (a - b).relu()
        x = paired if n % 2 == 0 else crypten.cat([paired, x.narrow(dim, n - 1, 1)], dim=dim)
    return x


def row_argmax(x: Any) -> Any:
    """The index of each row's largest entry along the last dimension, secret-shared (shape ``x``'s
    without it), the first of entries equal in fixed point, as ``torch.argmax``: a tournament of groups
    of four (two of the last entries where fewer remain), ceil(log4 n) rounds of comparisons, each of
    a round's groups compared pairwise (6 comparisons) in one go and its winner and index picked by
    three products (:func:`_group_winners`). Only the indices may then be opened: the values never are.
    Exact while entries differ by less than 2^47 in fixed point (their differences are compared);
    near-ties within the inputs' own MPC error may go either way."""
    crypten = _crypten()
    index = _public_shares(torch.arange(x.size(-1), dtype=torch.float32).expand(x.size()), like=x)
    while x.size(-1) > 1:
        n = x.size(-1)
        width = 4 if n >= 4 else 2
        whole = n - n % width  # entries in whole groups; the rest go on to the next round as they are
        winners, indices = _group_winners(x[..., :whole], index[..., :whole], width)
        if whole < n:
            winners, indices = crypten.cat([winners, x[..., whole:]], dim=-1), crypten.cat([indices, index[..., whole:]], dim=-1)
        x, index = winners, indices
    return index[..., 0]


def _group_winners(x: Any, index: Any, width: int) -> tuple[Any, Any]:
    """Each group of ``width`` (2 or 4) neighbours' first largest entry and its index.

    One comparison per pair of a group, all in one call: ``beats[p, q] = x_p >= x_q`` for p < q, so a
    tie goes to the lower index. Entry p wins if it beats every later entry and no earlier one beats
    it: a product of ``width - 1`` such bits (scale 1, so no truncation), taken in one product for
    width 2 and two for width 4; then one product picks the winner and its index from the ``width``
    entries (exactly one wins: the order is total).
    """
    crypten = _crypten()
    groups = [x[..., p::width] for p in range(width)]
    places = [index[..., p::width] for p in range(width)]
    pairs = [(p, q) for p in range(width) for q in range(p + 1, width)]
    beats = crypten.stack([groups[p] for p, _ in pairs]).ge(crypten.stack([groups[q] for _, q in pairs]))
    bit = {pair: beats[i] for i, pair in enumerate(pairs)}
    # wins[p]: the factors that say p beats each other entry of its group
    wins = [[bit[p, q] if p < q else 1 - bit[q, p] for q in range(width) if q != p] for p in range(width)]
    if width == 2:
        first = wins[0][0]  # 1 where the lower index wins: the other's bit is 1 - it
        both = crypten.stack([groups[0] - groups[1], places[0] - places[1]]) * first
        return groups[1] + both[0], places[1] + both[1]
    halves = crypten.stack([f[0] for f in wins]) * crypten.stack([f[1] for f in wins])
    won = halves * crypten.stack([f[2] for f in wins])  # (width, ...): exactly one 1 per group
    values = crypten.stack([crypten.stack(groups), crypten.stack(places)]) * won  # (2, width, ...)
    picked = values.sum(1)
    return picked[0], picked[1]


def _public_shares(value: torch.Tensor, *, like: Any) -> Any:
    """A public tensor as shares on ``like``'s device and scale, without communication: party 0
    holds its encoding, every other party zeros."""
    crypten = _crypten()
    share = like.encoder.encode(value.contiguous()).to(like.device)
    if crypten.communicator.get().get_rank() != 0:
        share.zero_()
    return crypten.mpc.MPCTensor.from_shares(share, precision=round(math.log2(like.encoder.scale)))


def softmax(x: Any, dim: int = -1, keep: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Any:
    """Softmax along ``dim`` with an optional public mask: ``keep`` (bool, broadcast against x)
    says which entries take part, ``bias`` is a public additive term (a float mask's finite part).

    Differences from the row's maximum are clamped to [-64, 0] (CrypTen's softmax has no clamp: a
    gap past 256 returns garbage). Valid for any logits below the ring's 2^31 and rows of at most
    4,096 entries (the denominator's reciprocal); a fully masked row returns 0 where torch gives NaN.
    Absolute error ~1e-3 (measured in the tests).
    """
    if isinstance(x, MaskedScores):
        extra = x.bias
        x, keep = x.scores, _merge_keep(keep, x.keep)
        bias = extra if bias is None else (bias if extra is None else bias + extra)
    # public masks are built on the host (buffers, _causal); the scores may be CUDA shares
    keep = None if keep is None else keep.to(x.device)
    bias = None if bias is None else bias.to(x.device)
    length = x.size(dim)
    if length > MAX_SOFTMAX_LENGTH:
        raise UnsupportedOperationError(
            f"softmax over {length} entries: at most {MAX_SOFTMAX_LENGTH} are supported in fixed point"
        )
    if bias is not None:
        x = x + bias
    if _friendly():
        return _quad_softmax(x, dim, keep)
    if torch.is_tensor(x):  # plaintext emulation (convert.emulate)
        return F.softmax(x if keep is None else x.masked_fill(~keep, float("-inf")), dim)
    if keep is not None:  # masked entries sit below every kept one for the max, then drop out exactly
        x = x + (~keep).to(torch.float32) * -MASK_OFFSET
    # the max only shifts the row (softmax is invariant to it): a constant for autograd, so that
    # training neither differentiates its comparisons nor pays for their backward
    gap = x - row_max(x.detach(), dim % x.dim())
    numerator = (gap + (-gap - SOFTMAX_FLOOR).relu()).exp()
    if keep is not None:
        numerator = numerator * keep.to(torch.float32)
    return compat.apply_function(_Ratio, numerator, numerator.sum(dim, keepdim=True), _SUM_EXPONENTS, dim)


def _quad_softmax(x: Any, dim: int, keep: torch.Tensor | None) -> Any:
    """MPCFormer's 2Quad: (x + 5)^2 / sum (x + 5)^2 along ``dim``, masked entries zeroed.

    Valid while the row's mean of (x + 5)^2 lies in [5e-4, 512] (the range of its reciprocal; the
    mean, not the sum, so that the length does not narrow the range).
    """
    numerator = (x + QUAD_SOFTMAX_SHIFT).square()
    if keep is not None:
        numerator = numerator * keep.to(torch.float32)
    length = x.size(dim)
    if torch.is_tensor(numerator):
        return numerator / numerator.sum(dim, keepdim=True)
    return compat.apply_function(_Ratio, numerator, numerator.sum(dim, keepdim=True).div(length), _QUAD_MEAN_EXPONENTS,
                                 dim).div(length)


def public_mask(mask: torch.Tensor | None, *, true_means_keep: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A torch attention mask as (keep, bias): a bool mask (in SDPA True keeps, in
    ``nn.MultiheadAttention`` True drops) or a float mask added to the scores, -inf dropping."""
    if mask is None:
        return None, None
    if not torch.is_tensor(mask):
        raise UnsupportedOperationError("an attention mask must be a public tensor (a buffer or a constant), not a secret")
    if mask.dtype == torch.bool:
        return (mask if true_means_keep else ~mask), None
    keep = torch.isfinite(mask)
    bias = torch.where(keep, mask, torch.zeros_like(mask)).float()
    return (None if bool(keep.all()) else keep), (bias if bool(bias.any()) else None)


def _causal(length: int, source: int, past: int = 0) -> torch.Tensor:
    """Query i sees keys 0 .. past + i: torch's ``is_causal`` (aligned at the start) where ``past`` is 0."""
    return torch.ones(length, source, dtype=torch.bool).tril(past)


def _merge_keep(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a & b


def attention(q: Any, k: Any, v: Any, keep: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              scale: float | None = None) -> Any:
    """softmax(q k^T * scale + mask) v over (..., L, E) CrypTensors: two products of secrets.

    q is scaled before the product (a public scalar), which keeps the scores' magnitude down.
    Valid for at most 4,096 keys (the softmax) while each score stays below ~2^31 (the ring);
    error about 1e-3 (measured: scaled_dot_product_attention, MultiheadAttention).
    """
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q * scale).matmul(k.transpose(-2, -1))
    return softmax(scores, -1, keep, bias).matmul(v)


def scaled_dot_product_attention(q: Any, k: Any, v: Any, attn_mask: torch.Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Any:
    """``F.scaled_dot_product_attention`` in eval (dropout off); masks public."""
    if enable_gqa:
        raise UnsupportedOperationError("scaled_dot_product_attention with enable_gqa=True")
    cache, past = _CACHE.get(), 0
    if cache is not None:  # query i is position past + i, after the cached keys
        if not is_causal or attn_mask is not None:
            raise UnsupportedOperationError("a key-value cache needs causal attention without another mask")
        k, v = cache.extend(k, v)
        past = k.size(-2) - q.size(-2)
    keep, bias = public_mask(attn_mask, true_means_keep=True)
    if is_causal:
        keep = _merge_keep(keep, _causal(q.size(-2), k.size(-2), past))
    return attention(q, k, v, keep, bias, scale)


def _sub(p: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The tensors under ``prefix.`` with the prefix taken off."""
    start = f"{prefix}."
    return {name[len(start):]: t for name, t in p.items() if name.startswith(start)}


def check_layer_norm(m: nn.LayerNorm) -> None:
    """Refuses a LayerNorm over more than the last dim."""
    if len(m.normalized_shape) != 1:
        raise UnsupportedOperationError(f"LayerNorm over {len(m.normalized_shape)} dims (the last dim is supported)")


def check_multihead(m: nn.MultiheadAttention) -> None:
    """Refuses the settings not implemented here."""
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedOperationError("MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn")


def multihead_attention(m: nn.MultiheadAttention, query: Any, p: dict[str, Any], key: Any = None, value: Any = None,
                        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[Any, None]:
    """``nn.MultiheadAttention.forward`` in eval: (output, None); the weights are never returned
    (they would be a secret the caller did not ask to open). Masks public, as torch takes them.
    Valid as :func:`attention`."""
    key = query if key is None else key
    value = key if value is None else value
    if not m.batch_first:  # (L, N, E) -> (N, L, E)
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    embed, heads = m.embed_dim, m.num_heads
    weight, bias = p["in_proj_weight"], p.get("in_proj_bias")

    if key is query and value is query:  # self-attention: one product for q, k and v
        qkv = query.matmul(weight.t())
        if bias is not None:
            qkv = qkv + bias
        q, k, v = split(qkv, embed, -1)
    else:
        weights = split(weight, embed, 0)
        biases = (None,) * 3 if bias is None else split(bias, embed, 0)
        q, k, v = (t.matmul(w.t()) if b is None else t.matmul(w.t()) + b
                   for t, w, b in zip((query, key, value), weights, biases))

    def split_heads(t: Any) -> Any:  # (N, L, E) -> (N, H, L, E/H)
        n, length, _ = t.size()
        return t.reshape(n, length, heads, embed // heads).permute((0, 2, 1, 3))

    keep, mask_bias = public_mask(attn_mask, true_means_keep=False)
    if is_causal and attn_mask is None:
        keep = _causal(q.size(1), k.size(1))
    if key_padding_mask is not None:  # (N, S) -> (N, 1, 1, S)
        pad_keep, pad_bias = public_mask(key_padding_mask, true_means_keep=False)
        keep = _merge_keep(keep, None if pad_keep is None else pad_keep[:, None, None, :])
        if pad_bias is not None:
            mask_bias = pad_bias[:, None, None, :] if mask_bias is None else mask_bias + pad_bias[:, None, None, :]
    if keep is not None and keep.dim() == 3:  # (N * H, L, S) per head -> (N, H, L, S)
        keep = keep.reshape(-1, heads, *keep.shape[1:])
    if mask_bias is not None and mask_bias.dim() == 3:
        mask_bias = mask_bias.reshape(-1, heads, *mask_bias.shape[1:])
    out = attention(split_heads(q), split_heads(k), split_heads(v), keep, mask_bias)
    n, _, length, _ = out.size()
    out = out.permute((0, 2, 1, 3)).reshape(n, length, embed)
    out = out.matmul(p["out_proj.weight"].t())
    if "out_proj.bias" in p:
        out = out + p["out_proj.bias"]
    return (out if m.batch_first else out.transpose(0, 1)), None


def _activation(layer: nn.TransformerEncoderLayer, x: Any) -> Any:
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return x.relu()
    if act is F.gelu:
        return gelu(x)
    if isinstance(act, nn.GELU):
        return gelu(x, act.approximate)
    raise UnsupportedOperationError(f"TransformerEncoderLayer with activation {act!r} (relu and gelu are supported)")


def check_encoder_layer(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> None:
    """Refuses an activation other than relu or gelu, or attention settings not implemented
    (a decoder layer's too: its attention to the memory and its third norm)."""
    act = layer.activation
    if not (act in (F.relu, F.gelu) or isinstance(act, (nn.ReLU, nn.GELU))):
        raise UnsupportedOperationError(f"TransformerEncoderLayer with activation {act!r} (relu and gelu are supported)")
    check_multihead(layer.self_attn)
    check_layer_norm(layer.norm1)
    check_layer_norm(layer.norm2)
    if isinstance(layer, nn.TransformerDecoderLayer):
        check_multihead(layer.multihead_attn)
        check_layer_norm(layer.norm3)


def _feed_forward(m: nn.Module, p: dict[str, Any], x: Any) -> Any:
    """An encoder or decoder layer's linear2(activation(linear1(x))); bias=False layers have no biases."""

    def linear(x: Any, name: str) -> Any:
        out = x.matmul(p[f"{name}.weight"].t())
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    return linear(_activation(m, linear(x, "linear1")), "linear2")


def _norm(m: nn.Module, p: dict[str, Any], x: Any, name: str) -> Any:
    return layer_norm(x, _sub(p, name), getattr(m, name).eps)


def encoder_layer(m: nn.TransformerEncoderLayer, src: Any, p: dict[str, Any], src_mask: torch.Tensor | None = None,
                  src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> Any:
    """``nn.TransformerEncoderLayer.forward`` in eval, both ``norm_first`` settings; valid as its
    parts (:func:`attention`, :func:`layer_norm`, :func:`gelu`)."""

    def attend(x: Any) -> Any:
        return multihead_attention(m.self_attn, x, _sub(p, "self_attn"), x, x, src_key_padding_mask,
                                   attn_mask=src_mask, is_causal=is_causal and src_mask is None)[0]

    x = src
    if m.norm_first:
        x = x + attend(_norm(m, p, x, "norm1"))
        return x + _feed_forward(m, p, _norm(m, p, x, "norm2"))
    x = _norm(m, p, x + attend(x), "norm1")
    return _norm(m, p, x + _feed_forward(m, p, x), "norm2")


def decoder_layer(m: nn.TransformerDecoderLayer, tgt: Any, p: dict[str, Any], memory: Any,
                  tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                  tgt_key_padding_mask: torch.Tensor | None = None, memory_key_padding_mask: torch.Tensor | None = None,
                  tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Any:
    """``nn.TransformerDecoderLayer.forward`` in eval: self-attention, attention to ``memory`` (a
    secret the same model computed), feed-forward; both ``norm_first`` settings. Valid as its parts."""

    def attend(x: Any) -> Any:
        return multihead_attention(m.self_attn, x, _sub(p, "self_attn"), x, x, tgt_key_padding_mask,
                                   attn_mask=tgt_mask, is_causal=tgt_is_causal and tgt_mask is None)[0]

    def attend_memory(x: Any) -> Any:
        return multihead_attention(m.multihead_attn, x, _sub(p, "multihead_attn"), memory, memory,
                                   memory_key_padding_mask, attn_mask=memory_mask,
                                   is_causal=memory_is_causal and memory_mask is None)[0]

    x = tgt
    if m.norm_first:
        x = x + attend(_norm(m, p, x, "norm1"))
        x = x + attend_memory(_norm(m, p, x, "norm2"))
        return x + _feed_forward(m, p, _norm(m, p, x, "norm3"))
    x = _norm(m, p, x + attend(x), "norm1")
    x = _norm(m, p, x + attend_memory(x), "norm2")
    return _norm(m, p, x + _feed_forward(m, p, x), "norm3")


def decoder(m: nn.TransformerDecoder, tgt: Any, p: dict[str, Any], memory: Any, tgt_mask: torch.Tensor | None = None,
            memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
            memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
            memory_is_causal: bool = False) -> Any:
    """``nn.TransformerDecoder.forward`` in eval: its layers in turn, then its final norm, if any."""
    x = tgt
    for i, layer in enumerate(m.layers):
        x = decoder_layer(layer, x, _sub(p, f"layers.{i}"), memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                          memory_key_padding_mask, bool(tgt_is_causal), memory_is_causal)
    if m.norm is not None:
        x = layer_norm(x, _sub(p, "norm"), m.norm.eps)
    return x


def encoder(m: nn.TransformerEncoder, src: Any, p: dict[str, Any], mask: torch.Tensor | None = None,
            src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> Any:
    """``nn.TransformerEncoder.forward`` in eval: its layers in turn, then its final norm, if any."""
    x = src
    for i, layer in enumerate(m.layers):
        x = encoder_layer(layer, x, _sub(p, f"layers.{i}"), mask, src_key_padding_mask, bool(is_causal))
    if m.norm is not None:
        x = layer_norm(x, _sub(p, "norm"), m.norm.eps)
    return x
