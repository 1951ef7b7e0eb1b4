"""The dealer's request table: every kind of request party 0 may send, checked, digested and sized
the same way by the dealer and the parties, and what the dealer computes for each (see the
package's docstring for the protocol, :mod:`.server` for the loop that serves it).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpcfl.dp.noise import MAX_VARIANCE, skellam
from mpcfl.errors import MpcflError
from mpcfl.mpc.prng import SecureGenerator, numpy_generator
from mpcfl.mpc.truncation import MAX_DIVISOR, unsigned_floordiv
from mpcfl.mpc.wire import to_words

log = logging.getLogger(__name__)


#: Products a Beaver triple may be requested for (CrypTen's ``op`` names), and the
#: keyword arguments each may carry.
PRODUCTS: dict[str, frozenset[str]] = {
    "mul": frozenset(),
    "matmul": frozenset(),
    "conv1d": frozenset({"stride", "padding", "dilation", "groups"}),
    "conv2d": frozenset({"stride", "padding", "dilation", "groups"}),
    "conv_transpose1d": frozenset({"stride", "padding", "output_padding", "dilation", "groups"}),
    "conv_transpose2d": frozenset({"stride", "padding", "output_padding", "dilation", "groups"}),
}
#: Refuse a request whose operands or result exceed this many elements (2 GiB of
#: int64): a party 0 asking for absurd sizes would exhaust the dealer's memory.
MAX_ELEMENTS = 1 << 28
#: Options of a convolution (stride, padding, ...) above this are refused.
MAX_OPTION = 1 << 12
#: A request message larger than this is refused before it is read (a batch lists its items).
MAX_MESSAGE_BYTES = 1 << 20
#: A prefetched batch holds at most this many requests...
MAX_BATCH_ITEMS = 1 << 12
#: ...whose operands and answers hold at most this many elements in all (as one request).
MAX_BATCH_ELEMENTS = MAX_ELEMENTS
#: CrypTen's TrustedThirdParty method, by the request party 0 sends the dealer for it.
PARTY_METHODS = {
    "additive": "generate_additive_triple",
    "square": "square",
    "binary": "generate_binary_triple",
    "wraps": "wrap_rng",
    "B2A": "B2A_rng",
    "fixed_mask": "generate_fixed_mask",
    "fixed_triple": "generate_fixed_triple",
    "fixed_release": "release_fixed_mask",
    "noise": "generate_noise",
    "truncation": "generate_truncation",
}
DIGEST_WORDS = 4  # SHA-256 as int64 words
#: The fixed masks the dealer keeps at once hold at most this many elements in all.
MAX_MASK_ELEMENTS = MAX_ELEMENTS
#: What party 0 sends the dealer, in place of crypten's "terminate", when its session failed.
ABORT = "abort"
#: The longest silence party 0 may announce (``quiet``), beyond the job's timeout.
MAX_QUIET_S = 24 * 3600
#: How long party 0, given no answer, waits to hear whose digest the dealer gave up waiting for.
NOTICE_S = 1.0
#: That party's name as the dealer tells it: zero-padded to this many bytes.
NAME_BYTES = 256


def _plain(value: Any) -> Any:
    """Sizes and options as plain tuples and ints, so every party digests the same text."""
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_plain(v) for v in value)
    return value


def _canonical(function: str, device: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    """A request as every party writes it (the device by type: parties may use different GPUs)."""
    kind = torch.device(device or "cpu").type
    return (function, kind, _plain(tuple(args)), sorted((k, _plain(v)) for k, v in kwargs.items()))


def _is_binding(value: Any) -> bool:
    """A data binding: a SHA-256 in hex (:func:`mpcfl.mpc.fixed_mask.binding`)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def request_digest(function: str, device: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """SHA-256 of a request in canonical form."""
    text = repr(_canonical(function, device, args, kwargs))
    return to_words(hashlib.sha256(text.encode()).digest())


def batch_digest(items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """SHA-256 over the digests of a batch's items, in order."""
    h = hashlib.sha256(b"mpcfl batch")
    for item in items:
        h.update(request_digest(item["function"], item["device"], item["args"], item["kwargs"]).numpy().tobytes())
    return to_words(h.digest())


def _broadcast(*shapes: Sequence[int]) -> tuple[int, ...]:
    """torch's broadcasting rule (``torch.broadcast_shapes``'s first call costs seconds of imports)."""
    result: list[int] = []
    for dims in itertools.zip_longest(*(reversed(tuple(s)) for s in shapes), fillvalue=1):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"sizes {[tuple(s) for s in shapes]} do not broadcast")
        result.append(sizes.pop() if sizes else 1)
    return tuple(reversed(result))


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """``torch.matmul``'s result shape: 1-d operands promoted and dropped again, batches broadcast."""
    if not a or not b:
        raise ValueError("matmul of a 0-d operand")
    left, right = ((1,) + a if len(a) == 1 else a), (b + (1,) if len(b) == 1 else b)
    if left[-1] != right[-2]:
        raise ValueError(f"matmul of sizes {a} and {b}: inner dimensions differ")
    batch = _broadcast(left[:-2], right[:-2])
    return batch + (left[-2],) * (len(a) > 1) + (right[-1],) * (len(b) > 1)


def _conv_shape(op: str, x: tuple[int, ...], w: tuple[int, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    """A convolution's result shape by torch's formulas, refusing what its product refuses.

    No tensor is made: party 0's message alone sets these sizes before the others' digests
    are checked (a weight of 2^28 elements would be a 1 GiB allocation in the dealer).
    """
    dims = 1 if op.endswith("1d") else 2
    if len(w) != dims + 2 or len(x) not in (dims + 1, dims + 2):
        raise ValueError(f"{op} of sizes {x} and {w}")
    batch, channels, spatial = (x[:1], x[1], x[2:]) if len(x) == dims + 2 else ((), x[0], x[1:])

    def option(key: str, default: int) -> tuple[int, ...]:
        value = kwargs.get(key, default)
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        values = values * dims if len(values) == 1 else values
        if len(values) != dims:
            raise ValueError(f"{op} with {key}={value!r}")
        return values

    stride, padding, dilation, groups = option("stride", 1), option("padding", 0), option("dilation", 1), kwargs.get("groups", 1)
    kernel = w[2:]
    if op.startswith("conv_transpose"):
        extra = option("output_padding", 0)
        if any(e >= max(s, d) for e, s, d in zip(extra, stride, dilation)):
            raise ValueError(f"{op}: output_padding must be smaller than stride or dilation")
        if channels != w[0] or channels % groups:
            raise ValueError(f"{op}: {channels} input channels for a weight of size {w} in {groups} groups")
        out = w[1] * groups
        sizes = [(i - 1) * s - 2 * p + d * (k - 1) + e + 1 for i, s, p, d, k, e in zip(spatial, stride, padding, dilation, kernel, extra)]
    else:
        if channels != w[1] * groups or w[0] % groups:
            raise ValueError(f"{op}: {channels} input channels for a weight of size {w} in {groups} groups")
        out = w[0]
        sizes = [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, s, p, d, k in zip(spatial, stride, padding, dilation, kernel)]
    if any(size < 1 for size in sizes):
        raise ValueError(f"{op}: the kernel does not fit the (padded) input of size {x}")
    return (*batch, out, *sizes)


def answer_size(function: str, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Size:
    """The shape of the dealer's answer to a request, from shape rules alone.

    Not on the meta device: its first operation imports torch._dynamo, seconds of CPU in the
    dealer and in party 0 on the first request of a job. Raises ValueError for operands the
    product refuses.
    """
    if function in ("fixed_mask", "fixed_release"):
        return torch.Size([1])
    if function == "truncation":  # party 0's shares of floor(r / d) and of r's top bit
        return torch.Size([2, *args[0]])
    if function == "fixed_triple":
        mask, other = (tuple(size) for size in args[1:3])
        if args[3] and len(mask) > 2:
            raise ValueError(f"transposed mask of size {mask}")
        return torch.Size(_matmul_shape(mask[::-1] if args[3] else mask, other))
    if function in ("additive", "binary"):
        a, b = (tuple(size) for size in args[:2])
        if function == "binary" or args[2] == "mul":
            return torch.Size(_broadcast(a, b))
        if args[2] == "matmul":
            return torch.Size(_matmul_shape(a, b))
        return torch.Size(_conv_shape(args[2], a, b, kwargs))
    return torch.Size(args[0])


def _operands(function: str, args: Sequence[Any]) -> Sequence[Any]:
    """The sizes of what the parties draw for a request, besides their share of the answer."""
    if function in ("additive", "binary"):
        return args[:2]
    if function == "fixed_mask":  # (binding, size of A)
        return args[1:2]
    if function == "fixed_triple":  # (binding, size of A, size of B, transposed[, drawer]): A is drawn already
        return args[2:3]
    if function in ("noise", "fixed_release"):  # (size, variance): the answer alone; (binding,): nothing drawn
        return ()
    if function == "truncation":  # (size, divisor): r besides the answer
        return args[:1]
    return args[:1]


def _elements(function: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """Elements a request draws and answers (its operands and its answer)."""
    sizes = _operands(function, args)
    return sum(int(torch.Size(size).numel()) for size in sizes) + int(answer_size(function, args, kwargs).numel())


class DealerRequestRefused(MpcflError):
    """Party 0 asked the dealer for something outside its request table."""


class Requests:
    """What the dealer computes for each kind of request, and how it checks one before computing.

    Args:
        generators: the stream shared with each party, by rank.
    """

    def __init__(self, generators: Sequence[SecureGenerator]) -> None:
        self.generators = list(generators)
        self.requests: dict[str, Callable[..., torch.Tensor]] = {
            "additive": self.additive,
            "square": self.square,
            "binary": self.binary,
            "wraps": self.wraps,
            "B2A": self.b2a,
            "quiet": self.quiet,
            "batch": self.batch,
            "fixed_mask": self.fixed_mask,
            "fixed_triple": self.fixed_triple,
            "fixed_release": self.fixed_release,
            "noise": self.noise,
            "truncation": self.truncation,
        }
        self._own = numpy_generator()  # the dealer's alone: DP noise no party knows
        self.masks: dict[str, torch.Tensor] = {}  # fixed masks by data binding (see the package's docstring)
        self._patience_s = 0  # how much longer than the timeout the next request may take

    def _check(self, message: Any, *, within: str | None = None) -> tuple[Callable[..., torch.Tensor], tuple, dict]:
        """The handler and arguments of a request, or a refusal naming what is wrong.

        ``within``: the request is an item of a batch (so neither a batch nor ``quiet``).
        """
        if not isinstance(message, dict) or set(message) != {"function", "device", "args", "kwargs"}:
            raise self._refuse(f"a malformed request ({type(message).__name__}){within or ''}")
        name, device, args, kwargs = message["function"], message["device"], message["args"], message["kwargs"]
        if not isinstance(name, str) or name not in self.requests:
            raise self._refuse(f"unknown request {name!r} (known: {', '.join(self.requests)})")
        if within is not None and name in ("batch", "quiet"):
            raise self._refuse(f"request {name!r}{within} (a batch holds triples only)")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise self._refuse(f"request {name!r} with malformed arguments")
        self._check_device(name, device)
        if name == "batch":
            return self._check_batch(device, args, kwargs)
        if name in ("fixed_mask", "fixed_triple", "fixed_release"):
            return self._check_fixed(name, args, kwargs, within)
        if name == "noise":
            if len(args) != 2 or kwargs or type(args[1]) is not float or not 0 < args[1] <= MAX_VARIANCE:
                raise self._refuse(f"request 'noise' with arguments {args!r} (a size and a variance in (0, 2^56])")
            self._size(name, args[0])
            return self.requests[name], args, kwargs
        if name == "truncation":
            if len(args) != 2 or kwargs or type(args[1]) is not int or not 2 <= args[1] <= MAX_DIVISOR:
                raise self._refuse(f"request 'truncation' with arguments {args!r} (a size and an int divisor in [2, 2^62])")
            self._size(name, args[0])
            self._size(name, answer_size(name, args, kwargs))
            return self.requests[name], args, kwargs
        if name == "quiet":
            if len(args) != 1 or type(args[0]) is not int or not 0 < args[0] <= MAX_QUIET_S or kwargs:
                raise self._refuse(f"request 'quiet' with arguments {args!r} (one whole number of seconds up to {MAX_QUIET_S})")
            return self.requests[name], args, kwargs
        if name == "additive":
            if len(args) < 3 or not isinstance(args[2], str) or args[2] not in PRODUCTS:
                raise self._refuse(f"request 'additive' for an unknown product {args[2:3]!r}")
            unknown = set(kwargs) - PRODUCTS[args[2]]
            if unknown or len(args) > 3:
                raise self._refuse(f"request 'additive' ({args[2]}) with unexpected arguments {sorted(unknown) or args[3:]}")
            if not all(self._option(k, v) for k, v in kwargs.items()):
                raise self._refuse(f"request 'additive' ({args[2]}) with options beyond 0..{MAX_OPTION}: {kwargs}")
            sizes = args[:2]
        else:
            if len(args) != (2 if name == "binary" else 1) or kwargs:
                raise self._refuse(f"request {name!r} with unexpected arguments")
            sizes = args
        for size in sizes:
            self._size(name, size)
        if name in ("additive", "binary"):
            self._size(name, self._result_size(name, args, kwargs))
        return self.requests[name], args, kwargs

    def _check_batch(self, device: Any, args: tuple, kwargs: dict) -> tuple[Callable[..., torch.Tensor], tuple, dict]:
        """A batch: one tuple of requests, each checked as if sent alone, and a cap on their total size."""
        if device is not None or kwargs or len(args) != 1 or not isinstance(args[0], tuple):
            raise self._refuse("request 'batch' with malformed arguments (one tuple of requests)")
        items = args[0]
        if not 0 < len(items) <= MAX_BATCH_ITEMS:
            raise self._refuse(f"request 'batch' of {len(items)} requests (limit {MAX_BATCH_ITEMS})")
        checked, total = [], 0
        for index, item in enumerate(items):
            function, item_args, item_kwargs = self._check(item, within=f" (item {index} of a batch)")
            total += _elements(item["function"], item_args, item_kwargs)
            if total > MAX_BATCH_ELEMENTS:
                raise self._refuse(f"request 'batch' of more than {MAX_BATCH_ELEMENTS} elements (at item {index})")
            checked.append((function, item_args, item_kwargs, int(answer_size(item["function"], item_args, item_kwargs).numel())))
        return self.batch, (tuple(checked), batch_digest(items)), {}

    def _check_fixed(self, name: str, args: tuple, kwargs: dict, within: str | None) -> tuple[Callable[..., torch.Tensor], tuple, dict]:
        """A fixed mask's registration or release, or a triple whose first factor is a registered mask.

        Each mask belongs to one data tensor (its binding) and is registered once until released;
        neither a registration nor a release goes in a batch, whose items are all checked before
        any is served.
        """
        if name != "fixed_triple" and within is not None:
            raise self._refuse(f"request {name!r}{within} (a mask is registered and released alone)")
        arity = {"fixed_mask": (2,), "fixed_triple": (4, 5), "fixed_release": (1,)}[name]
        if kwargs or len(args) not in arity or not _is_binding(args[0]):
            raise self._refuse(f"request {name!r} with malformed arguments")
        if name == "fixed_release":
            if args[0] not in self.masks:
                raise self._refuse(f"request 'fixed_release' for data {args[0][:16]} that has no mask")
            return self.requests[name], args, kwargs
        binding, size = args[0], args[1]
        self._size(name, size)
        if len(size) != 2:
            raise self._refuse(f"request {name!r} for a mask of size {size!r} (a mask is a matrix)")
        mask = self.masks.get(binding)
        if name == "fixed_mask":
            if mask is not None:
                raise self._refuse(f"request 'fixed_mask' for data {binding[:16]} that has a mask already (one mask per data)")
            kept = sum(int(m.numel()) for m in self.masks.values())
            if kept + int(torch.Size(size).numel()) > MAX_MASK_ELEMENTS:
                raise self._refuse(f"request 'fixed_mask' beyond {MAX_MASK_ELEMENTS} elements of masks kept")
            return self.requests[name], args, kwargs
        if mask is None:
            raise self._refuse(f"request 'fixed_triple' for data {binding[:16]} that has no mask")
        if tuple(mask.shape) != tuple(size):
            raise self._refuse(f"request 'fixed_triple' for data {binding[:16]} of size {tuple(size)}, its mask is {tuple(mask.shape)}")
        if type(args[3]) is not bool or (len(args) == 5 and (type(args[4]) is not int or not 0 <= args[4] < len(self.generators))):
            raise self._refuse("request 'fixed_triple' with malformed arguments")
        self._size(name, args[2])
        if len(args[2]) != 2:
            raise self._refuse(f"request 'fixed_triple' with a second factor of size {args[2]!r} (a matrix)")
        self._size(name, self._result_size(name, args, kwargs))
        return self.requests[name], args, kwargs

    @staticmethod
    def _option(key: str, value: Any) -> bool:
        # Conv options come as ints, tuples, or lists (crypten.nn.from_pytorch's ONNX converter), one
        # or two entries (conv1d/2d). Checked here, not left to the product: a zero dilation or a list
        # of the wrong length would raise in the real product, after every party agreed to it.
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        low = 1 if key in ("stride", "dilation", "groups") else 0
        return 0 < len(values) <= 2 and all(type(v) is int and low <= v <= MAX_OPTION for v in values)

    def _size(self, name: str, size: Any) -> None:
        if not isinstance(size, (tuple, torch.Size)) or not all(type(d) is int for d in size):
            raise self._refuse(f"request {name!r} with a malformed size {size!r}")
        # An empty dimension makes a product of nothing, whose answer is a sum of the
        # other parties' stream values alone: refused, whatever the digests say.
        if not all(d > 0 for d in size):
            raise self._refuse(f"request {name!r} with a malformed size {size!r}")
        if int(torch.Size(size).numel()) > MAX_ELEMENTS:
            raise self._refuse(f"request {name!r} for {torch.Size(size).numel()} elements (limit {MAX_ELEMENTS})")

    def _result_size(self, name: str, args: tuple, kwargs: dict[str, Any]) -> torch.Size:
        """The shape of the answer (:func:`answer_size`), or the refusal of a product that cannot be computed."""
        try:
            return answer_size(name, args, kwargs)
        except (RuntimeError, ValueError, TypeError) as err:
            raise self._refuse(f"request {name!r} ({args[2] if name == 'additive' else ''}) that cannot be computed: {err}") from None

    def _check_device(self, name: str, device: Any) -> None:
        """Party 0's device for the answer: None (the host), ``cpu`` or ``cuda[:N]``; the dealer itself needs no GPU."""
        if device is None:
            return
        try:
            kind = torch.device(device).type if isinstance(device, str) else None
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise self._refuse(f"request {name!r} for device {device!r}")

    @staticmethod
    def _refuse(what: str) -> DealerRequestRefused:
        log.error("dealer: refused %s from party 0", what)
        return DealerRequestRefused(f"dealer: party 0 sent {what}; refused, and the dealer stops")

    # The tables below mirror the party side of CrypTen's TrustedThirdParty: party i
    # draws its shares from the stream it shares with the dealer, in the same order.

    def quiet(self, seconds: int) -> torch.Tensor:
        """The parties announce a long local step: wait up to ``seconds`` more for the next request."""
        log.info("dealer: the parties announce up to %d s without requests", seconds)
        self._patience_s = seconds
        return torch.zeros(1, dtype=torch.long)

    def batch(self, items: Sequence[tuple[Callable[..., torch.Tensor], tuple, dict, int]], digest: torch.Tensor) -> torch.Tensor:
        """Party 0's shares of every item (each with its answer's element count), in order (so each
        stream is drawn in the parties' order), flat, then the batch's ``digest``, which party 0 checks
        (a short message would leave the end of its buffer unfilled). Each answer goes into its place
        as it is computed: one copy of the batch at a time.

        The next request may come a whole step later, where single requests came every
        multiplication: the dealer waits up to the timeout per item served, as it would have.
        """
        from mpcfl.mpc.compat import process_group_timeout

        self._patience_s = int(process_group_timeout().total_seconds() * (len(items) - 1))
        flat = torch.empty(sum(count for *_, count in items) + len(digest), dtype=torch.long)
        offset = 0
        for function, args, kwargs, count in items:
            flat[offset : offset + count] = function(*args, **kwargs).flatten()
            offset += count
        flat[offset:] = digest
        return flat

    def _sum(self, size: Sequence[int], parties: Sequence[SecureGenerator]) -> torch.Tensor:
        total = torch.zeros(tuple(size), dtype=torch.long)
        for generator in parties:
            total += generator.ring(size)
        return total

    def fixed_mask(self, binding: str, size: Sequence[int]) -> torch.Tensor:
        """Draws and keeps the mask A of one data tensor, as the parties draw their shares of it; answers nothing of it."""
        self.masks[binding] = self._sum(size, self.generators)
        log.info("dealer: keeps a fixed mask of %s for data %s until the parties release it (at the latest, the session's end)",
                 "x".join(map(str, size)), binding[:16])
        return torch.zeros(1, dtype=torch.long)

    def fixed_release(self, binding: str) -> torch.Tensor:
        """Forgets the mask of one data tensor (the parties are done with it); answers a placeholder."""
        del self.masks[binding]
        log.debug("dealer: released the fixed mask for data %s", binding[:16])
        return torch.zeros(1, dtype=torch.long)

    def fixed_triple(self, binding: str, size: Sequence[int], size1: Sequence[int], transposed: bool,
                     drawer: int | None = None) -> torch.Tensor:
        """Party 0's share of c = A·b (``transposed``: Aᵀ·b) for the data's kept mask A and a fresh random b,
        which every party draws a share of, or the party ``drawer`` alone (a one-sided triple)."""
        mask = self.masks[binding]
        b = self._sum(size1, self.generators if drawer is None else self.generators[drawer : drawer + 1])
        c = torch.matmul(mask.t() if transposed else mask, b)
        return c - self._sum(c.size(), self.generators[1:])

    def _xor(self, size: Sequence[int], parties: Sequence[SecureGenerator], bits: int = 64) -> torch.Tensor:
        total = torch.zeros(tuple(size), dtype=torch.long)
        for generator in parties:
            total ^= generator.kbit(size, bits)
        return total

    def additive(self, size0: Sequence[int], size1: Sequence[int], op: str, **options: Any) -> torch.Tensor:
        """Party 0's share of c = op(a, b) for random a, b."""
        a, b = self._sum(size0, self.generators), self._sum(size1, self.generators)
        c = getattr(torch, op)(a, b, **options)  # op is one of PRODUCTS, checked in _check
        return c - self._sum(c.size(), self.generators[1:])

    def square(self, size: Sequence[int]) -> torch.Tensor:
        """Party 0's share of r^2 for random r."""
        r = self._sum(size, self.generators)
        return r * r - self._sum(size, self.generators[1:])

    def binary(self, size0: Sequence[int], size1: Sequence[int]) -> torch.Tensor:
        """Party 0's XOR share of a & b for random a, b."""
        a, b = self._xor(size0, self.generators), self._xor(size1, self.generators)
        c = a & b
        return c ^ self._xor(c.size(), self.generators[1:])

    def wraps(self, size: Sequence[int]) -> torch.Tensor:
        """Party 0's share of the wrap count of a random sharing r."""
        from crypten.common.util import count_wraps  # crypten is loaded: this process runs its session

        shares = [generator.ring(size) for generator in self.generators]
        return count_wraps(shares) - self._sum(size, self.generators[1:])

    def noise(self, size: Sequence[int], variance: float) -> torch.Tensor:
        """Shares of integer DP noise (Skellam of ``variance`` ring units squared) drawn from the dealer's
        own generator: every party's share is uniform, so no coalition of parties knows the noise."""
        drawn = torch.from_numpy(skellam(tuple(size), variance, self._own))
        return drawn - self._sum(size, self.generators[1:])

    def truncation(self, size: Sequence[int], divisor: int) -> torch.Tensor:
        """Party 0's shares of floor(r / divisor) and of r's top bit (r read unsigned) for a random
        sharing r (:mod:`mpcfl.mpc.truncation`): randomness only, nothing of the value divided."""
        r = self._sum(size, self.generators)
        quotient, top = unsigned_floordiv(r, divisor), (r < 0).long()
        return torch.stack([quotient - self._sum(size, self.generators[1:]), top - self._sum(size, self.generators[1:])])

    def b2a(self, size: Sequence[int]) -> torch.Tensor:
        """Party 0's arithmetic share of a random bit whose XOR shares the parties draw."""
        bit = self._xor(size, self.generators, bits=1)
        return bit - self._sum(size, self.generators[1:])

