"""The reveal chokepoint is the only way out of MPC."""

from __future__ import annotations


from conftest import package_files_matching


def test_only_the_reveal_module_opens_secrets() -> None:
    # fixed_mask.py opens only Beaver differences padded by uniform dealer masks (x - a, w - b),
    # as CrypTen's multiplication does; truncation.py opens only x + r, r a fresh uniform ring element
    # from the dealer (a one-time pad). Nothing either opens is a secret value.
    # CrypTen's module decrypt() and reveal_batch open to every party as well, so they count as openings.
    assert package_files_matching(r"get_plain_text|\.reveal\(|\.decrypt\(|reveal_batch") == [
        "mpcfl/mpc/fixed_mask.py", "mpcfl/mpc/reveal.py", "mpcfl/mpc/truncation.py"]


def test_only_known_modules_run_collectives() -> None:
    # Every collective in the package, and why what it moves is no secret: auth gathers public keys;
    # compat counts CrypTen's all_reduce under its name; generators broadcast the key all parties share
    # (the "global" stream); lockstep opens masked protocol values; opening is the exchange itself; the
    # dealer's broadcast is on its two-member group with party 0 (party 0's share of the randomness);
    # session gathers small public integers (shapes, flags). A new one must argue its place here.
    assert package_files_matching(r"all_reduce\(|all_gather\(|\.broadcast\(") == [
        "mpcfl/mpc/auth.py", "mpcfl/mpc/compat.py", "mpcfl/mpc/generators.py", "mpcfl/mpc/lockstep.py",
        "mpcfl/mpc/opening.py", "mpcfl/mpc/providers/ttp/party.py", "mpcfl/mpc/providers/ttp/server.py",
        "mpcfl/mpc/session.py"]


def test_under_a_budget_every_reveal_must_declare_its_charge(crypten_single: None) -> None:
    import pytest
    import torch

    from mpcfl.mpc.engine import import_crypten
    from mpcfl.dp import Budget
    from mpcfl.mpc.reveal import Disclosure, RevealPolicyError, reveal

    crypten = import_crypten()
    value = crypten.cryptensor(torch.ones(3))
    with Disclosure(Budget.create(epsilon=1.0, delta=1e-5, accountant="rdp")):
        with pytest.raises(RevealPolicyError, match="reveal of x: the job has a privacy budget, and this reveal declares no charge"):
            reveal(value, to=[0], what="x")
        with pytest.raises(RevealPolicyError, match="invalid receivers"):
            reveal(value, to=[0, 0], what="x")
    # The budget went with the run: the same reveal needs no charge now.
    assert torch.equal(reveal(value, to=[0], what="x"), torch.ones(3))


def test_each_run_has_its_own_ledger_and_budget(crypten_single: None) -> None:
    import pytest
    import torch

    from mpcfl.dp import Budget, Charge
    from mpcfl.mpc.engine import import_crypten
    from mpcfl.mpc.reveal import Disclosure, Privacy, reveal

    crypten = import_crypten()
    value = crypten.cryptensor(torch.ones(2))
    budget = Budget.create(epsilon=1.0, delta=1e-5, accountant="rdp")
    with Disclosure(budget) as first:
        reveal(value, to=[0], what="first run", privacy=Privacy(Charge("gaussian", 50.0)))
    with Disclosure() as second:
        reveal(value, to=[0], what="second run")  # no budget: no charge needed
    reveal(value, to=[0], what="outside any run")
    assert [r["what"] for r in first.ledger()] == ["first run"]
    assert first.ledger()[0]["epsilon_after"] == pytest.approx(budget.spent())
    assert [r["what"] for r in second.ledger()] == ["second run"]
    assert [e["what"] for e in budget.ledger] == ["first run"]
    # Leaving by an exception uninstalls the budget too.
    with pytest.raises(RuntimeError, match="boom"), Disclosure(Budget.create(epsilon=1.0, delta=1e-5, accountant="rdp")):
        raise RuntimeError("boom")
    assert torch.equal(reveal(value, to=[0], what="after"), torch.ones(2))
    with first, pytest.raises(RuntimeError, match="entered once"), first:
        pass
