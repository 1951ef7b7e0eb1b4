"""Where Beaver triples and other correlated randomness come from, one module per provider.

A provider is one entry in :data:`_PROVIDERS`, declaring what a session needs to know of
it, plus a module here for any code of ours it runs (``ttp/``: the request table, the dealer and
the party side; TFP is CrypTen's own and has none). The modules are imported where their code runs,
never to read those facts, so checking a job (the schema, the launcher, the CLI) does not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT = "ttp"
#: The dealer's process name, rank n after the n parties.
DEALER = "dealer"


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


_PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider(name="ttp", needs_dealer=True, crypten_name="TTP"),  # providers/ttp/
        Provider(  # CrypTen's trusted first party: no dealer process, for tests only
            name="tfp",
            needs_dealer=False,
            crypten_name="TFP",
            warning="INSECURE: provider tfp is on, so party {first} generates every Beaver triple "
            "and can see all secrets. Use only for tests.",
        ),
    )
}
NAMES = tuple(sorted(_PROVIDERS))


def known(name: str) -> str:
    """``name`` if a provider has it.

    Raises:
        ValueError: naming the known providers.
    """
    if name not in _PROVIDERS:
        raise ValueError(f"unknown provider {name!r} (known: {', '.join(NAMES)})")
    return name


def get(name: str) -> Provider:
    """The provider called ``name``; raises ValueError for an unknown name."""
    return _PROVIDERS[known(name)]
