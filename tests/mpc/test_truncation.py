"""Exact truncation through the dealer (runtime.truncation): unsigned division of ring elements,
the dealer's truncation pairs and their refusals, and division in real 2- and 3-party sessions."""

from __future__ import annotations

import json
import random
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import DEMO, party_lines, spy_views, write_job
from mpcfl.jobs.schema import load_job
from mpcfl.jobs.session import session_of
from mpcfl.errors import MpcflError
from mpcfl.jobs.schema.common import RuntimeSpec
from mpcfl.mpc import truncation
from mpcfl.mpc.prng import SecureGenerator, new_key
from mpcfl.mpc.providers.ttp import answer_size
from mpcfl.mpc.providers.ttp.requests import DealerRequestRefused, Requests

RING = 1 << 64
EDGES = [0, 1, 2, 3, -1, -2, (1 << 63) - 1, -(1 << 63), 1 << 62, -(1 << 62), (1 << 62) - 1, 1 << 32, -(1 << 32)]
DIVISORS = [2, 3, 7, 1 << 16, (1 << 16) + 1, (1 << 32) + 1, (1 << 62) - 1, 1 << 62]


@pytest.mark.parametrize("divisor", DIVISORS)
def test_unsigned_floordiv_is_exact_over_the_whole_ring(divisor: int) -> None:
    rng = random.Random(divisor)
    values = EDGES + [rng.randrange(-(1 << 63), 1 << 63) for _ in range(5000)]
    got = truncation.unsigned_floordiv(torch.tensor(values, dtype=torch.long), divisor).tolist()
    assert got == [(v % RING) // divisor for v in values]


@pytest.mark.parametrize("divisor", [1, 0, -2, (1 << 62) + 1])
def test_unsigned_floordiv_refuses_divisors_outside_its_range(divisor: int) -> None:
    with pytest.raises(ValueError, match="divisor must be in"):
        truncation.unsigned_floordiv(torch.zeros(3, dtype=torch.long), divisor)


def _request(*args: object, **kwargs: object) -> dict:
    return {"function": "truncation", "device": None, "args": args, "kwargs": kwargs}


def test_an_empty_tensor_is_left_to_crypten_s_own_division() -> None:
    # The dealer refuses a zero-size request as malformed; an empty tensor never asks (nor needs a session).
    truncation.set_mode("dealer")
    try:
        assert not truncation.applies(SimpleNamespace(share=torch.empty(0, 3, dtype=torch.long)), 1 << 16)
    finally:
        truncation.set_mode("auto")


@pytest.mark.parametrize("parties", [2, 3])
@pytest.mark.parametrize("divisor", [2, 3, 1 << 16, 1 << 62])
def test_the_dealer_deals_a_truncation_pair(parties: int, divisor: int) -> None:
    # Party 0's answer plus the other parties' stream draws (in their order: r, then floor(r/d),
    # then the top bit) are shares of floor(r / d) and msb(r) for the r all parties draw.
    keys = [new_key() for _ in range(parties)]
    dealer = Requests([SecureGenerator(k) for k in keys])
    streams = [SecureGenerator(k) for k in keys]
    size = (64, 5)
    handler, args, kwargs = dealer._check(_request(size, divisor))
    answer = handler(*args, **kwargs)
    assert answer.shape == answer_size("truncation", (size, divisor), {}) == (2, *size)
    r = [stream.ring(size) for stream in streams]
    quotient, top = answer[0].clone(), answer[1].clone()
    for stream in streams[1:]:
        quotient += stream.ring(size)
        top += stream.ring(size)
    whole = [sum(int(t.flatten()[i]) for t in r) % RING for i in range(r[0].numel())]
    assert quotient.flatten().tolist() == [u // divisor for u in whole]
    assert top.flatten().tolist() == [u >> 63 for u in whole]


@pytest.mark.parametrize(
    "message",
    [
        _request((4,), 1),
        _request((4,), (1 << 62) + 1),
        _request((4,), 2.0),
        _request((4,), True),
        _request((4,)),
        _request((4,), 2, 3),
        _request((4,), 2, extra=1),
        _request((0,), 2),
        _request((1 << 28,), 2),  # its answer is twice that
        _request("4", 2),
    ],
)
def test_the_dealer_refuses_a_truncation_request_outside_its_table(message: dict, caplog: pytest.LogCaptureFixture) -> None:
    dealer = Requests([SecureGenerator(), SecureGenerator()])
    with pytest.raises(DealerRequestRefused, match="request 'truncation'"):
        dealer._check(message)
    assert "refused" in caplog.text


def test_modes_are_the_job_s_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    assert typing.get_args(RuntimeSpec.model_fields["truncation"].annotation) == truncation.MODES
    assert RuntimeSpec().truncation == "auto"
    with pytest.raises(ValueError, match="truncation: dealer needs the dealer process; provider tfp has none"):
        RuntimeSpec(provider="tfp", truncation="dealer")
    assert RuntimeSpec(provider="tfp", truncation="local").truncation == "local"
    # A job's processes divide as its runtime.truncation says (mpcfl.mpc.session._configure sets it),
    # and every party's copy of the job must say the same.
    spec = yaml.safe_load(DEMO.read_text())
    spec["runtime"] = spec.get("runtime") or {}
    spec["runtime"]["truncation"] = "dealer"
    path = write_job(tmp_path, spec)
    job = load_job(path)
    assert session_of(job).truncation == "dealer" and job.fingerprint() != load_job(DEMO).fingerprint()
    with pytest.raises(MpcflError, match="truncation mode 'exact'"):
        truncation.set_mode("exact")
    assert truncation.mode() == "auto"


@pytest.mark.parametrize("parties", [2, 3])
def test_dealer_truncation_is_exact_where_local_division_wraps(parties: int, spied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND"):  # crypten_single's, if it ran first
        monkeypatch.delenv(key, raising=False)
    for rank, line in party_lines("truncation_party.py", parties, "truncation party").items():
        report = json.loads(line)
        # Values up to 2^62 in magnitude: crypten's own division (2 parties: each share divided
        # alone; 3: the wrap of x + r ignored) is wrong by about 2^48 on about 1 entry in 8.
        assert report["local"]["wrong"] > 10 and report["local"]["worst"] > 1 << 40, report
        assert report["dealer"] == report["dealer"] | {"wrong": 0} and report["dealer"]["worst"] <= 2, report
        # auto: the dealer with 3 parties or more, crypten's own with 2.
        assert (report["auto"]["wrong"] == 0) == (parties > 2), report
        assert report["product"] <= 2, report
        # One opening of x + r each (party 0 also asks the dealer: send, answer's size, answer);
        # dividing locally with two parties costs nothing.
        assert report["dealer"]["rounds"] == (4 if rank == "0" else 1), report
        assert report["local"]["rounds"] == (0 if parties == 2 else 4 if rank == "0" else 1), report
    # The dealer deals randomness only: nothing it received is a value divided or a party's share of one.
    views = spy_views(spied)
    dealer = views[str(parties)]["seen_protocol"]
    assert dealer.size > 0

    def large(values: np.ndarray) -> np.ndarray:
        return values[np.abs(values) >= 1 << 20]  # small words (the edges, sizes) would match by chance

    for rank in map(str, range(parties)):
        assert int(np.isin(dealer, large(views[rank]["own_share"])).sum()) == 0, f"the dealer holds party {rank}'s share"
    assert int(np.isin(dealer, large(views["0"]["own_plain"])).sum()) == 0, "the dealer holds values divided"
