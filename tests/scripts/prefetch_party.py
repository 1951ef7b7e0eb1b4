"""Prefetched steps that match, deviate from and fall short of their recording.

Every unit's result is checked, and a last multiplication outside any unit checks
that every party's stream is still in step with the dealer's. Then a unit fails part-way
(every party raises at the same point): after it, no triple is served at all.
"""

import torch

import mpcfl
from mpcfl.errors import MpcflError
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.providers.ttp import prefetched
from mpcfl.mpc.providers.ttp.party import _prefetch

with mpcfl.join() as me:
    crypten = import_crypten()
    x = crypten.cryptensor(torch.arange(1.0, 5.0), src=me.session.world_size - 1)  # 1 2 3 4
    y = crypten.cryptensor(torch.full((3,), 2.0), src=0)

    def both() -> list[float]:  # two requests: mul (4,) then mul (3,)
        return [(x * x).sum().get_plain_text().item(), (y * y).sum().get_plain_text().item()]

    def other() -> list[float]:  # mul (4,) then square (3,): deviates at the second request
        return [(x * x).sum().get_plain_text().item(), y.square().sum().get_plain_text().item()]

    def fewer() -> list[float]:  # mul (4,) only
        return [(x * x).sum().get_plain_text().item(), 12.0]

    results = []
    for unit in (both, both, both, other, both, fewer, both):
        with prefetched("unit"):
            results.append(unit())
    final = (x * y[:1].expand(4)).sum().get_plain_text().item()  # live, after every batch
    ok = all(abs(a - 30.0) < 1e-2 and abs(b - 12.0) < 1e-2 for a, b in results) and abs(final - 20.0) < 1e-2
    try:
        with prefetched("unit"):
            x * x  # the batch's first item
            raise RuntimeError("a step fails part-way")
    except RuntimeError:
        pass
    try:
        x * x
        stopped = False
    except MpcflError as err:
        stopped = "out of step" in str(err)
    ok = ok and stopped
    print(f"prefetch party {me.rank}: ok={ok} stats={dict(sorted(_prefetch.stats.items()))} results={results} final={final}")
