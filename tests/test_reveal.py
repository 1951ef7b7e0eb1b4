"""The reveal chokepoint is the only way out of MPC."""

from __future__ import annotations

import re

from conftest import REPO


def test_only_the_reveal_module_opens_secrets() -> None:
    callers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "mpcfl").rglob("*.py")
        if re.search(r"get_plain_text|\.reveal\(\)", path.read_text())
    )
    assert callers == ["mpcfl/reveal.py"]
