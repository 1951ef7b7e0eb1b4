"""Multi-host for real: the dealer and each party in its own Linux network namespace.

Each process gets its own namespace, veth link and IP address on a private bridge
that this test creates (and removes). Needs root and `ip netns`; skipped with the
reason otherwise. The second test cuts one party's link mid-run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import assert_no_leftovers, base_job, vertical_parties, write_job

SUBNET = "10.231.{}.{}"
SECRET = "n" * 32


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


class Hosts:
    """A bridge and one namespace per role, named uniquely for this test process."""

    def __init__(self, roles: list[str]) -> None:
        tag = f"{os.getpid() % 10000}"
        self.bridge = f"mpbr{tag}"
        self.names = {role: f"mp{tag}{role}" for role in roles}
        self.links = {role: f"mv{tag}{i}" for i, role in enumerate(roles)}
        self.addresses = {role: SUBNET.format(os.getpid() % 200, i + 2) for i, role in enumerate(roles)}

    def up(self) -> None:
        steps = [["ip", "link", "add", self.bridge, "type", "bridge"], ["ip", "link", "set", self.bridge, "up"]]
        for role, ns in self.names.items():
            link = self.links[role]
            steps += [
                ["ip", "netns", "add", ns],
                ["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns],
                ["ip", "link", "set", link, "master", self.bridge, "up"],
                ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addresses[role]}/24", "dev", "eth0"],
                ["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"],
                ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            ]
        for step in steps:
            done = sh(*step)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {done.stderr.strip()}")

    def down(self) -> None:
        for ns in self.names.values():
            sh("ip", "netns", "del", ns)
        for link in self.links.values():
            sh("ip", "link", "del", link)
        sh("ip", "link", "del", self.bridge)

    def start(self, role: str, argv: list[str]) -> subprocess.Popen:
        env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RENDEZVOUS")},
               "GLOO_SOCKET_IFNAME": "eth0", "MPCFL_JOB_SECRET": SECRET}
        return subprocess.Popen(
            ["ip", "netns", "exec", self.names[role], sys.executable, "-m", "mpcfl", *argv],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    network = Hosts(["dealer", "p0", "p1"])
    try:
        network.up()
    except (RuntimeError, OSError) as err:
        network.down()
        pytest.skip(f"cannot create network namespaces here: {err}")
    yield network
    network.down()


def job_file(tmp_path: Path, epochs: int, timeout_s: float) -> Path:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["training"]["epochs"] = epochs
    spec["runtime"]["timeout_s"] = timeout_s
    spec["outputs"]["model_to"] = ["p1"]
    return write_job(tmp_path, spec)


def start_all(hosts: Hosts, job: Path) -> dict[str, subprocess.Popen]:
    rendezvous = f"tcp://{hosts.addresses['p0']}:29500"  # rank 0 hosts the rendezvous
    return {
        "p0": hosts.start("p0", ["party", str(job), "--party", "p0", "--rendezvous", rendezvous]),
        "p1": hosts.start("p1", ["party", str(job), "--party", "p1", "--rendezvous", rendezvous]),
        "dealer": hosts.start("dealer", ["dealer", str(job), "--rendezvous", rendezvous]),
    }


def test_parties_in_separate_network_namespaces(hosts: Hosts, tmp_path: Path) -> None:
    job = job_file(tmp_path, epochs=2, timeout_s=30)
    processes = start_all(hosts, job)
    results = {role: p.communicate(timeout=180) for role, p in processes.items()}
    for role, process in processes.items():
        assert process.returncode == 0, (role, results[role][1][-1500:])
    assert "authenticated all 2 peers" in results["p1"][1]
    assert (tmp_path / "out" / "p1" / "latest" / "model.pt").exists()
    assert_no_leftovers(str(job))


def test_a_cut_link_stops_everyone_within_the_timeout(hosts: Hosts, tmp_path: Path) -> None:
    timeout_s = 5
    job = job_file(tmp_path, epochs=500, timeout_s=timeout_s)
    processes = start_all(hosts, job)
    time.sleep(2)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out" / "p1").glob("*/checkpoints/*.pt")):  # training is under way
        assert time.monotonic() < deadline, "training never started"
        assert all(p.poll() is None for p in processes.values()), {r: p.stderr.read() for r, p in processes.items() if p.poll() is not None}
        time.sleep(0.2)
    cut_at = time.monotonic()
    assert sh("ip", "link", "set", hosts.links["p1"], "down").returncode == 0
    results = {}
    for role, process in processes.items():
        try:
            results[role] = process.communicate(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            results[role] = process.communicate()
    elapsed = time.monotonic() - cut_at
    assert elapsed < timeout_s + 15 + 5, f"took {elapsed:.1f}s"
    for role, process in processes.items():
        assert process.returncode != 0, role
        last = results[role][1].strip().splitlines()[-1]
        assert last.startswith(f"mpcfl: error: {'dealer' if role == 'dealer' else 'party ' + role}: "), last
    # p0 lost p1, or, waiting for the dealer's answer, hears that the dealer gave up waiting for p1's digest.
    assert "lost a peer" in results["p0"][1] or "the dealer gave up waiting for party p1" in results["p0"][1]
    assert_no_leftovers(str(job))
