"""Every adaptation of crypten 0.4.1 to the torch we run on, in one place.

Import crypten only through :func:`mpcfl.mpc.engine.import_crypten`: it applies the
patches below (:func:`load`) first, once per process, and hands this module mpcfl's own
protocols to install (:class:`Protocols`): they import this module, so it imports none of
them. Each patch names what upstream breaks and has a test in ``tests/mpc/test_compat.py``
that fails if it regresses. No other module patches crypten or torch.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mpcfl.errors import MpcflError
from mpcfl.mpc import on_import

CRYPTEN_VERSION = "0.4.1"
#: The environment crypten.init reads: this process's rank, the parties' count, where they
#: meet and how (WORLD_SIZE counts the parties only; the dealer is rank WORLD_SIZE).
ENV_RANK, ENV_WORLD_SIZE, ENV_RENDEZVOUS, ENV_BACKEND = "RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND"
CRYPTEN_ENV = (ENV_RANK, ENV_WORLD_SIZE, ENV_RENDEZVOUS, ENV_BACKEND)
BACKEND = "gloo"
#: How long a silent peer may block the others, unless a job or launcher says otherwise.
DEFAULT_TIMEOUT_S = 60.0

_state: dict[str, Any] = {
    "crypten": None, "stock": False, "protocols": None, "timeout": datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
}


@dataclass(frozen=True)
class Protocols:
    """mpcfl's own protocols that the patches install, handed over by :mod:`mpcfl.mpc.engine`."""

    less_than_zero: Callable[[Any], Any]  # mpcfl.mpc.comparison
    sigmoid: Callable[[Any], Any]  # mpcfl.mpc.logistic
    product: Callable[..., Any]  # mpcfl.mpc.fixed_mask
    transposed: Callable[[Any, Any], Any]  # mpcfl.mpc.fixed_mask: tags x.t() of a fixed x
    ttp: types.ModuleType  # mpcfl.mpc.providers.ttp: the dealer and its party side
    divide: Callable[[Any, Any], Any]  # mpcfl.mpc.truncation


def _alias_onnx_registration() -> None:
    """crypten.nn.onnx_converter imports ``torch.onnx._internal.registration``.

    torch >= 2.9 moved that module to
    ``torch.onnx._internal.torchscript_exporter.registration``; without an alias
    ``import crypten`` fails with ModuleNotFoundError.
    """
    old = "torch.onnx._internal.registration"
    if old in sys.modules:
        return
    try:
        importlib.import_module(old)
        return
    except ModuleNotFoundError:
        pass
    moved = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
    sys.modules[old] = moved


def _force_legacy_onnx_exporter(converter: types.ModuleType) -> None:
    """``crypten.nn.from_pytorch`` calls ``torch.onnx.export`` with TorchScript-only
    arguments (operator_export_type, custom symbolic registry).

    torch >= 2.9 defaults to the dynamo exporter, which ignores that registry and
    emits graphs crypten cannot read; ask for the legacy exporter explicitly.
    """
    if getattr(converter._export_pytorch_model, "_mpcfl_patched", False):
        return
    import torch

    def export_legacy(f, pytorch_model, dummy_input):
        torch.onnx.export(
            pytorch_model,
            dummy_input,
            f,
            do_constant_folding=False,
            export_params=True,
            input_names=["input"],
            operator_export_type=torch.onnx.OperatorExportTypes.ONNX,
            output_names=["output"],
            opset_version=converter._OPSET_VERSION,
            dynamo=False,
        )
        return f

    export_legacy._mpcfl_patched = True  # type: ignore[attr-defined]
    converter._export_pytorch_model = export_legacy


_CONVERTER = "crypten.nn.onnx_converter"


def _converter() -> types.ModuleType:
    """crypten's ONNX converter, imported (with :func:`_alias_onnx_registration` first) and patched
    by :func:`_force_legacy_onnx_exporter` on first use."""
    module = sys.modules.get(_CONVERTER)
    if isinstance(module, _DeferredConverter):
        del sys.modules[_CONVERTER]
        _alias_onnx_registration()
        module = importlib.import_module(_CONVERTER)  # binds crypten.nn.onnx_converter to it
        _force_legacy_onnx_exporter(module)
    return module


def _deferred(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_converter(), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


class _DeferredConverter(types.ModuleType):
    """Stands in for ``crypten.nn.onnx_converter`` until something uses it.

    ``import crypten`` imports that converter, and with it the onnx package: about 1.5 s of CPU
    in every party and dealer process here, most of a process's start after torch's. mpcfl
    converts models by tracing (:mod:`mpcfl.models.convert`) and never calls it; a user's
    ``crypten.nn.from_pytorch`` (or any attribute of the module) imports the real one then.
    """

    def __init__(self) -> None:
        super().__init__(_CONVERTER)
        # what crypten.nn imports from it, without importing it
        for name in ("from_onnx", "from_pytorch", "from_tensorflow"):
            setattr(self, name, _deferred(name))
        self.TF_AND_TF2ONNX = all(importlib.util.find_spec(n) is not None for n in ("tensorflow", "tf2onnx"))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # module protocol lookups (inspect.getmodule walks sys.modules asking for __file__)
            raise AttributeError(name)
        return getattr(_converter(), name)


class _DistWithTimeout(types.ModuleType):
    """A view of ``torch.distributed`` whose group constructors carry our timeout.

    crypten's DistributedCommunicator calls ``dist.init_process_group`` and
    ``dist.new_group`` without a timeout, so gloo's 30-minute default applies and a
    hung peer blocks everyone for half an hour. crypten also refuses to finish its
    own set-up if the group already exists, so we cannot create it ourselves.
    Only crypten's module-level ``dist`` name is replaced; torch is untouched.
    """

    def __init__(self) -> None:
        super().__init__("torch.distributed")
        import torch.distributed as dist

        self._dist = dist

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dist, name)

    def init_process_group(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", _state["timeout"])
        wrapper = _state.get("store_wrapper")
        if wrapper is not None and "store" not in kwargs:
            # The rendezvous crypten names, as torch would reach it, handed to the wrapper (a TLS channel's
            # relays): gloo then finds its peers through what the wrapper publishes.
            store, rank, world = next(self._dist.rendezvous(
                kwargs.pop("init_method"), kwargs.pop("rank"), kwargs.pop("world_size"), timeout=kwargs["timeout"]
            ))
            # A store written in Python lives only as long as a Python reference to it: kept here, as the group is.
            _state["store"] = wrapper(store)
            kwargs.update(store=_state["store"], rank=rank, world_size=world)
        return self._dist.init_process_group(*args, **kwargs)

    def new_group(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", _state["timeout"])
        return self._dist.new_group(*args, **kwargs)


def _inject_process_group_timeout(crypten: types.ModuleType) -> None:
    module = crypten.communicator.distributed_communicator
    if not isinstance(module.dist, _DistWithTimeout):
        module.dist = _DistWithTimeout()


def set_store_wrapper(wrapper: Callable[[Any], Any] | None) -> None:
    """What the process group's rendezvous store goes through from now on (None: nothing)."""
    _state["store_wrapper"] = wrapper


def set_process_group_timeout(seconds: float) -> None:
    """Sets the timeout of the process groups crypten creates from now on."""
    _state["timeout"] = datetime.timedelta(seconds=seconds)


def process_group_timeout() -> datetime.timedelta:
    """The timeout crypten's process groups get."""
    return _state["timeout"]


def init_crypten(crypten: types.ModuleType, on_group_ready: Callable[[], None]) -> None:
    """``crypten.init()`` (0.4.1) with a hook between forming the process group and using it.

    crypten.init forms the group, then at once exchanges PRNG seeds with the other
    parties and receives its seed from the dealer. Authentication has to run in
    between, before anything but its own round crosses the wire, so the same steps
    are taken here with the hook inserted. The dealer's TTPServer later calls
    crypten.init() itself, which returns early on an initialised communicator.
    """
    comm = crypten.comm
    comm._init(use_threads=False, init_ttp=crypten.mpc.ttp_required())
    on_group_ready()
    if comm.get().get_rank() < comm.get().get_world_size():
        crypten._setup_prng()
        if crypten.mpc.ttp_required():
            crypten.mpc.provider.ttp_provider.TTPClient._init()


def end_crypten(crypten: types.ModuleType, *, failed: bool) -> None:
    """``crypten.uninit()``, except that party 0 of a failed session tells the dealer so.

    crypten's shutdown sends the dealer "terminate" whatever happened, so a dealer whose
    parties failed would end as if the job had succeeded. Party 0 sends
    :data:`mpcfl.mpc.providers.ttp.ABORT` instead, and the dealer stops with an error at once.
    ``crypten.uninit`` (patched: :func:`_uninit_cleanly`) also drops this process's dealer link,
    also where the script has already left: a process that joins a later session (federated
    survivors, :func:`mpcfl.mpc.session.reformed`) gets a fresh one.
    """
    if crypten.is_initialized():
        comm = crypten.comm.get()
        if failed and comm.get_rank() == 0 and getattr(comm, "ttp_initialized", False):
            with contextlib.suppress(RuntimeError):
                comm.send_obj(_state["protocols"].ttp.ABORT, comm.get_ttp_rank(), comm.ttp_group)
            comm.ttp_initialized = False  # so shutdown sends no "terminate" after it
    crypten.uninit()


def run_dealer_server(crypten: types.ModuleType, parties: Sequence[str]) -> None:
    """Serves triples as the dealer (:class:`mpcfl.mpc.providers.ttp.Dealer`) to ``parties`` (names by rank)
    until party 0 ends the session.

    CrypTen's own TTPServer is not used: it dispatches any method party 0 names and
    swallows link errors, so a dealer whose parties died would exit as if the job
    had finished. The Dealer raises both.
    """
    _state["protocols"].ttp.Dealer.start(crypten.comm.get(), parties).serve()


def _route_randomness(crypten: types.ModuleType, ttp: types.ModuleType) -> None:
    """Every mask, zero-sharing and triple share comes from AES-CTR, never ``torch.Generator``.

    crypten 0.4.1 draws them with ``torch.randint`` on Mersenne Twister generators
    seeded with 64-bit values of which the CPU keeps 32 (``crypten._setup_prng``,
    the TTP's seeds). Its modules import the two drawing functions of
    ``crypten.common.rng`` by name, so each importer's reference is replaced; the
    generator set-up of the parties and of the TTP client is replaced too.
    """
    from mpcfl.mpc.generators import make_drawers, setup_party_generators

    rng = crypten.common.rng
    if getattr(rng.generate_random_ring_element, "_mpcfl_patched", False):
        return
    ring_element, kbit_tensor = make_drawers(crypten)
    ring_element._mpcfl_patched = True  # type: ignore[attr-defined]
    provider = crypten.mpc.provider
    importers = (
        rng, crypten.mpc.primitives.arithmetic, crypten.mpc.primitives.binary,
        provider.ttp_provider, provider.tfp_provider,
    )
    for module in importers:
        for name, replacement in (("generate_random_ring_element", ring_element), ("generate_kbit_random_tensor", kbit_tensor)):
            if hasattr(module, name):
                setattr(module, name, replacement)
    crypten._setup_prng = lambda: setup_party_generators(crypten)
    provider.ttp_provider.TTPClient._TTPClient__TTPClient._setup_generators = ttp.receive_dealer_key


class _TTPServer:
    """What ``crypten.mpc.provider.TTPServer()`` starts under these patches: see :func:`_serve_as_dealer`.

    A module-level class with no state, so that an instance pickles: CrypTen's ``run_multiprocess``
    queues the dealer's return value (this instance) as it does a party's.
    """

    TERMINATE = -1  # crypten's TTPServer constant

    def __init__(self) -> None:
        crypten = loaded_crypten()
        if not crypten.is_initialized():  # run_multiprocess has initialised it; the test harness has not
            crypten.init()
        failed = True
        try:
            world = crypten.comm.get().get_world_size()
            run_dealer_server(crypten, [f"rank {rank}" for rank in range(world)])
            failed = False
        finally:
            end_crypten(crypten, failed=failed)


def _serve_as_dealer(crypten: types.ModuleType) -> None:
    """``crypten.mpc.provider.TTPServer()``, which CrypTen scripts and CrypTen's own tests start
    as the dealer process, serves as mpcfl's :class:`~mpcfl.mpc.providers.ttp.Dealer`.

    Under these patches the parties speak mpcfl's dealer protocol (a 128-bit key each,
    request digests, fixed masks), which crypten 0.4.1's server does not: it sends a 64-bit
    seed where parties wait for a key, then reads their digests as requests and, on the error
    that follows, closes, so party 0's ``crypten.uninit()`` fails sending "terminate" to it.
    The dealer is the one ``mpcfl dealer`` runs (request table, digests checked, data never
    seen). Who is authenticated is the caller's choice: a bare ``crypten.init()``
    authenticates nobody, as in CrypTen, while mpcfl's sessions authenticate every peer before
    their dealer serves (:func:`init_crypten`, :func:`run_dealer_server`). Served, it leaves the
    process group as a party does, so its process exits cleanly.
    """
    provider = crypten.mpc.provider
    provider.TTPServer = provider.ttp_provider.TTPServer = _TTPServer


def _uninit_cleanly(crypten: types.ModuleType, ttp: types.ModuleType) -> None:
    """``crypten.uninit()`` leaves the session if this process is still in one, and always drops
    its dealer link (the TTP client and :func:`mpcfl.mpc.providers.ttp.forget_session`).

    crypten 0.4.1 raises ValueError from ``torch.distributed`` where the session has already been
    left, yet CrypTen code ends with ``crypten.uninit()`` there too: a party script after
    :func:`mpcfl.join`'s block, CrypTen's ``run_multiprocess`` after the dealer's ``TTPServer``
    (:func:`_serve_as_dealer`), which leaves by itself; now it returns, as ``crypten.init()`` in a
    session does. And crypten keeps its TTP client, a singleton, past ``uninit``: a later
    ``crypten.init()`` or :func:`mpcfl.join` in the same process would draw from the old dealer's
    key, out of step with the new dealer's.
    """
    from crypten.mpc.provider.ttp_provider import TTPClient

    shipped = crypten.uninit
    if getattr(shipped, "_mpcfl_patched", False):
        return

    @functools.wraps(shipped)
    def uninit() -> None:
        try:
            if crypten.is_initialized():
                shipped()
        finally:
            TTPClient.uninit()
            ttp.forget_session()

    uninit._mpcfl_patched = True  # type: ignore[attr-defined]
    crypten.uninit = uninit


def _fix_negative_decoding(crypten: types.ModuleType) -> None:
    """crypten 0.4.1 decodes a negative fixed-point value with ``floor(t / (2^16 - 1))``.

    The integer part is then off by one whenever ``t / 2^32`` pushes the quotient
    across an integer: about 1.5% of values near -1000 come back 1.0 too low
    (measured on an opened -989.469 read as -990.469). Decode as floor division
    by the scale plus the non-negative remainder instead.
    """
    encoder = crypten.encoder.FixedPointEncoder
    if getattr(encoder.decode, "_mpcfl_patched", False):
        return
    original = encoder.decode

    def decode(self: Any, tensor: Any) -> Any:
        if tensor is None or self._scale <= 1:
            return original(self, tensor)
        whole = tensor.div(self._scale, rounding_mode="floor")
        fraction = tensor - whole * self._scale  # in [0, scale)
        return (whole.float() + fraction.float() / self._scale).data

    decode._mpcfl_patched = True  # type: ignore[attr-defined]
    encoder.decode = decode


def _copy_without_sharing(crypten: types.ModuleType) -> None:
    """``MPCTensor([])``, the empty shell that every ``shallow_copy``, ``clone`` and ``from_shares``
    fills (every CrypTen operation makes one), was meant to skip sharing (``if tensor is []``), but
    a new list is never that object: each shell encodes ``[]`` and draws a zero-sharing of no
    elements from both pairwise generators. Nothing is drawn (AES-CTR gives no words for size 0,
    so the streams stay where they were), but it cost about 0.2 ms a shell: a fifth of a served
    BERT-mini inference's time at each party (1,940 shells). An empty list now takes the branch it
    was written for."""
    import torch

    mpc_tensor = crypten.mpc.MPCTensor
    if getattr(mpc_tensor.__init__, "_mpcfl_patched", False):
        return
    original = mpc_tensor.__init__

    def __init__(self: Any, tensor: Any, ptype: Any = crypten.mpc.ptype.arithmetic, device: Any = None,
                 *args: Any, **kwargs: Any) -> None:
        if isinstance(tensor, list) and not tensor and not args and not kwargs:
            crypten.CrypTensor.__init__(self, requires_grad=False)
            self._tensor = torch.tensor([], device=device)
            self.ptype = ptype
            return
        original(self, tensor, ptype, device, *args, **kwargs)

    __init__._mpcfl_patched = True  # type: ignore[attr-defined]
    mpc_tensor.__init__ = __init__


def _announce_triple_requests(crypten: types.ModuleType, ttp: types.ModuleType) -> None:
    """Parties 1..n-1 tell the dealer each request they make (see :mod:`mpcfl.mpc.providers.ttp`).

    crypten 0.4.1 lets party 0 alone talk to the dealer, so the dealer cannot tell
    a request every party makes from one party 0 invented. The same wrappers record
    and serve prefetched batches (:func:`mpcfl.mpc.providers.ttp.prefetched`); party 0's
    ``ttp_request`` (:func:`mpcfl.mpc.providers.ttp.request`) answers a prefetched request
    from its queue, and hears whose digest the dealer gave up waiting for.
    """
    client = crypten.mpc.provider.ttp_provider.TTPClient._TTPClient__TTPClient
    client.ttp_request = ttp.request
    provider = crypten.mpc.provider.ttp_provider.TrustedThirdParty
    for method, function in ttp.PARTY_EXTENSIONS.items():  # the fixed-mask requests, wrapped below
        if not hasattr(provider, method):
            setattr(provider, method, function)
    rank = lambda: crypten.comm.get().get_rank()  # noqa: E731
    for request, method in ttp.PARTY_METHODS.items():
        original = getattr(provider, method)
        if not getattr(original, "_mpcfl_patched", False):
            wrapped = ttp.announcing(original, request, rank)
            wrapped._mpcfl_patched = True  # type: ignore[attr-defined]
            setattr(provider, method, wrapped)


def _skip_unused_matmul_gradient(crypten: types.ModuleType, product: Callable[..., Any]) -> None:
    """crypten 0.4.1's matmul backward computes the gradient of both operands, and its
    ``backward`` then drops the one whose operand needs none. In a linear layer (``x @ W^T``)
    that operand is the data: a whole n x d Beaver product, with its dealer request and
    opening, every training step for nothing. Skip it when the first operand does not
    require a gradient; every other case runs crypten's own backward. The gradient that
    remains, ``xᵀ·grad``, reuses the data's fixed mask where it has one (:func:`_reuse_data_masks`).
    """
    matmul = crypten.gradients.AutogradMatMul
    if getattr(matmul.backward, "_mpcfl_patched", False):
        return
    original = matmul.backward

    def backward(ctx: Any, grad_output: Any) -> Any:
        first, second = ctx.saved_tensors
        if first.requires_grad or first.dim() < 2 or second.dim() < 2:
            return original(ctx, grad_output)
        grad = product(first, grad_output, transposed=True)
        if grad is None:
            grad = first.transpose(-2, -1).matmul(grad_output)
        return (None, crypten.gradients._inverse_broadcast(grad, second.size()))

    backward._mpcfl_patched = True  # type: ignore[attr-defined]
    matmul.backward = staticmethod(backward)


def _keep_gradients_on_the_device(crypten: types.ModuleType) -> None:
    """crypten 0.4.1's backward of ``sum`` multiplies the gradient by ``torch.ones(size)`` made on
    the host: with CUDA shares the product mixes devices and fails (secure ViT training on an
    H200, where softmax sums each row). Here the ones are made on the gradient's device; on the
    CPU nothing changes.
    """
    import torch  # crypten is imported, so torch is

    function = crypten.gradients.AutogradSum
    if getattr(function.backward, "_mpcfl_patched", False):
        return

    def backward(ctx: Any, grad_output: Any) -> Any:
        size, dim, keepdim = ctx.saved_tensors
        if len(size) == 0:
            return grad_output
        if not keepdim and dim is not None:
            grad_output = grad_output.unsqueeze(dim)
        return grad_output.mul(torch.ones(size, device=grad_output.device))

    backward._mpcfl_patched = True  # type: ignore[attr-defined]
    function.backward = staticmethod(backward)


def _reuse_data_masks(crypten: types.ModuleType, product: Callable[..., Any], transposed: Callable[[Any, Any], Any]) -> None:
    """A product with a fixed tensor (training features, a served model's weights) takes a
    triple whose fixed factor is that tensor's mask (:mod:`mpcfl.mpc.fixed_mask`): only the
    other factor is opened.

    ``MPCTensor.matmul`` is where both CrypTen's autograd (``AutogradMatMul.forward``, which
    passes the same tensor objects) and a forward under ``no_grad`` multiply; any other
    operand runs crypten's own matmul. The data gradient's side is in
    :func:`_skip_unused_matmul_gradient`. ``MPCTensor.t`` keeps the fixed tag, as the
    transpose's (a linear layer multiplies by ``weight.t()``); crypten's ``AutogradT`` calls it
    too, so a transpose under autograd is tagged alike.
    """
    tensor = crypten.mpc.MPCTensor
    if getattr(tensor.matmul, "_mpcfl_patched", False):
        return
    original, original_t = tensor.matmul, tensor.t

    def matmul(self: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        result = None if args or kwargs else product(self, y, transposed=False)
        return original(self, y, *args, **kwargs) if result is None else result

    def t(self: Any) -> Any:
        return transposed(self, original_t(self))

    matmul._mpcfl_patched = t._mpcfl_patched = True  # type: ignore[attr-defined]
    tensor.matmul, tensor.t = matmul, t


def _serve_first(tensor: type, name: str, ours: Callable[..., Any]) -> None:
    """``tensor.name`` tries ``ours`` first and runs crypten's own where it returns None
    (crypten's stays reachable as ``__wrapped__``, for tests that compare the two)."""
    original = getattr(tensor, name)
    if getattr(original, "_mpcfl_patched", False):
        return

    @functools.wraps(original)
    def served(self: Any, *args: Any) -> Any:
        result = ours(self, *args)
        return original(self, *args) if result is None else result

    served._mpcfl_patched = True  # type: ignore[attr-defined]
    setattr(tensor, name, served)


def _compare_on_packed_bits(crypten: types.ModuleType, less_than_zero: Callable[[Any], Any]) -> None:
    """Parties compute ``x < 0`` with :mod:`mpcfl.mpc.comparison`: no more rounds than
    crypten 0.4.1's ``MPCTensor._ltz``, about a fifth of its bytes. Every comparison goes
    through ``_ltz`` (relu, sign, abs, where, max, the sigmoid's sign); any case that module
    declines runs crypten's own.
    """
    _serve_first(crypten.mpc.MPCTensor, "_ltz", less_than_zero)


def _sigmoid_in_lockstep(crypten: types.ModuleType, sigmoid: Callable[[Any], Any]) -> None:
    """``MPCTensor.sigmoid`` runs crypten's sigmoid with its sign and exp in the same rounds
    (:mod:`mpcfl.mpc.logistic`): 16 rounds instead of 24, the same function. Where that module
    declines (another method, a GPU, other than two parties) crypten's own runs.
    """
    _serve_first(crypten.mpc.MPCTensor, "sigmoid", sigmoid)


def _truncate_exactly(crypten: types.ModuleType, divide: Callable[[Any, Any], Any]) -> None:
    """``ArithmeticSharedTensor.div_`` by a public integer (the truncation after every fixed-point
    product) goes through the dealer's truncation pairs where the job's ``runtime.truncation``
    asks for it (:mod:`mpcfl.mpc.truncation`). crypten 0.4.1 divides each share locally with two
    parties, which returns garbage when the shares wrap (about |x| / 2^64 per entry), and with
    more ignores the wrap of the masked value it opens. Where that module declines (mode
    ``local``, no dealer, a GPU, a tensor divisor) crypten's own runs.
    """
    _serve_first(crypten.mpc.primitives.arithmetic.ArithmeticSharedTensor, "div_", divide)


class _Section(types.SimpleNamespace):
    """One level of crypten's settings as plain attributes (see :func:`_read_settings_natively`)."""


def _as_sections(value: Any) -> Any:
    return _Section(**{key: _as_sections(item) for key, item in value.items()}) if isinstance(value, dict) else value


def _read_settings_natively(crypten: types.ModuleType) -> None:
    """crypten's settings (``crypten.cfg``) become plain attributes instead of an OmegaConf tree.

    crypten 0.4.1 reads them on every operation: ``MPCTensor`` checks
    ``cfg.debug.validation_mode`` on each attribute access, the encoder and the providers
    read theirs per call. Each OmegaConf lookup costs about 30 us, about 15 ms of a
    W1 iteration's 60 ms of local compute, and every ``temp_override`` (crypten's
    reciprocal and max use them) merges whole trees. Same interface: dotted ``cfg["a.b"]``,
    ``cfg.a.b = v`` in place, ``load_config``, ``set_config``, and ``temp_override``, which
    works on a copy and puts the outer settings back afterwards, also when the block raises.
    """
    import yaml
    from omegaconf import OmegaConf

    config = crypten.config.CrypTenConfig
    if getattr(config, "_mpcfl_patched", False):
        return

    def _lookup(self: Any, name: str) -> Any:
        result = object.__getattribute__(self, "config")
        for key in name.split("."):
            result = getattr(result, key)
        return result

    def _section(self: Any, keys: list[str]) -> _Section:
        section = object.__getattribute__(self, "config")
        for key in keys:  # a new key creates its sections, as OmegaConf's merge did
            if not isinstance(getattr(section, key, None), _Section):
                setattr(section, key, _Section())
            section = getattr(section, key)
        return section

    def _assign(self: Any, name: str, value: Any) -> None:
        if name == "config":
            object.__setattr__(self, name, value if isinstance(value, _Section) else _as_sections(value))
            return
        keys = name.split(".")
        if isinstance(value, dict):  # a mapping merges into its section, as OmegaConf's merge did
            _section(self, keys)
            for key, item in value.items():
                _assign(self, f"{name}.{key}", item)
            return
        section = _section(self, keys[:-1])
        if isinstance(value, str) and isinstance(getattr(section, keys[-1], None), bool):
            # OmegaConf parsed a dotted write's text: a "False" must not turn debug_mode on by being truthy
            value = OmegaConf.from_dotlist([f"value={value}"]).value
        setattr(section, keys[-1], value)

    def load_config(self: Any, config_file: str | None = None) -> None:
        path = config._CrypTenConfig__DEFAULT_CONFIG_PATH if config_file is None else config_file  # '' is no file
        with open(path) as stream:
            self.config = yaml.safe_load(stream)

    def set_config(self: Any, other: Any) -> None:
        if isinstance(other, config):
            self.config = object.__getattribute__(other, "config")
        else:  # a dict or an OmegaConf tree, as the original accepted
            self.config = OmegaConf.to_container(other, resolve=True) if OmegaConf.is_config(other) else other

    @contextlib.contextmanager
    def temp_override(self: Any, override_dict: dict[str, Any]) -> Any:
        outer = object.__getattribute__(self, "config")
        self.config = copy.deepcopy(outer)  # a few dozen keys: microseconds, where a merge took ms
        try:
            for name, value in override_dict.items():
                _assign(self, name, value)
            yield
        finally:
            self.config = outer

    del config.__getattribute__  # attribute reads of the settings fall through to __getattr__
    config.__getattr__ = _lookup
    config.__getitem__ = _lookup
    config.__setattr__ = _assign
    config.__setitem__ = _assign
    config.load_config, config.set_config, config.temp_override = load_config, set_config, temp_override
    config._mpcfl_patched = True
    # The live object keeps its identity (modules hold it by name) and what was set on it before.
    crypten.cfg.config = OmegaConf.to_container(object.__getattribute__(crypten.cfg, "config"), resolve=True)


def _open_point_to_point(crypten: types.ModuleType) -> None:
    """Opening toward one party sends shares point-to-point, and toward all parties in one
    exchange (see :mod:`mpcfl.mpc.opening`).

    crypten's decryption toward one rank r (``dst=r``), arithmetic or binary, calls the
    communicator's ``reduce``; gloo's reduce is a ring that leaves partial sums,
    i.e. slices of the plaintext, with the parties that are not r. Its ``all_reduce`` (every
    Beaver opening) is a ring too: several hops for a few words.
    """
    from mpcfl.mpc.opening import all_reduce_by_exchange, reduce_point_to_point

    communicator = crypten.communicator.distributed_communicator.DistributedCommunicator
    communicator.reduce = reduce_point_to_point
    if not getattr(communicator.all_reduce, "_mpcfl_patched", False):
        communicator._gloo_all_reduce = communicator.all_reduce.__wrapped__  # counted once, by the wrapper below

        def all_reduce(self: Any, *args: Any, **kwargs: Any) -> Any:  # the name crypten's _logging counts by
            return all_reduce_by_exchange(self, *args, **kwargs)

        exchange = crypten.communicator.communicator._logging(all_reduce)
        exchange._mpcfl_patched = True  # type: ignore[attr-defined]
        communicator.all_reduce = exchange


def apply_function(function: type, *inputs: Any) -> Any:
    """``function.forward(ctx, *inputs)`` recorded on CrypTen's autograd tape, as CrypTen records
    its registered functions, without registering a name in its global registry.

    ``function`` has CrypTen's ``AutogradFunction`` shape: static ``forward(ctx, *inputs)``
    returning one CrypTensor and ``backward(ctx, grad)`` returning one gradient per CrypTensor
    input, in order (CrypTen's ``backward`` pairs them with the result's children). It runs
    without a tape where no input needs a gradient, or autograd is off (inference).
    """
    crypten = loaded_crypten()
    children = [t for t in inputs if isinstance(t, crypten.CrypTensor)]
    recording = crypten.CrypTensor.AUTOGRAD_ENABLED and any(t.requires_grad for t in children)
    ctx = crypten.gradients.AutogradContext() if recording else crypten.gradients.BaseAutogradContext()
    with crypten.no_grad():  # the forward's own operations are not recorded one by one
        result = function.forward(ctx, *inputs)
    if recording:
        result.requires_grad, result.children, result.grad_fn, result.ctx = True, children, function, ctx
    return result


def load(protocols: Protocols, *, stock: bool = False) -> types.ModuleType:
    """Imports crypten with every adaptation applied, ``protocols`` installed (see
    :func:`mpcfl.mpc.engine.import_crypten`, which hands them over, for ``stock``).

    Raises:
        MpcflError: crypten is missing, is not the version these patches target, or was
            already imported in the other mode in this process.
    """
    if _state["crypten"] is not None:
        if _state["stock"] != stock:
            raise MpcflError(
                f"crypten is already imported {'in stock mode' if _state['stock'] else 'with mpcfl patches'} in this "
                f"process; a process runs one or the other"
            )
        return _state["crypten"]
    try:
        crypten = _import_and_patch(protocols, stock=stock)
    except BaseException:
        # A crypten left in sys.modules half patched would be what the next plain `import crypten` gets,
        # without the finder of mpcfl.mpc.on_import ever being asked: it must not outlive the failure.
        for name in [n for n in sys.modules if n == "crypten" or n.startswith("crypten.")]:
            del sys.modules[name]
        raise
    _state["crypten"], _state["stock"] = crypten, stock
    return crypten


def _import_and_patch(protocols: Protocols, *, stock: bool) -> types.ModuleType:
    try:
        sys.modules.setdefault(_CONVERTER, _DeferredConverter())
        with on_import.standing_aside():  # this import is the one that gets patched
            crypten = importlib.import_module("crypten")
    except ModuleNotFoundError as err:
        raise MpcflError(
            f"crypten is not installed ({err}); run `make install`, or "
            f"`pip install crypten=={CRYPTEN_VERSION} --no-deps`"
        ) from err
    if crypten.__version__ != CRYPTEN_VERSION:
        raise MpcflError(
            f"mpcfl needs crypten {CRYPTEN_VERSION}, found {crypten.__version__}"
        )
    if not hasattr(crypten.nn, "onnx_converter"):  # the import bound what it found in sys.modules to nothing
        crypten.nn.onnx_converter = sys.modules[_CONVERTER]
    if not stock:
        _state["protocols"] = protocols
        _inject_process_group_timeout(crypten)
        _route_randomness(crypten, protocols.ttp)
        _serve_as_dealer(crypten)
        _uninit_cleanly(crypten, protocols.ttp)
        _open_point_to_point(crypten)
        _fix_negative_decoding(crypten)
        _copy_without_sharing(crypten)
        _announce_triple_requests(crypten, protocols.ttp)
        _skip_unused_matmul_gradient(crypten, protocols.product)
        _keep_gradients_on_the_device(crypten)
        _reuse_data_masks(crypten, protocols.product, protocols.transposed)
        _compare_on_packed_bits(crypten, protocols.less_than_zero)
        _sigmoid_in_lockstep(crypten, protocols.sigmoid)
        _truncate_exactly(crypten, protocols.divide)
        _read_settings_natively(crypten)
    return crypten


def loaded_crypten() -> types.ModuleType:
    """crypten as :func:`load` imported it, for the protocols it installs: they run inside it.

    Raises:
        MpcflError: crypten is not imported yet (:func:`mpcfl.mpc.engine.import_crypten` imports it).
    """
    if _state["crypten"] is None:
        raise MpcflError("crypten is not imported yet: import it with mpcfl.mpc.engine.import_crypten")
    return _state["crypten"]
