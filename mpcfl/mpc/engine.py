"""crypten as mpcfl runs it: :mod:`mpcfl.mpc.compat`'s patches, with mpcfl's own protocols installed.

The one way to import crypten. The protocols (:mod:`~mpcfl.mpc.comparison`,
:mod:`~mpcfl.mpc.logistic`, :mod:`~mpcfl.mpc.fixed_mask`, :mod:`~mpcfl.mpc.truncation`,
:mod:`~mpcfl.mpc.providers.ttp`)
run inside the crypten this returns and reach it through
:func:`mpcfl.mpc.compat.loaded_crypten`; compat installs them as handed here, so imports
point one way: this module -> protocols -> compat.
"""

from __future__ import annotations

import types

from mpcfl.mpc import compat


def import_crypten(*, stock: bool = False) -> types.ModuleType:
    """Imports crypten with every adaptation applied.

    Args:
        stock: apply only what ``import crypten`` and ``from_pytorch`` need on this torch
            (the ONNX alias and exporter), none of the security, correctness and speed patches
            (generators, point-to-point openings, dealer digests and the dealer behind ``TTPServer``,
            decoding, timeouts, mask reuse, packed comparisons, a repeated ``uninit``):
            CrypTen as upstream ships it, for benchmarks that compare against it. Never for jobs.

    Raises:
        MpcflError: crypten is missing, is not the version these patches target, or was
            already imported in the other mode in this process.
    """
    from mpcfl.mpc import comparison, fixed_mask, logistic, truncation  # imported on use: they import torch, the launcher does not
    from mpcfl.mpc.providers import ttp

    protocols = compat.Protocols(
        less_than_zero=comparison.less_than_zero, sigmoid=logistic.sigmoid, product=fixed_mask.product,
        transposed=fixed_mask.transposed, ttp=ttp, divide=truncation.divide,
    )
    return compat.load(protocols, stock=stock)
