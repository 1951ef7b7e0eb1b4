"""The benchmark suite still runs: W1 on tiny sizes, in real processes, under the TTP dealer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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


def test_suite_w2_profiles_every_way_per_batch(tmp_path: Path) -> None:
    # W2 on 4 inputs: raw CrypTen in its own launch, raw+patches and mpcfl in one; --profile on all three.
    out = tmp_path / "w2.json"
    command = [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--workloads", "w2", "--providers", "ttp",
               "--batch", "4", "--quick", "--profile", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "W2 profile, ms per batch per party" in done.stdout
    w2 = json.loads(out.read_text())["w2"]["ttp"]
    for way in ("raw", "raw+patches", "mpcfl"):
        assert w2[way]["max_error"] < 1e-3, way
        assert len(w2[way]["profile"]) == 2, way
        for part in w2[way]["profile"]:
            assert part["total_s"] > 0 and part["dealer_s"] >= 0 and part["comm_s"] >= 0, way
            assert part["dealer_s"] + part["comm_s"] <= part["total_s"] + 1e-6, way  # parts of the batch, not more
            assert part["provider_requests"] > 0, way  # the MLP's products and ReLUs ask for triples
    # The first batch of each shape records its requests and later ones prefetch them: with --quick there is
    # one timed batch after the warm-up, so mpcfl's dealer share of it is a small part of raw CrypTen's.
    assert w2["mpcfl"]["profile"][0]["dealer_s"] < w2["raw"]["profile"][0]["dealer_s"]


def _scaling() -> Any:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scaling

    return scaling


def test_scaling_sweeps_each_axis_from_the_base_point() -> None:
    scaling = _scaling()
    args = scaling.parse(["--rows", "256", "512", "--features", "8", "16", "--parties", "2", "3", "4"])
    assert args.repeats == 3 and args.point_timeout == 900
    points = scaling.plan(args.sweep)
    assert points == [{"rows": 256, "features": 8, "parties": 2}, {"rows": 512, "features": 8, "parties": 2},
                      {"rows": 256, "features": 16, "parties": 2}, {"rows": 256, "features": 8, "parties": 3},
                      {"rows": 256, "features": 8, "parties": 4}]
    full = scaling.parse([])
    assert full.sweep == {"rows": [4096, 8192, 16384, 32768, 65536], "features": [32, 64, 128, 256, 512],
                          "parties": [2, 3, 4, 5]}
    assert scaling.parse(["--quick"]).repeats == 1
    for bad in (["--parties", "1"], ["--features", "4", "--parties", "2", "5"]):
        with pytest.raises(SystemExit):
            scaling.parse(bad)


def test_scaling_survives_a_point_that_times_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A point past its timeout is killed with its process group and recorded; the sweep still writes its files."""
    from conftest import live_processes

    out = tmp_path / "sweep"
    code = _scaling().main(["--out", str(out), "--rows", "256", "--features", "32", "--parties", "2", "--point-timeout", "1"])
    assert code == 1  # every point failed
    results = json.loads((out / "scaling.json").read_text())
    assert [p["result"] for p in results["points"]] == [{"error": "timed out after 1 s"}]
    assert "| 256 | 32 | 2 | - | failed: timed out after 1 s |" in (out / "scaling.md").read_text()
    assert f"wrote {out / 'scaling.json'}" in capsys.readouterr().out
    assert live_processes(str(out)) == []


def test_scaling_report_table_and_curves(tmp_path: Path) -> None:
    scaling = _scaling()
    sweep = {"rows": [256, 512], "features": [8], "parties": [2, 3]}

    def row(seconds: float, parties: int) -> dict[str, Any]:
        per_party = [{"bytes_per_iter": 1e6 * (i + 1), "rounds_per_iter": 20 + i, "maxrss_mb": 300 + i}
                     for i in range(parties)]
        return {"seconds": seconds, "per_party": per_party, "accuracy": 0.97}

    points = []
    for point in scaling.plan(sweep):
        ours, raw = row(0.1 * point["rows"] / 256, point["parties"]), row(0.2, point["parties"])
        point["result"] = {"plaintext": {"accuracy": 0.975}, "raw": raw, "mpcfl": ours,
                           "ratios": {"mpcfl/raw": ours["seconds"] / raw["seconds"]}}
        points.append(point)
    points.append({"rows": 256, "features": 8, "parties": 4, "result": {"error": "exit 1: boom"}})
    text = scaling.table(points)
    assert "| 512 | 8 | 2 | mpcfl | 0.2 | 1.00 / 2.00 | 20 / 21 | 300 / 301 | 97.00% (97.50%) | 1.00 |" in text
    assert "| 256 | 8 | 3 | raw | 0.2 | 1.00 / 2.00 / 3.00 |" in text and "failed: exit 1: boom" in text
    pictures = scaling.plot(points, sweep, tmp_path)
    assert [p.name for p in pictures] == ["scaling-rows.png", "scaling-features.png", "scaling-parties.png"]
    assert all(p.stat().st_size > 10_000 for p in pictures)


def _transformer_shapes() -> Any:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import transformer_shapes

    return transformer_shapes


def test_transformer_shapes_runs_every_way_and_the_decoder_on_a_tiny_model(tmp_path: Path) -> None:
    """One BERT-shaped point (1 layer, width 32, 6 tokens), served too, and 2 decoder steps each way, in real processes under TTP."""
    out = tmp_path / "tf.json"
    command = [sys.executable, str(REPO / "benchmarks" / "transformer_shapes.py"), "--sizes", "1x32", "--lengths", "6",
               "--vocab", "40", "--repeats", "2", "--no-warm-up", "--serve", "2", "--gpt", "--gpt-shape", "1", "32",
               "--gpt-vocab", "40", "--prompt", "3", "--generate", "2", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    [point] = results["points"]
    assert (point["layers"], point["width"], point["length"]) == (1, 32, 6)
    served = {f"{mode}{way}" for mode in ("exact", "mpc_friendly")
              for way in (", 2 batches per call", ", 2 batches per call, no mask reuse", ", served (weights fixed once)")}
    raw_served = _transformer_shapes().RAW_SERVED
    assert set(point["ways"]) == {"exact", "mpc_friendly", "raw CrypTen (by hand)", raw_served, *served}
    # CrypTen shares a tensor from pseudo-random zero shares: keeping the weights shared saves the
    # owner's encoding and generation, not bytes (each product still opens its weight's difference)
    assert point["ways"][raw_served]["bytes"] == point["ways"]["raw CrypTen (by hand)"]["bytes"]
    for mode in ("exact", "mpc_friendly"):
        ways = point["ways"]
        assert ways[f"{mode}, 2 batches per call"]["batches"] == 2 and ways[mode]["batches"] == 1
        # Weights opened once per call (or, served, once: the median of 2 calls, the first fixing them).
        assert ways[f"{mode}, 2 batches per call"]["bytes"] < ways[f"{mode}, 2 batches per call, no mask reuse"]["bytes"]
        assert ways[f"{mode}, served (weights fixed once)"]["bytes"] < ways[mode]["bytes"]
    assert point["onnx_error"] and "Identity" in point["onnx_error"]  # CrypTen's converter, recorded as the result
    for name, way in point["ways"].items():
        assert way["seconds"] > 0 and way["bytes"] > 0 and way["rounds"] > 0 and way["first_seconds"] > 0, name
        assert way["max_logit_diff"] < 0.05, name  # each against plaintext with its own operators
        assert len(way["peak_rss_mb"]) == 2 and min(way["peak_rss_mb"]) > 50, name
    # the MPC-friendly mode compares nothing in GELU and softmax: fewer bytes than exact
    assert point["ways"]["mpc_friendly"]["bytes"] < point["ways"]["exact"]["bytes"]
    gpt = results["gpt"]["ways"]
    assert list(gpt) == list(_transformer_shapes().GPT_WAYS)
    for name, way in gpt.items():
        assert way["seconds_per_token"] > 0 and way["rounds_per_token"] > 0, name
        assert way["largest_regret"] < 0.02, name  # each token plaintext's argmax, or within a near tie of it
    # Served, the weights are shared and opened once: far fewer bytes per token than a call per token,
    # and fewer again once fixed; the argmax under MPC costs rounds, not bytes, beside opening the logits.
    first, again = gpt["served: tokens only, first call"]["mb_per_token"], gpt["served: tokens only, again"]["mb_per_token"]
    assert again < first < gpt["one secure_predict per token"]["mb_per_token"], gpt
    # the key-value cache runs a token's one new position: fewer bytes than the whole prefix
    assert again < gpt["served: tokens only, no key-value cache, again"]["mb_per_token"], gpt
    assert "| one secure_predict per token |" in done.stdout
    assert "| 1x32 (1 x 32) | 6 | exact |" in done.stdout


def test_transformer_shapes_break_even_of_a_served_way() -> None:
    """A served way's one-time cost (first call less a later one) over what each call saves against a
    secure_predict call: 4 s once, 2 s saved a call, repaid after 2 calls; never when it saves nothing."""
    break_even = _transformer_shapes().break_even
    ways = {"exact": {"seconds": 3.0, "first_seconds": 6.0},
            "exact, served (weights fixed once)": {"seconds": 1.0, "first_seconds": 5.0},
            "mpc_friendly": {"seconds": 1.0, "first_seconds": 2.0},
            "mpc_friendly, served (weights fixed once)": {"seconds": 1.5, "first_seconds": 3.0}}
    assert break_even("exact, served (weights fixed once)", ways) == "2"
    assert break_even("exact", ways) == "-"
    assert break_even("mpc_friendly, served (weights fixed once)", ways) == "never"
    ways["exact, served (weights fixed once)"]["first_seconds"] = 5.5  # 4.5 s over 2 s a call: 3 calls
    assert break_even("exact, served (weights fixed once)", ways) == "3"


def test_transformer_shapes_plans_the_sweeps_and_draws_them(tmp_path: Path) -> None:
    shapes = _transformer_shapes()
    args = shapes.parse(["--sizes", "tiny", "--lengths", "32", "--sweep"])
    assert shapes.plan(args) == [("tiny", 32), ("tiny", 16), ("tiny", 64), ("tiny", 128), ("2x64", 32), ("2x256", 32)]
    assert shapes.shape_of("base") == (12, 768) and shapes.shape_of("3x96") == (3, 96)
    points = []
    for size, length in shapes.plan(args):
        layers, width = shapes.shape_of(size)
        ways = {way: {"seconds": length * width / 1e3 * (i + 1), "bytes": 1e6, "rounds": 100, "peak_rss_mb": [400, 410],
                      "max_logit_diff": 1e-3} for i, way in enumerate(shapes.WAYS)}
        points.append({"size": size, "layers": layers, "width": width, "length": length, "onnx_error": "ValueError: x", "vocab": 100,
                       "ways": ways})
    points.append({"size": "mini", "length": 128, "error": "exit 1; boom"})
    text = shapes.table(points)
    assert "| tiny (2 x 128) | 32 | exact | 4.10 | 1 | 100 | 400 / 410 | 0.001 | 3.00 |" in text
    assert "| mini | 128 | failed: exit 1; boom |" in text and "fails: `ValueError: x`" in text
    assert {line.count("|") for line in text.splitlines()} == {13}, text  # every row, short ones padded, 12 cells
    pictures = shapes.plot(points, tmp_path)
    assert [p.name for p in pictures] == ["transformer-length.png", "transformer-width.png"]
    assert all(p.stat().st_size > 10_000 for p in pictures)
