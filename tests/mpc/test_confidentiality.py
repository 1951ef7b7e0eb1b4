"""An attacker's view: what a party that is not a receiver actually holds after a reveal.

Every process of these jobs runs with the recorder of ``tests/spy`` loaded, which
keeps every buffer that passed through torch.distributed in that process (in ring
units) and, at the receiver, the ring values it opened. Two checks per
non-receiver: it received nothing at all while an opening toward others was under
way (so no share and no partial sum reached it), and no opened value, to within
two ring units, sits in any of its buffers. The control phase of ``leak_party.py``
opens the same value with gloo's ring reduce, as CrypTen's
``get_plain_text(dst=)`` does, and both checks must catch it: that shows the
recorder can see a leak.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SCRIPTS, assert_no_leftovers, base_job, mpcfl, spy_views, vertical_parties, write_job

# Ring values below this magnitude can be public small integers (shapes, flags,
# counts); any opened value above it found in a buffer is a leak.
SMALLEST_TELLING = 1 << 12


def _leaked(view: dict[str, np.ndarray], opened: np.ndarray, phase: str) -> int:
    """How many of the opened ring values sit in this process's buffers of ``phase``."""
    telling = opened[np.abs(opened) >= SMALLEST_TELLING]
    near = np.unique(np.concatenate([telling + delta for delta in range(-2, 3)]))
    seen = view.get(f"seen_{phase}", np.empty(0, dtype=np.int64))
    return int(np.isin(seen, near).sum())


def _received_while_opening(view: dict[str, np.ndarray], phase: str) -> int:
    return int(view.get(f"received_{phase}", np.zeros(0, dtype=np.int64)).sum())


@pytest.mark.parametrize("parties", [2, 3, 4])
def test_a_reveal_to_one_party_reaches_no_other(parties: int, spied: Path) -> None:
    names = ",".join(f"p{i}" for i in range(parties))
    result = mpcfl("launch", "--timeout-s", "30", "--parties", names, str(SCRIPTS / "leak_party.py"), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "receiver: all values correct" in result.stdout
    views = spy_views(spied)
    receiver_rank = str(parties - 1)
    receiver = views[receiver_rank]
    opened = receiver["opened_protocol"]
    assert opened.size == 2 * 1000 + 32 * 4  # arithmetic, binary, predictions
    for rank in [*map(str, range(parties - 1)), str(parties)]:  # the other parties and the dealer
        assert _received_while_opening(views[rank], "protocol") == 0, f"rank {rank} received data during an opening"
        assert _leaked(views[rank], opened, "protocol") == 0, f"rank {rank} holds revealed values"
    assert _received_while_opening(receiver, "protocol") > 0
    for rank in map(str, range(parties - 1)):
        # gloo's ring reduce leaves about 1/n of the value with each non-receiver: the spy must see it.
        assert _received_while_opening(views[rank], "control") > 0
        caught = _leaked(views[rank], receiver["opened_control"], "control")
        assert caught >= 1000 // (parties + 1), f"the spy missed the ring reduce's leak at rank {rank}"
    # No other process, the dealer included, holds a party's share as it stood before an opening: with
    # 2 parties the receiver alone holds it (it is the opened value minus its own), with 3 or more
    # nobody (a fresh pairwise zero-sharing goes on first, or two colluders holding that share's
    # masks' keys could strip it), in an opening toward one party or toward every party.
    for rank in map(str, range(parties)):  # the opening toward every party reached every party
        assert views[rank].get("seen_everyone", np.empty(0)).size >= (parties - 1) * 1000, rank
    for phase in ("protocol", "everyone"):
        shares = {str(r): views[str(r)][f"own_{phase}"] for r in range(parties)}
        for rank in map(str, range(parties + 1)):
            if phase == "everyone" and parties == 2 or rank == receiver_rank and parties == 2:
                continue  # two parties: each learns the other's share from the sum anyway
            for owner, share in shares.items():
                if owner != rank:
                    held = int(np.isin(views[rank].get(f"seen_{phase}", np.empty(0, dtype=np.int64)), share).sum())
                    assert held == 0, f"rank {rank} holds {held} values of party {owner}'s share ({phase})"
    # The check sees a share that leaves its party as it stands: the control's openings without the
    # zero-sharing (what reveal did before it), toward the last party and toward every party, give
    # every other party party 0's share.
    for rank in map(str, range(1, parties)):
        assert int(np.isin(views[rank]["seen_control"], views["0"]["own_protocol"]).sum()) >= 1000, rank
    for rank, view in views.items():
        assert view["draws"].size == 0, f"rank {rank} drew from torch's generators inside crypten: {view['draws'][:3]}"
    assert_no_leftovers(str(SCRIPTS / "leak_party.py"))


def test_training_reveals_model_and_metrics_to_their_receiver_only(tmp_path: Path, spied: Path) -> None:
    groups = [["mean_radius", "mean_texture"], ["worst_radius", "worst_area"], ["mean_smoothness"]]
    parties = vertical_parties(tmp_path, groups, label_party=2)
    job = write_job(tmp_path, base_job(
        parties=parties, labels={"party": "p2", "column": "malignant"},
        outputs={"dir": str(tmp_path / "out"), "model_to": ["p2"], "metrics_to": ["p2"]},
    ))
    result = mpcfl("run", str(job), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    views = spy_views(spied)
    opened = views["2"]["opened_protocol"]
    weights = torch.load(tmp_path / "out" / "p2" / "latest" / "model.pt", weights_only=True)
    encoded = torch.cat([w.reshape(-1) for w in weights.values()]).double().mul(2**16).round().long().numpy()
    assert np.isin(encoded[np.abs(encoded) >= SMALLEST_TELLING], opened).all(), "the model was not opened to p2"
    for rank in ("0", "1", "3"):
        assert _received_while_opening(views[rank], "protocol") == 0, f"rank {rank} received data during an opening"
        assert _leaked(views[rank], opened, "protocol") == 0, f"rank {rank} holds values revealed to p2"
        assert views[rank]["draws"].size == 0
    for party in ("p0", "p1"):  # what the non-receivers wrote: no model, no loss or accuracy
        folder = tmp_path / "out" / party / "latest"
        assert not (folder / "model.pt").exists()
        written = json.loads((folder / "metrics.json").read_text())
        keys = {key for record in written["history"] for key in record}
        assert keys and not any("loss" in key or "accuracy" in key for key in keys), keys
    assert_no_leftovers(str(job))


def test_the_dealer_answers_no_request_the_other_parties_did_not_make(tmp_path: Path) -> None:
    # A deviating party 0 could otherwise read the other parties' next masks off the answers.
    # --debug: the launcher relays each process's own error line, not only its one-line blame.
    result = mpcfl("--debug", "launch", "--timeout-s", "20", "--parties", "p0,p1", str(SCRIPTS / "rogue_party.py"), timeout=120)
    assert result.returncode != 0
    assert "rogue: the dealer answered" not in result.stdout
    # The dealer's own report: the launcher's one-line blame may name party 0 instead, when its
    # lost-link error ends its process before the refusing dealer's exit is seen (both exit 1).
    assert "[dealer] mpcfl: error: dealer: party 0 sent request 'square' that party 1 did not make; refused" in result.stdout
    assert_no_leftovers(str(SCRIPTS / "rogue_party.py"))


def test_the_dealer_serves_no_batch_the_other_parties_did_not_announce() -> None:
    # Prefetching: party 0 asks for a batch other than the one party 1 announced (runtime.prefetch).
    script = str(SCRIPTS / "rogue_batch_party.py")
    result = mpcfl("--debug", "launch", "--timeout-s", "20", "--parties", "p0,p1", script, timeout=120)
    assert result.returncode != 0
    assert "rogue: the dealer answered" not in result.stdout
    assert "[dealer] mpcfl: error: dealer: party 0 sent request 'batch' (1 requests) that party 1 did not make; refused" in result.stdout
    assert_no_leftovers(script)
