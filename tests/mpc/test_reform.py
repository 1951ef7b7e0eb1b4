"""Re-forming a session after a lost process: the survivors agree on who is left, the first
proposal binds everyone, and what cannot go on says why, naming the lost process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mpcfl.errors import MpcflError, PeerFailure
from mpcfl.mpc.auth import Credentials
from mpcfl.mpc.session import Session, reformed


def _session(tmp_path: Path, rendezvous: str | None = None) -> Session:
    return Session(
        parties=("p0", "p1", "p2"), rendezvous=rendezvous or f"file://{tmp_path}/store", timeout_s=0.2,
        label="job t", credentials=Credentials(secret=b"k" * 32), fingerprint="f",
    )


def _mark(tmp_path: Path, epoch: int, *names: str) -> Path:
    folder = tmp_path / f"store.members.{epoch}"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"alive-{name}").touch()
    return folder


def test_the_survivors_form_a_session_of_those_alive_on_a_fresh_rendezvous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    _mark(tmp_path, 1, "p0", "dealer")  # p2 never comes
    new = reformed(_session(tmp_path), "p1", epoch=1, min_parties=2)
    assert new.parties == ("p0", "p1") and new.process_names == ["p0", "p1", "dealer"]
    assert new.rendezvous == f"file://{tmp_path}/store.1"
    assert (new.credentials, new.fingerprint) == (_session(tmp_path).credentials, "f")  # it authenticates as the first
    assert "RANK" not in os.environ  # the old session's rank no longer holds


def test_the_first_proposal_binds_a_late_survivor(tmp_path: Path) -> None:
    folder = _mark(tmp_path, 2, "p0", "dealer")
    (folder / "members").write_text(json.dumps(["p0", "p2", "dealer"]))
    with pytest.raises(MpcflError, match="^p1: job t: lost p1, and the others re-formed without this process"):
        reformed(_session(tmp_path), "p1", epoch=2, min_parties=2)


@pytest.mark.parametrize(
    ("alive", "error"),
    [
        (["p0", "p1", "p2"], "p0: job t: lost dealer: the triple dealer is gone"),
        (["p0", "dealer"], "p0: job t: lost p1, p2: 1 parties remain, below federated.min_parties=2"),
    ],
)
def test_no_session_without_the_dealer_or_enough_parties(tmp_path: Path, alive: list[str], error: str) -> None:
    _mark(tmp_path, 1, *alive)
    with pytest.raises(PeerFailure, match=f"^{error}"):
        reformed(_session(tmp_path), "p0", epoch=1, min_parties=2)


def test_only_a_file_rendezvous_outlives_a_lost_process(tmp_path: Path) -> None:
    with pytest.raises(PeerFailure, match="only over a file:// rendezvous .* not tcp://127.0.0.1:1"):
        reformed(_session(tmp_path, "tcp://127.0.0.1:1"), "p0", epoch=1, min_parties=2)


def test_a_lost_peer_is_one_line_without_gloos_own_text() -> None:
    """A new user's `mpcfl runs` printed gloo's source path, the peer's port and its "GLHF!" as the run's error."""
    from types import SimpleNamespace

    from mpcfl.mpc.session import _translate

    raw = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                       "[127.0.0.1]:33967: Connection reset by peer. This may indicate a possible application crash "
                       "on rank 0 or a network set up issue. GLHF! \U0001f3d6")
    error = _translate(raw, "party a", SimpleNamespace(label="job x", timeout_s=60.0))
    assert isinstance(error, PeerFailure)
    assert str(error) == ("party a: lost a peer of job x (it died, hung past timeout_s=60s, or the link was cut): "
                          "connection reset")
