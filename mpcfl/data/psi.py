"""Private set intersection (PSI): lines up a vertical job's rows by ID, and shows no party another's other IDs.

Each party keys its rows by ``data.id_column``; its files need not be in the same
order as the others' or cover the same people. Before anything is shared, the
parties run ECDH-PSI with OpenMined's ``openmined-psi``: every ID, hashed with a
per-job salt, is mapped to a point of the P-256 curve and raised to a party's
fresh secret exponent, so only blinded points cross the job's links; no ID, hashed
or not, travels in a form an eavesdropper could test guesses against. The salt is
public (anyone with the job file can compute it): it keeps jobs apart, it is no key.

The protocol, run once per split (train, then test), with the label holder L as hub:

1. **Chain.** L intersects its IDs with each other party's, in rank order, as the
   PSI client; the other party is the server. L ends with I, the IDs every party holds.
2. **Spread.** Each other party, as the client, intersects its own IDs with I (L the
   server): it learns which of its rows are in I, and nothing of L's other IDs, as I
   holds none.
3. **Order.** Every party sorts its rows of I by the salted hash of their ID, so all
   agree on one order without sending it.

What is disclosed (every party's ledger records it, marked as outside DP):

- to every party: the size of each party's ID set, |I|, and which of its own rows are in I
  (each needs that to select and order its rows; it is the intersection itself, of IDs it holds);
- with more than two parties, to L: the IDs it shares with the parties before each chain step
  (L ∩ P1, L ∩ P1 ∩ P2, ...), and to each later party the size of that running intersection.

A semi-honest party learns no ID outside I that it does not itself hold. A party that
cheats can bring guessed IDs instead of its own (up to ``data.max_ids`` of them, which
also bounds every message and wait) and learn which guesses a peer holds; so can an
active attacker on links that are not tunnelled, after the handshake. It can also
drop rows or make the job fail.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpcfl.data.files import DataError
from mpcfl.data.party import PartyData, Split
from mpcfl.mpc.reveal import disclose
from mpcfl.mpc.session import all_gather_public, quiet_dealer, recv_bytes, send_bytes

if TYPE_CHECKING:
    from mpcfl.jobs.schema import TrainJob

log = logging.getLogger(__name__)

# Bytes per blinded point a peer may send (33 for a compressed P-256 point, plus protobuf
# framing); how many points is bounded by the job's data.max_ids.
_BYTES_PER_ID = 64
_SLACK_BYTES = 1024
# Links wait this long per announced ID beyond the job's timeout: a peer is silent while it
# exponentiates (measured: 0.45 ms per ID of all parties for the whole protocol, on a 2-core machine).
_SECONDS_PER_ID = 5e-4


def _psi() -> Any:
    import private_set_intersection.python as psi  # a compiled extension: loaded only by jobs that use it

    return psi


def job_salt(job: TrainJob) -> bytes:
    """The per-job salt: a digest of what every party's copy of the job agrees on."""
    return hashlib.sha256(b"mpcfl psi salt\0" + job.fingerprint().encode()).digest()


def salted(ids: list[str], salt: bytes) -> list[str]:
    """Each ID as HMAC-SHA256 under the job's salt: what enters the PSI, and the agreed sort key."""
    return [hmac.new(salt, value.encode(), hashlib.sha256).hexdigest() for value in ids]


def agreed_order(rows: list[int], items: list[str]) -> list[int]:
    """``rows`` in the order every party uses for the intersection: by salted ID."""
    return sorted(rows, key=items.__getitem__)


@dataclass
class _Traffic:
    """This party's PSI messages: the bytes sent and received (framing included), and how much
    longer than the job's timeout each may take (peers are silent while they exponentiate)."""

    patience_s: float
    sent: int = 0
    received: int = 0

    def send(self, data: bytes, peer: int) -> None:
        send_bytes(data, peer, patience_s=self.patience_s)
        self.sent += _on_the_wire(data)

    def recv(self, peer: int, *, ids: int, what: str) -> bytes:
        data = recv_bytes(peer, limit=_BYTES_PER_ID * ids + _SLACK_BYTES, what=what, patience_s=self.patience_s)
        self.received += _on_the_wire(data)
        return data


def _on_the_wire(data: bytes) -> int:
    """Bytes a message takes on the links: its length word, then its bytes padded to whole words."""
    return 8 + len(data) + (-len(data) % 8)


def _parse(kind: Any, data: bytes, peer: str, what: str) -> Any:
    from google.protobuf.message import DecodeError

    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError:
        raise DataError(f"private set intersection: party {peer} sent a malformed {what}") from None
    return message


def _as_client(items: list[str], peer: int, peer_name: str, peer_ids: int, traffic: _Traffic) -> list[int]:
    """One PSI with this party as client: the indices of ``items`` that the peer also holds."""
    psi = _psi()
    client = psi.client.CreateWithNewKey(True)
    traffic.send(client.CreateRequest(items).SerializeToString(), peer)
    setup = _parse(psi.ServerSetup, traffic.recv(peer, ids=peer_ids, what="PSI setup"), peer_name, "PSI setup")
    response = _parse(psi.Response, traffic.recv(peer, ids=len(items), what="PSI response"), peer_name, "PSI response")
    check_answer(setup, response, asked=len(items), peer_ids=peer_ids, peer=peer_name)
    try:
        return sorted(client.GetIntersection(setup, response))
    except RuntimeError as err:
        raise DataError(f"private set intersection: party {peer_name}'s answer is unusable: {err}") from None


def check_answer(setup: Any, response: Any, *, asked: int, peer_ids: int, peer: str) -> None:
    """Refuses a server's answer that does not fit the protocol: an exact (RAW) setup of at most
    its announced set, and one blinded point per point asked (a GCS or Bloom-filter setup would let
    false matches in).

    Raises:
        DataError: names the peer.
    """
    if setup.WhichOneof("data_structure") != "raw" or len(setup.raw.encrypted_elements) > peer_ids:
        raise DataError(f"private set intersection: party {peer}'s setup is not an exact set of its announced size")
    if len(response.encrypted_elements) != asked:
        raise DataError(f"private set intersection: party {peer} answered {len(response.encrypted_elements)} points for {asked}")


def check_sizes(sizes: list[int], names: list[str], *, max_ids: int) -> None:
    """Refuses announced set sizes outside 0..``max_ids``: they bound every later message and wait.

    Raises:
        DataError: names the party.
    """
    for name, size in zip(names, sizes):
        if not 0 <= size <= max_ids:
            raise DataError(f"private set intersection: party {name} announces {size} IDs, outside 0..{max_ids} (data.max_ids)")


def _as_server(items: list[str], peer: int, peer_name: str, peer_ids: int, traffic: _Traffic) -> int:
    """One PSI with this party as server: it learns the client's set size only, which it returns."""
    psi = _psi()
    server = psi.server.CreateWithNewKey(True)
    request = _parse(psi.Request, traffic.recv(peer, ids=peer_ids, what="PSI request"), peer_name, "PSI request")
    asked = len(request.encrypted_elements)
    if asked > peer_ids or not request.reveal_intersection:
        raise DataError(f"private set intersection: party {peer_name}'s request does not match its set size")
    setup = server.CreateSetupMessage(0.0, max(asked, 1), items, psi.DataStructure.RAW)
    traffic.send(setup.SerializeToString(), peer)
    try:
        response = server.ProcessRequest(request)
    except RuntimeError as err:
        raise DataError(f"private set intersection: party {peer_name}'s request is unusable: {err}") from None
    traffic.send(response.SerializeToString(), peer)
    return asked


@dataclass
class SplitAlignment:
    """What PSI did to one split of this party's rows."""

    rows: int
    kept: int
    seconds: float
    bytes_sent: int
    bytes_received: int

    @property
    def dropped(self) -> int:
        return self.rows - self.kept

    def report(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "kept": self.kept, "dropped": self.dropped, "seconds": round(self.seconds, 3),
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
        }


def intersect(
    items: list[str], *, names: list[str], hub: int, rank: int, split: str, max_ids: int
) -> tuple[list[int], SplitAlignment]:
    """Runs the chain-and-spread protocol on one split's salted IDs, inside a party session.

    Args:
        items: this party's salted IDs (:func:`salted`), one per row.
        names: the parties, in rank order.
        hub: the rank that chains the intersection (a job's label holder).
        split: names the split in the ledger and in errors.
        max_ids: the most IDs any party may announce (the job's ``data.max_ids``, public).

    Returns:
        This party's rows of the intersection, in the agreed order, and what it cost.
    """
    world = len(names)
    others = [r for r in range(world) if r != hub]
    started = time.perf_counter()
    sizes = [size for (size,) in all_gather_public([len(items)])]
    check_sizes(sizes, names, max_ids=max_ids)
    # Every wait of the protocol may last as long as all its exponentiations, and the dealer
    # hears nothing meanwhile: both are told, from the public sizes.
    traffic = _Traffic(patience_s=_SECONDS_PER_ID * 4 * sum(sizes))
    quiet_dealer(traffic.patience_s)
    everyone = list(range(world))
    disclose(f"the number of {split} IDs of every party", shape=(world,), to=everyone)
    if rank == hub:
        mine = list(range(len(items)))
        for step, peer in enumerate(others):
            found = _as_client([items[i] for i in mine], peer, names[peer], sizes[peer], traffic)
            mine = [mine[i] for i in found]
            if step < len(others) - 1:
                chain = ", ".join(names[r] for r in others[: step + 1])
                disclose(f"which of its {split} IDs {names[hub]} shares with {chain}", shape=(len(mine),), to=[hub])
        common = [items[i] for i in mine]
        for peer in others:
            _as_server(common, peer, names[peer], sizes[peer], traffic)
    else:
        asked = _as_server(items, hub, names[hub], sizes[hub], traffic)
        if others.index(rank) > 0:
            chain = ", ".join(names[r] for r in others[: others.index(rank)])
            disclose(f"how many {split} IDs {names[hub]} shares with {chain}", shape=(asked,), to=[rank])
        mine = _as_client(items, hub, names[hub], sizes[hub], traffic)
    _agree_on_size(len(mine), names=names, hub=hub, rank=rank, traffic=traffic, split=split)
    disclose(
        f"the private set intersection of {split} IDs: its size, and to each party which of its own rows are in it",
        shape=(len(mine),), to=everyone,
    )
    return agreed_order(mine, items), SplitAlignment(
        rows=len(items), kept=len(mine), seconds=time.perf_counter() - started,
        bytes_sent=traffic.sent, bytes_received=traffic.received,
    )


def _agree_on_size(kept: int, *, names: list[str], hub: int, rank: int, traffic: _Traffic, split: str) -> None:
    """Every party found as many rows as the hub, or all stop; it also ends the protocol together
    (through the hub, patiently: the hub may still be serving a later party)."""
    others = [r for r in range(len(names)) if r != hub]
    if rank == hub:
        counts = {r: int.from_bytes(traffic.recv(r, ids=0, what="intersection size"), "little", signed=True) for r in others}
        counts[hub] = kept
        verdict = all(count == kept for count in counts.values())
        for r in others:
            traffic.send(bytes([verdict]), r)
    else:
        traffic.send(kept.to_bytes(8, "little", signed=True), hub)
        verdict = traffic.recv(hub, ids=0, what="verdict") == b"\x01"
        counts = {rank: kept}
    if not verdict:
        found = ", ".join(f"{names[r]} {count}" for r, count in sorted(counts.items()))
        raise DataError(f"private set intersection of {split} IDs: the parties found different sizes ({found})")


def _keep(job: TrainJob, split: Split, party: str, which: str, rows: list[int]) -> None:
    """Keeps this split's rows of the intersection, in the agreed order, after checking there are enough.

    Raises:
        DataError: none, or fewer than ``data.min_intersection``; names the party, file and column.
    """
    kept = len(rows)
    column = job.id_column_of(party)
    if kept == 0:
        raise DataError(
            f"party {party}: {split.path}: no ID of column {column!r} is in every party's {which} file; "
            "there is nothing to train on"
        )
    if kept < job.data.min_intersection:
        raise DataError(
            f"party {party}: {split.path}: only {kept} IDs of column {column!r} are in every party's {which} file, "
            f"fewer than data.min_intersection={job.data.min_intersection}"
        )
    split.keep(rows)


def align(job: TrainJob, data: PartyData, *, rank: int) -> dict[str, dict[str, Any]]:
    """Keeps only this party's rows whose ID every party holds, in the order all parties agree on.

    Every party calls it at the same point, after loading its own files. Train and
    test files are intersected separately: a person must be in the same split at every party.

    Returns:
        Per split, the rows before and after, bytes and seconds, for the party's outputs.

    Raises:
        DataError: an empty intersection or one below ``data.min_intersection`` (every
            party raises it, naming its own file), or a peer that breaks the protocol.
    """
    salt = job_salt(job)
    report: dict[str, dict[str, Any]] = {}
    for which in ("train", "test"):
        split = getattr(data, which)
        if split is None:
            continue
        assert split.ids is not None
        rows, alignment = intersect(
            salted(split.ids, salt), names=job.party_names, hub=job.rank_of(job.labels.party), rank=rank, split=which,
            max_ids=job.data.max_ids,
        )
        _keep(job, split, data.party, which, rows)
        report[which] = alignment.report()
        log.info(
            "private set intersection of %s IDs: kept %d of this party's %d rows (dropped %d) in %.2f s, "
            "%d bytes sent", which, alignment.kept, alignment.rows, alignment.dropped, alignment.seconds,
            alignment.bytes_sent,
        )
    return report


def align_plainly(job: TrainJob, parts: list[PartyData]) -> None:
    """What :func:`align` computes, from every party's files at once: for the plaintext baseline only.

    Same rows, same order, so the baseline trains on the data the secure run does.
    """
    salt = job_salt(job)
    for which in ("train", "test"):
        splits = [getattr(p, which) for p in parts]
        if any(s is None for s in splits):
            continue
        items = [salted(s.ids, salt) for s in splits]
        common = set.intersection(*(set(i) for i in items))
        for part, split, own in zip(parts, splits, items):
            rows = agreed_order([i for i, item in enumerate(own) if item in common], own)
            _keep(job, split, part.party, which, rows)
