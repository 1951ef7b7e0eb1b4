"""The reveal chokepoint is the only way out of MPC."""

from __future__ import annotations

import re

from conftest import REPO


def test_only_the_reveal_module_opens_secrets() -> None:
    callers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "mpcfl").rglob("*.py")
        if re.search(r"\w\.get_plain_text\(|\.reveal\(\)", path.read_text())
    )
    assert callers == ["mpcfl/mpc/reveal.py"]


def test_under_a_budget_every_reveal_must_declare_its_charge(crypten_single: None) -> None:
    import pytest
    import torch

    from mpcfl.mpc.compat import import_crypten
    from mpcfl.dp import Budget
    from mpcfl.mpc.reveal import RevealPolicyError, install_budget, reveal

    crypten = import_crypten()
    value = crypten.cryptensor(torch.ones(3))
    install_budget(Budget.create(epsilon=1.0, delta=1e-5, accountant="rdp"))
    try:
        with pytest.raises(RevealPolicyError, match="reveal of x: the job has a privacy budget, and this reveal declares no charge"):
            reveal(value, to=[0], what="x")
        with pytest.raises(RevealPolicyError, match="invalid receivers"):
            reveal(value, to=[0, 0], what="x")
    finally:
        install_budget(None)
    assert torch.equal(reveal(value, to=[0], what="x"), torch.ones(3))
