"""Division by secret values over a wide range (:func:`mpcfl.mpc.division.inverse_power`): softmax's
denominator and LayerNorm's variance in the comparison's 8 rounds plus 7, where CrypTen's reciprocal
takes 38 and its inverse square root 17 over a far narrower range; and the products that share a
round (:func:`mpcfl.mpc.lockstep.products`) open nothing of a party's share.

Measured with ``tests/scripts/division_party.py`` (601 divisors from 6.3e-4 to 3.2e7, 2 parties, TTP,
no prefetch), party 1: 8 + 7 rounds for both powers; largest errors 7.5e-4 (t / v) and 3.5e-4
(t / sqrt(v)), relative to |t / v^power| + 0.03 (so that fixed point's unit, 1.5e-5, does not
dominate near 0), against the encoded values; 5.0e-5 and 3.1e-5 for divisors in [1/2, 2].
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import assert_shares_stay_home, party_lines, spy_views


def test_two_parties_divide_over_the_whole_range_in_fifteen_rounds_and_see_no_share(spied: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND"):  # crypten_single's, if it ran first
        monkeypatch.delenv(key, raising=False)
    for rank, line in party_lines("division_party.py", 2, "division party").items():
        figures = {k: float(v) for k, v in re.findall(r"([\w.]+)=([-\d.e+]+)", line)}
        assert figures["error_out1"] < 2e-3 and figures["error_times1"] < 2e-3, line
        assert figures["error_out0.5"] < 2e-3 and figures["error_times0.5"] < 2e-3, line
        assert figures["error_near1"] < 1e-4 and figures["error_near0.5"] < 1e-4, line
        assert figures["error_products"] < 1e-4, line
        if rank == "1":  # party 0's counts include its dealer round trips
            assert figures["rounds_1"] == figures["rounds_0.5"] == figures["compare"] + 7, line
            assert figures["rounds_near1"] == figures["rounds_near0.5"] == 5, line
            assert figures["rounds_products"] == 1, line
            assert figures["rounds_1"] < figures["rounds_crypten_reciprocal"], line
    assert_shares_stay_home(spy_views(spied), 2)
