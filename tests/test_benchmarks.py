"""The benchmark suite still runs: W1 on tiny sizes, in real processes, under the TTP dealer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_suite_w1_runs_raw_crypten_and_mpcfl_and_reports_sane_figures(tmp_path: Path) -> None:
    # raw+patches is raw CrypTen's code in mpcfl's processes: no code of its own to keep from rotting.
    out = tmp_path / "w1.json"
    command = [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--workloads", "w1", "--providers", "ttp",
               "--rows", "256", "--quick", "--profile", "--ways", "raw", "mpcfl", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| W1 | mpcfl | ttp |" in done.stdout and "W1 profile" in done.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["cores"] >= 1 and results["machine"]["crypten"] == "0.4.1"
    w1 = results["w1"]
    assert (w1["rows"], w1["features"], w1["parties"]) == (256, 32, 2)
    plain = w1["plaintext"]
    assert plain["accuracy"] > 0.9 and plain["seconds"] > 0
    for way in ("raw", "mpcfl"):
        row = w1["ttp"][way]
        assert 0 < row["seconds"] < 30, way
        assert abs(row["accuracy"] - plain["accuracy"]) <= 0.03, way
        assert row["max_weight_error"] < 0.05, way
        assert len(row["per_party"]) == 2
        for party in row["per_party"]:
            assert party["bytes_per_iter"] > 0 and party["rounds_per_iter"] > 0, way
            assert party["maxrss_mb"] >= party["maxrss_before_mb"] > 0, way
        assert row["network"]["WAN"] > row["network"]["LAN"] >= row["seconds"]
        for part in row["profile"]:
            assert part["dealer_s"] >= 0 and part["comm_s"] >= 0 and part["total_s"] > 0, way
    assert "raw+patches" not in w1["ttp"]
    assert set(w1["ttp"]["ratios"]) == {"mpcfl/raw", "mpcfl/plaintext"}
