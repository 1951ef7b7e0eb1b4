"""A deviating party, loaded into every process of a test job through PYTHONPATH.

``MPCFL_WITHHOLD_DIGESTS=NAME``: the process of ``mpcfl party ... --party NAME`` never sends
the dealer the digests of its requests (:func:`mpcfl.mpc.providers.ttp.party._announce`), and goes
on as if it had.

``MPCFL_TAMPER_LINKS=NAME:ATTACK``: every TLS link the relays of ``--party NAME`` open goes through a
man in the middle (:mod:`tamper`) doing ATTACK (flip, drop, replay, reorder, truncate) to it.
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


def _tamper_links(attack: str) -> None:
    from mpcfl.mpc import channel
    from tamper import man_in_the_middle

    connect = channel.Relay.connect

    def through_the_attacker(self: channel.Relay, peer: int, host: str, port: int) -> tuple[str, int]:
        return connect(self, peer, "127.0.0.1", man_in_the_middle(host, port, attack, bytearray()))

    channel.Relay.connect = through_the_attacker


_TAMPERED, _, _ATTACK = os.environ.get("MPCFL_TAMPER_LINKS", "").partition(":")
if _TAMPERED and _TAMPERED == _party():
    _tamper_links(_ATTACK)
