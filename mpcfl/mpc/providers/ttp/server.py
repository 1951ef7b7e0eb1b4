"""The dealer process: hands each party its key, then serves party 0's requests from the
table (:class:`~.requests.Requests`) once every other party's digest agrees, until party 0
ends the session.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from mpcfl.errors import PeerFailure, first_line
from mpcfl.mpc.prng import SecureGenerator, key_to_words, new_key
from mpcfl.mpc.providers.ttp.requests import (
    ABORT,
    DIGEST_WORDS,
    MAX_MESSAGE_BYTES,
    NAME_BYTES,
    NOTICE_S,
    Requests,
    batch_digest,
    request_digest,
)
from mpcfl.mpc.wire import to_words

log = logging.getLogger(__name__)


class Dealer(Requests):
    """Serves correlated randomness to the parties until party 0 says ``terminate``.

    Args:
        communicator: CrypTen's communicator, initialised as the dealer (rank n).
        generators: the stream shared with each party, by rank.
        parties: the parties' names, by rank.
    """

    def __init__(self, communicator: Any, generators: Sequence[SecureGenerator], parties: Sequence[str]) -> None:
        super().__init__(generators)
        self.comm = communicator
        self.parties = list(parties)

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
        import torch.distributed as dist

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
            result = function(*args, **kwargs)  # on the host: see the package's docstring
            if message["function"] == "batch":  # party 0 posted its receive when it asked (party.request_batch)
                dist.send(result, 0, group=self.comm.ttp_group)  # it ends in the batch's digest
            else:
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
        """Serves nothing that any party did not ask for too (see the package's docstring).

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
