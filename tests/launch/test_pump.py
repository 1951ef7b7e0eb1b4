"""The launcher's copy of a child's output: prefixed lines, its error kept for the one-line blame."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from mpcfl.launch.local import Child, _pump


@pytest.mark.parametrize("debug", [False, True])
def test_a_childs_error_line_is_kept_for_the_blame_and_shown_only_with_debug(debug: bool) -> None:
    child = Child(name="p1", process=subprocess.Popen(["true"]), relay_errors=debug)
    child.process.wait()
    sink = io.StringIO()
    output = b"INFO mpcfl.x: joined\nmpcfl: waiting on: p0\nmpcfl: error: party p0 failed during data loading\n"
    _pump(child, io.BytesIO(output), sink)
    assert child.error_line == "party p0 failed during data loading" and child.waiting_on == "p0"
    shown = ["[p1] INFO mpcfl.x: joined"] + (["[p1] mpcfl: error: party p0 failed during data loading"] if debug else [])
    assert sink.getvalue().splitlines() == shown


def test_a_torchrun_worker_prefixes_its_log_lines_with_its_role() -> None:
    import logging

    from mpcfl.launch.worker import prefix_log_lines

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = {h: h.formatter for h in root.handlers}  # pytest's own handlers keep their format
    root.addHandler(handler)
    try:
        prefix_log_lines("hospital_b")
        prefix_log_lines("hospital_b")  # once only
        logging.getLogger("mpcfl.test").warning("joined")
    finally:
        root.removeHandler(handler)
        for other, formatter in saved.items():
            other.setFormatter(formatter)
    assert stream.getvalue() == "[hospital_b] WARNING mpcfl.test: joined\n"


def test_the_summary_line_gives_the_headline_the_model_and_the_privacy_ledger(tmp_path: Path) -> None:
    import yaml

    from conftest import DEMO
    from mpcfl import runs
    from mpcfl.jobs.schema import load_job
    from mpcfl.launch.local import summary_line

    spec = yaml.safe_load(DEMO.read_text())
    for party in spec["parties"]:
        party["data"] = {key: str((DEMO.parent / value).resolve()) for key, value in party["data"].items()}
    spec["outputs"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = load_job(path)
    run_id = runs.new_run_id()
    for name in job.party_names:
        run = runs.start(job.party_root(name), run_id, {"job": job.name})
        (run.dir / "privacy.json").write_text("{}")
        run.finish({"epoch": 10, "test_accuracy": 0.97368, "loss": 0.0812, "seconds": 3.2})
    (job.party_root("hospital_b") / run_id / "model.pt").write_bytes(b"")
    out = tmp_path / "out"
    assert summary_line(job, run_id) == (
        f"mpcfl: job breast-cancer-lr run {run_id} finished: epoch=10 test_accuracy=0.9737 loss=0.0812 (hospital_a); "
        f"model: {out}/hospital_b/{run_id}/model.pt; "
        f"privacy ledger: {out}/<party>/{run_id}/privacy.json at hospital_a, hospital_b; "
        f"outputs in {out}/<party>/{run_id} (and <party>/latest)"
    )


def test_the_summary_line_compares_the_parties_where_each_scored_its_own_rows(tmp_path: Path) -> None:
    from mpcfl import runs
    from mpcfl.jobs.schema import load_job
    from mpcfl.launch.local import summary_line

    import yaml

    from conftest import REPO

    spec = yaml.safe_load((REPO / "configs" / "breast_cancer_fed.yaml").read_text())
    for party in spec["parties"]:
        party["data"] = {key: str((REPO / "configs" / value).resolve()) for key, value in party["data"].items()}
    spec["outputs"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    job = load_job(path)
    run_id = runs.new_run_id()
    for name, accuracy in zip(job.party_names, (0.95, 0.9667, 0.9)):
        runs.start(job.party_root(name), run_id, {"job": job.name}).finish({"round": 10, "test_accuracy": accuracy})
    line = summary_line(job, run_id)
    assert ": round=10 test_accuracy=0.9500 (hospital_a); test_accuracy by party: hospital_a=0.9500 hospital_b=0.9667 hospital_c=0.9000; " in line


def test_plot_history_draws_a_federated_history_by_round(tmp_path: Path) -> None:
    from mpcfl.outputs import plot_history

    history = [{"round": r, "train_loss": 1.0 / r, "test_accuracy": 0.8 + r / 100} for r in (1, 2, 3)]
    plot_history(tmp_path / "metrics.png", history, title="t", x="round")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError):
        plot_history(tmp_path / "other.png", history, title="t")  # no epoch: the x key is the caller's choice
