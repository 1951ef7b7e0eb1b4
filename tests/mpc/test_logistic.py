"""CrypTen's sigmoid with its sign and exp in lockstep (:mod:`mpcfl.mpc.logistic`, :mod:`mpcfl.mpc.lockstep`):
the same function in 8 fewer rounds, and nothing of a party's share anywhere else.

Measured with ``tests/scripts/logistic_party.py`` (3,406 values, 2 parties, TTP, no prefetch): party 1
15 rounds against 23 for crypten 0.4.1's own (with mpcfl's packed comparison inside both), 1.84 MB
against 1.40 MB (exp(x) and exp(-x) are squared together), and the same largest error against torch
(0.00195-0.0026 over runs, for both: the truncations' randomness).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import SCRIPTS, assert_no_leftovers, assert_shares_stay_home, mpcfl, spy_views
from mpcfl.mpc import lockstep


def test_the_driver_runs_protocols_of_any_length_in_shared_rounds(crypten_single: None) -> None:
    # One party: every opening returns this party's own values, so the bookkeeping is what is tested:
    # each protocol gets back exactly its own values, in shape, round after round, and its result.
    seen: list[tuple[str, int, list[int]]] = []

    def protocol(name: str, kinds: list[str], size: int):  # noqa: ANN202
        total = 0
        for round_index, kind in enumerate(kinds):
            values = [torch.full((size,), round_index + 1), torch.arange(size * 2).view(2, size)]
            opened = yield values, kind
            assert [tuple(v.shape) for v in opened] == [(size,), (2, size)]
            assert all(torch.equal(o, v) for o, v in zip(opened, values))
            seen.append((name, round_index, [int(o.sum()) for o in opened]))
            total += int(opened[0].sum())
        return name, total

    results = lockstep.run([protocol("a", [lockstep.XOR, lockstep.SUM], 3),  # mixed rounds: one all_gather
                            protocol("b", [lockstep.SUM, lockstep.SUM, lockstep.XOR], 5),
                            protocol("c", [], 1)])  # opens nothing
    assert results == [("a", 3 + 6), ("b", 5 + 10 + 15), ("c", 0)]
    assert [(name, r) for name, r, _ in seen] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2)]


def test_two_parties_get_crypten_s_sigmoid_in_fewer_rounds_and_see_no_share(spied: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND"):  # crypten_single's, if it ran first
        monkeypatch.delenv(key, raising=False)
    script = str(SCRIPTS / "logistic_party.py")
    result = mpcfl("launch", "--timeout-s", "30", "--parties", "p0,p1", script, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_leftovers(script)
    lines = dict(re.findall(r"logistic party (\d): (.*)", result.stdout))
    assert sorted(lines) == ["0", "1"], result.stdout[-2000:]
    for rank, line in lines.items():
        figures = dict(re.findall(r"(\w+)=([\d.,]+)", line))
        ours, theirs = float(figures["ours_error"]), float(figures["theirs_error"])
        assert ours <= 0.003 and ours <= theirs + 1e-3, line  # crypten's own: 0.00195-0.0026 over runs, |x| <= 400
        assert float(figures["grad_error"]) < 0.002 and float(figures["tanh_error"]) < 0.005, line
        assert "empty=(0, 3)" in line, line
        ours_rounds, theirs_rounds = (int(v) for v in figures["rounds"].split(","))
        # Past CHUNK elements crypten's own runs: correct, its comparison in 4 pieces (3 more of 7 ANDs each)
        # and the rest after it (in lockstep the pieces' 29 rounds would carry the squarings: 37, not 44).
        assert float(figures["big_error"]) <= 0.003, line
        if rank == "1":  # party 0's count includes its dealer round trips
            assert int(figures["big_rounds"]) == theirs_rounds + 3 * 7, line
            assert ours_rounds == theirs_rounds - 8, line  # the exp's 8 squarings ride on the sign's 8 rounds
        ours_bytes, theirs_bytes = (int(v) for v in figures["bytes"].split(","))
        assert ours_bytes <= 1.4 * theirs_bytes, line  # exp(x) and exp(-x) squared together
    assert_shares_stay_home(spy_views(spied), 2)


def _openings_and_masks(x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[torch.Tensor], list[tuple[torch.Tensor, str]]]]:
    """Each round of the sigmoid's lockstep protocols (sign, then exp's squarings) on ``x``, one party:
    what it opens, and the dealer masks it drew for that round (AND's a and b, square's r, B2A's r_binary)."""
    from mpcfl.mpc import comparison, logistic
    from mpcfl.mpc.engine import import_crypten

    crypten = import_crypten()
    provider = crypten.mpc.provider.TrustedFirstParty()  # one party: triples drawn here, fresh each call
    drawn: list[tuple[torch.Tensor, str]] = []

    class Recorder:
        def generate_binary_triple(self, *args: object, **kwargs: object) -> tuple:
            a, b, c = provider.generate_binary_triple(*args, **kwargs)
            drawn.extend([(a.share, lockstep.XOR), (b.share, lockstep.XOR)])
            return a, b, c

        def square(self, *args: object, **kwargs: object) -> tuple:
            r, r2 = provider.square(*args, **kwargs)
            drawn.append((r.share, lockstep.SUM))
            return r, r2

        def B2A_rng(self, *args: object, **kwargs: object) -> tuple:  # noqa: N802 (crypten's name)
            r_arithmetic, r_binary = provider.B2A_rng(*args, **kwargs)
            drawn.append((lockstep.pack_bits(r_binary.share & 1), lockstep.XOR))  # its low bits mask, packed
            return r_arithmetic, r_binary

    rounds: list[tuple[list[torch.Tensor], list[tuple[torch.Tensor, str]]]] = []
    original = lockstep._open

    def recording_open(steps: list[lockstep.Step]) -> list[list[torch.Tensor]]:
        rounds.append(([share.clone() for shares, _ in steps for share in shares], list(drawn)))
        drawn.clear()
        return original(steps)

    def sign(flat: torch.Tensor):  # noqa: ANN202  # as less_than_zero_steps for party 0 of 2, on one process
        plane = yield from comparison.sign_bit_share(flat, 0, 2)
        return (yield from lockstep.bits_to_arithmetic(plane, flat.numel()))

    with monkeypatch.context() as patch:
        patch.setattr(crypten.mpc, "get_default_provider", lambda: Recorder())
        patch.setattr(lockstep, "_open", recording_open)
        secret = crypten.cryptensor(x)
        base = crypten.stack([secret.neg(), secret]).div(2**8) + 1
        lockstep.run([sign(secret._tensor.share.reshape(-1)), logistic._powers(base, 8)])
    return rounds


def test_every_opened_value_is_masked_by_its_own_fresh_dealer_value(crypten_single: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # One party holds the whole value, so every unmasked value is the same in two runs on the same x while
    # the masks differ: each opening must be exactly one fresh mask over such a value, in the order drawn,
    # and nothing else (an extra share, an unmasked value, a mask used twice) is opened.
    # 80 elements: the B2A opening is one masked bit per element, so two runs' openings coincide with
    # probability 2^-80 (with 5 elements it was 1/32, and CI met it)
    x = torch.tensor([-3.5, 0.0, 2.25, 40.0, -40.0]).repeat(16)
    first, second = _openings_and_masks(x, monkeypatch), _openings_and_masks(x, monkeypatch)
    assert len(first) == len(second) == 8  # 7 ANDs then the B2A, the 8 squarings alongside
    for (opened, masks), (opened_again, masks_again) in zip(first, second):
        assert len(opened) == len(masks) == len(opened_again) == len(masks_again)
        for value, (mask, kind), value_again, (mask_again, _) in zip(opened, masks, opened_again, masks_again):
            unmask = (lambda v, m: v ^ m) if kind == lockstep.XOR else (lambda v, m: v + m)
            assert torch.equal(unmask(value, mask), unmask(value_again, mask_again))
            assert not torch.equal(value, value_again)
