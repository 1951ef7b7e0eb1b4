"""Confidential, authenticated links under gloo: mutual TLS 1.3 between the job's processes.

torch's gloo has no TLS transport, so every byte between two processes would cross the network in
the clear (the pairwise generator keys and the dealer's keys among them). This module puts TLS under
gloo without touching it: gloo still talks TCP, but only to this process's loopback relays.

- Each process makes a fresh self-signed X.509 certificate from its Ed25519 identity key (the one the
  job lists for its name), naming the job's fingerprint, the run and its rank, and publishes it in
  the rendezvous store. A peer accepts it only if its key is the one the job lists for that rank and
  its job and run are ours: a stranger writing to the store can delay the start, never join.
- gloo publishes each process's listening address in the store. :class:`ChannelStore` rewrites it on
  the way out to a TLS listener of this process's :class:`Relay` (which forwards to the gloo listener
  on loopback), and on the way in to a loopback listener that forwards over TLS to that peer, its
  certificate pinned: the only certificate that verifies is the one that rank published.
- TLS 1.3 (Python's ``ssl``, OpenSSL): ephemeral ECDHE key agreement (forward secrecy), AEAD records
  with sequence numbers (a flipped, dropped, replayed or reordered record fails the MAC), the
  certificates, and so the job and run, in the handshake transcript. No cipher or handshake of ours.

A link whose TLS fails (a bad record, a certificate of someone else) is closed at once; the relay
records which two processes it joined and why, so the process names the link rather than gloo's
"connection reset".
"""

from __future__ import annotations

import datetime
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from mpcfl.errors import MpcflError

log = logging.getLogger(__name__)

# gloo's TCP address as torch 2.13 serialises it into the store: a sockaddr_storage at this offset,
# AF_INET (little-endian family, big-endian port, IPv4 address). Checked on every blob: another
# layout is refused, not guessed at.
_SOCKADDR = 18
_AF_INET = 2
_TAG = b"mpcfl-ch"  # written into the sockaddr's unused padding, with the owner's global rank
_TAG_AT = _SOCKADDR + 16
_CHUNK = 1 << 20
_POLL_S = 0.5  # a waiting relay thread looks again this often (the lock may have been released meanwhile)
GLOO_HOST = "127.0.0.1"  # where gloo listens with the channel on (GLOO_SOCKET_IFNAME=lo): only relays reach it


class ChannelError(MpcflError):
    """A link's TLS failed: tampering, a wrong identity, or a peer that broke off mid-record."""


def certificate(key: Ed25519PrivateKey, *, rank: int, fingerprint: str, run_id: str) -> bytes:
    """A self-signed certificate (PEM) of ``key`` for this run: its alternative name binds the job
    fingerprint, the run and the rank, which every peer checks. It is published in the plain
    rendezvous store, so it names the rank, never the party."""
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mpcfl rank {rank}")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(binding(fingerprint, run_id, rank))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return builder.sign(key, None).public_bytes(serialization.Encoding.PEM)


def binding(fingerprint: str, run_id: str, rank: int) -> str:
    """What a certificate must name to be accepted in this job's run as ``rank``."""
    return f"mpcfl:job:{fingerprint}:run:{run_id}:rank:{rank}"


def check_certificate(pem: bytes, *, public_key: bytes, fingerprint: str, run_id: str, rank: int, who: str) -> None:
    """Refuses a peer's published certificate that is not of the job's listed key, job, run and rank.

    Raises:
        ChannelError: names the process and what differs.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ChannelError(f"{who}: its published certificate is not a certificate") from None
    raw = cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if raw != public_key:
        raise ChannelError(f"{who}: its certificate's key is not the one the job lists for it")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    if binding(fingerprint, run_id, rank) not in names:
        raise ChannelError(f"{who}: its certificate is for another job, run or rank ({', '.join(names)})")
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # noqa: BLE001 - any failure of the self-signature is the same refusal
        raise ChannelError(f"{who}: its certificate's signature does not verify") from None


def parse_address(blob: bytes) -> tuple[str, int] | None:
    """The IPv4 host and port of a gloo address blob, or None when the value is not one."""
    if len(blob) < _TAG_AT + 12 or struct.unpack_from("<H", blob, _SOCKADDR)[0] != _AF_INET:
        return None
    port = struct.unpack_from(">H", blob, _SOCKADDR + 2)[0]
    return socket.inet_ntoa(blob[_SOCKADDR + 4 : _SOCKADDR + 8]), port


def rewrite_address(blob: bytes, host: str, port: int, *, owner: int | None = None) -> bytes:
    """``blob`` pointing at ``host:port``; with ``owner``, tagged with the global rank that owns it."""
    out = bytearray(blob)
    struct.pack_into(">H4s", out, _SOCKADDR + 2, port, socket.inet_aton(host))
    if owner is not None:
        out[_TAG_AT : _TAG_AT + 12] = _TAG + struct.pack("<I", owner)
    return bytes(out)


def owner_of(blob: bytes) -> int | None:
    """The global rank a rewritten blob was tagged with, or None."""
    if blob[_TAG_AT : _TAG_AT + 8] != _TAG:
        return None
    return struct.unpack_from("<I", blob, _TAG_AT + 8)[0]


@dataclass
class _Link:
    """One TLS link's socket, the lock every call on it holds, and what is still to be encrypted."""

    secure: ssl.SSLSocket
    plain: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False  # the encrypting thread holds bytes gloo wrote that are not yet sent

    def drained(self) -> bool:
        """Nothing gloo wrote is waiting: neither held by the encrypting thread nor unread on loopback."""
        if self.busy:
            return False
        try:
            return not select.select([self.plain], [], [], 0)[0]
        except (OSError, ValueError):  # closed already
            return True


@dataclass
class Relay:
    """This process's TLS endpoints: a listener per gloo listener (peers connect to it), and a loopback
    listener per peer address (gloo connects to it), each pumping bytes to the other side."""

    rank: int
    names: list[str]  # every process's name, by global rank
    own_cert: bytes
    key: Ed25519PrivateKey
    peer_certs: dict[int, bytes]  # global rank -> its checked certificate (PEM)
    public_host: str
    failures: list[str] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _sockets: list[socket.socket] = field(default_factory=list)
    _links: list[_Link] = field(default_factory=list)

    def _context(self, server: bool, trusted: list[bytes]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        _load_chain(context, self.own_cert, key_pem)
        context.load_verify_locations(cadata="".join(c.decode() for c in trusted))
        return context

    def serve(self, local_port: int) -> int:
        """A TLS listener on the public host forwarding every accepted link to ``local_port`` (gloo's)."""
        context = self._context(True, list(self.peer_certs.values()))
        listener = socket.create_server((self.public_host, 0))
        self._accept(listener, lambda raw: self._inbound(context, raw, local_port))
        return listener.getsockname()[1]

    def _accept(self, listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        """Hands every link ``listener`` accepts to ``handle``, each in a thread of its own, until closed."""
        self._sockets.append(listener)

        def accept() -> None:
            while not self._stopping.is_set():
                try:
                    link, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(link,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def _inbound(self, context: ssl.SSLContext, raw: socket.socket, local_port: int) -> None:
        try:
            secure = context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
        except (ssl.SSLError, OSError) as err:
            self._fail(f"{self.names[self.rank]} refused a link before any data: {err}")
            raw.close()
            return
        peer = self._rank_of(secure.getpeercert(binary_form=True))
        plain = socket.create_connection(("127.0.0.1", local_port))
        self._pump(secure, plain, peer)

    def connect(self, peer: int, host: str, port: int) -> tuple[str, int]:
        """A loopback listener whose links go over TLS to ``peer``'s listener at ``host:port``.

        gloo decides which side of a pair connects by comparing the two addresses as each side sees
        them, IP first: its own listener is on 127.0.0.1 (:data:`GLOO_HOST`), so a higher rank's relay
        listens on 127.0.0.2 (this side then waits for the peer) and a lower rank's on 127.0.0.0 (this
        side connects), and the two sides' decisions are always opposite.
        """
        context = self._context(False, [self.peer_certs[peer]])
        listener = socket.create_server(("127.0.0.2" if peer > self.rank else "127.0.0.0", 0))
        self._accept(listener, lambda plain: self._outbound(context, plain, peer, host, port))
        return listener.getsockname()

    def _outbound(self, context: ssl.SSLContext, plain: socket.socket, peer: int, host: str, port: int) -> None:
        try:
            secure = context.wrap_socket(socket.create_connection((host, port)), suppress_ragged_eofs=False)
        except (ssl.SSLError, OSError) as err:
            self._fail(f"link {self.names[self.rank]} -> {self.names[peer]}: {_reason(err)}")
            plain.close()
            return
        self._pump(secure, plain, peer)

    def _rank_of(self, der: bytes | None) -> int:
        for rank, pem in self.peer_certs.items():
            if der == ssl.PEM_cert_to_DER_cert(pem.decode()):
                return rank
        return -1  # unreachable: the handshake verified it against these certificates

    def _pump(self, secure: ssl.SSLSocket, plain: socket.socket, peer: int) -> None:
        """Copies bytes both ways between a TLS link and its loopback end.

        OpenSSL does not allow one connection to be read and written from two threads at once (a read may
        write, a key update or a ticket; under load the two corrupt each other's records). The TLS socket is
        therefore non-blocking, and every call on it holds one lock; the threads wait for readiness outside it.
        """
        link = f"link {self.names[self.rank]} <-> {self.names[peer]}"
        self._sockets += [secure, plain]
        for sock in (secure, plain):  # MPC rounds are small messages: Nagle's delay would cost each 40 ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        secure.setblocking(False)
        state = _Link(secure, plain)
        lock = state.lock
        self._links.append(state)

        def call(operation: Callable[[], Any]) -> Any:
            """``operation`` on the TLS socket under the lock; None when it would block."""
            with lock:
                try:
                    return operation()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return None

        def decrypt() -> None:  # TLS -> loopback
            while True:
                data = call(lambda: secure.recv(_CHUNK))
                if data is None:
                    select.select([secure], [], [], _POLL_S)
                    continue
                if not data:
                    return
                plain.sendall(data)

        def encrypt() -> None:  # loopback -> TLS
            while data := plain.recv(_CHUNK):
                state.busy = True
                view = memoryview(data)
                while view:
                    sent = call(lambda: secure.send(view))
                    if sent:
                        view = view[sent:]
                    else:
                        select.select([], [secure], [], _POLL_S)
                state.busy = False
            _close_notify(secure, lock)  # gloo closed its end: a TLS close tells the peer an end from a cut

        def run(direction: Callable[[], None]) -> None:
            try:
                direction()
            except ssl.SSLEOFError:  # TCP ended inside a record or without close_notify
                self._fail(f"{link}: integrity failed (cut without a TLS close: truncated by the network, or the peer "
                           "process died)")
            except ssl.SSLError as err:
                self._fail(f"{link}: integrity failed ({_reason(err)})")
            except (OSError, ValueError):  # the other direction closed the link
                pass
            finally:
                for sock in (secure, plain):
                    _close(sock)

        threading.Thread(target=run, args=(decrypt,), daemon=True).start()
        threading.Thread(target=run, args=(encrypt,), daemon=True).start()

    def _fail(self, what: str) -> None:
        if not self._stopping.is_set():
            log.error("channel: %s", what)
            self.failures.append(what)

    def close(self, drain_s: float = 2.0) -> None:
        """Closes every link with a TLS close (so no peer reads the end as a cut), once what gloo wrote
        has been sent (up to ``drain_s``), then every socket."""
        self._stopping.set()
        deadline = time.monotonic() + drain_s
        for link in self._links:
            while not link.drained() and time.monotonic() < deadline:
                time.sleep(0.01)
            _close_notify(link.secure, link.lock)
        for sock in self._sockets:
            _close(sock)


def _close_notify(secure: ssl.SSLSocket, lock: threading.Lock) -> None:
    """Sends this end's TLS close_notify on a non-blocking link, without waiting for the peer's."""
    with lock:
        try:
            secure.unwrap()
        except (ssl.SSLError, OSError, ValueError):  # want-read (the peer's close is not awaited), or closed already
            pass


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """``load_cert_chain`` reads files only: the certificate and key go through a private temporary file."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="mpcfl-channel-", suffix=".pem")
    try:
        os.write(fd, key + cert)
        os.close(fd)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)


def _reason(err: BaseException) -> str:
    return getattr(err, "reason", None) or str(err) or type(err).__name__


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def channel_store(inner: object, relay: Relay) -> object:
    """``inner`` (torch's rendezvous store) with gloo's addresses routed through ``relay``."""
    import torch.distributed as dist

    class ChannelStore(dist.Store):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.own: dict[str, int] = {}  # key prefix of a group's addresses -> this process's gloo port

        def _outgoing(self, key: str, value: bytes | str) -> bytes:
            blob = value.encode() if isinstance(value, str) else bytes(value)
            address = parse_address(blob)
            if address is not None and owner_of(blob) is None:
                self.own[key.rsplit("/", 1)[0]] = address[1]
                public = relay.serve(address[1])
                blob = rewrite_address(blob, relay.public_host, public, owner=relay.rank)
            return blob

        def set(self, key: str, value: bytes | str) -> None:
            inner.set(key, self._outgoing(key, value))

        def multi_set(self, keys: list[str], values: list[bytes]) -> None:
            inner.multi_set(keys, [self._outgoing(k, v) for k, v in zip(keys, values)])

        def multi_get(self, keys: list[str]) -> list[bytes]:
            return [self._incoming(k, v) for k, v in zip(keys, inner.multi_get(keys))]

        def get(self, key: str) -> bytes:
            return self._incoming(key, inner.get(key))

        def _incoming(self, key: str, value: bytes) -> bytes:
            blob = bytes(value)
            owner = owner_of(blob)
            if owner is None:
                if parse_address(blob) is not None:  # gloo would dial it in the clear: someone wrote the store
                    raise ChannelError(f"the rendezvous store holds a peer address {key!r} that no relay published "
                                       "(changed on the network?); refusing to connect outside TLS")
                return blob
            if owner == relay.rank:  # its own entry, as gloo published it
                return rewrite_address(blob, GLOO_HOST, self.own[key.rsplit("/", 1)[0]])
            host, port = parse_address(blob)  # type: ignore[misc]
            return rewrite_address(blob, *relay.connect(owner, host, port))

        def add(self, key: str, amount: int) -> int:
            return inner.add(key, amount)

        def append(self, key: str, value: bytes) -> None:
            inner.append(key, value)

        def has_extended_api(self) -> bool:
            return True

        def list_keys(self) -> list[str]:
            return inner.list_keys()

        def compare_set(self, key: str, expected: str, desired: str) -> bytes:
            return inner.compare_set(key, expected, desired)

        def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
            return inner.wait(keys) if timeout is None else inner.wait(keys, timeout)

        def check(self, keys: list[str]) -> bool:
            return inner.check(keys)

        def delete_key(self, key: str) -> bool:
            return inner.delete_key(key)

        def num_keys(self) -> int:
            return inner.num_keys()

        def set_timeout(self, timeout: datetime.timedelta) -> None:
            return inner.set_timeout(timeout)

    return ChannelStore()




_CERT_KEY = "mpcfl-channel/certificate/{rank}"
_relays: list[Relay] = []  # this process's, for naming a failed link when gloo reports only a reset


def close_all() -> None:
    """Ends this process's links cleanly: at the end of a session that succeeded."""
    while _relays:
        _relays.pop().close()


def first_failure() -> str | None:
    """The first link failure this process's relays recorded (which two processes, and why), if any."""
    return next((failure for relay in _relays for failure in relay.failures), None)


def rendezvous_address(rendezvous: str) -> tuple[str, int] | None:
    """The host ("" when the URL names none) and port of a ``tcp://`` or ``env://`` rendezvous (``env://``:
    ``MASTER_ADDR`` and ``MASTER_PORT``); None for a ``file://`` store, which names no host."""
    import os
    from urllib.parse import urlparse

    if rendezvous.startswith("env://"):
        return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "1"))
    if rendezvous.startswith("tcp://"):
        parsed = urlparse(rendezvous)
        return parsed.hostname or "", parsed.port or 1
    return None


def public_host(rendezvous: str) -> str:
    """The address peers reach this process at: its interface towards the rendezvous host (loopback
    for a local ``file://`` rendezvous)."""
    address = rendezvous_address(rendezvous)
    if address is None:
        return GLOO_HOST
    host, port = address
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((socket.gethostbyname(host or "127.0.0.1"), port))  # no packet: it only picks the route
        return probe.getsockname()[0]
    finally:
        probe.close()


def secured(
    store: object, *, rank: int, names: list[str], key: Ed25519PrivateKey, public_keys: dict[str, object],
    fingerprint: str, run: str, public_host: str,
) -> object:
    """``store`` with gloo's links through TLS: this process's certificate published, every peer's read
    and checked against the job's keys, and a :class:`Relay` serving them.

    Raises:
        ChannelError: a peer's published certificate is not of its listed key, this job or this run.
    """
    own = certificate(key, rank=rank, fingerprint=fingerprint, run_id=run)
    store.set(_CERT_KEY.format(rank=rank), own)  # type: ignore[attr-defined]
    peers = {}
    for peer, name in enumerate(names):
        if peer == rank:
            continue
        pem = bytes(store.get(_CERT_KEY.format(rank=peer)))  # type: ignore[attr-defined]
        raw = public_keys[name].public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]
        check_certificate(pem, public_key=raw, fingerprint=fingerprint, run_id=run, rank=peer, who=f"process {name} (rank {peer})")
        peers[peer] = pem
    relay = Relay(rank, names, own, key, peers, public_host)
    _relays.append(relay)
    log.info("channel: mutual TLS 1.3 to %d peers, this process's listeners on %s", len(peers), public_host)
    return channel_store(store, relay)
