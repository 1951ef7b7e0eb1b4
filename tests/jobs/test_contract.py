"""The provider registry, the task registry and the launcher's environment contract."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import DEMO, REPO, assert_no_leftovers, mpcfl
from mpcfl.errors import MpcflError
from mpcfl.jobs import registry
from mpcfl.jobs.schema import load_job
from mpcfl.launch.env import ENV_PARTY, ENV_PROVIDER, KEYS, from_env, script_session, to_env
from mpcfl.mpc import providers
from mpcfl.mpc.auth import Credentials


def test_providers_by_name() -> None:
    ttp, tfp = providers.get("ttp"), providers.get("tfp")
    assert (ttp.needs_dealer, ttp.crypten_name, ttp.insecure) == (True, "TTP", False)
    assert (tfp.needs_dealer, tfp.crypten_name, tfp.insecure) == (False, "TFP", True)
    assert ttp.processes(["a", "b"]) == ["a", "b", "dealer"] and tfp.processes(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"^unknown provider 'he' \(known: tfp, ttp\)$"):
        providers.get("he")


@pytest.mark.parametrize("provider", providers.NAMES)
def test_env_round_trip(monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    session = script_session(
        ("bank", "clinic"), rendezvous="file:///tmp/x/store", timeout_s=7.5, provider=provider, device="cpu",
        credentials=Credentials(secret=b"0123456789abcdef0123"),
    )
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    for process in session.process_names:
        env = to_env(session, process)
        assert set(env) <= set(KEYS)
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert from_env() == session
            assert os.environ.get(ENV_PARTY) == (None if process == providers.DEALER else process)
            assert os.environ["RANK"] == str(session.process_names.index(process))
            assert os.environ["WORLD_SIZE"] == "2"


def test_env_names_a_bad_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in to_env(script_session(("a", "b")), "a").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_PROVIDER, "he")
    with pytest.raises(MpcflError, match=r"^\$MPCFL_PROVIDER: unknown provider 'he' \(known: tfp, ttp\)$"):
        from_env()


def test_task_registry() -> None:
    job = load_job(DEMO)
    task = registry.task_of(job)
    assert task.name == job.task == "train"
    assert task.run_party().__name__ == "run_party"
    inference = load_job(REPO / "configs" / "digits_inference.yaml")
    with pytest.raises(MpcflError, match=r"--resume is for task: train, federated; this job is task: inference"):
        registry.task_of(inference).require(inference, registry.RESUME)


def test_resume_refused_for_a_task_without_it() -> None:
    done = mpcfl("party", str(REPO / "configs" / "digits_inference.yaml"), "--party", "bank", "--resume")
    assert done.returncode == 1
    assert done.stderr.strip().endswith("--resume is for task: train, federated; this job is task: inference")


def test_launch_with_provider_tfp_runs_without_a_dealer() -> None:
    script = str(REPO / "examples" / "secure_inference_party.py")
    done = mpcfl("launch", "--provider", "tfp", "--parties", "bank,clinic", script, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[clinic] clinic: 197 predictions" in done.stdout
    assert "[dealer]" not in done.stdout
    assert "INSECURE: provider tfp is on, so party bank generates every Beaver triple" in done.stdout
    assert_no_leftovers("secure_inference_party.py")


def test_launch_refuses_an_unknown_provider(tmp_path: Path) -> None:
    done = mpcfl("launch", "--provider", "he", "--parties", "a,b", str(tmp_path / "x.py"))
    assert done.returncode == 2 and "invalid choice: 'he'" in done.stderr


def test_the_dealers_name_is_reserved_for_party_scripts(tmp_path: Path) -> None:
    with pytest.raises(MpcflError, match="party name 'dealer' is reserved for the triple dealer's process"):
        script_session(("dealer", "b"))
    done = mpcfl("launch", "--parties", "dealer,b", str(tmp_path / "x.py"))
    assert done.returncode == 1 and "'dealer' is reserved" in done.stderr.strip().splitlines()[-1]
