"""Vertical jobs keyed by ID: private set intersection lines up the rows, and no ID outside it travels.

The process tests run real parties with the recorder of ``tests/spy`` loaded: it
keeps every buffer that crossed torch.distributed in every process, the dealer
included, so the check is on what each process actually held, not on what the
protocol means to send.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_no_leftovers, base_job, mpcfl, spy_views, wdbc, write_csv, write_job
from mpcfl.data.files import DataError, load_table
from mpcfl.data.party import load_party_data
from mpcfl.data.psi import align_plainly, job_salt, salted
from mpcfl.errors import ConfigError
from mpcfl.jobs.schema import TrainJob, load_job
from mpcfl.mpc.wire import to_words
from mpcfl.tasks.train.baseline import train_plaintext

GROUPS = [["mean_radius", "mean_texture", "mean_smoothness"], ["worst_radius", "worst_area"], ["mean_symmetry"]]
HUB = 1  # the label holder, not rank 0, so the chain and the spread run through a middle rank


def _people(seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """wdbc's 569 patients, each with a patient number, and a fixed train/test split by patient."""
    rng = np.random.default_rng(seed)
    ids = [f"PID-{v:07d}" for v in rng.choice(10_000_000, size=569, replace=False)]
    split = {pid: int(rng.random() < 0.2) for pid in ids}
    return ids, split


def _keyed_parties(folder: Path, groups: list[list[str]], *, hold: float, seed: int = 0) -> tuple[list[dict], list[set[str]]]:
    """Each party holds a random ``hold`` share of the patients, in its own order, keyed by ``pid``."""
    header, values = wdbc()
    ids, split = _people()
    rng = np.random.default_rng(seed + 1)
    parties, held = [], []
    for i, columns in enumerate(groups):
        cols = columns + (["malignant"] if i == HUB else [])
        index = [header.index(c) for c in cols]
        mine = [int(k) for k in rng.permutation(len(ids)) if rng.random() < hold]
        held.append({ids[k] for k in mine})
        files = {}
        for which, flag in (("train", 0), ("test", 1)):
            rows = [[ids[k], *values[k, index]] for k in mine if split[ids[k]] == flag]
            files[which] = str(write_csv(folder / f"p{i}_{which}.csv", ["pid", *cols], rows))
        parties.append({"name": f"p{i}", "data": files})
    return parties, held


def _job(folder: Path, parties: list[dict], **data: object) -> dict:
    return base_job(
        "psi-job", parties=parties, labels={"party": f"p{HUB}", "column": "malignant"},
        data={"standardize": True, **data},
        outputs={"dir": str(folder / "out"), "model_to": [f"p{HUB}"], "metrics_to": "all"},
    )


def _bytes_seen(view: dict[str, np.ndarray]) -> bytes:
    """Every buffer a process held, as the bytes that crossed the wire (int64 words, in order)."""
    return b"".join(view[key].astype(np.int64).tobytes() for key in view if key.startswith("seen_"))


def _forms(pid: str, salt: bytes) -> list[bytes]:
    """An ID as it could travel: raw, and hashed with the job's salt (hex, as PSI's input, or binary)."""
    digest = hmac.new(salt, pid.encode(), hashlib.sha256)
    return [pid.encode(), digest.hexdigest().encode(), digest.digest()]


def test_the_byte_search_sees_an_id_sent_as_words() -> None:
    # Control for the leak check below: an ID sent the way the job sends bytes is found.
    sent = b"header PID-0001234 trailer"
    words = to_words(sent + bytes(-len(sent) % 8)).numpy()
    assert b"PID-0001234" in _bytes_seen({"seen_protocol": words, "own_protocol": words[:0]})


def test_shuffled_overlapping_files_train_the_model_of_aligned_files_and_no_id_travels(
    tmp_path: Path, spied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed_dir = tmp_path / "keyed"
    parties, held = _keyed_parties(keyed_dir, GROUPS, hold=0.85)
    job_path = write_job(keyed_dir, _job(keyed_dir, parties, id_column="pid"))
    result = mpcfl("run", str(job_path), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    views = spy_views(spied)
    monkeypatch.delenv("MPCFL_SPY_DIR")

    # The intersection the parties found is the true one, and each reports what it dropped.
    job = load_job(job_path)
    ids, split = _people()
    common = set.intersection(*held)
    train_common = sum(1 for pid in common if split[pid] == 0)
    for i in range(3):
        report = _metrics(keyed_dir / "out" / f"p{i}" / "latest")["private_set_intersection"]
        own_train = sum(1 for pid in held[i] if split[pid] == 0)
        assert report["train"]["kept"] == train_common and report["train"]["rows"] == own_train
        assert report["train"]["dropped"] == own_train - train_common
        assert report["test"]["kept"] == len(common) - train_common
    ledger = _metrics(keyed_dir / "out" / f"p{HUB}" / "latest")["reveals"]
    psi_entries = [r for r in ledger if r["outside_dp"]]
    assert any(r["shape"] == [train_common] and r["to"] == [0, 1, 2] for r in psi_entries)
    assert any("shares with p0" in r["what"] and r["to"] == [HUB] for r in psi_entries), "the hub's chain step"

    # No process, the dealer included, held any ID in any form, nor wrote or logged one.
    salt = job_salt(job)
    everyone = set(ids)
    seen = {rank: _bytes_seen(view) for rank, view in views.items()}
    assert set(seen) >= {"0", "1", "2", "3"}
    for i in range(3):  # the recorder saw the PSI's messages (blinded points), not just training's
        received = sum(r["bytes_received"] for r in _metrics(keyed_dir / "out" / f"p{i}" / "latest")["private_set_intersection"].values())
        assert received > 33 * train_common and len(seen[str(i)]) > received
    for pid in everyone:
        for form in _forms(pid, salt):
            for rank, data in seen.items():
                assert form not in data, f"rank {rank} held patient {pid}"
    written = b"".join(p.read_bytes() for p in (keyed_dir / "out").rglob("*") if p.is_file())
    logs = (result.stdout + result.stderr).encode()
    for pid in everyone:
        assert pid.encode() not in written and pid.encode() not in logs, f"patient {pid} was written or logged"

    # Plain torch on the same people, aligned in the agreed order (align_plainly, by salted ID), from the same
    # initial weights and batch order, trains the same model: what a secure run on pre-aligned files trains
    # (test_partitions_and_models), without a second secure run.
    plain = train_plaintext(job)
    keyed = torch.load(keyed_dir / "out" / f"p{HUB}" / "latest" / "model.pt", weights_only=True)
    for name, value in plain.model.state_dict().items():
        gap = (keyed[name] - value).abs().max().item()
        assert gap < 2e-3, f"{name}: the keyed run and plaintext on aligned rows differ by {gap}"
    scores = {k: v for k, v in _metrics(keyed_dir / "out" / "p0" / "latest")["final"].items() if "loss" in k or "accuracy" in k}
    assert len(scores) == 4 and scores == pytest.approx({k: plain.history[-1][k] for k in scores}, abs=0.01)
    assert_no_leftovers(str(job_path))


def _metrics(folder: Path) -> dict:
    import json

    return json.loads((folder / "metrics.json").read_text())


def _two_party_files(folder: Path, ids_a: list[str], ids_b: list[str]) -> Path:
    rng = np.random.default_rng(3)
    a = write_csv(folder / "a.csv", ["pid", "x1"], [[pid, rng.normal()] for pid in ids_a])
    b = write_csv(folder / "b.csv", ["pid", "x2", "y"], [[pid, rng.normal(), int(rng.random() < 0.5)] for pid in ids_b])
    spec = base_job(
        "psi-errors", parties=[{"name": "a", "data": {"train": str(a)}}, {"name": "b", "data": {"train": str(b)}}],
        labels={"party": "b", "column": "y"}, data={"id_column": "pid"},
    )
    spec["outputs"]["dir"] = str(folder / "out")
    return write_job(folder, spec)


def test_a_repeated_id_stops_every_party_naming_party_file_column_and_rows(tmp_path: Path) -> None:
    ids = [f"P{i}" for i in range(40)]
    job = _two_party_files(tmp_path, ids[:6] + [ids[2]] + ids[7:], ids)
    result = mpcfl("run", str(job), timeout=120)
    assert result.returncode != 0
    assert f"party a: {tmp_path / 'a.csv'}: ID column 'pid': data rows 3 and 7 have the same ID" in result.stderr
    assert "P2" not in result.stderr, "the error names rows, not the ID itself"
    assert_no_leftovers(str(job))


def test_disjoint_ids_stop_the_job_with_an_empty_intersection(tmp_path: Path) -> None:
    job = _two_party_files(tmp_path, [f"A{i}" for i in range(30)], [f"B{i}" for i in range(30)])
    result = mpcfl("run", str(job), timeout=120)
    assert result.returncode != 0
    # Each party fails on its own file; the launcher reports the first to stop.
    assert any(
        f"party {party}: {tmp_path / party}.csv: no ID of column 'pid' is in every party's train file" in result.stderr
        for party in ("a", "b")
    ), result.stderr[-2000:]
    assert not (tmp_path / "out" / "b" / "latest" / "model.pt").exists()
    assert_no_leftovers(str(job))


def _plain_job(tmp_path: Path, ids_a: list[str], ids_b: list[str], **data: object) -> TrainJob:
    path = _two_party_files(tmp_path, ids_a, ids_b)
    job = load_job(path)
    if data:
        spec = job.model_dump(mode="json")
        spec["data"].update(data)
        job = TrainJob.model_validate({**spec, "source": path})
    return job


def test_an_intersection_below_the_minimum_is_refused(tmp_path: Path) -> None:
    job = _plain_job(tmp_path, [f"P{i}" for i in range(30)], [f"P{i}" for i in range(25, 60)], min_intersection=6)
    parts = [load_party_data(job, name) for name in job.party_names]
    with pytest.raises(DataError, match=r"party a: .*a\.csv: only 5 IDs of column 'pid' are in every party's train "
                                        r"file, fewer than data.min_intersection=6"):
        align_plainly(job, parts)


def test_plain_alignment_orders_rows_by_salted_id_at_every_party(tmp_path: Path) -> None:
    job = _plain_job(tmp_path, [f"P{i}" for i in range(30)], [f"P{i}" for i in reversed(range(10, 50))])
    parts = [load_party_data(job, name) for name in job.party_names]
    before = [dict(zip(p.train.ids, p.train.x.tolist())) for p in parts]
    align_plainly(job, parts)
    expected = sorted((f"P{i}" for i in range(10, 30)), key=lambda pid: salted([pid], job_salt(job))[0])
    for part, rows in zip(parts, before):
        assert part.train.x.tolist() == [rows[pid] for pid in expected]
        assert part.train.ids is None, "no ID outlives the alignment"
    assert parts[1].train.y.shape == (20,)


def test_the_salt_is_per_job(tmp_path: Path) -> None:
    one = _plain_job(tmp_path, ["P1"], ["P1"])
    spec = one.model_dump(mode="json")
    other = TrainJob.model_validate({**spec, "name": "another-job", "source": one.source})
    assert salted(["P1"], job_salt(one)) != salted(["P1"], job_salt(other))


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ([["P1", 1.0], ["", 2.0]], "ID column 'pid', data row 2: missing ID"),
        ([["P1", 1.0], ["P1", 2.0]], "ID column 'pid': data rows 1 and 2 have the same ID"),
    ],
)
def test_bad_ids_are_refused_by_row(tmp_path: Path, cells: list, message: str) -> None:
    path = write_csv(tmp_path / "t.csv", ["pid", "x"], cells)
    with pytest.raises(DataError, match=f"party a: {path}: {message}"):
        load_table(path, party="a", id_column="pid")


def test_ids_may_be_any_text_in_a_csv_and_whole_numbers_in_npy(tmp_path: Path) -> None:
    table = load_table(write_csv(tmp_path / "t.csv", ["x", "pid"], [[1.5, "a-1"], [2.5, "Zürich 7"]]), party="a", id_column="pid")
    assert table.ids == ["a-1", "Zürich 7"] and table.columns == ["x"] and table.values.tolist() == [[1.5], [2.5]]
    np.save(tmp_path / "t.npy", np.array([[17, 0.5], [4, 1.5]]))
    table = load_table(tmp_path / "t.npy", party="a", id_column="0")
    assert table.ids == ["17", "4"] and table.values.tolist() == [[0.5], [1.5]]
    np.save(tmp_path / "f.npy", np.array([[1.5, 0.5]]))
    with pytest.raises(DataError, match=r"ID column '0', data row 1: 1.5 is not a whole-number ID"):
        load_table(tmp_path / "f.npy", party="a", id_column="0")
    with pytest.raises(DataError, match=r"no ID column 'patient' \(data.id_column\)"):
        load_table(tmp_path / "t.csv", party="a", id_column="patient")


def test_ids_starting_with_a_hash_sign_stay_with_their_row_and_unicode_forms_match(tmp_path: Path) -> None:
    # numpy would read '#' as a comment and drop the row, shifting every later row to the wrong ID.
    path = write_csv(tmp_path / "t.csv", ["pid", "x"], [["P1", 1.0], ["#P2", 2.0], ["P3", 3.0], ["Jose\u0301", 4.0]])
    table = load_table(path, party="a", id_column="pid")
    assert table.ids == ["P1", "#P2", "P3", "Jos\u00e9"] and table.values[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    np.save(tmp_path / "big.npy", np.array([[2**60 + 1, 5]], dtype=np.int64))
    assert load_table(tmp_path / "big.npy", party="a", id_column="0").ids == [str(2**60 + 1)]


def test_more_ids_than_the_job_allows_are_refused_at_load(tmp_path: Path) -> None:
    job = _plain_job(tmp_path, [f"P{i}" for i in range(30)], [f"P{i}" for i in range(30)], max_ids=20)
    with pytest.raises(DataError, match=r"party a: .*a\.csv: 30 IDs in column 'pid', beyond data.max_ids=20"):
        load_party_data(job, "a")


def test_a_peer_must_announce_a_size_within_bounds_and_answer_with_an_exact_set() -> None:
    import private_set_intersection.python as psi

    from mpcfl.data.psi import check_answer, check_sizes

    check_sizes([0, 20], ["a", "b"], max_ids=20)
    for bad in (-1, 21):
        with pytest.raises(DataError, match=f"party b announces {bad} IDs, outside 0..20"):
            check_sizes([3, bad], ["a", "b"], max_ids=20)
    client, server = psi.client.CreateWithNewKey(True), psi.server.CreateWithNewKey(True)
    request = client.CreateRequest(["x", "y"])
    response = server.ProcessRequest(request)
    exact = server.CreateSetupMessage(0.0, 2, ["y", "z"], psi.DataStructure.RAW)
    check_answer(exact, response, asked=2, peer_ids=2, peer="b")
    assert client.GetIntersection(exact, response) == [1]
    filtered = server.CreateSetupMessage(0.01, 2, ["y", "z"], psi.DataStructure.GCS)
    with pytest.raises(DataError, match="party b's setup is not an exact set"):
        check_answer(filtered, response, asked=2, peer_ids=2, peer="b")
    with pytest.raises(DataError, match="party b's setup is not an exact set"):
        check_answer(exact, response, asked=2, peer_ids=1, peer="b")
    with pytest.raises(DataError, match="party b answered 2 points for 3"):
        check_answer(exact, response, asked=3, peer_ids=2, peer="b")


def test_the_intersection_is_in_the_privacy_ledger_as_outside_dp() -> None:
    from mpcfl.dp.budget import Budget
    from mpcfl.mpc.reveal import Disclosure, disclose

    budget = Budget.create(epsilon=1.0, delta=1e-5, accountant="rdp")
    with Disclosure(budget) as disclosure:
        disclose("the private set intersection of train IDs", shape=(30,), to=[0, 1])
    assert disclosure.ledger()[0]["outside_dp"] is True
    assert budget.ledger[-1] == {"what": "the private set intersection of train IDs", "outside_dp": True, "epsilon_after": 0.0}


def test_the_schema_refuses_ids_where_they_mean_nothing(tmp_path: Path) -> None:
    path = _two_party_files(tmp_path, ["P1"], ["P1"])
    spec = load_job(path).model_dump(mode="json")

    def refused(change: dict, message: str) -> None:
        bad = {**spec, **change}
        with pytest.raises(ConfigError, match=message):
            load_job(write_job(tmp_path, bad, name="bad.yaml"))

    refused({"partition": "horizontal", "labels": {"column": "y"}},
            "data.id_column: IDs line up the rows of a vertical job")
    parties = [dict(p) for p in spec["parties"]]
    parties[1] = {**parties[1], "data": {**parties[1]["data"], "id_column": "pid"}}
    refused({"data": {**spec["data"], "id_column": None}, "parties": parties},
            "parties.0.data.id_column: give every party an ID column, or none")
    refused({"labels": {"party": "b", "column": "pid"}}, "labels.column: 'pid' is b's ID column")
    parties[0] = {**parties[0], "data": {**parties[0]["data"], "id_column": "patient"}}
    job = load_job(write_job(tmp_path, {**spec, "parties": parties}, name="own.yaml"))
    assert job.id_column_of("a") == "patient" and job.id_column_of("b") == "pid" and job.keyed


def test_the_demo_hospitals_share_about_four_in_five_patients() -> None:
    from conftest import REPO

    job = load_job(REPO / "configs" / "breast_cancer_psi.yaml")
    parts = [load_party_data(job, name) for name in job.party_names]
    held = [len(p.train.ids) + len(p.test.ids) for p in parts]
    align_plainly(job, parts)
    kept = {which: len(getattr(parts[0], which).x) for which in ("train", "test")}
    assert kept == {"train": 300, "test": 79}
    assert all(0.75 < (kept["train"] + kept["test"]) / n < 0.85 for n in held), held
