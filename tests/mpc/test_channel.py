"""The TLS channel under gloo (runtime.channel: tls): certificates bound to the job's keys, job, run and
rank; links that refuse an impostor before any byte and stop on a flipped byte; a whole job over it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import DEMO, REPO, assert_no_leftovers, mpcfl, write_job
from faults.tamper import man_in_the_middle
from mpcfl.errors import ConfigError, MpcflError
from mpcfl.jobs.schema import load_job
from mpcfl.mpc import channel
from mpcfl.mpc.auth import Credentials
from mpcfl.mpc.keys import generate
from mpcfl.mpc.session import Session, channel_mode

NAMES = ["p0", "p1"]


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_certificate_is_accepted_only_for_its_key_job_run_and_rank() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = channel.certificate(key, rank=1, fingerprint="job-f", run_id="run-r")
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
    forged = channel.certificate(other, rank=1, fingerprint="job-f", run_id="run-r")
    with pytest.raises(channel.ChannelError):
        channel.check_certificate(forged, public_key=_raw(key), fingerprint="job-f", run_id="run-r", rank=1, who="p1")


def test_gloo_addresses_are_rewritten_and_tagged_in_place() -> None:
    blob = bytes(18) + b"\x02\x00" + bytes([0x9C, 0x40]) + socket.inet_aton("10.1.2.3") + bytes(150)
    assert channel.parse_address(blob) == ("10.1.2.3", 40000)
    moved = channel.rewrite_address(blob, "127.0.0.2", 5555, owner=7)
    assert channel.parse_address(moved) == ("127.0.0.2", 5555) and channel.owner_of(moved) == 7
    assert len(moved) == len(blob) and moved[:18] == blob[:18] and moved[46:] == blob[46:]
    assert channel.parse_address(b"not an address") is None and channel.owner_of(blob) is None


def test_an_address_no_relay_published_is_refused_not_dialled_in_the_clear() -> None:
    """A man in the middle on the rendezvous store strips the tag from a peer's address (so gloo would
    connect to it outside TLS): the process refuses it."""
    import torch.distributed as dist

    relay0, relay1, _ = _relays()
    try:
        inner = dist.HashStore()
        blob = bytes(18) + struct.pack("<H", 2) + struct.pack(">H", 4242) + socket.inet_aton("10.0.0.9") + bytes(8) + bytes(20)
        inner.set("0//cpu//0/1", blob)  # untagged: as gloo writes it, never as a relay publishes it
        store = channel.channel_store(inner, relay0)
        with pytest.raises(channel.ChannelError, match="no relay published"):
            store.get("0//cpu//0/1")
        inner.set("0//cpu//0/2", channel.rewrite_address(blob, "127.0.0.1", 4243, owner=1))
        host, port = channel.parse_address(store.get("0//cpu//0/2"))  # a relay's address: routed to p0's relay
        assert host.startswith("127.0.0.") and port != 4243
    finally:
        relay0.close(), relay1.close()


def _relays() -> tuple[channel.Relay, channel.Relay, list[Ed25519PrivateKey]]:
    keys = [Ed25519PrivateKey.generate() for _ in NAMES]
    certs = [channel.certificate(k, rank=r, fingerprint="f", run_id="r") for r, k in enumerate(keys)]
    relays = [channel.Relay(r, NAMES, certs[r], keys[r], {1 - r: certs[1 - r]}, "127.0.0.1") for r in range(2)]
    return relays[0], relays[1], keys


def _echo_server() -> tuple[int, socket.socket]:
    """What stands for p1's gloo listener: echoes every byte back."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn, contextlib.suppress(ConnectionError):  # an attack may cut the link: the test reads the relays
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], server


def _through(relay0: channel.Relay, relay1: channel.Relay, *, attack: str | None, payload: bytes, seen: bytearray | None = None) -> bytes:
    echo, _ = _echo_server()
    public = relay1.serve(echo)  # p1's TLS listener in front of its "gloo"
    host, local = relay0.connect(1, "127.0.0.1", man_in_the_middle("127.0.0.1", public, attack, bytearray() if seen is None else seen))  # p0's loopback end of the link
    with socket.create_connection((host, local), timeout=3) as sock:  # a cut link may leave the far end open
        got = b""
        try:
            sock.sendall(payload)
            while len(got) < len(payload) and (data := sock.recv(65536)):
                got += data
        except OSError:
            pass
    return got


def test_bytes_cross_the_link_intact_and_encrypted() -> None:
    relay0, relay1, _ = _relays()
    payload = bytes(range(256)) * 256
    seen = bytearray()
    try:
        assert _through(relay0, relay1, attack=None, payload=payload, seen=seen) == payload
        assert len(seen) > len(payload) and bytes(range(16)) not in seen
        assert not relay0.failures and not relay1.failures
    finally:
        relay0.close(), relay1.close()


@pytest.mark.parametrize("attack", ["flip", "drop", "replay", "reorder", "truncate"])
def test_a_tampered_record_stops_the_link_naming_it(attack: str) -> None:
    relay0, relay1, _ = _relays()
    payload = bytes(range(256)) * 256  # 64 KiB: four records
    try:
        assert _through(relay0, relay1, attack=attack, payload=payload) != payload
        deadline = time.monotonic() + 5
        while not relay1.failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(f.startswith("link p1 <-> p0: integrity failed") for f in relay1.failures), relay1.failures
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


def test_auto_is_plain_on_loopback_tls_across_hosts_and_plain_across_hosts_only_when_confirmed() -> None:
    def mode(channel: str, rendezvous: str, confirmed: bool = False, key: bool = True) -> str:
        credentials = Credentials(private_key=Ed25519PrivateKey.generate()) if key else Credentials(secret=b"s" * 32)
        return channel_mode(Session(parties=("a", "b"), channel=channel, credentials=credentials, label="job j"),
                            rendezvous, plain_confirmed=confirmed)

    for local in ("file:///tmp/rendezvous", "tcp://127.0.0.1:29500", "tcp://localhost:29500"):
        assert mode("auto", local) == "plain" and mode("auto", local, key=False) == "plain"
        assert mode("tls", local) == "tls"
    remote = "tcp://10.0.0.1:29500"
    assert mode("auto", remote) == "tls"
    with pytest.raises(MpcflError, match=r"job j: links between hosts are TLS \(runtime.channel: auto\).*declare runtime.identity"):
        mode("auto", remote, key=False)
    with pytest.raises(MpcflError, match=r"job j: runtime.channel: plain across hosts \(tcp://10.0.0.1:29500\).*--plain-network"):
        mode("plain", remote)
    assert mode("plain", remote, confirmed=True, key=False) == "plain"


def test_tls_needs_identities(tmp_path: Path) -> None:
    spec = yaml.safe_load(DEMO.read_text())
    spec["runtime"]["channel"] = "tls"
    for party in spec["parties"]:
        party["data"] = {k: str((DEMO.parent / v).resolve()) for k, v in party["data"].items()}
    with pytest.raises(ConfigError, match="runtime: channel: tls binds each link to a process's key: declare runtime.identity"):
        load_job(write_job(tmp_path, spec))


def _tls_job(tmp_path: Path, timeout_s: float = 60) -> tuple[Path, Path]:
    """The demo with identities and runtime.channel: tls, and the folder of its keys."""
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
    spec["runtime"].update(channel="tls", timeout_s=timeout_s)
    return write_job(tmp_path, spec), keys


def test_a_whole_job_trains_over_the_channel(tmp_path: Path) -> None:
    job, keys = _tls_job(tmp_path)
    done = mpcfl("run", str(job), "--key-dir", str(keys), timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("channel: mutual TLS 1.3 to 2 peers") == 3
    assert "integrity failed" not in done.stdout + done.stderr  # every link ended with a TLS close
    assert "test_accuracy=0.9735" in done.stdout  # the plain run's figure after 2 epochs (docs/guides/runs.md)


def test_a_job_whose_link_is_tampered_with_stops_naming_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A man in the middle flips one byte on the links hospital_b opens (to hospital_a, the lower rank:
    gloo's higher rank connects): every process stops, and the job's error names the link and that
    integrity failed."""
    job, keys = _tls_job(tmp_path, timeout_s=10)
    monkeypatch.setenv("MPCFL_TAMPER_LINKS", "hospital_b:flip")
    faults = REPO / "tests" / "faults"  # the hook imports mpcfl before `-m` puts the working directory on sys.path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), str(faults), os.environ.get("PYTHONPATH")])))
    started = time.monotonic()
    done = mpcfl("run", str(job), "--key-dir", str(keys), timeout=180)
    assert done.returncode == 1
    assert time.monotonic() - started < 60, done.stdout[-2000:]
    blame = done.stderr.strip().splitlines()[-1]
    assert re.match(r"mpcfl: error: .*channel link (hospital_a <-> hospital_b|hospital_b <-> hospital_a): integrity failed \(", blame), blame
    assert_no_leftovers(str(job))
