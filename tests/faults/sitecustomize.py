"""A deviating party, loaded into every process of a test job through PYTHONPATH.

``MPCFL_WITHHOLD_DIGESTS=NAME``: the process of ``mpcfl party ... --party NAME`` never sends
the dealer the digests of its requests (:func:`mpcfl.mpc.providers.ttp.party._announce`), and goes
on as if it had.
"""

from __future__ import annotations

import os
import sys


def _party() -> str | None:
    """This process's party name, from its command line."""
    argv = sys.argv
    return argv[argv.index("--party") + 1] if "--party" in argv[:-1] else None


def _withhold_digests() -> None:
    from mpcfl.mpc.providers.ttp import party

    party._announce = lambda words: None


_WITHHOLDING = os.environ.get("MPCFL_WITHHOLD_DIGESTS")
if _WITHHOLDING is not None and _WITHHOLDING == _party():
    _withhold_digests()
