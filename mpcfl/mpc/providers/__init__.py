"""Where Beaver triples and other correlated randomness come from, one module per provider.

A provider is a module here that defines ``PROVIDER``, a :class:`Provider`, plus
one line in :data:`_MODULES`. Modules load on first use, so checking a name (the
job schema, the CLI) does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

DEFAULT = "ttp"
#: The dealer's process name, rank n after the n parties.
DEALER = "dealer"

_MODULES = {
    "ttp": "mpcfl.mpc.providers.ttp",
    "tfp": "mpcfl.mpc.providers.tfp",
}
NAMES = tuple(sorted(_MODULES))


@dataclass(frozen=True)
class Provider:
    """What a session needs to know about a triple provider.

    Args:
        name: the name jobs and the CLI use.
        needs_dealer: a dealer process (rank n) serves the triples.
        crypten_name: CrypTen's ``cfg.mpc.provider`` value.
        warning: logged by every party when insecure; ``{first}`` is party 0's name.
    """

    name: str
    needs_dealer: bool
    crypten_name: str
    warning: str = ""

    @property
    def insecure(self) -> bool:
        return bool(self.warning)

    def processes(self, parties: list[str] | tuple[str, ...]) -> list[str]:
        """Every process's name by rank: the parties, then the dealer if there is one."""
        return [*parties, *([DEALER] if self.needs_dealer else [])]


def known(name: str) -> str:
    """``name`` if a provider has it.

    Raises:
        ValueError: naming the known providers.
    """
    if name not in _MODULES:
        raise ValueError(f"unknown provider {name!r} (known: {', '.join(NAMES)})")
    return name


def get(name: str) -> Provider:
    """The provider called ``name``; raises ValueError for an unknown name."""
    return importlib.import_module(_MODULES[known(name)]).PROVIDER
