"""Secret Poisson sampling in real processes: run by both parties under ``mpcfl launch --parties p0,p1``.

Each party draws the inclusion bits of ``STEPS`` steps over ``ROWS`` rows at rate ``RATE``
(:func:`mpcfl.mpc.sampling.inclusion_bits`) from its own AES-CTR generator, which records
its draws (``own_draw``) for the test to recombine. Only afterwards, in the ``control``
phase, the bits are opened (``own_bits``): the test's ground truth, which a real run never
computes. ``POISSON_LEAK=bits`` or ``=size`` opens the bits or a step's batch size during
sampling: the variants the test must catch.
"""

import os


import mpcfl
import sitecustomize
from mpcfl.mpc.engine import import_crypten
from mpcfl.mpc.prng import SecureGenerator
from mpcfl.mpc.sampling import inclusion_bits

ROWS, STEPS, RATE = 4096, 4, 0.07


class Recording(SecureGenerator):
    """The party's generator, keeping what it drew (this party's shares of r)."""

    def ring(self, size, device=None):
        values = super().ring(size, device)
        sitecustomize._records["own"].append(("draw", values.clone()))
        return values


with mpcfl.join() as me:
    crypten = import_crypten()
    sitecustomize.phase("sample")  # the test reads this phase's messages
    bits = inclusion_bits((STEPS, ROWS, 1), RATE, generator=Recording())
    leak = os.environ.get("POISSON_LEAK")
    if leak == "bits":
        bits = crypten.cryptensor(bits.get_plain_text().float(), src=0)
    elif leak == "size":
        bits.sum(dim=1).get_plain_text()
    sitecustomize.phase("control")
    opened = bits.get_plain_text().reshape(STEPS, ROWS).long()
    sitecustomize._records["own"].append(("bits", opened))
    print(f"poisson party {me.rank}: scale={bits.encoder.scale} sizes={opened.sum(dim=1).tolist()}", flush=True)
