"""The TLS channel under gloo (runtime.channel: tls): certificates bound to the job's keys, job, run and
rank; links that refuse an impostor before any byte and stop on a flipped byte; a whole job over it."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import DEMO, mpcfl, write_job
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job
from mpcfl.mpc import channel
from mpcfl.mpc.keys import generate

NAMES = ["p0", "p1"]


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_certificate_is_accepted_only_for_its_key_job_run_and_rank() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = channel.certificate(key, name="p1", rank=1, fingerprint="job-f", run_id="run-r")
    channel.check_certificate(pem, public_key=_raw(key), fingerprint="job-f", run_id="run-r", rank=1, who="p1")
    refusals = {
        "its certificate's key is not the one the job lists for it": dict(public_key=_raw(other)),
        "its certificate is for another job, run or rank": dict(fingerprint="job-g"),
    }
    for message, change in refusals.items():
        args = dict(public_key=_raw(key), fingerprint="job-f", run_id="run-r", rank=1, who="p1") | change
        with pytest.raises(channel.ChannelError, match=f"p1: {message}"):
            channel.check_certificate(pem, **args)
    for change in (dict(run_id="run-s"), dict(rank=0)):
        with pytest.raises(channel.ChannelError, match="another job, run or rank"):
            channel.check_certificate(pem, **(dict(public_key=_raw(key), fingerprint="job-f", run_id="run-r", rank=1, who="p1") | change))
    # a certificate carrying the right key, signed by another: the self-signature does not verify
    forged = channel.certificate(other, name="p1", rank=1, fingerprint="job-f", run_id="run-r")
    with pytest.raises(channel.ChannelError):
        channel.check_certificate(forged, public_key=_raw(key), fingerprint="job-f", run_id="run-r", rank=1, who="p1")


def test_gloo_addresses_are_rewritten_and_tagged_in_place() -> None:
    blob = bytes(18) + b"\x02\x00" + bytes([0x9C, 0x40]) + socket.inet_aton("10.1.2.3") + bytes(150)
    assert channel.parse_address(blob) == ("10.1.2.3", 40000)
    moved = channel.rewrite_address(blob, "127.0.0.2", 5555, owner=7)
    assert channel.parse_address(moved) == ("127.0.0.2", 5555) and channel.owner_of(moved) == 7
    assert len(moved) == len(blob) and moved[:18] == blob[:18] and moved[46:] == blob[46:]
    assert channel.parse_address(b"not an address") is None and channel.owner_of(blob) is None


def _relays() -> tuple[channel.Relay, channel.Relay, list[Ed25519PrivateKey]]:
    keys = [Ed25519PrivateKey.generate() for _ in NAMES]
    certs = [channel.certificate(k, name=n, rank=r, fingerprint="f", run_id="r") for r, (k, n) in enumerate(zip(keys, NAMES))]
    relays = [channel.Relay(r, NAMES, certs[r], keys[r], {1 - r: certs[1 - r]}, "127.0.0.1") for r in range(2)]
    return relays[0], relays[1], keys


def _echo_server() -> tuple[int, socket.socket]:
    """What stands for p1's gloo listener: echoes every byte back."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], server


def _mitm(target: int, corrupt: bool) -> int:
    """A man in the middle on the network between p0's relay and p1's: copies bytes, flipping one
    byte of p0's first application data when ``corrupt``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        inbound, _ = listener.accept()
        outbound = socket.create_connection(("127.0.0.1", target))
        def copy(src: socket.socket, dst: socket.socket, flip: bool) -> None:
            try:
                while data := src.recv(65536):
                    if flip and corrupt and len(data) > 4096:  # application data: the handshake's flights are smaller
                        data = data[:-100] + bytes([data[-100] ^ 1]) + data[-99:]
                        flip = False
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    s.close()

        threading.Thread(target=copy, args=(outbound, inbound, False), daemon=True).start()
        copy(inbound, outbound, True)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]


def _through(relay0: channel.Relay, relay1: channel.Relay, *, corrupt: bool, payload: bytes) -> bytes:
    echo, _ = _echo_server()
    public = relay1.serve(echo)  # p1's TLS listener in front of its "gloo"
    host, local = relay0.connect(1, "127.0.0.1", _mitm(public, corrupt))  # p0's loopback end of the link
    with socket.create_connection((host, local), timeout=3) as sock:  # a cut link may leave the far end open
        got = b""
        try:
            sock.sendall(payload)
            while len(got) < len(payload) and (data := sock.recv(65536)):
                got += data
        except OSError:
            pass
    return got


def test_bytes_cross_the_link_encrypted_and_a_flipped_byte_stops_it_naming_the_link() -> None:
    relay0, relay1, _ = _relays()
    payload = bytes(range(256)) * 64
    try:
        assert _through(relay0, relay1, corrupt=False, payload=payload) == payload
        assert not relay0.failures and not relay1.failures
    finally:
        relay0.close(), relay1.close()
    relay0, relay1, _ = _relays()
    try:
        assert _through(relay0, relay1, corrupt=True, payload=payload) != payload
        deadline = time.monotonic() + 5
        while not relay1.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("link p1 <-> p0: integrity failed" in f for f in relay1.failures), relay1.failures
    finally:
        relay0.close(), relay1.close()


def test_an_impostor_with_another_rank_s_valid_key_is_refused_before_any_byte() -> None:
    relay0, relay1, keys = _relays()
    # p0's relay expects p1's certificate; p1's listener presents p0's (a valid key of the job, another rank)
    impostor = channel.Relay(1, NAMES, relay0.own_cert, keys[0], {0: relay0.own_cert}, "127.0.0.1")
    echo, _ = _echo_server()
    try:
        public = impostor.serve(echo)
        host, local = relay0.connect(1, "127.0.0.1", public)
        with socket.create_connection((host, local), timeout=10) as sock:
            sock.sendall(b"secret share")
            try:
                answer = sock.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed: nothing was forwarded, nothing came back
        deadline = time.monotonic() + 5
        while not relay0.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(f.startswith("link p0 -> p1: CERTIFICATE_VERIFY_FAILED") for f in relay0.failures), relay0.failures
    finally:
        relay0.close(), relay1.close(), impostor.close()


def test_tls_needs_identities(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    spec["runtime"]["channel"] = "tls"
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    with pytest.raises(ConfigError, match="runtime: channel: tls binds each link to a process's key: declare runtime.identity"):
        load_job(write_job(tmp_path, spec))


def test_a_whole_job_trains_over_the_channel(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    names = ("hospital_a", "hospital_b", "dealer")
    for name in names:
        generate(name, keys)
    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    spec["training"]["epochs"] = 2
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["runtime"]["identity"] = {"public_keys": {n: str(keys / f"{n}.pub") for n in names}}
    spec["runtime"]["channel"] = "tls"
    done = mpcfl("run", str(write_job(tmp_path, spec)), "--key-dir", str(keys), timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("channel: mutual TLS 1.3 to 2 peers") == 3
    assert "test_accuracy=0.9735" in done.stdout  # the plain run's figure after 2 epochs (docs/guides/runs.md)
