"""Run integrity across runs, as an attacker and a new user tried it (issue 20), on real processes.

Each attack is run twice: against this build, where a check refuses it, and against a build that
skips that check (``tests/unchecked``), where the test's detector, working from what the attacker
holds, catches it. So each test shows it can fail.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (
    base_job, crash_after_epoch, horizontal_parties, mpcfl, run_dir, run_job, unchecked, vertical_parties, wdbc,
    write_csv, write_job,
)
from mpcfl import runs
from mpcfl.data.party import contents, load_party_data
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import load_job
from mpcfl.models.heads import head_of
from mpcfl.tasks.federated.aggregate import MAX_AVERAGED
from mpcfl.tasks.federated.local import Rows, initial_model, local_update
from mpcfl.tasks.federated.simulate import prepared_parties
from mpcfl.tasks.federated.strategies import strategy_of


def update_of(job: Any, rows: Rows, rank: int, *, weights: torch.Tensor, round_index: int) -> torch.Tensor:
    """A party's local update in plaintext, as its process computes it (its batch order depends on its rank)."""
    model, head, strategy = initial_model(job, rows.x.shape[1]), head_of(job.model), strategy_of(job.federated.strategy)
    return local_update(
        job, model, rows, head, strategy, weights=weights, round_index=round_index, rank=rank, clip=None,
        bound=MAX_AVERAGED, who="test",
    )[0]


def _train_job(folder: Path) -> Path:
    parties = vertical_parties(folder, [["mean_radius", "mean_texture", "mean_area"], ["worst_radius", "worst_area"]], label_party=1)
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["outputs"].update(dir=str(folder / "out"), model_to=["p0"])
    return write_job(folder, spec)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def test_reruns_keep_earlier_runs_and_a_stale_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _train_job(tmp_path)
    job = load_job(path)
    run_job(path)
    first = run_dir(path, "p0")
    kept = {p: _digests(job.party_root(p) / first.name) for p in job.party_names}
    # A second run, killed after its first epoch: a new folder; the first run's files untouched and still current.
    assert crash_after_epoch(path, 1) == 1
    second = run_dir(path, "p0")
    assert second.name > first.name
    for party in job.party_names:
        assert _digests(job.party_root(party) / first.name) == kept[party], "a rerun changed an earlier run's files"
        assert (job.party_root(party) / "latest").resolve().name == first.name
    assert not (second / "model.pt").exists()
    listing = mpcfl("runs", str(path)).stdout
    assert f"{first.name}  finished" in listing and f"{second.name}  interrupted" in listing, listing
    # p0 lost its peer: it marks its run failed, or stopped when the launcher's SIGTERM comes first, or, killed
    # while blocked in gloo past the launcher's grace, leaves it running with its process gone: interrupted.
    assert runs.status_of(json.loads((second / "run.json").read_text())) in ("failed", "stopped", "interrupted")

    # The attack: the first run's newer checkpoints put into the second run's folders, then a resume.
    for party in job.party_names:
        shutil.copy(job.party_root(party) / first.name / "checkpoints" / "epoch-0002.pt", job.party_root(party) / second.name / "checkpoints")
    done = mpcfl("run", str(path), "--resume", timeout=120)
    assert done.returncode == 1
    assert f"written by run {first.name}, not this run ({second.name}); refusing it" in done.stderr, done.stderr[-2000:]
    assert (job.party_root("p0") / "latest").resolve().name == first.name

    # Without the check, the resume "finishes" the second run with the first run's model.
    unchecked(monkeypatch, "run")
    done = mpcfl("run", str(path), "--resume", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    stale, fresh = _model(first), _model(second)
    assert all(torch.equal(stale[name], fresh[name]) for name in stale), "the detector missed the stale model"


def test_a_resume_refuses_a_finished_run_changed_inputs_and_a_reopening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two parties; after a finished run p1 deletes its newest round, keeps half its rows and resumes,
    to solve p0's row count and update from round 2 opened twice."""
    header, values = wdbc()
    features = [i for i, name in enumerate(header) if name != "malignant"]
    scaling = {header[i]: [float(values[:, i].mean()), float(values[:, i].std())] for i in features}
    spec = {
        "name": "replay", "task": "federated", "parties": horizontal_parties(tmp_path, 2),
        "labels": {"column": "malignant"}, "model": {"type": "logistic_regression"},
        "data": {"standardize": False, "scaling": scaling},
        "federated": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.5},
        "outputs": {"dir": str(tmp_path / "out")}, "runtime": {"timeout_s": 60},
    }
    path = write_job(tmp_path, spec)
    job = load_job(path)
    run_job(path)
    run_id = run_dir(path, "p0").name
    checkpoints = {p: job.party_root(p) / run_id / "checkpoints" for p in job.party_names}
    w1, w2 = (torch.load(checkpoints["p0"] / f"round-000{r}.pt", weights_only=True)["weights"] for r in (1, 2))
    parts = prepared_parties(job)
    rows = [Rows.of(part.train, head_of(job.model)) for part in parts]

    (checkpoints["p1"] / "round-0002.pt").unlink()
    train = Path(spec["parties"][1]["data"]["train"])
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[: 1 + (len(lines) - 1) // 2]) + "\n")
    resume = ("run", str(path), "--resume", run_id)
    refusals = {
        (): "a finished run is never resumed",
        ("finished",): f"party p1: its data.train in {path} differ from what it committed to when run {run_id} began",
        ("finished", "inputs"): "'round 2 average update' was already opened in this run with other inputs",
    }
    for skipped, message in refusals.items():
        unchecked(monkeypatch, *skipped)
        done = mpcfl(*resume, timeout=120)
        assert done.returncode == 1 and message in done.stderr, (skipped, done.stderr[-2000:])
    assert torch.equal(torch.load(checkpoints["p0"] / "round-0002.pt", weights_only=True)["weights"], w2)

    # With every check skipped, round 2 is opened again, and p1 solves p0's rows and update.
    unchecked(monkeypatch, "finished", "inputs", "journal")
    done = mpcfl(*resume, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    w2_again = torch.load(checkpoints["p0"] / "round-0002.pt", weights_only=True)["weights"]
    first, again = w2 - w1, w2_again - w1
    half = Rows.of(prepared_parties(job)[1].train, head_of(job.model))  # p1's rows now
    own = [update_of(job, r, 1, weights=w1, round_index=2) for r in (rows[1], half)]
    n1, n1_half = rows[1].x.shape[0], half.x.shape[0]
    # n0 (first - again) = n1 u1 - n1' u1' - n1 first + n1' again, in least squares
    lhs, rhs = first - again, n1 * own[0] - n1_half * own[1] - n1 * first + n1_half * again
    n0 = float(lhs @ rhs / (lhs @ lhs))
    u0 = (first * (n0 + n1) - n1 * own[0]) / n0
    truth = update_of(job, rows[0], 0, weights=w1, round_index=2)
    assert abs(n0 - rows[0].x.shape[0]) < 1.0, n0
    assert (u0 - truth).abs().max() < 1e-2, "the detector missed p0's update"


def test_min_parties_below_two_is_refused(tmp_path: Path) -> None:
    spec = {
        "name": "alone", "task": "federated", "parties": horizontal_parties(tmp_path, 2),
        "labels": {"column": "malignant"}, "model": {"type": "logistic_regression"},
        "federated": {"allow_dropouts": True, "min_parties": 1}, "outputs": {"dir": "out"},
    }
    with pytest.raises(ConfigError, match=r"federated\.min_parties: Input should be greater than or equal to 2"):
        load_job(write_job(tmp_path, spec))


def test_a_run_id_in_the_job_file_is_refused(tmp_path: Path) -> None:
    spec = base_job(parties=vertical_parties(tmp_path, [["mean_radius"], ["worst_area"]], label_party=1),
                    labels={"party": "p1", "column": "malignant"}, run_id="20261203-000000-000000000000")
    with pytest.raises(ConfigError, match="run_id: unknown key"):
        load_job(write_job(tmp_path, spec))


def test_journal_refuses_a_reopening_with_other_contributors_receivers_or_inputs(tmp_path: Path) -> None:
    journal = runs.Journal(tmp_path / runs.JOURNAL, check=False)
    opening = runs.Opening("round 2 average update", ("p0", "p1", "p2"), ("p0", "p1"), "abc")
    assert journal.conflict(opening) is None
    journal.record(opening)
    journal.record(opening)  # the same opening again: a recomputation, recorded once
    again = runs.Journal(tmp_path / runs.JOURNAL, check=True)  # as a resume reads it
    assert again.entries == [opening]
    assert again.conflict(opening) is None
    for changed, says in (
        (runs.Opening(opening.what, opening.to, ("p0", "p1", "p2"), "abc"), "contributors p0, p1 then, p0, p1, p2 now"),
        (runs.Opening(opening.what, ("p0",), opening.contributors, "abc"), "receivers p0, p1, p2 then, p0 now"),
        (runs.Opening(opening.what, opening.to, opening.contributors, "def"), "with other inputs"),
    ):
        assert says in (again.conflict(changed) or ""), changed
    assert again.conflict(runs.Opening("round 3 average update", ("p0",), ("p0", "p1", "p2"), "def")) is None


def test_commitments_cover_the_rows_as_loaded_and_hide_them(tmp_path: Path) -> None:
    parties = []
    for i, columns in enumerate((["pid", "mean_radius"], ["pid", "worst_area", "malignant"])):
        rows = [[f"id{r}", float(r), r % 2][: len(columns)] for r in range(20)]
        files = {split: str(write_csv(tmp_path / f"p{i}_{split}.csv", columns, rows[:n])) for split, n in (("train", 20), ("test", 5))}
        parties.append({"name": f"p{i}", "data": files})
    spec = base_job(parties=parties, labels={"party": "p1", "column": "malignant"})
    spec["data"] = {"standardize": True, "id_column": "pid"}
    job = load_job(write_job(tmp_path, spec))
    salt = b"s" * 32
    loaded = load_party_data(job, "p1")
    digests = runs.commit_contents(contents(loaded), salt)
    assert list(digests) == ["data.test", "data.train"]
    assert digests != runs.commit_contents(contents(loaded), b"t" * 32)  # salted: the same rows, another digest
    assert runs.commitment(salt, digests) != runs.commitment(b"t" * 32, digests)
    for change in ("value", "label", "id"):  # any change to what the run would use
        other = load_party_data(job, "p1")
        {"value": other.train.x, "label": other.train.y}.get(change, np.zeros(1))[:1] += 1
        if change == "id":
            other.train.ids[0] = "another"
        assert runs.commit_contents(contents(other), salt)["data.train"] != digests["data.train"], change


def test_run_ids_sort_by_time_and_only_finished_runs_become_latest(tmp_path: Path) -> None:
    ids = [runs.new_run_id() for _ in range(3)]
    assert len(set(ids)) == 3 and all(runs.is_run_id(i) for i in ids)
    for bad in ("../elsewhere", ids[0] + "\n"):
        with pytest.raises(Exception, match="is not a run id"):
            runs.check_run_id(bad, where="--resume")
    root = tmp_path / "p0"
    job = {"job": "a"}
    old, new = runs.start(root, "20261201-000000-aaaaaaaaaaaa", job), runs.start(root, "20261202-000000-bbbbbbbbbbbb", job)
    with pytest.raises(Exception, match="exists already"):
        runs.start(root, old.run_id, job)
    old.finish({"test_accuracy": 0.9})
    assert runs.latest(root, "a") == old.dir
    assert runs.newest_unfinished(root, "a") == new.run_id
    new.end(runs.FAILED, "p1 failed")
    assert runs.latest(root, "a") == old.dir and runs.Run(root, new.run_id).read()["error"] == "p1 failed"
    # Another job writing into the same folder keeps apart, and its run as latest is not this job's model.
    other = runs.start(root, "20261203-000000-cccccccccccc", {"job": "b"})
    assert runs.run_ids(root, "a") == [old.run_id, new.run_id] and runs.newest_unfinished(root, "b") == other.run_id
    other.finish({})
    with pytest.raises(Exception, match="the latest run here is one of job b, not of job a"):
        runs.latest(root, "a")
    # One process at a time holds a run: a second resume of a live run is refused.
    held = new.lock()
    with pytest.raises(Exception, match="is in use by another process"):
        new.lock()
    held.close()
    new.lock().close()
    new.write({**new.read(), "status": runs.RUNNING, "pid": 2**22 + 1})  # beyond pid_max: a process that is gone
    assert runs.status_of(new.read()) == "interrupted"
