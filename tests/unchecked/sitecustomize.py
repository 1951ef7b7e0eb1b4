"""A build that skips some run-integrity checks, so an attack test can show that it catches the attack.

Loaded into every process a test starts through PYTHONPATH (the ``unchecked`` fixture of
``tests/conftest.py``); active only when ``MPCFL_UNCHECKED`` names checks, comma-separated:

- ``finished``: a finished run may be resumed;
- ``inputs``: a party's changed files, and others' changed commitments, are let through on resume;
- ``journal``: a step may be opened again with other contributors, receivers or inputs;
- ``run``: a checkpoint of another run is accepted.
"""

from __future__ import annotations

import os

_SKIP = {name for name in os.environ.get("MPCFL_UNCHECKED", "").split(",") if name}

if _SKIP:
    from mpcfl import runs
    from mpcfl.tasks import run
    from mpcfl.tasks.train import checkpoint

    def _nothing(*args: object, **kwargs: object) -> None:
        return None

    if "finished" in _SKIP:
        runs.refuse_finished = _nothing
    if "inputs" in _SKIP:
        run._refuse_changed_inputs = _nothing
        run._refuse_changed_commitments = _nothing
    if "journal" in _SKIP:
        runs.Journal.conflict = _nothing
    if "run" in _SKIP:
        checkpoint._refuse_other_run = _nothing
