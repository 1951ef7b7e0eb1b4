"""The launcher's copy of a child's output: prefixed lines, its error kept for the one-line blame."""

from __future__ import annotations

import io
import subprocess

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
