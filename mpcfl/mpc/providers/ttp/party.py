"""The parties' side of the dealer: the key hand-out, each request's digest sent to the dealer,
party 0's requests (and whose digest the dealer gave up on), the fixed-mask requests, and
prefetching (see the package's docstring).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

from mpcfl.errors import MpcflError, PeerFailure, first_line
from mpcfl.mpc.prng import KEY_WORDS, SecureGenerator, words_to_key
from mpcfl.mpc.providers import DEALER
from mpcfl.mpc.providers.ttp.requests import (
    MAX_BATCH_ELEMENTS,
    MAX_BATCH_ITEMS,
    MAX_MASK_ELEMENTS,
    NAME_BYTES,
    NOTICE_S,
    PARTY_METHODS,
    _canonical,
    _elements,
    _plain,
    answer_size,
    batch_digest,
    request_digest,
)
from mpcfl.mpc.wire import from_words

log = logging.getLogger(__name__)


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
    vars(client).setdefault(_KEPT, {})[binding] = a.numel()
    return upstream.ArithmeticSharedTensor.from_shares(a, precision=0)


def release_fixed_mask(self: Any, binding: str, device: Any = None) -> None:
    """Has the dealer forget the fixed mask of ``binding``, so that its room and its binding serve
    again (request ``fixed_release``)."""
    from crypten.mpc.provider import ttp_provider as upstream

    client = upstream.TTPClient.get()
    if upstream.comm.get().get_rank() == 0:
        client.ttp_request("fixed_release", device, binding)  # its answer is a placeholder
    del vars(client)[_KEPT][binding]


# The masks the dealer keeps in this session, as the parties count them (on the session's
# client, which a new session replaces): elements by binding.
_KEPT = "_mpcfl_fixed_masks_kept"


def fixed_mask_room(self: Any) -> tuple[frozenset[str], int]:
    """The bindings of the fixed masks the dealer keeps for this session, and how many more elements it would keep."""
    from crypten.mpc.provider import ttp_provider as upstream

    kept = vars(upstream.TTPClient.get()).get(_KEPT, {})
    return frozenset(kept), MAX_MASK_ELEMENTS - sum(kept.values())


def generate_fixed_triple(self: Any, binding: str, size: Sequence[int], size1: Sequence[int], transposed: bool,
                          drawer: int | None = None, device: Any = None) -> tuple[Any, Any]:
    """Shares of a fresh b and of A·b (``transposed``: Aᵀ·b) for the fixed mask A of ``binding`` (request
    ``fixed_triple``). With a ``drawer`` (a rank), b is that party's alone: the others' shares of it are 0."""
    from crypten.mpc.provider import ttp_provider as upstream

    client = upstream.TTPClient.get()
    generator = client.get_generator(device=device)
    rank = upstream.comm.get().get_rank()
    if drawer is None or drawer == rank:
        b = upstream.generate_random_ring_element(size1, generator=generator, device=device)
    else:
        b = torch.zeros(tuple(size1), dtype=torch.long, device=device)
    if rank == 0:
        c = client.ttp_request("fixed_triple", device, binding, size, size1, transposed, *(() if drawer is None else (drawer,)))
    else:
        answer = answer_size("fixed_triple", (binding, size, size1, transposed), {})
        c = upstream.generate_random_ring_element(answer, generator=generator, device=device)
    shares = upstream.ArithmeticSharedTensor
    return shares.from_shares(b, precision=0), shares.from_shares(c, precision=0)


def generate_noise(self: Any, size: Sequence[int], variance: float, device: Any = None) -> torch.Tensor:
    """This party's share, in ring units, of DP noise the dealer draws (request ``noise``): party 0's
    comes from the dealer, the others' from their dealer streams, so each share is uniform alone."""
    from crypten.mpc.provider import ttp_provider as upstream

    client = upstream.TTPClient.get()
    if upstream.comm.get().get_rank() == 0:
        return client.ttp_request("noise", device, size, variance)
    return upstream.generate_random_ring_element(size, generator=client.get_generator(device=device), device=device)


def generate_truncation(self: Any, size: Sequence[int], divisor: int, device: Any = None) -> tuple[Any, Any, Any]:
    """Shares of a random r, of floor(r / divisor) and of r's top bit, r read unsigned (request
    ``truncation``, :mod:`mpcfl.mpc.truncation`): party 0 gets its last two from the dealer."""
    from crypten.mpc.provider import ttp_provider as upstream

    client = upstream.TTPClient.get()
    generator = client.get_generator(device=device)
    r = upstream.generate_random_ring_element(size, generator=generator, device=device)
    if upstream.comm.get().get_rank() == 0:
        quotient, top = client.ttp_request("truncation", device, tuple(size), divisor).unbind(0)
    else:
        quotient, top = (upstream.generate_random_ring_element(size, generator=generator, device=device) for _ in range(2))
    shares = upstream.ArithmeticSharedTensor
    return tuple(shares.from_shares(share, precision=0) for share in (r, quotient, top))


#: What mpcfl.mpc.compat adds to CrypTen's TrustedThirdParty, by method name.
PARTY_EXTENSIONS = {
    "generate_fixed_mask": generate_fixed_mask, "generate_fixed_triple": generate_fixed_triple, "generate_noise": generate_noise,
    "generate_truncation": generate_truncation, "fixed_mask_room": fixed_mask_room,
    "release_fixed_mask": release_fixed_mask,
}


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


#: A recording too large for one batch is fetched in segments of at most this many elements (operands
#: and answers; an item above it goes alone), each asked for as the parties start using the one
#: before it, so the dealer computes a segment while the parties use the previous one. One that fits
#: is fetched whole: on a 2-core CPU the dealer computing alongside two compute-bound parties slowed
#: them (BERT-base, seq 128, MPC-friendly served: 5.2-6.0 s in segments of 2^24 against 4.8 s whole),
#: while the exact mode's one call, too large for a batch and once not prefetched at all, waits on
#: rounds and gains the dealer's time (30 s in segments of 2^24 against 34 s in two of 2^28).
SEGMENT_ELEMENTS = 1 << 24


class _Segment:
    """Party 0's answer to one batch request (:func:`request_batch`): its items' answers, flat, then the
    batch's digest, received point-to-point on the dealer's request link into a buffer posted when the
    batch was asked for, so the dealer sends it as soon as it is computed, whenever party 0 needs it."""

    def __init__(self, digest: torch.Tensor, buffer: torch.Tensor, work: Any) -> None:
        self._digest, self._buffer, self._work = digest, buffer, work

    def answers(self) -> torch.Tensor:
        """The flat answers, once they arrived.

        Raises:
            PeerFailure: they did not (naming the party whose digest the dealer gave up on, if it says so).
            MpcflError: the answer does not end in the batch's digest (a short one leaves the buffer's zeros).
        """
        if self._work is not None:
            import crypten.communicator as comm
            from crypten.mpc.provider.ttp_provider import TTPClient

            communicator = comm.get()
            try:  # a timeout here closes the request link; the dealer's notice comes on the other
                self._work.wait()
            except RuntimeError as err:
                raise _no_answer("batch", err, communicator.get_ttp_rank(), TTPClient.get().comm_group) from err
            self._work = None
            communicator._log_communication(self._buffer.nelement())  # as CrypTen counts what it receives
            if not torch.equal(self._buffer[-len(self._digest):], self._digest):
                raise MpcflError("prefetch: the dealer's answer to a batch does not end in that batch's digest")
        return self._buffer[: -len(self._digest)]


def request_batch(items: tuple[dict[str, Any], ...], elements: int) -> _Segment:
    """Party 0 asks the dealer for a batch and returns at once, its receive posted: the answer (the
    items' ``elements``, which the parties know from their shapes, then the batch's digest) arrives meanwhile."""
    import crypten.communicator as comm
    import torch.distributed as dist
    from crypten.mpc.provider.ttp_provider import TTPClient

    communicator, client = comm.get(), TTPClient.get()
    dealer = communicator.get_ttp_rank()
    digest = batch_digest(items)
    buffer = torch.zeros(elements + len(digest), dtype=torch.long)
    try:
        communicator.send_obj({"function": "batch", "device": None, "args": (items,), "kwargs": {}}, dealer, client.ttp_group)
        work = dist.irecv(buffer, src=dealer, group=client.ttp_group)
    except RuntimeError as err:
        raise _no_answer("batch", err, dealer, client.comm_group) from err
    return _Segment(digest, buffer, work)


def _fits(items: list[dict[str, Any]]) -> bool:
    """Whether a recording may go as one batch."""
    return len(items) <= MAX_BATCH_ITEMS and sum(_elements(i["function"], i["args"], i["kwargs"]) for i in items) <= MAX_BATCH_ELEMENTS


def _segments(items: list[dict[str, Any]]) -> list[list[dict[str, Any]]] | None:
    """A recording as the batches it is fetched in: whole if it fits one, else cut into segments; or
    None where it cannot be prefetched (no request, or one larger than a batch may be). Every party
    cuts the same."""
    if items and _fits(items):
        return [items]
    segments: list[list[dict[str, Any]]] = []
    total = 0
    for item in items:
        elements = _elements(item["function"], item["args"], item["kwargs"])
        if elements > MAX_BATCH_ELEMENTS:
            return None
        if not segments or total + elements > SEGMENT_ELEMENTS or len(segments[-1]) == MAX_BATCH_ITEMS:
            segments.append([])
            total = 0
        segments[-1].append(item)
        total += elements
    return segments or None


class _Prefetch:
    """Party side of prefetching: the recordings, the queue of the step under way."""

    def __init__(self) -> None:
        self.recordings: dict[Hashable, list[list[dict[str, Any]]] | None] = {}
        self.recording: list[dict[str, Any]] | None = None
        # (item, canonical, party 0's answer: (segment, offset, size), first of its segment)
        self.queue: collections.deque = collections.deque()
        self.upcoming: collections.deque = collections.deque()  # the unit's segments not asked for yet
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
            self.upcoming.clear()  # never asked for: the dealer drew none of them
            self.drain(provider)
            return False
        _, _, answer, first = self.queue.popleft()
        if party_0:
            segment, offset, size = answer
            answer = segment.answers()[offset : offset + size.numel()].view(size)
            self.answer = (item["function"], answer.to(item["device"]) if item["device"] else answer)
        if first and self.upcoming and not self.draining:  # the dealer computes it while the parties use this one
            self.fetch(self.upcoming.popleft(), party_0)
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
        """Party 0 asks the dealer for one segment, its answer arriving meanwhile; the others announce its digest."""
        if party_0:
            sizes = [answer_size(item["function"], item["args"], item["kwargs"]) for item in items]
            segment = request_batch(tuple(items), sum(int(size.numel()) for size in sizes))
            offsets = itertools.accumulate((int(size.numel()) for size in sizes), initial=0)
            answers = [(segment, offset, size) for offset, size in zip(offsets, sizes)]
        else:
            _announce(batch_digest(items))
            answers = [None] * len(items)
        self.queue.extend((item, _canonical(**item), answer, index == 0)
                          for index, (item, answer) in enumerate(zip(items, answers)))
        self.stats["batches"] += 1


_prefetch = _Prefetch()


@contextlib.contextmanager
def prefetched(key: Hashable) -> Iterator[None]:
    """Around a unit of work (a training step) whose dealer requests repeat for the same ``key``.

    Every party calls it at the same point with the same key. The first unit with a key
    is recorded and runs as usual; each later one fetches the recorded requests in one
    batch, or, too many for one, in segments (:data:`SEGMENT_ELEMENTS`), each asked for
    as the unit starts on the one before it, and is served from them. Nesting is a no-op
    for the inner unit.
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
            state.recordings[key] = _segments(items)
            return
        try:
            if recorded is not None:
                state.upcoming.extend(recorded[1:])
                state.fetch(recorded[0], party_0)
            yield
            state.drain(get_default_provider())  # requests the unit did not make: drawn and dropped
        except BaseException:
            # The dealer drew the whole batch; the parties did not: their streams are out of step.
            state.broken = state.broken or recorded is not None
            raise
        finally:
            state.queue.clear()
            state.upcoming.clear()
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
