"""Prefetched triples (runtime.prefetch): the same model, streams in step with the dealer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import SCRIPTS, assert_no_leftovers, base_job, mpcfl, vertical_parties, write_job

GROUPS = [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"], ["mean_smoothness"]]


def _train(tmp_path: Path, parties: int, prefetch: bool) -> tuple[dict[str, torch.Tensor], int]:
    folder = tmp_path / f"prefetch-{prefetch}"
    label = f"p{parties - 1}"
    spec = base_job(
        parties=vertical_parties(folder, GROUPS[:parties], label_party=parties - 1),
        labels={"party": label, "column": "malignant"},
        outputs={"dir": str(folder / "out"), "model_to": [label], "metrics_to": "none"},
        runtime={"timeout_s": 30, "prefetch": prefetch},
    )
    job = write_job(folder, spec)
    result = mpcfl("run", str(job), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_leftovers(str(job))
    served = re.search(r"ended the session after (\d+) requests", result.stdout + result.stderr)
    assert served, (result.stdout + result.stderr)[-2000:]
    return torch.load(folder / "out" / label / "latest" / "model.pt", weights_only=True), int(served.group(1))


@pytest.mark.parametrize("parties", [3])  # 2 parties train with prefetch in every other training test
def test_training_with_prefetch_gives_the_model_trained_without(tmp_path: Path, parties: int) -> None:
    # 2 epochs of 64-row batches over 455 rows: two step shapes (64 and 7 rows), each recorded once.
    with_prefetch, requests_with = _train(tmp_path, parties, True)
    without, requests_without = _train(tmp_path, parties, False)
    assert with_prefetch.keys() == without.keys()
    for name in without:
        assert torch.allclose(with_prefetch[name], without[name], atol=2e-3), (name, with_prefetch[name], without[name])
    assert requests_with < requests_without / 4, (requests_with, requests_without)


def _launch(script_name: str, names: str, marker: str) -> list[str]:
    """Runs a party script with ``names``; each party's line holding ``marker``, one per party."""
    script = str(SCRIPTS / script_name)
    result = mpcfl("launch", "--timeout-s", "30", "--parties", names, script, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_leftovers(script)
    lines = [line for line in result.stdout.splitlines() if marker in line]
    assert len(lines) == names.count(",") + 1, lines
    return lines


# 3+ parties (wraps requests, a stream per party): test_every_kind_of_prefetched_triple_holds_exactly.
@pytest.mark.parametrize("names", ["p0,p1"])
def test_units_that_match_deviate_or_fall_short_keep_every_stream_in_step(names: str) -> None:
    lines = _launch("prefetch_party.py", names, "prefetch party")
    assert all("ok=True" in line for line in lines), lines
    # 7 units: 2 recorded, 5 fetched; one deviates (the rest of its batch dropped), one falls short;
    # then an eighth, fetched, fails part-way and stops every later triple.
    assert all("'batches': 6, 'dropped':" in line and "'mismatches': 1" in line for line in lines), lines


@pytest.mark.parametrize("names", ["p0,p1,p2,p3"])  # 4 parties: one stream per party besides party 0's answers
def test_every_kind_of_prefetched_triple_holds_exactly(names: str) -> None:
    # The federated average once looked wrong with 5 parties under prefetch; the cause was CrypTen's
    # truncation (an error with probability |a b| / 2^32 per entry, prefetch on or off). This checks
    # the replay itself exactly: every triple from a batch, a drain or a live request after them.
    lines = _launch("prefetch_triples.py", names, "prefetch triples party")
    # 8 units: 2 recorded (the deviation drops its recording), 6 fetched; 8 items dropped (the
    # deviation's rest and the short unit's), 28 served; 51 triples checked in all.
    expected = "ok=True checks=51 stats={'batches': 6, 'dropped': 8, 'mismatches': 1, 'served': 28}"
    assert all(line.endswith(expected) for line in lines), lines


def test_segments_fetched_one_ahead_keep_every_stream_in_step() -> None:
    # prefetch_triples.py with each request a segment of its own, asked for as the one before it is first
    # used: the same 51 exact checks and 28 triples served; the deviating and the short unit draw and drop
    # only the one segment asked for ahead (2 items, where whole batches dropped 8); 30 segment requests.
    lines = _launch("prefetch_segments.py", "p0,p1,p2,p3", "prefetch triples party")
    expected = "ok=True checks=51 stats={'batches': 30, 'dropped': 2, 'mismatches': 1, 'served': 28}"
    assert all(line.endswith(expected) for line in lines), lines


def test_a_recording_goes_whole_if_it_fits_one_batch_else_in_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpcfl.mpc.providers.ttp import party
    from mpcfl.mpc.providers.ttp.requests import MAX_BATCH_ELEMENTS

    def item(rows: int) -> dict:  # a matmul triple: rows x 4 by 4 x 4, its answer rows x 4
        return {"function": "additive", "device": None, "args": ((rows, 4), (4, 4), "matmul"), "kwargs": {}}

    items = [item(1), item(2), item(3)]  # 24, 32 and 40 elements, operands and answers
    assert party._segments(items) == [items] and party._segments([]) is None
    monkeypatch.setattr(party, "_fits", lambda items: False)  # as if too large for one batch
    monkeypatch.setattr(party, "SEGMENT_ELEMENTS", 56)
    assert party._segments(items) == [[item(1), item(2)], [item(3)]]
    monkeypatch.setattr(party, "SEGMENT_ELEMENTS", 10)  # an item above a segment goes alone
    assert party._segments(items) == [[item(1)], [item(2)], [item(3)]]
    huge = {"function": "additive", "device": None, "args": ((MAX_BATCH_ELEMENTS, 1), (1, 1), "matmul"), "kwargs": {}}
    assert party._segments([item(1), huge]) is None  # one request larger than any batch: not prefetched


def test_a_batch_answer_must_end_in_its_digest(crypten_single: None) -> None:
    from types import SimpleNamespace

    from mpcfl.errors import MpcflError
    from mpcfl.mpc.providers.ttp import party

    done, digest = SimpleNamespace(wait=lambda: None), torch.tensor([5, -6, 7, -8])
    assert party._Segment(digest, torch.tensor([7, 8, 9, 5, -6, 7, -8]), done).answers().tolist() == [7, 8, 9]
    short = party._Segment(digest, torch.tensor([7, 8, 5, -6, 7, -8, 0]), done)  # a short message leaves zeros
    with pytest.raises(MpcflError, match="does not end in that batch's digest"):
        short.answers()
