"""An attacker's recorder, loaded into every process of a test job through PYTHONPATH.

Active only when ``MPCFL_SPY_DIR`` is set. It records what this process actually
holds, not what the code means to do:

- ``seen``: every buffer that passes through ``torch.distributed``: what is sent (``where`` names its rank),
  as it is sent, and every buffer once the operation has filled it (received,
  reduced, gathered, broadcast), and what an opening toward every party combined here
  (CrypTen's ``all_reduce``, which mpcfl serves by point-to-point messages); int64 as ring values, floating point scaled to
  ring units (2^16), so a plaintext in any of these forms is caught;
- ``opened``: what CrypTen's ``reveal(dst=...)`` returned here, i.e. the ring
  values this process received as the sole receiver (ground truth for the test);
- ``received``: how many elements this process received while an opening toward
  some parties was under way: a non-receiver must receive none, so no partial
  sum of shares, in whatever form, can reach it;
- ``own``: shares a party script says are its own (``_records["own"]``), so a test can
  look for them at the other processes;
- ``draws``: torch random functions, Tensor random methods and Generator
  constructions called from inside crypten.

At exit each process writes ``rank<R>-<pid>.npz`` to ``MPCFL_SPY_DIR``. A party
script may call ``sitecustomize.phase("control")`` to tag later records.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("MPCFL_SPY_DIR")
_records: dict[str, list] = {"seen": [], "opened": [], "draws": [], "received": [], "where": [], "own": []}
_phase = ["protocol"]
_opening = [0]  # depth of reveal(dst=...) calls under way
_collectives = [0]  # torch.distributed all_reduce calls so far (their buffers hold the sums already)
# Functions whose buffers come back filled with what peers sent.
_RECEIVING = {"recv", "irecv", "reduce", "all_reduce", "broadcast", "all_gather", "gather", "scatter",
              "reduce_scatter", "all_to_all", "reduce_scatter_tensor", "all_gather_into_tensor",
              "all_to_all_single", "batch_isend_irecv"}


def phase(name: str) -> None:
    """Tags the records from now on (e.g. ``control`` for a deliberately leaky opening)."""
    _phase[0] = name


class opening:  # noqa: N801 (a context manager, used like a function)
    """Marks an opening done by hand (the control) like one done by CrypTen's reveal."""

    def __enter__(self) -> None:
        _opening[0] += 1

    def __exit__(self, *exc: object) -> None:
        _opening[0] -= 1


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _install() -> None:
    import atexit
    import sys

    import numpy as np
    import torch
    import torch.distributed as dist

    def record_buffers(name):
        original = getattr(dist, name)

        def keep(tensors, when):
            for tensor in tensors:
                _records["seen"].append((_phase[0], tensor.detach().cpu().clone().reshape(-1)))
                _records["where"].append(f"{_phase[0]}:{name}:{when}:{tensor.dtype}:{tensor.nelement()}")

        def spy(*args, **kwargs):
            if name == "all_reduce":
                _collectives[0] += 1
            tensors = [t for value in (*args, *kwargs.values()) for t in _tensors(value)]
            if _opening[0] and name in _RECEIVING:
                _records["received"].append((_phase[0], torch.tensor([sum(t.nelement() for t in tensors)])))
            if name in ("send", "isend"):  # what leaves, as it leaves, and to which rank
                keep(tensors, f"sent>{kwargs.get('dst', args[1] if len(args) > 1 else '?')}")
            work = original(*args, **kwargs)
            # Read buffers once filled: before, a receive buffer holds whatever the
            # allocator left there (uninitialised memory is not what a peer sent).
            if work is None or not hasattr(work, "wait"):
                keep(tensors, "after")
            else:
                wait = work.wait

                def waited(*a, **k):
                    result = wait(*a, **k)
                    keep(tensors, "after")
                    return result

                try:
                    work.wait = waited
                except AttributeError:  # a C++ Work object: read at exit instead
                    _records["seen"].extend((_phase[0], t) for t in tensors)
                    _records["where"].extend(f"{_phase[0]}:{name}:exit:{t.dtype}:{t.nelement()}" for t in tensors)
            return work

        setattr(dist, name, spy)

    for name in ("send", "recv", "isend", "irecv", "reduce", "all_reduce", "broadcast", "all_gather",
                 "gather", "scatter", "reduce_scatter", "all_to_all", "reduce_scatter_tensor",
                 "all_gather_into_tensor", "all_to_all_single", "batch_isend_irecv"):
        if hasattr(dist, name):
            record_buffers(name)

    def record_draws(owner, name):
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}crypten{os.sep}" in caller:
                _records["draws"].append((_phase[0], name, caller))
            return original(*args, **kwargs)

        setattr(owner, name, spy)

    for name in ("randint", "rand", "randn", "randperm", "normal", "bernoulli", "multinomial", "rand_like",
                 "randint_like", "randn_like", "poisson"):
        record_draws(torch, name)
    for name in ("random_", "uniform_", "normal_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
                 "log_normal_"):
        record_draws(torch.Tensor, name)

    class Generator(torch.Generator):
        def __init__(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}crypten{os.sep}" in caller:
                _records["draws"].append((_phase[0], "Generator", caller))
            super().__init__(*args, **kwargs)

    torch.Generator = Generator

    import mpcfl.mpc.engine as engine

    original_import = engine.import_crypten

    def import_crypten():
        crypten = original_import()
        for cls in (crypten.mpc.primitives.ArithmeticSharedTensor, crypten.mpc.primitives.BinarySharedTensor):
            if not getattr(cls.reveal, "_spy", False):
                cls.reveal = _record_opened(cls.reveal)
        communicator = crypten.communicator.distributed_communicator.DistributedCommunicator
        if not getattr(communicator.all_reduce, "_spy", False):
            communicator.all_reduce = _record_combined(communicator.all_reduce)
        return crypten

    engine.import_crypten = import_crypten

    def ring(tensor):
        """Ring units: int64 as is, floating point scaled by 2^16, other types left out."""
        tensor = tensor.detach().cpu().reshape(-1)
        if tensor.dtype == torch.int64:
            return tensor.numpy()
        if tensor.is_floating_point():
            values = tensor.double().mul(2**16).round()
            return values[values.abs() < 2**62].long().numpy()
        return np.empty(0, dtype=np.int64)

    def dump() -> None:
        def flat(kind):
            parts = [(p, ring(t)) for p, t in _records[kind] if t is not None]
            out = {}
            for label in {p for p, _ in parts}:
                out[f"{kind}_{label}"] = np.concatenate([a for p, a in parts if p == label])
            return out

        rank = os.environ.get("RANK", "x")
        np.savez(
            os.path.join(_DIR, f"rank{rank}-{os.getpid()}.npz"),
            **flat("seen"), **flat("opened"), **flat("received"), **flat("own"),
            where=np.array(_records["where"], dtype=str),
            draws=np.array([f"{p}:{n}:{c}" for p, n, c in _records["draws"]], dtype=str),
        )

    atexit.register(dump)


def _record_combined(all_reduce):
    """What an opening toward every party leaves here: between two parties mpcfl combines the peer's
    share in the process (no torch.distributed buffer holds the sum), so its result is recorded as
    seen; where gloo's all_reduce ran, its buffers were recorded already (not twice)."""
    def spy(self, *args, **kwargs):
        before = _collectives[0]
        result = all_reduce(self, *args, **kwargs)
        if _collectives[0] != before:  # gloo's ring ran: its buffers, recorded, hold these sums
            return result
        for tensor in _tensors(result):
            _records["seen"].append((_phase[0], tensor.detach().cpu().clone().reshape(-1)))
            _records["where"].append(f"{_phase[0]}:all_reduce:combined:{tensor.dtype}:{tensor.nelement()}")
        return result

    spy._spy = True
    return spy


def _record_opened(reveal):
    def spy(self, dst=None):
        if dst is None:
            return reveal(self, dst=dst)
        with opening():
            result = reveal(self, dst=dst)
        if dst is not None and result is not None:
            _records["opened"].append((_phase[0], getattr(result, "data", result)))
        return result

    spy._spy = True
    return spy


if _DIR:
    _install()
