"""The trusted-third-party triple provider: the dealer process and its key hand-out.

The dealer shares one 128-bit AES-CTR key with each party (sent once, at start-up,
over the authenticated process group). Party i and the dealer then draw the same
stream: party i's share of every triple comes from it, so the dealer knows every
share without sending any, and only party 0's share of each product is computed
by the dealer and sent to party 0. This is the protocol of CrypTen 0.4.1's TTP
(``crypten.mpc.provider.ttp_provider``), whose party side is kept as is; two things
differ here:

- every draw comes from :class:`~mpcfl.mpc.prng.SecureGenerator`, not from a
  ``torch.Generator`` seeded with 32 effective bits;
- the dealer answers only the requests it knows. CrypTen's server runs
  ``getattr(self, name)`` on whatever name party 0 sends, and ``getattr(torch, op)``
  for the product; here both come from fixed tables, the sizes are checked, and
  anything else is refused, logged and ends the dealer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mpcfl.errors import MpcflError
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
#: Refuse a single request for more elements than this (a party 0 asking for
#: absurd sizes would exhaust the dealer's memory).
MAX_ELEMENTS = 1 << 31


class DealerRequestRefused(MpcflError):
    """Party 0 asked the dealer for something outside its request table."""


def _count_wraps(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """How often the running sum of ``shares`` wraps around the 64-bit ring (+1 up, -1 down)."""
    result = torch.zeros_like(shares[0])
    total = shares[0]
    for share in shares[1:]:
        after = total + share
        result -= ((total < 0) & (share < 0) & (after > 0)).long()
        result += ((total > 0) & (share > 0) & (after < 0)).long()
        total = after
    return result


class Dealer:
    """Serves correlated randomness to the parties until party 0 says ``terminate``.

    Args:
        communicator: CrypTen's communicator, initialised as the dealer (rank n).
        generators: the stream shared with each party, by rank.
    """

    def __init__(self, communicator: Any, generators: Sequence[SecureGenerator]) -> None:
        self.comm = communicator
        self.generators = list(generators)
        self.device = torch.device("cpu")
        self.requests: dict[str, Callable[..., torch.Tensor]] = {
            "additive": self.additive,
            "square": self.square,
            "binary": self.binary,
            "wraps": self.wraps,
            "B2A": self.b2a,
        }

    @classmethod
    def start(cls, communicator: Any) -> Dealer:
        """Sends each party its own fresh key (the party side is :func:`receive_dealer_key`)."""
        import torch.distributed as dist

        keys = [new_key() for _ in range(communicator.get_world_size())]
        words = [key_to_words(key) for key in keys]
        pending = [dist.isend(tensor=w, dst=rank, group=communicator.ttp_group) for rank, w in enumerate(words)]
        for request in pending:
            request.wait()
        dist.barrier(group=communicator.ttp_group)
        return cls(communicator, [SecureGenerator(key) for key in keys])

    def serve(self) -> None:
        """Answers requests until ``terminate``.

        Raises:
            DealerRequestRefused: a request outside the table (the dealer stops).
            RuntimeError: the link to a party failed (gloo's error, not swallowed).
        """
        ttp_rank = self.comm.get_ttp_rank()
        served = 0
        while True:
            message = self.comm.recv_obj(0, self.comm.ttp_group)
            if message == "terminate":
                log.info("dealer: party 0 ended the session after %d requests", served)
                return
            function, args, kwargs = self._check(message)
            result = function(*args, **kwargs)
            self.comm.send_obj(result.size(), 0, self.comm.ttp_group)
            self.comm.broadcast(result.to(self.device), ttp_rank, self.comm.ttp_comm_group)
            served += 1

    def _check(self, message: Any) -> tuple[Callable[..., torch.Tensor], tuple, dict]:
        """The handler and arguments of a request, or a refusal naming what is wrong."""
        if not isinstance(message, dict) or set(message) != {"function", "device", "args", "kwargs"}:
            raise self._refuse(f"a malformed request ({type(message).__name__})")
        name, device, args, kwargs = message["function"], message["device"], message["args"], message["kwargs"]
        if not isinstance(name, str) or name not in self.requests:
            raise self._refuse(f"unknown request {name!r} (known: {', '.join(self.requests)})")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise self._refuse(f"request {name!r} with malformed arguments")
        self.device = self._device(name, device)
        if name == "additive":
            if len(args) < 3 or not isinstance(args[2], str) or args[2] not in PRODUCTS:
                raise self._refuse(f"request 'additive' for an unknown product {args[2:3]!r}")
            unknown = set(kwargs) - PRODUCTS[args[2]]
            if unknown or len(args) > 3:
                raise self._refuse(f"request 'additive' ({args[2]}) with unexpected arguments {sorted(unknown) or args[3:]}")
            if not all(isinstance(v, (int, tuple)) for v in kwargs.values()):
                raise self._refuse(f"request 'additive' ({args[2]}) with non-integer options")
            sizes = args[:2]
        else:
            if len(args) != (2 if name == "binary" else 1) or kwargs:
                raise self._refuse(f"request {name!r} with unexpected arguments")
            sizes = args
        for size in sizes:
            self._size(name, size)
        return self.requests[name], args, kwargs

    def _size(self, name: str, size: Any) -> None:
        if not isinstance(size, (tuple, torch.Size)) or not all(isinstance(d, int) and d >= 0 for d in size):
            raise self._refuse(f"request {name!r} with a malformed size {size!r}")
        if int(torch.Size(size).numel()) > MAX_ELEMENTS:
            raise self._refuse(f"request {name!r} for {torch.Size(size).numel()} elements (limit {MAX_ELEMENTS})")

    def _device(self, name: str, device: Any) -> torch.device:
        if device is None:
            return torch.device("cpu")
        if not isinstance(device, str) or not device.startswith(("cpu", "cuda")):
            raise self._refuse(f"request {name!r} for device {device!r}")
        parsed = torch.device(device)
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise self._refuse(f"request {name!r} for {device}, but the dealer has no GPU")
        return parsed

    @staticmethod
    def _refuse(what: str) -> DealerRequestRefused:
        log.error("dealer: refused %s from party 0", what)
        return DealerRequestRefused(f"dealer: party 0 sent {what}; refused, and the dealer stops")

    # The tables below mirror the party side of CrypTen's TrustedThirdParty: party i
    # draws its shares from the stream it shares with the dealer, in the same order.

    def _sum(self, size: Sequence[int], parties: Sequence[SecureGenerator]) -> torch.Tensor:
        total = torch.zeros(tuple(size), dtype=torch.long)
        for generator in parties:
            total += generator.ring(size)
        return total

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
        shares = [generator.ring(size) for generator in self.generators]
        return _count_wraps(shares) - self._sum(size, self.generators[1:])

    def b2a(self, size: Sequence[int]) -> torch.Tensor:
        """Party 0's arithmetic share of a random bit whose XOR shares the parties draw."""
        bit = self._xor(size, self.generators, bits=1)
        return bit - self._sum(size, self.generators[1:])


def receive_dealer_key(client: Any) -> None:
    """Party side of the key hand-out, in place of CrypTen's ``TTPClient._setup_generators``."""
    import torch.distributed as dist

    dealer = dist.get_world_size(client.ttp_group) - 1  # the dealer is the group's last rank
    words = torch.empty(KEY_WORDS, dtype=torch.long)
    dist.irecv(tensor=words, src=dealer, group=client.ttp_group).wait()
    dist.barrier(group=client.ttp_group)
    # One stream for every device: values are made on the host and moved.
    client.generator = client.generator_cuda = SecureGenerator(words_to_key(words))
