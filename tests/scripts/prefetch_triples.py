"""Every kind of dealer request served from prefetched batches, each triple checked exactly.

Units that match their recording, deviate from it, fall short of it and go beyond it; after
each request the triple is opened (a test's privilege) and its relation checked in the ring:
c = a*b (mul, matmul), r2 = r^2, c = a & b, theta_r = the wraps of r's shares, rA = rB. A
party whose stream slipped against the dealer's by a single value breaks every later relation.
"""

import torch

import mpcfl
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.providers.ttp import prefetched
from mpcfl.mpc.providers.ttp.party import _prefetch

with mpcfl.join() as me:
    crypten = import_crypten()
    from crypten.common.util import count_wraps

    provider = crypten.mpc.get_default_provider()

    def mul(size: tuple[int, ...]) -> bool:
        a, b, c = provider.generate_additive_triple(size, size, "mul")
        return torch.equal(c.reveal(), a.reveal() * b.reveal())

    def matmul(rows: int) -> bool:
        a, b, c = provider.generate_additive_triple((rows, 3), (3, 2), "matmul")
        return torch.equal(c.reveal(), a.reveal() @ b.reveal())

    def square(size: tuple[int, ...]) -> bool:
        r, r2 = provider.square(size)
        return torch.equal(r2.reveal(), r.reveal() * r.reveal())

    def binary(size: tuple[int, ...]) -> bool:
        a, b, c = provider.generate_binary_triple(size, size)
        return torch.equal(c.reveal(), a.reveal() & b.reveal())

    def wraps(size: tuple[int, ...]) -> bool:
        r, theta_r = provider.wrap_rng(size)
        return torch.equal(theta_r.reveal(), count_wraps(crypten.comm.get().all_gather(r.share)))

    def b2a(size: tuple[int, ...]) -> bool:
        r_arithmetic, r_binary = provider.B2A_rng(size)
        return torch.equal(r_arithmetic.reveal(), r_binary.reveal())

    full = [lambda: mul((3,)), lambda: wraps((4,)), lambda: square((2,)), lambda: binary((3,)), lambda: b2a((2,)), lambda: matmul(2)]
    deviates = full[:2] + [lambda: b2a((5,))] + full[3:]  # a different third request
    fewer = full[:2]
    more = full + [lambda: wraps((6,))]  # one request past the batch: live
    checks = []
    for unit in (full, full, deviates, full, full, fewer, more, full):
        with prefetched("unit"):
            checks.extend(request() for request in unit)
    checks.extend(request() for request in full)  # live, after every batch
    print(f"prefetch triples party {me.rank}: ok={all(checks)} checks={len(checks)} stats={dict(sorted(_prefetch.stats.items()))}")
