"""Division by secret values over a wide range (:func:`mpcfl.mpc.division.inverse_power`) and the
products it takes in one round (:func:`mpcfl.mpc.lockstep.products`), in real processes: run by
both parties under ``mpcfl launch --parties p0,p1``.

Each party prints the largest relative errors against torch and the rounds each step took; under
the spy of ``tests/spy`` it records its own share of the divisor (``own``).
"""

import torch

import mpcfl
import sitecustomize
from mpcfl.mpc import lockstep
from mpcfl.mpc.division import inverse_power, inverse_power_near_one
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.session import communication_stats

EXPONENTS = range(-5, 12)  # LayerNorm's: v in (2 * 4^-6, 2 * 4^12]

with mpcfl.join() as me:
    crypten = import_crypten()
    generator = torch.Generator().manual_seed(11)  # the same public test values at both parties
    v_plain = torch.logspace(-3.2, 7.5, 601)  # 6.3e-4 .. 3.2e7, every threshold's both sides
    # Numerators as the callers' (softmax's |t| <= v * length, LayerNorm's |x - mean| <= sqrt(v * width)):
    # |t / v^power| <= 8
    u = torch.randn(601, 8, generator=generator).clamp(-3, 3) * 8 / 3
    v = crypten.cryptensor(v_plain[:, None], src=0)
    sitecustomize._records["own"].append(("share", v._tensor.share.clone()))

    def encoded(values: torch.Tensor) -> torch.Tensor:
        """``values`` as fixed point holds them (read here, not opened: opening would show the shares)."""
        encoder = crypten.encoder.FixedPointEncoder()
        return encoder.decode(encoder.encode(values))

    def error(out: torch.Tensor, truth: torch.Tensor) -> float:
        """The error relative to |truth| + 0.03: relative for large values, while fixed point's unit
        (2^-16 = 1.5e-5) cannot dominate near 0 (at a truth of 0.01, 1.6 units are 2.4e-3 of it)."""
        return float(((out - truth).abs() / (truth.abs() + 0.03)).max())

    def rounds(run):  # noqa: ANN001, ANN202
        before = communication_stats()["rounds"]
        out = run()
        return out, communication_stats()["rounds"] - before

    _, compare = rounds(lambda: crypten.stack([v - float(k) for k in EXPONENTS]).gt(0))
    errors, counts = {}, {}
    for power in (1, 0.5):
        t_plain = (u if power == 1 else u * 16) * v_plain[:, None] ** power
        t = crypten.cryptensor(t_plain, src=1)
        truth = encoded(t_plain) / encoded(v_plain[:, None]) ** power  # of the values as shared (6e-4 is 41 units)
        (inverse, out), counts[power] = rounds(lambda: inverse_power(v, power, EXPONENTS, times=t))
        errors[f"out{power}"] = error(out.get_plain_text(), truth)
        errors[f"times{power}"] = error(inverse.times(t).get_plain_text(), truth)  # the factors, as a backward reuses them
    near = torch.linspace(0.5, 2, 301)
    for power in (1, 0.5):
        y, counts[f"near{power}"] = rounds(lambda: inverse_power_near_one(crypten.cryptensor(near, src=0), power))
        errors[f"near{power}"] = float((y.get_plain_text() * near**power - 1).abs().max())
    # Products in one round: broadcast, a scale-1 factor, and one factor of 1 element.
    x_plain, y_plain = torch.randn(3, 4, generator=generator), torch.randn(3, 1, generator=generator)
    bits = crypten.cryptensor(torch.tensor([[1.0], [0.0], [1.0]]), src=0) > 0  # 0/1 at scale 1
    x, y = crypten.cryptensor(x_plain, src=0), crypten.cryptensor(y_plain, src=1)
    products, counts["products"] = rounds(lambda: lockstep.products([(x, y), (x, bits), (y, x[:1, :1])]))
    expected = [x_plain * y_plain, x_plain * torch.tensor([[1.0], [0.0], [1.0]]), y_plain * x_plain[:1, :1]]
    errors["products"] = max(float((p.get_plain_text() - e).abs().max()) for p, e in zip(products, expected))
    # CrypTen's own on values in its range, for scale
    _, counts["crypten_reciprocal"] = rounds(lambda: crypten.cryptensor(near, src=0).reciprocal())
    _, counts["crypten_inv_sqrt"] = rounds(lambda: crypten.cryptensor(near, src=0).inv_sqrt())
    print(f"division party {me.rank}: compare={compare} "
          + " ".join(f"rounds_{k}={c}" for k, c in counts.items()) + " "
          + " ".join(f"error_{k}={e:.3g}" for k, e in errors.items()), flush=True)
