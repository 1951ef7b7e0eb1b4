"""A deviating party, loaded into every process of a test job through PYTHONPATH.

``MPCFL_WITHHOLD_DIGESTS=NAME``: the process of ``mpcfl party ... --party NAME`` never sends
the dealer the digests of its requests (:func:`mpcfl.mpc.providers.ttp.party._announce`), and goes
on as if it had.

``MPCFL_DIE_AT_CHARGE=NAME:WHEN:WHAT``: the process of ``--party NAME`` dies (SIGKILL to itself) just
``before`` or ``after`` its privacy budget charges the entry WHAT (:meth:`mpcfl.dp.budget.Budget.charge`):
a crash at an exact point of a DP run.

``MPCFL_TAMPER_LINKS=NAME:ATTACK``: every TLS link the relays of ``--party NAME`` open goes through a
man in the middle (:mod:`tamper`) doing ATTACK (flip, drop, replay, reorder, truncate) to it.
"""

from __future__ import annotations

import os
import signal
import sys


def _party() -> str | None:
    """This process's party name, from its command line: read when a patched function runs, not
    here, since the local launcher forks its processes from one interpreter that loaded this file
    with a command line of its own (:mod:`mpcfl.launch.zygote`)."""
    argv = sys.argv
    return argv[argv.index("--party") + 1] if "--party" in argv[:-1] else None


def _withhold_digests(name: str) -> None:
    from mpcfl.mpc.providers.ttp import party

    announce = party._announce
    party._announce = lambda words: None if _party() == name else announce(words)


_WITHHOLDING = os.environ.get("MPCFL_WITHHOLD_DIGESTS")
if _WITHHOLDING is not None:
    _withhold_digests(_WITHHOLDING)


def _die_at_charge(name: str, when: str, what: str) -> None:
    from mpcfl.dp import budget

    charge = budget.Budget.charge

    def dying(self: budget.Budget, entry: str, *args: object, **kwargs: object) -> float:
        if _party() == name and entry == what and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        spent = charge(self, entry, *args, **kwargs)
        if _party() == name and entry == what and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return spent

    budget.Budget.charge = dying


_DYING = os.environ.get("MPCFL_DIE_AT_CHARGE", "")
if _DYING:
    _die_at_charge(*_DYING.split(":", 2))


def _tamper_links(name: str, attack: str) -> None:
    from mpcfl.mpc import channel
    from tamper import man_in_the_middle

    connect = channel.Relay.connect

    def through_the_attacker(self: channel.Relay, peer: int, host: str, port: int) -> tuple[str, int]:
        if _party() != name:
            return connect(self, peer, host, port)
        return connect(self, peer, "127.0.0.1", man_in_the_middle(host, port, attack, bytearray()))

    channel.Relay.connect = through_the_attacker


_TAMPERED, _, _ATTACK = os.environ.get("MPCFL_TAMPER_LINKS", "").partition(":")
if _TAMPERED:
    _tamper_links(_TAMPERED, _ATTACK)
