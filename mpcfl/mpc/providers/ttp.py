"""The trusted-third-party triple provider: the dealer process and its key hand-out.

The dealer shares one 128-bit AES-CTR key with each party (sent once, at start-up,
over the authenticated process group). Party i and the dealer then draw the same
stream: party i's share of every triple comes from it, so the dealer knows every
share without sending any, and only party 0's share of each product is computed
by the dealer and sent to party 0. This is the protocol of CrypTen 0.4.1's TTP
(``crypten.mpc.provider.ttp_provider``), whose party side is kept as is; four things
differ here:

- every draw comes from :class:`~mpcfl.mpc.prng.SecureGenerator`, not from a
  ``torch.Generator`` seeded with 32 effective bits;
- the dealer answers only the requests it knows. CrypTen's server runs
  ``getattr(self, name)`` on whatever name party 0 sends, and ``getattr(torch, op)``
  for the product; here both come from fixed tables, the sizes and options are
  checked, and anything else is refused, logged and ends the dealer;
- the dealer computes on the host and sends host memory, whatever device a request
  names: gloo's broadcast copies the answer into party 0's buffer on that device (a
  CUDA one for a ``cuda`` session), so the dealer needs no GPU and moves nothing to
  one. The device is still checked and is part of the request's digest, so every
  party must have asked for its triple on the same kind of device;
- the dealer answers only requests every party makes. Only party 0 talks to
  CrypTen's dealer, so a party 0 that deviates could ask for triples nobody else
  uses and read the other parties' next stream values off the answers (an empty
  matmul returns minus their sum exactly), then subtract them from the next
  opening. Here every other party sends the dealer a digest of each request it
  makes (:func:`announcing`, a send nobody waits on), and the dealer serves a
  request only when all digests match party 0's. A party owes its digest the moment
  it makes the request, whatever the others do, so a digest that does not come names
  the party that stalled: the dealer gives up on it, and tells party 0, waiting for
  the answer, whose it was (:func:`request`), so both name it.

Prefetching (:func:`prefetched`, the job's ``runtime.prefetch``): the dealer's requests
depend only on public shapes, so every party records the requests of a unit of work
(a training step) and, for each later unit with the same key, party 0 asks for the
whole recorded list at once (a ``batch`` request) while the others announce one
digest of that list. The dealer checks every item as it would a single request, caps
the batch's size, serves it only if the digests match, and computes the items in
order: each party's stream is drawn in the order the party draws it later. Party 0
then takes each answer from its queue. A request that differs from the next recorded
item (every honest party sees the same difference) first drains the rest of the
queue on every party, drawing each item's stream values as if it had been used, so
the streams stay in step with the dealer's; then it goes to the dealer as usual.
Every triple is still covered by a digest of every party: the dealer's trust model
is unchanged.

Fixed masks (:mod:`mpcfl.mpc.fixed_mask`, mask reuse on fixed data): a ``fixed_mask``
request, bound to a public identifier of one data tensor, makes every party draw its
share of a mask A from its stream, as for a triple's first factor; the dealer draws the
same values, keeps A under that identifier and answers nothing of it. Each later
``fixed_triple`` for that identifier is a triple (A, B, A·B) or (Aᵀ, B, Aᵀ·B) with a
fresh B: the parties draw B (and parties 1..n-1 their share of the product) and party 0
gets its share of the product, as for ``additive``. The dealer registers an identifier
once (a second mask for the same data is refused, and a registration never goes in a
batch), and serves triples only for a registered identifier and the size it was
registered with. It sees neither the data nor any share of it, and never the opened
difference X - A: it knows A, so that would be X.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import hashlib
import itertools
import inspect
import logging
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from mpcfl.errors import MpcflError, PeerFailure, first_line
from mpcfl.mpc.providers import DEALER
from mpcfl.mpc.wire import from_words, to_words
from mpcfl.mpc.prng import KEY_WORDS, SecureGenerator, key_to_words, new_key, words_to_key

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
    if function == "fixed_mask":
        return torch.Size([1])
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
    if function == "fixed_triple":  # (binding, size of A, size of B, transposed): A is drawn already
        return args[2:3]
    return args[:1]


def _elements(function: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """Elements a request draws and answers (its operands and its answer)."""
    sizes = _operands(function, args)
    return sum(int(torch.Size(size).numel()) for size in sizes) + int(answer_size(function, args, kwargs).numel())


class DealerRequestRefused(MpcflError):
    """Party 0 asked the dealer for something outside its request table."""


class Dealer:
    """Serves correlated randomness to the parties until party 0 says ``terminate``.

    Args:
        communicator: CrypTen's communicator, initialised as the dealer (rank n).
        generators: the stream shared with each party, by rank.
        parties: the parties' names, by rank.
    """

    def __init__(self, communicator: Any, generators: Sequence[SecureGenerator], parties: Sequence[str]) -> None:
        self.comm = communicator
        self.generators = list(generators)
        self.parties = list(parties)
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
        }
        self.masks: dict[str, torch.Tensor] = {}  # fixed masks by data binding (see the module's docstring)
        self._patience_s = 0  # how much longer than the timeout the next request may take

    @classmethod
    def start(cls, communicator: Any, parties: Sequence[str]) -> Dealer:
        """Sends each party (``parties``: names by rank) its own fresh key (the party side is :func:`receive_dealer_key`)."""
        import torch.distributed as dist

        keys = [new_key() for _ in range(communicator.get_world_size())]
        words = [key_to_words(key) for key in keys]
        pending = [dist.isend(tensor=w, dst=rank, group=communicator.ttp_group) for rank, w in enumerate(words)]
        for request in pending:
            request.wait()
        dist.barrier(group=communicator.ttp_group)
        return cls(communicator, [SecureGenerator(key) for key in keys], parties)

    def serve(self) -> None:
        """Answers requests until ``terminate``.

        Raises:
            DealerRequestRefused: a request outside the table (the dealer stops).
            PeerFailure: a party's digest did not come (naming that party).
            RuntimeError: the link to party 0 failed (gloo's error, not swallowed).
        """
        ttp_rank = self.comm.get_ttp_rank()
        served = 0
        while True:
            message = self._receive()
            if message == "terminate":
                log.info("dealer: party 0 ended the session after %d requests", served)
                return
            if message == ABORT:
                raise PeerFailure(f"dealer: party 0 stopped the session after a failure ({served} requests served); see the parties' logs")
            function, args, kwargs = self._check(message)
            self._agree(message)
            result = function(*args, **kwargs)  # on the host: see the module's docstring
            self.comm.send_obj(result.size(), 0, self.comm.ttp_group)
            self.comm.broadcast(result, ttp_rank, self.comm.ttp_comm_group)
            served += 1

    def _receive(self) -> Any:
        """Party 0's next message, refused before allocation if it is larger than any request."""
        import torch.distributed as dist

        from mpcfl.mpc.compat import loaded_crypten, process_group_timeout

        size = torch.zeros((), dtype=torch.int32)
        wait = process_group_timeout() + datetime.timedelta(seconds=self._patience_s)
        dist.irecv(size, src=0, group=self.comm.ttp_group).wait(wait)
        self._patience_s = 0
        if not 0 < int(size) <= MAX_MESSAGE_BYTES:
            raise self._refuse(f"a request of {int(size)} bytes (limit {MAX_MESSAGE_BYTES})")
        data = torch.empty(int(size), dtype=torch.int8)
        dist.recv(data, src=0, group=self.comm.ttp_group)
        return loaded_crypten().common.serial.restricted_loads(data.numpy().tobytes())  # crypten only through compat

    def _agree(self, message: dict[str, Any]) -> None:
        """Serves nothing that any party did not ask for too (see the module's docstring).

        Raises:
            DealerRequestRefused: a party's digest differs from party 0's request.
            PeerFailure: a party's digest did not come within the timeout (party 0's for the answer),
                or its link failed; party 0 is told whose.
        """
        import torch.distributed as dist

        from mpcfl.mpc.compat import process_group_timeout

        if message["function"] == "batch":
            expected = batch_digest(message["args"][0])
            what = f"request 'batch' ({len(message['args'][0])} requests)"
        else:
            expected = request_digest(message["function"], message["device"], message["args"], message["kwargs"])
            what = f"request {message['function']!r}"
        deadline = time.monotonic() + process_group_timeout().total_seconds()
        disagree = []
        for rank in range(1, len(self.generators)):
            announced = torch.empty(DIGEST_WORDS, dtype=torch.long)
            left = datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3))  # 0 means the group's timeout
            try:
                dist.irecv(announced, src=rank, group=self.comm.ttp_group).wait(left)
            except RuntimeError as err:
                raise self._stalled(rank, what, err) from err
            if not torch.equal(announced, expected):
                disagree.append(rank)
        if disagree:
            raise self._refuse(f"{what} that party {', '.join(map(str, disagree))} did not make")

    def _stalled(self, rank: int, what: str, err: RuntimeError) -> PeerFailure:
        """Names the party whose digest did not come, to party 0 too (:func:`request`), on the link only
        the two of them share: a timeout closes every link of the group the answer would come by."""
        import torch.distributed as dist

        name = self.parties[rank]
        notice = to_words(name.encode()[:NAME_BYTES].ljust(NAME_BYTES, b"\0"))
        with contextlib.suppress(RuntimeError):  # party 0 is listening, or gone
            dist.isend(notice, dst=0, group=self.comm.ttp_comm_group).wait(datetime.timedelta(seconds=NOTICE_S))
        return PeerFailure(f"gave up waiting for party {name} (its dealer digest of {what}): {first_line(err)}", waiting_on=name)

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
        if name in ("fixed_mask", "fixed_triple"):
            return self._check_fixed(name, args, kwargs, within)
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
            checked.append((function, item_args, item_kwargs))
        return self.batch, (tuple(checked),), {}

    def _check_fixed(self, name: str, args: tuple, kwargs: dict, within: str | None) -> tuple[Callable[..., torch.Tensor], tuple, dict]:
        """A fixed mask's registration, or a triple whose first factor is a registered mask.

        Each mask belongs to one data tensor (its binding) and is registered once; a
        registration never goes in a batch, whose items are all checked before any is served.
        """
        if name == "fixed_mask" and within is not None:
            raise self._refuse(f"request 'fixed_mask'{within} (a mask is registered alone)")
        if kwargs or len(args) != (2 if name == "fixed_mask" else 4) or not _is_binding(args[0]):
            raise self._refuse(f"request {name!r} with malformed arguments")
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
        if type(args[3]) is not bool:
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

    def batch(self, items: Sequence[tuple[Callable[..., torch.Tensor], tuple, dict]]) -> torch.Tensor:
        """Party 0's shares of every item, in order (so each stream is drawn in the parties' order), flat.

        The next request may come a whole step later, where single requests came every
        multiplication: the dealer waits up to the timeout per item served, as it would have.
        """
        from mpcfl.mpc.compat import process_group_timeout

        self._patience_s = int(process_group_timeout().total_seconds() * (len(items) - 1))
        return torch.cat([function(*args, **kwargs).flatten() for function, args, kwargs in items])

    def _sum(self, size: Sequence[int], parties: Sequence[SecureGenerator]) -> torch.Tensor:
        total = torch.zeros(tuple(size), dtype=torch.long)
        for generator in parties:
            total += generator.ring(size)
        return total

    def fixed_mask(self, binding: str, size: Sequence[int]) -> torch.Tensor:
        """Draws and keeps the mask A of one data tensor, as the parties draw their shares of it; answers nothing of it."""
        self.masks[binding] = self._sum(size, self.generators)
        log.info("dealer: keeps a fixed mask of %s for data %s until the session ends", "x".join(map(str, size)), binding[:16])
        return torch.zeros(1, dtype=torch.long)

    def fixed_triple(self, binding: str, size: Sequence[int], size1: Sequence[int], transposed: bool) -> torch.Tensor:
        """Party 0's share of c = A·b (``transposed``: Aᵀ·b) for the data's kept mask A and a fresh random b."""
        mask = self.masks[binding]
        b = self._sum(size1, self.generators)
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

    def b2a(self, size: Sequence[int]) -> torch.Tensor:
        """Party 0's arithmetic share of a random bit whose XOR shares the parties draw."""
        bit = self._xor(size, self.generators, bits=1)
        return bit - self._sum(size, self.generators[1:])


def announcing(method: Callable[..., Any], request: str, rank: Callable[[], int]) -> Callable[..., Any]:
    """Wraps a TrustedThirdParty method so parties 1..n-1 announce each request to the dealer.

    The digest goes out with a send that is not waited on (the dealer receives it
    when party 0's request arrives), so it costs no round trip. A request served
    from a prefetched batch (see :func:`prefetched`) is not announced again: the
    batch's digest covers it.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        named = [v for k, v in bound.arguments.items() if k not in ("self", "device", "args", "kwargs")]
        item = {
            "function": request,
            "device": None if bound.arguments.get("device") is None else str(bound.arguments["device"]),
            "args": _plain((*named, *bound.arguments.get("args", ()))),
            "kwargs": {k: _plain(v) for k, v in bound.arguments.get("kwargs", {}).items()},
        }
        if not _prefetch.take(self, item, rank() == 0) and rank() != 0:
            _announce(request_digest(item["function"], item["device"], item["args"], item["kwargs"]))
        return method(self, *args, **kwargs)

    return call


# Party side of the fixed-mask requests: TrustedThirdParty methods in CrypTen's pattern,
# installed on it by mpcfl.mpc.compat (and wrapped by ``announcing``, as CrypTen's own).

def generate_fixed_mask(self: Any, binding: str, size: Sequence[int], device: Any = None) -> Any:
    """This party's share of a data tensor's fixed mask A, drawn from its dealer stream (request ``fixed_mask``)."""
    from crypten.mpc.provider import ttp_provider as upstream

    client = upstream.TTPClient.get()
    a = upstream.generate_random_ring_element(size, generator=client.get_generator(device=device), device=device)
    if upstream.comm.get().get_rank() == 0:
        client.ttp_request("fixed_mask", device, binding, size)  # its answer is a placeholder
    return upstream.ArithmeticSharedTensor.from_shares(a, precision=0)


def generate_fixed_triple(self: Any, binding: str, size: Sequence[int], size1: Sequence[int], transposed: bool, device: Any = None) -> tuple[Any, Any]:
    """Shares of a fresh b and of A·b (``transposed``: Aᵀ·b) for the fixed mask A of ``binding`` (request ``fixed_triple``)."""
    from crypten.mpc.provider import ttp_provider as upstream

    client = upstream.TTPClient.get()
    generator = client.get_generator(device=device)
    b = upstream.generate_random_ring_element(size1, generator=generator, device=device)
    if upstream.comm.get().get_rank() == 0:
        c = client.ttp_request("fixed_triple", device, binding, size, size1, transposed)
    else:
        answer = answer_size("fixed_triple", (binding, size, size1, transposed), {})
        c = upstream.generate_random_ring_element(answer, generator=generator, device=device)
    shares = upstream.ArithmeticSharedTensor
    return shares.from_shares(b, precision=0), shares.from_shares(c, precision=0)


#: What mpcfl.mpc.compat adds to CrypTen's TrustedThirdParty, by method name.
PARTY_EXTENSIONS = {"generate_fixed_mask": generate_fixed_mask, "generate_fixed_triple": generate_fixed_triple}


def request(self: Any, function: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Party 0's ``TTPClient.ttp_request``: CrypTen's, through the same calls (so its communication
    statistics stay CrypTen's), except that a request taken from the prefetched queue is answered
    from it, and that a missing answer is explained.

    Raises:
        PeerFailure: no answer came; it names the party whose digest the dealer gave up waiting for,
            if the dealer says so, or else the dealer.
    """
    import crypten.communicator as comm

    answer = _prefetch.answer
    if answer is not None:
        _prefetch.answer = None
        if answer[0] != function:
            raise MpcflError(f"prefetched answer for {answer[0]!r} taken by a {function!r} request")
        return answer[1]
    communicator = comm.get()
    device = None if device is None else str(device)
    dealer = communicator.get_ttp_rank()
    try:
        communicator.send_obj({"function": function, "device": device, "args": args, "kwargs": kwargs}, dealer, self.ttp_group)
        size = communicator.recv_obj(dealer, self.ttp_group)
    except RuntimeError as err:
        raise _no_answer(function, err, dealer, self.comm_group) from err
    result = torch.empty(size, dtype=torch.long, device=device)
    communicator.broadcast(result, dealer, self.comm_group)
    return result


def _no_answer(function: str, err: RuntimeError, dealer: int, group: Any) -> PeerFailure:
    """Why party 0 got no answer to ``function``: the dealer's notice (:meth:`Dealer._stalled`), if one
    comes on ``group`` (party 0's and the dealer's own) within :data:`NOTICE_S`, or else ``err``."""
    import torch.distributed as dist

    notice = torch.zeros(NAME_BYTES // 8, dtype=torch.long)
    try:
        dist.irecv(notice, src=dealer, group=group).wait(datetime.timedelta(seconds=NOTICE_S))
    except RuntimeError:
        return PeerFailure(f"gave up waiting for the dealer (request {function!r}): {first_line(err)}", waiting_on=DEALER)
    name = from_words(notice).rstrip(b"\0").decode(errors="replace")
    return PeerFailure(
        f"the dealer gave up waiting for party {name} (its dealer digest of request {function!r})", waiting_on=name
    )


class _Prefetch:
    """Party side of prefetching: the recordings, the queue of the step under way."""

    def __init__(self) -> None:
        self.recordings: dict[Hashable, list[dict[str, Any]] | None] = {}
        self.recording: list[dict[str, Any]] | None = None
        self.queue: collections.deque = collections.deque()  # (item, canonical, party 0's answer)
        self.answer: tuple[str, torch.Tensor] | None = None  # for serving_prefetched, one request long
        self.key: Hashable = None
        self.draining = False
        self.broken = False  # a prefetched step failed part-way: the streams no longer match the dealer's
        self.stats = collections.Counter()

    def take(self, provider: Any, item: dict[str, Any], party_0: bool) -> bool:
        """True when ``item`` is served from the queue (party 0: its answer is set for the dealer hook).

        Raises:
            MpcflError: an earlier prefetched step failed part-way, so the dealer streams are out of
                step (reusing them would give party 0 stream values in other roles): nothing more is served.
        """
        if self.broken:
            raise MpcflError("prefetch: an earlier step failed part-way; the dealer streams are out of step, so no triple is served")
        if self.recording is not None:
            self.recording.append(item)
            return False
        if not self.queue:
            return False
        canonical = _canonical(item["function"], item["device"], item["args"], item["kwargs"])
        if self.queue[0][1] != canonical:
            if self.draining:  # never: draining replays the queue's own items
                raise MpcflError("prefetch: draining met a request not in the queue")
            log.warning("prefetch: request %r differs from the recorded one; the rest of the batch is drawn and dropped", canonical)
            self.stats["mismatches"] += 1
            self.recordings.pop(self.key, None)  # record this step's kind afresh next time
            self.drain(provider)
            return False
        _, _, answer = self.queue.popleft()
        if party_0:
            self.answer = (item["function"], answer.to(item["device"]) if item["device"] else answer)
        self.stats["dropped" if self.draining else "served"] += 1
        return True

    def drain(self, provider: Any) -> None:
        """Uses up the queue's items as the step would have: every party draws their stream values."""
        self.draining = True
        try:
            while self.queue:
                item = self.queue[0][0]
                method = getattr(provider, PARTY_METHODS[item["function"]])
                method(*item["args"], device=item["device"], **item["kwargs"])
        finally:
            self.draining = False

    def fetch(self, items: list[dict[str, Any]], party_0: bool) -> None:
        """Party 0 asks the dealer for the whole batch; the others announce its digest."""
        from crypten.mpc.provider.ttp_provider import TTPClient

        if party_0:
            flat = TTPClient.get().ttp_request("batch", None, tuple(items))
            offset = 0
            for item in items:
                size = answer_size(item["function"], item["args"], item["kwargs"])
                count = int(size.numel())
                answer = flat[offset:offset + count].view(size)
                offset += count
                self.queue.append((item, _canonical(**item), answer))
            if offset != flat.numel():
                raise MpcflError(f"prefetch: the dealer answered {flat.numel()} elements for {offset}")
        else:
            _announce(batch_digest(items))
            self.queue.extend((item, _canonical(**item), None) for item in items)
        self.stats["batches"] += 1


_prefetch = _Prefetch()


def _fits(items: list[dict[str, Any]]) -> bool:
    """Whether a recording may go as one batch (every party decides the same from the same recording)."""
    if not 0 < len(items) <= MAX_BATCH_ITEMS:
        return False
    return sum(_elements(i["function"], i["args"], i["kwargs"]) for i in items) <= MAX_BATCH_ELEMENTS


@contextlib.contextmanager
def prefetched(key: Hashable) -> Iterator[None]:
    """Around a unit of work (a training step) whose dealer requests repeat for the same ``key``.

    Every party calls it at the same point with the same key. The first unit with a key
    is recorded and runs as usual; each later one fetches the recorded requests in one
    batch first and is served from it. Nesting is a no-op for the inner unit.
    """
    import crypten.communicator as comm
    from crypten.mpc import get_default_provider

    state = _prefetch
    if state.recording is not None or state.queue or state.key is not None:
        yield
        return
    party_0 = comm.get().get_rank() == 0
    recorded = state.recordings.get(key)
    state.key = key
    try:
        if key not in state.recordings:
            state.recording = []
            try:
                yield
            finally:
                items, state.recording = state.recording, None
            state.recordings[key] = items if _fits(items) else None
            return
        try:
            if recorded is not None:
                state.fetch(recorded, party_0)
            yield
            state.drain(get_default_provider())  # requests the unit did not make: drawn and dropped
        except BaseException:
            # The dealer drew the whole batch; the parties did not: their streams are out of step.
            state.broken = state.broken or recorded is not None
            raise
        finally:
            state.queue.clear()
            state.answer = None
    finally:
        state.key = None


_pending: collections.deque = collections.deque()  # digests in flight, kept alive until sent


def forget_session() -> None:
    """Drops what a party's dealer link held (digests in flight, recorded batches), so the process
    can join a later session, whose dealer starts from nothing, after this one ended."""
    global _prefetch
    _pending.clear()
    _prefetch = _Prefetch()


def _announce(words: torch.Tensor) -> None:
    """Parties 1..n-1: sends the dealer a request's digest, without waiting for it to arrive."""
    import torch.distributed as dist
    from crypten.mpc.provider.ttp_provider import TTPClient

    client = TTPClient.get()
    dealer = dist.get_world_size(client.ttp_group) - 1
    _pending.append((words, dist.isend(words, dealer, group=client.ttp_group)))
    while _pending and _pending[0][1].is_completed():
        _pending.popleft()


def announce_quiet(seconds: int) -> None:
    """Party side of ``quiet``: party 0 asks, the others send its digest, as for any request."""
    import crypten.communicator as comm
    from crypten.mpc.provider.ttp_provider import TTPClient

    if comm.get().get_rank() == 0:
        TTPClient.get().ttp_request("quiet", None, seconds)
    else:
        _announce(request_digest("quiet", None, (seconds,), {}))


def receive_dealer_key(client: Any) -> None:
    """Party side of the key hand-out, in place of CrypTen's ``TTPClient._setup_generators``."""
    import torch.distributed as dist

    dealer = dist.get_world_size(client.ttp_group) - 1  # the dealer is the group's last rank
    words = torch.empty(KEY_WORDS, dtype=torch.long)
    dist.irecv(tensor=words, src=dealer, group=client.ttp_group).wait()
    dist.barrier(group=client.ttp_group)
    # One stream for every device: values are made on the host and moved.
    client.generator = client.generator_cuda = SecureGenerator(words_to_key(words))
