"""Mask reuse on fixed data (SecureML): a data tensor is opened masked once, and every later
product with it takes a triple whose first factor is that same mask.

An ordinary Beaver product X·W opens X - A and W - B for a fresh triple (A, B, A·B): in
training, the whole n x d feature matrix in every product, twice per step. Here instead:

- once per data tensor (:func:`fix`), every party draws its share of a mask A from the
  stream it shares with the dealer (request ``fixed_mask``, bound to a public identifier
  of the data that every party announces, see :mod:`mpcfl.mpc.providers.ttp`), and the
  parties open E = X - A to each other. A is uniform over the ring and masks this X only,
  so E is a one-time pad of X: it tells the parties nothing, and the dealer, which knows
  A, never receives it;
- each later product (:func:`product`) X·W or Xᵀ·G takes a fresh B with A·B (or Aᵀ·B)
  from the dealer (``fixed_triple``) and opens only D = W - B (d x k) or G - B (n x k):
  X·W = E·D + E·[B] + [A]·D + [A·B]. Per step, O(n·d) opened elements become O((n + d)·k);
- a mini-batch X[rows] (:func:`rows`) uses those rows of E and [A]. The dealer still
  multiplies the whole A, so its requests do not depend on the rows (each step's
  prefetched batch repeats) and it never learns them: the forward product takes the rows
  of A·B; the backward one scatters G into n rows (zeros elsewhere: D = G - B still
  reveals nothing, B being uniform). That moves n·k elements where an ordinary triple
  moves batch·(d + k): it is used only where it moves fewer.

A served model's weights are fixed the same way (:func:`fix_weights`, once per
``secure_predict`` call of two or more batches): W - A is opened once, and each batch's
product x·W (or x·Wᵀ, through the tag that :func:`transposed` carries to ``W.t()``) takes
a fresh B with B·A from the dealer as the transposed triple Aᵀ·Bᵀ (A·Bᵀ), so it opens only
x - B: a weight matrix's elements are opened once per call, not once per batch. With two
parties, the model owner holds W in plaintext: its products are one-sided
(:func:`_one_sided_product`), x - B opened to the owner alone and one matrix product a party.

The product keeps CrypTen's fixed point: the ring product at scale s^2 is divided by s as
``ArithmeticSharedTensor`` divides any private product. Under the TFP provider (no
dealer) nothing is fixed and every product takes ordinary triples.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from mpcfl.errors import MpcflError
from mpcfl.mpc.compat import loaded_crypten
from mpcfl.mpc.device import to_device

log = logging.getLogger(__name__)

#: Where a fixed data tensor keeps its :class:`_Fixed` (in the CrypTensor's ``__dict__``).
_TAG = "_mpcfl_fixed_mask"


@dataclass(frozen=True)
class FixedMask:
    """One data tensor's mask, as this party holds it.

    Args:
        binding: the public identifier the dealer keeps the mask under.
        opened: E = X - A, public to the parties, a ring tensor on the data's device.
        share: this party's share of A + E, a ring tensor on the same device: party 0 holds the
            public E in its share of the mask, so a Beaver sum's public term E·D (or D·E) comes
            within its [A]·D product (two products a party where three were).
    """

    binding: str
    opened: Any
    share: Any
    released: list[bool] = field(default_factory=lambda: [False], compare=False)  # set by release_weights
    #: With two parties, the rank that holds the tensor in plaintext (a model owner's weights), or None.
    owner: int | None = None
    #: At ``owner``, the tensor itself in ring units (None elsewhere).
    plain: Any = field(default=None, compare=False)


def _state(share: Any) -> tuple[Any, Any, int]:
    """What an in-place change alters: the share object, its torch tensor (a ``CUDALongTensor``
    wraps one, and its ``set_`` replaces it) and that tensor's version counter."""
    inner = getattr(share, "_tensor", share)
    return share, inner, inner._version


@dataclass(frozen=True)
class _Fixed:
    """What a tagged tensor is: rows of a fixed data tensor (``rows`` None: all, in order), or
    (``flipped``) its transpose, whose share was in ``state`` when tagged (a later in-place change
    leaves E stale; a transpose shares its base's version counter)."""

    mask: FixedMask
    rows: torch.Tensor | None
    state: tuple[Any, Any, int]
    flipped: bool = False

    @classmethod
    def of(cls, x: Any, mask: FixedMask, rows: torch.Tensor | None, flipped: bool = False) -> _Fixed:
        return cls(mask, rows, _state(x._tensor.share), flipped)


def binding(*public: object) -> str:
    """The identifier of a data tensor, from public facts every party agrees on (job, split, shape)."""
    return hashlib.sha256(repr(("mpcfl fixed mask", *public)).encode()).hexdigest()


def _tag(x: Any) -> _Fixed | None:
    """The tensor's fixed mask, or None if it was never fixed.

    Raises:
        MpcflError: it changed in place since E = X - A was opened. Falling back to ordinary triples
            is no way out: adding a public value changes party 0's share alone, so the parties would
            disagree on which triple to ask for.
    """
    tag = vars(x).get(_TAG)
    if tag is None or tag.mask.released[0]:  # a view kept past its mask's release: ordinary triples
        return None
    share, inner, version = _state(x._tensor.share)
    if share is tag.state[0] and inner is tag.state[1] and version == tag.state[2]:
        return tag
    raise MpcflError("a fixed data tensor (mask reuse) changed in place; its opened E = X - A no longer holds")


def fix(x: Any, data: str, *, quiet: bool = False, owner: int | None = None, plain: torch.Tensor | None = None) -> bool:
    """Opens the n x d data tensor ``x`` masked, once, so that its later products reuse the mask.

    Every party calls it at the same point. ``data`` is :func:`binding` of the tensor; the
    dealer refuses a second mask for it. A tensor already fixed stays as it is. With two parties
    of which ``owner`` holds ``x`` in plaintext (``plain``, there; None elsewhere), its later products
    on the right of an activation are one-sided (:func:`_one_sided_product`).

    Returns:
        Whether ``x`` is fixed (False where the provider serves no fixed masks: TFP).
    """
    if _tag(x) is not None:
        return True
    provider = loaded_crypten().mpc.get_default_provider()
    if not hasattr(provider, "generate_fixed_mask") or x.dim() != 2:
        return False
    mask = provider.generate_fixed_mask(data, tuple(x.size()), device=x.device)
    opened = _open_padded(x._tensor.share, mask)
    comm = loaded_crypten().communicator.get()
    if comm.get_world_size() != 2:
        owner = None
    encoded = None if owner is None or comm.get_rank() != owner else to_device(x.encoder.encode(plain), opened.device)
    vars(x)[_TAG] = _Fixed.of(x, FixedMask(data, opened, _with_public(mask.share, opened), owner=owner, plain=encoded), None)
    (log.debug if quiet else log.info)("fixed mask for %s (%d x %d): later products open O(n + d) elements", data[:16], *x.size())
    return True


def fix_weights(tensors: dict[str, Any], *, label: str, owner: int | None = None,
                plain: dict[str, torch.Tensor] | None = None) -> str | None:
    """Fixes the mask of each shared weight matrix of a served model (2-D, named ``*weight``: the
    factors of linear layers, attention projections and embedding tables), so that every later
    product with it opens only the activations.

    Every party calls it at the same point, with the same tensors and ``owner``, the rank that shared
    them (``plain``: its plaintext tensors by name, at ``owner``; see :func:`fix`). The dealer keeps each mask
    until :func:`release_weights` or the session's end, within a cap on their elements in all: a
    model that would not fit beside the masks kept already is not fixed (ordinary triples then).

    Returns:
        This fixing's identifier (a prefetch key: the same for each call after :func:`release_weights`),
        or None where nothing was fixed (no dealer, no weight matrix, or no room left at the dealer).
    """
    crypten = loaded_crypten()
    provider = crypten.mpc.get_default_provider()
    weights = {name: t for name, t in tensors.items()
               if name.endswith("weight") and isinstance(t, crypten.mpc.MPCTensor) and t.dim() == 2}
    if not weights or not hasattr(provider, "fixed_mask_room"):
        return None
    kept, room = provider.fixed_mask_room()
    size = sum(t.nelement() for t in weights.values())
    if size > room:
        log.info("served weights take ordinary triples: their %d elements exceed the %d the dealer would still keep "
                 "as fixed masks", size, room)
        return None
    # The first serial none of whose bindings the dealer keeps (another server's may be live): the
    # same one call after call once each call releases its masks.
    for count in itertools.count():
        serial = binding(label, count)
        bindings = {name: binding(serial, name, *tensor.size()) for name, tensor in weights.items()}
        if kept.isdisjoint(bindings.values()):
            break
    for name, tensor in weights.items():
        fix(tensor, bindings[name], quiet=True, owner=owner, plain=None if plain is None else plain[name])
    log.info("fixed the masks of %d weight matrices (%d elements): each later batch opens only its activations",
             len(weights), size)
    return serial


def release_weights(tensors: dict[str, Any]) -> None:
    """Has the dealer forget the masks :func:`fix_weights` fixed for ``tensors`` (their products
    then take ordinary triples), so that the next call fixes under the same bindings: its
    prefetch recordings match this call's, and the dealer's room for masks is back."""
    provider = loaded_crypten().mpc.get_default_provider()
    for tensor in tensors.values():
        tag = vars(tensor).pop(_TAG, None)  # shared tensors and public ones (torch tensors) alike
        if tag is not None:
            tag.mask.released[0] = True
            provider.release_fixed_mask(tag.mask.binding, device=tensor.device)


def transposed(x: Any, result: Any) -> Any:
    """Tags ``result``, ``x.t()`` of a fixed tensor ``x`` (all rows), as its transpose; returns it."""
    tag = _tag(x)
    if tag is not None and tag.rows is None:
        vars(result)[_TAG] = _Fixed.of(result, tag.mask, None, not tag.flipped)
    return result


def _open_padded(share: Any, pad: Any, to: int | None = None) -> Any:
    """Opens ``x - pad`` to every party (or to the rank ``to`` alone: None elsewhere), ``share``
    being this party's share of x: a Beaver opening, one-time padded by the uniform ``pad`` (the
    one opening of this module)."""
    return (type(pad).from_shares(share, precision=0) - pad).reveal(dst=to)


def rows(x: Any, index: torch.Tensor) -> Any:
    """``x[index]``, still known by its fixed mask when ``x`` is fixed (``index``: public row numbers)."""
    picked = x[index]
    tag = _tag(x)
    if tag is not None and tag.rows is None and not tag.flipped:
        whole = torch.equal(index, torch.arange(x.size(0), device=index.device))
        vars(picked)[_TAG] = _Fixed.of(picked, tag.mask, None if whole else index)
    return picked


def product(x: Any, y: Any, *, transposed: bool) -> Any | None:
    """``x·y`` (``transposed``: ``xᵀ·y``) by a fixed-mask triple, or None: neither ``x`` nor (for
    ``x·y``) ``y`` is fixed, the other is not an encrypted tensor of the same fixed-point scale,
    or an ordinary triple moves fewer elements; then the caller takes the ordinary product.
    """
    crypten = loaded_crypten()
    tag = _tag(x)
    if tag is None and not transposed and isinstance(y, crypten.mpc.MPCTensor) and _same_scale(x, y):
        right = _tag(y)
        return None if right is None or right.rows is not None else _right_product(x, right)
    if tag is None or tag.flipped or not isinstance(y, crypten.mpc.MPCTensor) or y.dim() != 2:
        return None
    if not _same_scale(x, y):
        return None
    mask, picked = tag.mask, tag.rows
    n, d = mask.opened.shape
    k = y.size(1)
    if picked is not None and n * k > picked.numel() * (d + k):
        return None
    second = y._tensor.share
    if transposed and picked is not None:  # G's rows in their places among n
        second = to_device(torch.zeros(n, k, dtype=torch.long), y.device).index_add_(0, picked, second)
    b, c = crypten.mpc.get_default_provider().generate_fixed_triple(
        mask.binding, (n, d), tuple(second.size()), transposed, device=x.device
    )
    delta = _open_padded(second, b)
    e, summed = mask.opened, mask.share
    if transposed:
        e, summed = e.t(), summed.t()
    elif picked is not None:
        e, summed, c = e[picked], summed[picked], c[picked]
    # z = c + e·b + (a + e)·delta: the Beaver sum c + e·b + a·delta + e·delta, with x - a = e opened
    # once and e·delta taken by party 0 within its share of a + e.
    c.share += torch.matmul(e, b.share)
    c.share += torch.matmul(summed, delta)
    return _scaled(x, c)


def _with_public(share: Any, public: Any) -> Any:
    """``share + public`` at party 0 and ``share`` elsewhere: a sharing of A + E from one of A."""
    return share + public if loaded_crypten().communicator.get().get_rank() == 0 else share


def _same_scale(x: Any, y: Any) -> bool:
    return x.encoder.scale > 1 and y.encoder.scale == x.encoder.scale


def _scaled(x: Any, c: Any) -> Any:
    """``c``, a ring product at scale s^2, as an MPCTensor at ``x``'s scale s."""
    c.encoder = x.encoder
    result = x.shallow_copy()
    result._tensor = c.div_(x.encoder.scale)
    return result


def _right_product(x: Any, tag: _Fixed) -> Any | None:
    """``x·M`` for a fixed matrix M (W, or Wᵀ where ``tag.flipped``) and any x of shape (..., r).

    The dealer multiplies its kept A on the left only: B·A comes as (Aᵀ·Bᵀ)ᵀ and B·Aᵀ as
    (A·Bᵀ)ᵀ, for a fresh Bᵀ of r x n. The rows of x (its leading dimensions flattened) are
    opened padded by B, as in any Beaver product; M's E = W - A was opened once, by :func:`fix`.
    """
    mask = tag.mask
    e, summed = mask.opened, mask.share
    if tag.flipped:
        e, summed = e.t(), summed.t()
    r, k = e.shape
    if x.dim() < 2 or x.size(-1) != r:
        return None  # crypten's own product names the mismatch
    lead = tuple(x.size())[:-1]
    first = x._tensor.share.reshape(-1, r)
    if mask.owner is not None:
        return _one_sided_product(x, mask, tag.flipped, first, lead, e)
    b, c = loaded_crypten().mpc.get_default_provider().generate_fixed_triple(
        mask.binding, tuple(mask.opened.shape), (r, first.size(0)), not tag.flipped, device=x.device
    )
    b = type(b).from_shares(b.share.t(), precision=0)
    delta = _open_padded(first, b)
    # z = c + b·e + delta·(a + e): the Beaver sum, with M - A = e opened once and delta·e taken by
    # party 0 within its share of a + e.
    c = type(c).from_shares(c.share.t() + torch.matmul(b.share, e) + torch.matmul(delta, summed), precision=0)
    c.share = c.share.reshape(*lead, k)
    return _scaled(x, c)


def _one_sided_product(x: Any, mask: FixedMask, flipped: bool, first: Any, lead: tuple[int, ...], e: Any) -> Any:
    """``x·M`` for a fixed M that one of two parties, ``mask.owner``, holds in plaintext: one matrix
    product a party where the Beaver sum takes two, and one message, toward the owner.

    The other party draws B alone (the owner's share of it is 0) and the dealer deals shares of B·A
    (a one-sided ``fixed_triple``). x - B is opened to the owner alone: B is uniform and unknown to
    it, a one-time pad. Then x·M = (x - B)·M + B·A + B·E, since M = A + E: the owner takes the first
    term, the other party B·E (E = M - A was opened once, by :func:`fix`), and each adds its share of
    B·A. The other party receives nothing; the dealer sees neither x nor E, as in any fixed product.
    """
    owner, (r, k) = mask.owner, e.shape  # e: M's E, transposed with M
    b, c = loaded_crypten().mpc.get_default_provider().generate_fixed_triple(
        mask.binding, tuple(mask.opened.shape), (r, first.size(0)), not flipped, drawer=1 - owner, device=x.device
    )
    b = type(b).from_shares(b.share.t(), precision=0)
    opened = _open_padded(first, b, to=owner)
    term = torch.matmul(opened, mask.plain.t() if flipped else mask.plain) if opened is not None else torch.matmul(b.share, e)
    c = type(c).from_shares(c.share.t() + term, precision=0)
    c.share = c.share.reshape(*lead, k)
    return _scaled(x, c)
