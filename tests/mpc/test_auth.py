"""Peer authentication on real processes: a wrong secret or key, a key for another rank, another job's
process, or a process without credentials is refused by name, at once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_no_leftovers, mpcfl, run_roles, write_job
from mpcfl.mpc.auth import load_secret, transcript
from mpcfl.jobs.schema import load_job
from mpcfl.errors import ConfigError, MpcflError
from mpcfl.mpc.keys import generate

GOOD = "a" * 32
TIMEOUT_S = 60  # refusals must come well before it


def inference_job(tmp_path: Path, name: str = "job.yaml", batch_size: int = 64) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "digits_inference.yaml").read_text())
    data = REPO / "examples" / "data" / "digits_inference"
    spec["model"]["weights"] = str(data / "bank_weights.pt")
    spec["inputs"]["file"] = str(data / "clinic_inputs.npy")
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["batch_size"] = batch_size
    spec["runtime"]["timeout_s"] = TIMEOUT_S
    return write_job(tmp_path, spec, name)


def identity_job(tmp_path: Path) -> tuple[str, Path]:
    """The inference job with a key pair per process: bank's and clinic's public keys as files, the dealer's inline."""
    keys = tmp_path / "keys"
    for name in ("bank", "clinic", "dealer"):
        generate(name, keys)
    spec = yaml.safe_load(inference_job(tmp_path).read_text())
    spec["runtime"]["identity"] = {
        "public_keys": {"bank": "keys/bank.pub", "clinic": "keys/clinic.pub", "dealer": (keys / "dealer.pub").read_text().strip()}
    }
    return str(write_job(tmp_path, spec)), keys


def run_processes(roles: list[tuple[list[str], str | None]]) -> list[subprocess.CompletedProcess]:
    """:func:`conftest.run_roles` within half the process-group timeout: every refusal must come at once."""
    return run_roles(roles, within=TIMEOUT_S / 2)


def key_roles(job: str, keys: Path, **key_files: Path | None) -> list[tuple[list[str], str | None]]:
    """dealer, bank and clinic of ``job``, each with its own key unless ``key_files`` says otherwise."""
    roles = []
    for name, args in (("dealer", ["dealer", job]), ("bank", ["party", job, "--party", "bank"]),
                       ("clinic", ["party", job, "--party", "clinic"])):
        key = key_files.get(name, keys / f"{name}.key")
        roles.append(([*args, *(["--key-file", str(key)] if key else [])], None))
    return roles


def test_a_wrong_secret_is_refused_before_anything_is_shared(tmp_path: Path) -> None:
    job = str(inference_job(tmp_path))
    dealer, bank, clinic = run_processes(
        [(["dealer", job], GOOD), (["party", job, "--party", "bank"], GOOD), (["party", job, "--party", "clinic"], "b" * 32)]
    )
    for honest, who in ((dealer, "dealer"), (bank, "bank")):
        assert honest.returncode == 3
        assert f"mpcfl: error: {who}: clinic failed authentication" in honest.stderr
    assert clinic.returncode == 1
    assert "mpcfl: error: clinic: no peer could verify this process: its job secret is wrong" in clinic.stderr
    assert not (tmp_path / "out").exists()
    assert_no_leftovers(job)


def test_a_process_of_another_job_is_refused_even_with_the_secret(tmp_path: Path) -> None:
    job = str(inference_job(tmp_path))
    other = str(inference_job(tmp_path, "other.yaml", batch_size=32))  # same parties, different job
    dealer, bank, clinic = run_processes(
        [(["dealer", job], GOOD), (["party", job, "--party", "bank"], GOOD), (["party", other, "--party", "clinic"], GOOD)]
    )
    assert "clinic failed authentication" in bank.stderr and "clinic failed authentication" in dealer.stderr
    assert clinic.returncode == 1
    assert not (tmp_path / "out").exists()


def test_the_right_secret_is_accepted(tmp_path: Path) -> None:
    job = str(inference_job(tmp_path))
    results = run_processes(
        [(["dealer", job], GOOD), (["party", job, "--party", "bank"], GOOD), (["party", job, "--party", "clinic"], GOOD)]
    )
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-500:] for r in results]
    assert all("authenticated all 2 peers" in r.stderr for r in results)
    assert (tmp_path / "out" / "clinic" / "latest" / "predictions.npy").exists()


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPCFL_JOB_SECRET", raising=False)
    assert load_secret(None) is None
    monkeypatch.setenv("MPCFL_JOB_SECRET", "short")
    with pytest.raises(MpcflError, match=r"\$MPCFL_JOB_SECRET: the job secret must be at least 16 bytes"):
        load_secret(None)
    path = tmp_path / "secret"
    path.write_text(GOOD + "\n")
    path.chmod(0o640)
    with pytest.raises(MpcflError, match=rf"runtime.secret_file {path} is accessible by group or others \(mode 0640\): run `chmod 600 {path}`"):
        load_secret(path)
    path.chmod(0o600)
    assert load_secret(path) == GOOD.encode()  # the file wins over the environment
    with pytest.raises(MpcflError, match="runtime.secret_file .*missing: No such file"):
        load_secret(tmp_path / "missing")


def test_the_transcript_binds_nonces_rank_name_world_rendezvous_and_job() -> None:
    nonces, names = [b"x" * 32, b"y" * 32], ["p0", "p1"]
    base = transcript("job", nonces, 0, names, "tcp://h:1")
    assert base == transcript("job", nonces, 0, names, "tcp://h:1")
    for other in (
        transcript("job", nonces[::-1], 0, names, "tcp://h:1"),
        transcript("job", nonces, 1, names, "tcp://h:1"),
        transcript("job", nonces, 0, ["p0", "p2"], "tcp://h:1"),
        transcript("job", nonces, 0, [*names, "dealer"], "tcp://h:1"),
        transcript("job", nonces, 0, names, "tcp://h:2"),
        transcript("other", nonces, 0, names, "tcp://h:1"),
    ):
        assert other != base


def test_identities_are_accepted_and_each_process_proves_its_own_rank(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    # One template for every process, as under torchrun or srun: {name} becomes each one's name.
    template = keys / "{name}.key"
    results = run_processes(key_roles(job, keys, dealer=template, bank=template, clinic=template))
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-500:] for r in results]
    assert all("authenticated all 2 peers (an Ed25519 identity)" in r.stderr for r in results)
    assert (tmp_path / "out" / "clinic" / "latest" / "predictions.npy").exists()


def assert_refused(results: list[subprocess.CompletedProcess], culprit: str, peers_say: str, culprit_says: str) -> None:
    names = ["dealer", "bank", "clinic"]
    for result, name in zip(results, names):
        if name == culprit:
            assert result.returncode == 1 and f"mpcfl: error: {culprit}: {culprit_says}" in result.stderr, result.stderr
        else:
            assert result.returncode == 3 and f"mpcfl: error: {name}: {culprit} {peers_say}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_key_not_listed_for_the_rank_is_refused_at_once(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    generate("stranger", keys)
    results = run_processes(key_roles(job, keys, clinic=keys / "stranger.key"))
    assert_refused(results, "clinic", "failed authentication (its signature does not verify against the public key",
                   "bank, dealer could not verify this process: its private key is not the one the job lists for clinic")
    assert not (tmp_path / "out").exists()
    assert_no_leftovers(job)


def test_a_key_of_another_rank_is_refused_at_once(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    results = run_processes(key_roles(job, keys, clinic=keys / "dealer.key"))
    assert_refused(results, "clinic", "failed authentication", "bank, dealer could not verify this process: "
                   "its private key is dealer's, not clinic's")


def test_a_key_file_others_can_read_is_refused_at_once(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    (keys / "clinic.key").chmod(0o644)
    results = run_processes(key_roles(job, keys))
    assert_refused(results, "clinic", "announced no credentials, but this process uses an Ed25519 identity: "
                   "it lacks its private key (--key-file)",
                   f"private key file {keys / 'clinic.key'} is accessible by group or others (mode 0644): "
                   f"run `chmod 600 {keys / 'clinic.key'}`")


def test_a_process_without_its_key_is_refused_at_once(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    results = run_processes(key_roles(job, keys, clinic=None))
    assert_refused(results, "clinic", "announced no credentials", f"{job}: runtime.identity is set: pass this "
                   "process's private key with --key-file")


def test_a_process_without_the_secret_is_refused_at_once(tmp_path: Path) -> None:
    job = str(inference_job(tmp_path))
    results = run_processes(
        [(["dealer", job], GOOD), (["party", job, "--party", "bank"], GOOD), (["party", job, "--party", "clinic"], None)]
    )
    assert_refused(results, "clinic", "announced no credentials, but this process uses the job secret: it lacks the "
                   "job secret", "this process has no credentials, but its peers use the job secret: it needs the job secret")


def test_identity_keys_are_validated_by_name(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    spec = yaml.safe_load(Path(job).read_text())
    del spec["runtime"]["identity"]["public_keys"]["dealer"]
    with pytest.raises(ConfigError, match=r"job.yaml: runtime.identity.public_keys: no public key for dealer$"):
        load_job(write_job(tmp_path, spec))
    spec["runtime"]["identity"]["public_keys"]["dealer"] = "keys/missing.pub"
    with pytest.raises(ConfigError, match=r"runtime.identity.public_keys: dealer: cannot read public key file .*missing.pub"):
        load_job(write_job(tmp_path, spec))


def test_mpcfl_run_gives_each_process_its_key_from_key_dir(tmp_path: Path) -> None:
    job, keys = identity_job(tmp_path)
    assert "runtime.identity is set: pass --key-dir" in mpcfl("run", job, timeout=60).stderr
    done = mpcfl("run", job, "--key-dir", str(keys), timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.count("authenticated all 2 peers (an Ed25519 identity)") == 3
