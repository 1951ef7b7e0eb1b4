"""Peer authentication on real processes: a wrong secret or another job's process is refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_no_leftovers, write_job
from mpcfl.auth import load_secret, tag
from mpcfl.errors import MpcflError
from mpcfl.launch import free_port

GOOD = "a" * 32


def inference_job(tmp_path: Path, name: str = "job.yaml", batch_size: int = 64) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "digits_inference.yaml").read_text())
    data = REPO / "examples" / "data" / "digits_inference"
    spec["model"]["weights"] = str(data / "bank_weights.pt")
    spec["inputs"]["file"] = str(data / "clinic_inputs.npy")
    spec["outputs"]["dir"] = str(tmp_path / "out")
    spec["batch_size"] = batch_size
    spec["runtime"]["timeout_s"] = 20
    return write_job(tmp_path, spec, name)


def run_processes(roles: list[tuple[list[str], str]]) -> list[subprocess.CompletedProcess]:
    """Starts `mpcfl ARGS` per role with its own secret, on one fresh rendezvous; waits for all."""
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RENDEZVOUS")}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mpcfl", *args, "--rendezvous", rendezvous],
            env={**env, "MPCFL_JOB_SECRET": secret}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for args, secret in roles
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=90)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


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
    assert (tmp_path / "out" / "clinic" / "predictions.npy").exists()


def test_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPCFL_JOB_SECRET", raising=False)
    assert load_secret(None) is None
    monkeypatch.setenv("MPCFL_JOB_SECRET", "short")
    with pytest.raises(MpcflError, match=r"\$MPCFL_JOB_SECRET: the job secret must be at least 16 bytes"):
        load_secret(None)
    path = tmp_path / "secret"
    path.write_text(GOOD + "\n")
    assert load_secret(path) == GOOD.encode()  # the file wins over the environment
    with pytest.raises(MpcflError, match="runtime.secret_file: cannot read"):
        load_secret(tmp_path / "missing")


def test_tags_bind_secret_nonces_rank_and_job() -> None:
    nonces = [b"x" * 32, b"y" * 32]
    base = tag(b"k" * 16, "job", nonces, 0)
    assert base == tag(b"k" * 16, "job", nonces, 0)
    assert base != tag(b"K" * 16, "job", nonces, 0)
    assert base != tag(b"k" * 16, "job", nonces[::-1], 0)
    assert base != tag(b"k" * 16, "job", nonces, 1)
    assert base != tag(b"k" * 16, "other", nonces, 0)
