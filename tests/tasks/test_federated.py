"""Federated training on real processes: the revealed average is the plaintext weighted average,
nothing else leaves MPC, a failed party stops the round by name (or sits out when dropouts are
allowed, and a killed one is left behind by the survivors), a killed run resumes from its round checkpoints, and DP rounds carry noise of the
declared scale and stop at the budget before revealing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import (
    crash_after_line, horizontal_parties, job_metrics, mpcfl, run_dir, run_job, spy_views, unchecked, wdbc, write_csv,
    write_job,
)
from mpcfl.data.party import apply_scaler, load_party_data
from mpcfl.dp.accountant import Charge, RdpAccountant
from mpcfl.jobs.schema import load_job
from mpcfl.models.heads import head_of
from mpcfl.mpc.division import divisor_scale
from mpcfl.tasks.federated.aggregate import MAX_AVERAGED, count_bound
from mpcfl.tasks.federated.local import Rows, flat, initial_model, local_update
from mpcfl.tasks.federated.simulate import plain_round, prepared_parties, simulate
from mpcfl.tasks.federated.strategies import strategy_of

SMALLEST_TELLING = 1 << 12  # ring values below this can be public small integers
STATS = ["column means for standardisation", "column mean deviations for standardisation",
         "column variances for standardisation"]


def fed_job(folder: Path, parties: list[dict[str, Any]], **federated: Any) -> Path:
    spec = {
        "name": "fed-test", "task": "federated", "parties": parties, "labels": {"column": "malignant"},
        "model": {"type": "logistic_regression"},
        "federated": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.1, **federated},
        "outputs": {"dir": str(folder / "out")}, "runtime": {"timeout_s": 60},
    }
    return write_job(folder, spec)


def round_weights(job: Any, party: str, rounds: list[int]) -> list[torch.Tensor]:
    folder = run_dir(job.source, party) / "checkpoints"  # the newest run's, finished or not
    return [torch.load(folder / f"round-{r:04d}.pt", weights_only=True)["weights"] for r in rounds]


def scaled_rows(job: Any, scaler: dict[str, Any] | None) -> list[Rows]:
    """Every party's training rows, scaled as the secure run scaled them (its revealed statistics)."""
    head = head_of(job.model)
    rows = []
    for name in job.party_names:
        part = load_party_data(job, name)
        if scaler is not None:
            apply_scaler(part, np.array(scaler["mean"]), np.array(scaler["std"]))
        rows.append(Rows.of(part.train, head))
    return rows


def within_fixed_point(job: Any, revealed: torch.Tensor, average: torch.Tensor, rows: int) -> bool:
    """Whether the secure average is the plaintext one within its documented error (mpcfl/tasks/federated/aggregate.py):
    n 2^-16 (s/N (1 + |avg|) + 1 + |avg| N/s) per entry, with a factor two in hand."""
    s = divisor_scale(count_bound(job.world_size, job.federated.max_rows))
    size = average.abs()
    bound = 2 * job.world_size * 2**-16 * (s / rows * (1 + size) + 1 + size * rows / s)
    return bool(((revealed - average).abs() <= bound).all())


def ring(values: torch.Tensor) -> np.ndarray:
    encoded = values.double().mul(2**16).round().long().numpy()
    return encoded[np.abs(encoded) >= SMALLEST_TELLING]


def held(view: dict[str, np.ndarray], values: np.ndarray) -> int:
    """How many of ``values`` (ring units, to within two) sit in the buffers a process handled."""
    near = np.unique(np.concatenate([values + delta for delta in range(-2, 3)]))
    return int(np.isin(view.get("seen_protocol", np.empty(0, dtype=np.int64)), near).sum())


def test_the_average_is_the_plaintext_weighted_average_and_nothing_else_leaves_mpc(tmp_path: Path, spied: Path) -> None:
    path = fed_job(tmp_path, horizontal_parties(tmp_path, 3), lr=0.5)  # updates well above public small integers
    run_job(path)
    job = load_job(path)
    # At the chokepoint: every party's ledger lists the same reveals, each to every party, and only
    # aggregates: the standardisation statistics and one average update per round.
    for party in job.party_names:
        reveals = job_metrics(path, party)["reveals"]
        assert [r["what"] for r in reveals] == [*STATS, "round 1 average update", "round 2 average update"]
        assert all(r["to"] == [0, 1, 2] for r in reveals)
    # runtime.prefetch: round 1 records the average's dealer requests, round 2 fetches them in one batch,
    # so party 0, which asks the dealer, waits on far fewer messages (the other parties draw theirs locally).
    history = job_metrics(path, "p0")["history"]
    assert [h["round"] for h in history] == [1, 2]
    assert history[1]["comm_rounds"] < history[0]["comm_rounds"] / 2, history
    scalers = [json.loads((job.party_root(p) / "latest" / "scaler.json").read_text()) for p in job.party_names]
    assert scalers[0] == scalers[1] == scalers[2]
    pooled = np.vstack([load_party_data(job, p).train.x for p in job.party_names])
    assert np.allclose(scalers[0]["mean"], pooled.mean(axis=0), rtol=1e-4, atol=1e-3)
    assert np.allclose(scalers[0]["std"], pooled.std(axis=0), rtol=1e-3, atol=1e-3)

    # Each round's revealed average (the change of the global weights, FedAvg with server_lr 1) equals the
    # plaintext row-weighted average of the same local updates, within fixed point's tolerance.
    head = head_of(job.model)
    rows = scaled_rows(job, scalers[0])
    model = initial_model(job, pooled.shape[1])
    strategy = strategy_of(job.federated.strategy)
    weights = [flat(model), *round_weights(job, "p0", [1, 2])]
    assert all(torch.equal(w, v) for w, v in zip(weights[1:], round_weights(job, "p2", [1, 2])))
    views = spy_views(spied)
    for r in (1, 2):
        average, live = plain_round(job, model, rows, head, strategy, weights=weights[r - 1], round_index=r)
        assert live == [0, 1, 2]
        revealed = weights[r] - weights[r - 1]
        assert within_fixed_point(job, revealed, average, pooled.shape[0]), (revealed - average).abs().max()
        # The recorder sees opened values: each party handled the opened average; the dealer did not.
        opened = ring(revealed)
        assert opened.size > 5
        for rank in ("0", "1", "2"):
            assert held(views[rank], opened) >= opened.size, f"rank {rank}: the spy missed the opened average"
        assert held(views["3"], opened) == 0, "the dealer holds the average"
        # No process other than its owner ever held a party's update, or its update times its rows.
        for owner, party_rows in enumerate(rows):
            update, _ = local_update(
                job, model, party_rows, head, strategy, weights=weights[r - 1], round_index=r, rank=owner,
                clip=None, bound=float("inf"), who="test",
            )
            secret = np.concatenate([ring(update), ring(update * party_rows.x.shape[0])])
            assert secret.size >= 30
            # A leak holds the whole vector, as the average above is held; a few entries can match
            # opened aggregates of the same magnitude (column means, averages) by chance.
            for rank in {"0", "1", "2", "3"} - {str(owner)}:
                found = held(views[rank], secret)
                assert found <= secret.size // 10, f"rank {rank} holds {found} values of party {owner}'s round {r} update"
    # The whole run matches the plaintext simulation (pooled statistics) and every party's model.
    plain = simulate(job)
    assert (plain.weights[-1] - weights[-1]).abs().max() < 5e-3
    for party in job.party_names:
        saved = torch.load(job.party_root(party) / "latest" / "model.pt", weights_only=True)
        assert torch.allclose(torch.cat([v.reshape(-1) for v in saved.values()]).double(), weights[-1], atol=1e-6)
        assert job_metrics(path, party)["final"]["test_accuracy"] > 0.85
        assert (run_dir(path, party) / "metrics.png").read_bytes()[:4] == b"\x89PNG"  # as training jobs draw it


def test_a_killed_party_fails_the_job_by_name_and_the_rounds_resume(tmp_path: Path) -> None:
    path = fed_job(tmp_path, horizontal_parties(tmp_path, 2), rounds=2, strategy={"name": "fedavgm", "momentum": 0.5})
    code, err, _ = crash_after_line(path, "[p1] INFO mpcfl.tasks.federated.runner: round round=1 ", "p1")
    assert code != 0
    assert "mpcfl: error: p1 failed: killed by signal 9" in err, err[-2000:]
    job = load_job(path)
    assert not (job.party_root("p0") / "latest" / "model.pt").exists()
    done = mpcfl("run", str(path), "--resume", timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "INFO mpcfl.tasks.federated.runner: resuming after round" in done.stdout
    assert [row["round"] for row in job_metrics(path, "p0")["history"]] == [1, 2]
    # The server momentum survived the crash: the resumed model is the plaintext simulation's.
    [final] = round_weights(job, "p0", [2])
    assert (simulate(job).weights[-1] - final).abs().max() < 5e-3


def test_the_survivors_of_a_killed_party_go_on_reweighted_and_no_resume_reopens_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header, values = wdbc()
    center, scale = values.mean(axis=0), values.std(axis=0)
    scaling = {name: [float(center[i]), float(scale[i])] for i, name in enumerate(header) if name != "malignant"}
    path = fed_job(tmp_path, horizontal_parties(tmp_path, 3), rounds=2, lr=0.5, allow_dropouts=True, min_parties=2, max_rows=200)
    raw = yaml.safe_load(path.read_text())
    # Public scaling (no statistics to average) and a short timeout (a survivor notices the loss within it) keep it short.
    raw.update(data={"standardize": False, "scaling": scaling}, runtime={"timeout_s": 8})
    path = write_job(tmp_path, raw)
    code, err, out = crash_after_line(path, "[p2] INFO mpcfl.tasks.federated.runner: round round=1 ", "p2")
    assert code == 0, err[-2000:] + out[-3000:]
    assert "mpcfl: warning: p2 died (killed by signal 9); the job goes on without it" in err, err[-2000:]
    # The survivors and the dealer met again, authenticated afresh, and named the one they lost.
    for name in ("p0", "p1", "dealer"):
        assert f"[{name}] INFO mpcfl.mpc.auth: authenticated all 2 peers" in out, out[-3000:]
        assert f"[{name}] WARNING mpcfl.mpc.session: job fed-test ({path}): lost p2; going on with p0, p1, dealer" in out
    job = load_job(path)
    assert not (job.party_root("p2") / "latest" / "model.pt").exists()
    for party in ("p0", "p1"):
        metrics = job_metrics(path, party)
        assert metrics["left"] == ["p2"]
        assert [row["parties"] for row in metrics["history"]] == [3, 2]
        # Round 2's average was never begun opening before the loss: each average is opened once.
        assert [r["what"] for r in metrics["reveals"]] == [f"round {r} average update" for r in (1, 2)]
    # Round 1 averages all three; round 2 the survivors' updates, re-weighted by their rows alone.
    rows, head = [Rows.of(part.train, head_of(job.model)) for part in prepared_parties(job)], head_of(job.model)
    model, strategy = initial_model(job, 30), strategy_of(job.federated.strategy)
    weights = [flat(model), *round_weights(job, "p2", [1]), *round_weights(job, "p0", [2])]
    assert torch.equal(weights[2], round_weights(job, "p1", [2])[0])
    for r, members in ((1, rows), (2, rows[:2])):
        average, live = plain_round(job, model, members, head, strategy, weights=weights[r - 1], round_index=r)
        assert live == list(range(len(members)))
        count = sum(m.x.shape[0] for m in members)
        assert within_fixed_point(job, weights[r] - weights[r - 1], average, count), r
    # The attack: resume the finished run so that p2 takes part, and round 2 is opened again with p2 in it.
    # p0 would then hold round 2's average with and without p2, and so p2's update.
    run_id = run_dir(path, "p0").name
    resume = ("run", str(path), "--resume", run_id)
    done = mpcfl(*resume, timeout=120)
    assert done.returncode == 1 and "a finished run is never resumed" in done.stderr, done.stderr[-2000:]
    unchecked(monkeypatch, "finished")
    done = mpcfl(*resume, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert ("'round 2 average update' was already opened in this run with contributors p0, p1 then, p0, p1, p2 now"
            in done.stderr), done.stderr[-2000:]
    assert torch.equal(round_weights(job, "p0", [2])[0], weights[2])
    unchecked(monkeypatch, "finished", "journal")
    done = mpcfl(*resume, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    [reopened] = round_weights(job, "p0", [2])
    without, with_p2 = weights[2] - weights[1], reopened - weights[1]
    n01, n2 = rows[0].x.shape[0] + rows[1].x.shape[0], rows[2].x.shape[0]
    recovered = with_p2 + n01 / n2 * (with_p2 - without)
    truth = local_update(job, model, rows[2], head, strategy, weights=weights[1], round_index=2, rank=2, clip=None,
                         bound=MAX_AVERAGED, who="test")[0]
    assert (recovered - truth).abs().max() < 1e-2, "the detector missed p2's update"


def _one_raw_party(folder: Path) -> list[dict[str, Any]]:
    """Three parties: p0 and p1 hold standardised rows, p2 raw ones (its local training runs away)."""
    header, values = wdbc()
    features = [i for i, name in enumerate(header) if name != "malignant"]
    scaled = values.copy()
    scaled[:, features] = (values[:, features] - values[:, features].mean(axis=0)) / values[:, features].std(axis=0)
    parties = []
    for i, (raw, std) in enumerate(zip(np.array_split(values, 3), np.array_split(scaled, 3))):
        train = write_csv(folder / f"p{i}_train.csv", header, raw if i == 2 else std)
        parties.append({"name": f"p{i}", "data": {"train": str(train)}})
    return parties


def test_a_party_whose_update_is_out_of_bounds_sits_out_when_dropouts_are_allowed(tmp_path: Path) -> None:
    # At lr 20, p2's update on raw features reaches about 8,000, beyond the 4,096 the average takes; p0's and p1's about 8.
    path = fed_job(tmp_path, _one_raw_party(tmp_path), rounds=1, lr=20.0, allow_dropouts=True, min_parties=2)
    raw = yaml.safe_load(path.read_text())
    path = write_job(tmp_path, {**raw, "data": {"standardize": False}})
    job = load_job(path)
    done = run_job(path)
    assert "[p2] WARNING mpcfl.tasks.federated.runner: round 1: p2 sit(s) out; averaging over 2 parties" in done.stdout
    assert job_metrics(path, "p0")["history"][0]["parties"] == 2
    # The average is over the survivors, re-weighted by their rows.
    head, model = head_of(job.model), initial_model(job, 30)
    start = flat(model)
    average, live = plain_round(job, model, scaled_rows(job, None), head, strategy_of(job.federated.strategy), weights=start, round_index=1)
    assert live == [0, 1]
    [after] = round_weights(job, "p1", [1])
    survivors = sum(load_party_data(job, p).train.x.shape[0] for p in ("p0", "p1"))
    assert within_fixed_point(job, after - start, average, survivors), ((after - start) - average).abs().max()


def test_dp_rounds_carry_noise_of_the_declared_scale_and_stop_at_the_budget(tmp_path: Path) -> None:
    header, values = wdbc()
    center, scale = values.mean(axis=0), values.std(axis=0)
    scaling = {name: [float(center[i]), float(scale[i])] for i, name in enumerate(header) if name != "malignant"}
    z, clip = 2.0, 0.5
    accountant = RdpAccountant()
    two = accountant.epsilon(1e-5, extra=[Charge("gaussian", z, 2)])
    three = accountant.epsilon(1e-5, extra=[Charge("gaussian", z, 3)])
    path = fed_job(tmp_path, horizontal_parties(tmp_path, 3), rounds=3)
    raw = yaml.safe_load(path.read_text())
    raw.update(data={"standardize": False, "scaling": scaling}, model={"type": "mlp", "hidden": [16]},
               dp={"epsilon": (two + three) / 2, "delta": 1e-5, "clip": clip, "noise_multiplier": z})
    path = write_job(tmp_path, raw)
    done = mpcfl("run", str(path), timeout=240)
    assert done.returncode == 1
    assert "reveal of round 3 average update refused: it would spend epsilon" in done.stderr, done.stderr[-2000:]
    job = load_job(path)
    ledger = json.loads((run_dir(path, "p0") / "privacy.json").read_text())["ledger"]
    assert [entry["what"] for entry in ledger] == ["round 1 average update", "round 2 average update"]
    assert not (job.party_root("p0") / "latest" / "model.pt").exists()
    # Each revealed mean = the mean of the clipped updates + noise of std z * 2S / n (replace-one, 3 parties)
    # from the n - t honest shares; all n parties add a share of variance sigma^2 / (n - t) (t = n - 1).
    head = head_of(job.model)
    rows = [Rows.of(part.train, head) for part in prepared_parties(job)]  # scaled by the public constants
    model = initial_model(job, 30)
    strategy = strategy_of(job.federated.strategy)
    weights = [flat(model), *round_weights(job, "p0", [1, 2])]
    noise = []
    for r in (1, 2):
        average, _ = plain_round(job, model, rows, head, strategy, weights=weights[r - 1], round_index=r)
        noise.append((weights[r] - weights[r - 1]) - average)
    noise = torch.cat(noise)
    expected = z * 2 * clip / 3 * 3**0.5
    assert noise.numel() > 1000
    assert 0.85 < float(noise.std()) / expected < 1.15, (float(noise.std()), expected)
    assert abs(float(noise.mean())) < 5 * expected / noise.numel() ** 0.5


def test_under_dp_an_out_of_range_value_is_clamped_and_no_peer_learns_of_it(tmp_path: Path) -> None:
    """Issue 21 item 2: one patient's mean_area at p0 is 60000, scaled by the job's public constants to
    about 169, beyond data.max_abs = 30. Under client-level DP the job trains to the end; p0 clamps the
    value and only p0's log says so; nothing p1 or p2 logs or writes mentions it (main refused the whole
    job in an agreed range check: "party p0 failed during range check", at every party)."""
    header, values = wdbc()
    center, scale = values.mean(axis=0), values.std(axis=0)
    scaling = {name: [float(center[i]), float(scale[i])] for i, name in enumerate(header) if name != "malignant"}
    parties = horizontal_parties(tmp_path, 3)
    train = Path(parties[0]["data"]["train"])
    lines = train.read_text().splitlines()
    column = lines[0].split(",").index("mean_area")
    cells = lines[1].split(",")
    cells[column] = "60000"
    lines[1] = ",".join(cells)
    train.write_text("\n".join(lines) + "\n")
    assert (60000 - scaling["mean_area"][0]) / scaling["mean_area"][1] > 30
    raw = yaml.safe_load(fed_job(tmp_path, parties, rounds=2).read_text())
    raw.update(data={"standardize": False, "scaling": scaling, "max_abs": 30.0},
               dp={"epsilon": 4.0, "delta": 1e-5, "clip": 1.0})
    path = write_job(tmp_path, raw)
    done = mpcfl("run", str(path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    output = (done.stdout + done.stderr).splitlines()
    mine = [line for line in output if line.startswith("[p0]")]
    assert any("clamped 1 feature value(s) in column(s) 'mean_area' to data.max_abs=30" in line for line in mine), mine[-20:]
    # the test's own folder (named after the test) is in paths they log and write: not about the data
    theirs = [line.replace(str(tmp_path), "") for line in output if line.startswith(("[p1]", "[p2]"))]
    assert theirs  # they did log their rounds
    for line in theirs:
        lowered = line.lower()
        assert "mean_area" not in line and "clamp" not in lowered and "range" not in lowered and "max_abs" not in lowered, line
        assert not ("p0" in line and "fail" in lowered), line
    job = load_job(path)
    for party in ("p1", "p2"):
        written = [f for f in job.party_root(party).rglob("*") if f.is_file()]
        assert any(f.name == "metrics.json" for f in written)
        for file in written:
            text = file.read_bytes().replace(str(tmp_path).encode(), b"").lower()
            assert b"clamp" not in text and b"max_abs" not in text and b"range check" not in text, file
            # 60000 as a number of its own: a float's digits (a loss of 2.07613716000004) are not the value
            assert not re.search(rb"(?<![0-9.])60000(?![0-9])", text) and b"fail" not in text, file
    assert json.loads((run_dir(path, "p1") / "metrics.json").read_text())["final"]["round"] == 2
