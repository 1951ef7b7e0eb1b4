"""torchrun and Slurm's environment contracts: real processes, rank n is the dealer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, assert_no_leftovers, base_job, vertical_parties, write_job
from mpcfl.launch.local import free_port

WORKER = str(REPO / "launchers" / "worker.py")
SECRET = "s" * 32


def small_job(tmp_path: Path) -> Path:
    parties = vertical_parties(tmp_path, [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["outputs"]["model_to"] = ["p0"]
    return write_job(tmp_path, spec)


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "RENDEZVOUS", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MPCFL_JOB_SECRET": SECRET, **extra}


def test_torchrun(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", WORKER, str(job)],
        env=clean_env(), capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "out" / "p0" / "latest" / "model.pt").exists()
    assert json.loads((tmp_path / "out" / "p1" / "latest" / "metrics.json").read_text())["final"]["test_accuracy"] > 0.8
    assert_no_leftovers(str(job))


def test_slurm_environment(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, WORKER, str(job)],
            env=clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(3)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert "dealer finished" in outputs[2]
    assert (tmp_path / "out" / "p0" / "latest" / "model.pt").exists()


def test_world_size_must_count_the_dealer(tmp_path: Path) -> None:
    job = small_job(tmp_path)
    done = subprocess.run(
        [sys.executable, WORKER, str(job)],
        env=clean_env(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "gives a world of 2 processes, but job" in done.stderr and "needs 3: 2 parties plus the dealer" in done.stderr
    missing = subprocess.run([sys.executable, WORKER, str(job)], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "set RANK and WORLD_SIZE (torchrun) or SLURM_PROCID" in missing.stderr
