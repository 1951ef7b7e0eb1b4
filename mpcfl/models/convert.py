"""torch.nn models to secure models, straight from the torch.fx graph.

CrypTen's own ``from_pytorch`` goes through the ONNX exporter, which torch keeps
changing and whose ``Identity`` nodes CrypTen cannot read. Here the model is
traced with ``torch.fx`` and each node is run with CrypTen's tensor operations,
so the graph never leaves torch. Every node is checked before anything is
shared: an unsupported layer or function is refused by name, never guessed at.

For inference the model is evaluated as in ``model.eval()`` (as ``torch.onnx.export``
does): dropout is the identity and batch norm uses its running statistics, which
the owner folds into one scale and shift per channel before sharing. For training
(:func:`trainable`), the same graph runs on encrypted parameters with CrypTen's
autograd; layers that behave differently in training (dropout, batch norm) are refused.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mpcfl.errors import MpcflError
from mpcfl.models import transformer as tf
from mpcfl.mpc.engine import import_crypten


class UnsupportedModelError(MpcflError):
    """The model uses a layer, function or construct that cannot run under MPC here."""


def _pair(value: Any) -> Any:
    return value if isinstance(value, int) else tuple(value)


def _channel_view(t: Any, x: Any) -> Any:
    """A per-channel vector shaped to broadcast against ``x`` of shape (N, C, ...)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _no_params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {}


def _own_params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in m.named_parameters(recurse=False)}


def _all_params(m: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a composite layer run as one leaf, by dotted local name."""
    return {name: t.detach() for name, t in m.named_parameters()}


def _checked(check: Callable[[Any], None], params: Callable[[Any], dict[str, torch.Tensor]]) -> Callable[[Any], dict[str, torch.Tensor]]:
    """A params function that first refuses the layer's unsupported settings."""

    def checked(m: nn.Module) -> dict[str, torch.Tensor]:
        with _refusing():
            check(m)
        return params(m)

    return checked


@contextlib.contextmanager
def _refusing() -> Iterator[None]:
    """An operator's refusal (UnsupportedOperationError) as the converter's, with the same message."""
    try:
        yield
    except tf.UnsupportedOperationError as err:
        raise UnsupportedModelError(str(err)) from None


def _embedding_check(m: nn.Embedding) -> None:
    if m.max_norm is not None:
        raise tf.UnsupportedOperationError("Embedding with max_norm (it renormalises the table at lookup)")


def _linear(m: nn.Linear, x: Any, p: dict[str, Any]) -> Any:
    out = x.matmul(p["weight"].t())
    return out + p["bias"] if "bias" in p else out


def _conv_params(m: nn.Conv1d | nn.Conv2d) -> dict[str, torch.Tensor]:
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedModelError(f"{type(m).__name__} with padding={m.padding!r}, padding_mode={m.padding_mode!r}")
    return _own_params(m)


def _conv(m: nn.Conv1d | nn.Conv2d, x: Any, p: dict[str, Any]) -> Any:
    if torch.is_tensor(x):  # plaintext emulation (emulate): the same call on torch's functions
        conv = functools.partial(F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d, x)
    else:
        conv = x.conv1d if isinstance(m, nn.Conv1d) else x.conv2d
    out = conv(p["weight"], stride=_pair(m.stride), padding=_pair(m.padding), dilation=_pair(m.dilation), groups=m.groups)
    return out + _channel_view(p["bias"], out) if "bias" in p else out


def _batchnorm_params(m: nn.modules.batchnorm._BatchNorm) -> dict[str, torch.Tensor]:
    """Eval-mode batch norm as y = x * scale + shift, folded in plaintext by the owner."""
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedModelError(f"{type(m).__name__} without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    return {"scale": scale.detach(), "shift": shift.detach()}


def _batchnorm(m: nn.Module, x: Any, p: dict[str, Any]) -> Any:
    return x * _channel_view(p["scale"], x) + _channel_view(p["shift"], x)


def _max_pool_params(m: nn.MaxPool2d) -> dict[str, torch.Tensor]:
    if m.return_indices:
        raise UnsupportedModelError("MaxPool2d with return_indices=True")
    return {}


def _max_pool(m: nn.MaxPool2d, x: Any, p: dict[str, Any]) -> Any:
    return x.max_pool2d(
        _pair(m.kernel_size), padding=_pair(m.padding), stride=_pair(m.stride),
        dilation=_pair(m.dilation), ceil_mode=m.ceil_mode,
    )


def _avg_pool_params(m: nn.AvgPool2d) -> dict[str, torch.Tensor]:
    if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
        raise UnsupportedModelError("AvgPool2d with ceil_mode, count_include_pad=False or divisor_override")
    return {}


def _avg_pool(m: nn.AvgPool2d, x: Any, p: dict[str, Any]) -> Any:
    return x.avg_pool2d(_pair(m.kernel_size), stride=_pair(m.stride), padding=_pair(m.padding))


def _unflatten(m: nn.Unflatten, x: Any, p: dict[str, Any]) -> Any:
    shape = list(x.size())
    dim = m.dim % len(shape)
    return x.reshape(*shape[:dim], *m.unflattened_size, *shape[dim + 1 :])


def _unflatten_params(m: nn.Unflatten) -> dict[str, torch.Tensor]:
    if not isinstance(m.dim, int) or -1 in tuple(m.unflattened_size):
        raise UnsupportedModelError("Unflatten with a named dim or a -1 size")
    return {}


def _adaptive_size(m: nn.AdaptiveAvgPool2d) -> tuple[int, int]:
    size = m.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if None in size:
        raise UnsupportedModelError("AdaptiveAvgPool2d with a None output size")
    return size


def _adaptive_avg_pool_params(m: nn.AdaptiveAvgPool2d) -> dict[str, torch.Tensor]:
    _adaptive_size(m)
    return {}


# layer type -> (the plaintext tensors its owner shares, how to run it on a CrypTensor)
_LAYERS: dict[type, tuple[Callable[[Any], dict[str, torch.Tensor]], Callable[[Any, Any, dict[str, Any]], Any]]] = {
    nn.Linear: (_own_params, _linear),
    nn.Conv1d: (_conv_params, _conv),
    nn.Conv2d: (_conv_params, _conv),
    nn.BatchNorm1d: (_batchnorm_params, _batchnorm),
    nn.BatchNorm2d: (_batchnorm_params, _batchnorm),
    nn.ReLU: (_no_params, lambda m, x, p: x.relu()),
    nn.Sigmoid: (_no_params, lambda m, x, p: x.sigmoid()),
    nn.Tanh: (_no_params, lambda m, x, p: x.tanh()),
    nn.MaxPool2d: (_max_pool_params, _max_pool),
    nn.AvgPool2d: (_avg_pool_params, _avg_pool),
    nn.AdaptiveAvgPool2d: (_adaptive_avg_pool_params, lambda m, x, p: x.adaptive_avg_pool2d(_adaptive_size(m))),
    nn.Flatten: (_no_params, lambda m, x, p: x.flatten(m.start_dim, m.end_dim)),
    nn.Unflatten: (_unflatten_params, _unflatten),
    nn.Dropout: (_no_params, lambda m, x, p: x),
    nn.Identity: (_no_params, lambda m, x, p: x),
    nn.Softmax: (_no_params, lambda m, x, p: tf.softmax(x, m.dim)),
    nn.LayerNorm: (_checked(tf.check_layer_norm, _own_params), lambda m, x, p: tf.layer_norm(x, p, m.eps)),
    nn.GELU: (_no_params, lambda m, x, p: tf.gelu(x, m.approximate)),
    nn.SiLU: (_no_params, lambda m, x, p: tf.silu(x)),
    nn.MultiheadAttention: (_checked(tf.check_multihead, _all_params), tf.multihead_attention),
    nn.TransformerEncoderLayer: (_checked(tf.check_encoder_layer, _all_params), tf.encoder_layer),
    nn.TransformerEncoder: (
        _checked(lambda m: [tf.check_encoder_layer(layer) for layer in m.layers], _all_params), tf.encoder,
    ),
    nn.TransformerDecoderLayer: (_checked(tf.check_encoder_layer, _all_params), tf.decoder_layer),
    nn.TransformerDecoder: (
        _checked(lambda m: [tf.check_encoder_layer(layer) for layer in m.layers], _all_params), tf.decoder,
    ),
    # the data owner one-hot encodes its token ids before sharing (encode_inputs): a lookup is a product
    nn.Embedding: (_checked(_embedding_check, _own_params), lambda m, x, p: x.matmul(p["weight"])),
    nn.LogSoftmax: (_no_params, lambda m, x, p: x.log_softmax(m.dim)),
}


# layers whose shared tensors are not their parameters (folded by the owner before sharing)
_TRANSFORMED = (nn.BatchNorm1d, nn.BatchNorm2d)


def _dim_of(args: tuple, kwargs: dict, position: int = 1) -> int:
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if dim is None:
        raise UnsupportedModelError("softmax without an explicit dim")
    return dim


def _add(a: Any, b: Any) -> Any:
    """a + b, where an operand that is a public mask with -inf stays apart until the softmax."""
    if tf.is_public_mask(b):
        return tf.add_public_mask(a, b)
    if tf.is_public_mask(a):
        return tf.add_public_mask(b, a)
    return a + b


def _functional_layer_norm(x: Any, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    if len(tuple(shape)) != 1:
        raise UnsupportedModelError(f"layer_norm over {len(tuple(shape))} dims (the last dim is supported)")
    return tf.layer_norm(x, {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}, eps)


# functions a traced forward() may call -> how to run them (CrypTensors and plain values mixed)
_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    operator.add: _add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.truediv: operator.truediv,
    # called by name: Python's indexing looks __getitem__ up on the type, past CrypTen's autograd
    operator.getitem: lambda a, index: a.__getitem__(index),
    operator.floordiv: operator.floordiv,  # shape arithmetic (CrypTensors have no floor division)
    torch.add: _add,
    torch.flatten: lambda x, start_dim=0, end_dim=-1: x.flatten(start_dim, end_dim),
    torch.relu: lambda x: x.relu(),
    F.relu: lambda x, inplace=False: x.relu(),
    torch.sigmoid: lambda x: x.sigmoid(),
    torch.tanh: lambda x: x.tanh(),
    F.softmax: lambda x, *a, **k: tf.softmax(x, _dim_of((x, *a), k)),
    torch.softmax: lambda x, *a, **k: tf.softmax(x, _dim_of((x, *a), k)),
    F.gelu: lambda x, approximate="none": tf.gelu(x, approximate),
    F.silu: lambda x, inplace=False: tf.silu(x),
    F.layer_norm: _functional_layer_norm,
    F.scaled_dot_product_attention: tf.scaled_dot_product_attention,
    tf.decoder_positions: tf.decoder_positions,
    torch.matmul: lambda a, b: a.matmul(b),
    operator.matmul: lambda a, b: a.matmul(b),
    torch.transpose: lambda x, a, b: x.transpose(a, b),
    getattr: lambda x, name: x.size(),  # ``x.shape``, the only attribute trace() lets through
    torch.cat: tf.cat,
    F.log_softmax: lambda x, *a, **k: x.log_softmax(_dim_of((x, *a), k)),
}

_METHODS = {
    "view", "reshape", "flatten", "size", "relu", "sigmoid", "tanh", "mean", "sum",
    "transpose", "squeeze", "unsqueeze", "add", "sub", "mul", "dim", "matmul",
}
_IDENTITY_METHODS = {"contiguous"}


def _expand(x: Any, *sizes: Any) -> Any:
    """``x.expand`` as a sum with public zeros of the expanded shape: free, and its gradient sums
    back over the broadcast dims (CrypTen's expand records none)."""
    sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)) else sizes
    lead = len(sizes) - x.dim()
    shape = [x.size(i - lead) if n == -1 else n for i, n in enumerate(sizes)]
    return x + torch.zeros(shape, device=x.device)  # a share's device: CUDA refuses a host operand


def _permute(x: Any, *dims: Any) -> Any:
    """``x.permute`` with the dims as varargs or one sequence: CrypTen's autograd takes one tuple."""
    return x.permute(tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims)


# methods run by our operators rather than CrypTen's (its softmax has no clamp; its split, unbind
# and expand have no gradient)
_OWN_METHODS: dict[str, Callable[..., Any]] = {
    "softmax": lambda x, *a, **k: tf.softmax(x, _dim_of((x, *a), k)),
    "chunk": lambda x, chunks, dim=0: tf.split(x, -(-x.size(dim) // chunks), dim),  # as torch sizes the chunks
    "split": tf.split,
    "unbind": lambda x, dim=0: tuple(t.squeeze(dim) for t in tf.split(x, 1, dim)),
    "expand": _expand,
    "permute": _permute,
}


def _describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.op.replace('call_', '')} {name!r} (node {node.name})"


def _is(gm: torch.fx.GraphModule, node: torch.fx.Node, module: type, functions: tuple, method: str) -> bool:
    """Whether ``node`` is one operation in any of its three spellings: a module, a function, a method."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), module)
    return (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target == method)


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return _is(gm, node, nn.ReLU, (torch.relu, F.relu), "relu")


def _pool_before_relu(gm: torch.fx.GraphModule) -> int:
    """Rewrites relu -> maxpool as maxpool -> relu; returns how many pairs it swapped.

    Both orders give the same result (relu is monotonic, so it commutes with max),
    but a comparison under MPC costs far more than a multiplication: pooling first
    runs the relu's comparisons on a quarter of the values for a 2x2 pool.
    """
    swapped = 0
    for pool in list(gm.graph.nodes):
        if pool.op != "call_module" or not isinstance(gm.get_submodule(pool.target), nn.MaxPool2d):
            continue
        relu = pool.args[0]
        if not isinstance(relu, torch.fx.Node) or not _is_relu(gm, relu) or len(relu.users) != 1:
            continue
        source = relu.args[0]
        pool.replace_all_uses_with(relu)
        relu.args = (pool, *relu.args[1:])
        pool.args = (source,)
        pool.append(relu)
        swapped += 1
    if swapped:
        gm.graph.lint()
        gm.recompile()
    return swapped


def _from_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _traced_root(model: nn.Module) -> nn.Module:
    """The module fx traces: a bare composite torch layer (an encoder layer...) wrapped, so that
    it runs as a leaf, as it does inside a model (fx traces the root's own forward); a Hugging Face
    model rewritten with a forward fx traces, on the model's own submodules (:mod:`.huggingface`)."""
    if _from_transformers(model):
        from mpcfl.models import huggingface  # only here: transformers is an optional dependency

        with _refusing():
            return huggingface.traceable(model)
    inside = next(((name, m) for name, m in model.named_modules() if _from_transformers(m)), None)
    if inside is not None:  # fx would trace into it and fail on HF's internals, far from its name
        raise UnsupportedModelError(
            f"layer {inside[0]!r} ({type(inside[1]).__name__}) is not supported under MPC: Hugging Face layers "
            "run only inside the Hugging Face models supported (see mpcfl.models.huggingface)"
        )
    if type(model).__module__.startswith("torch.nn.modules") and list(model.children()) and not isinstance(
        model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    ):
        return nn.Sequential(model)
    return model


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Traces an eval-mode copy of ``model``, checks that every node can run securely,
    and reorders relu/max-pool pairs to compare fewer values.

    Raises:
        UnsupportedModelError: names the first unsupported layer, function or method.
    """
    model = _traced_root(copy.deepcopy(model).eval())
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types for data-dependent control flow
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced with torch.fx: {str(err).splitlines()[0]}"
        ) from None
    gm.meta["key_value_cache"] = getattr(type(model), "key_value_cache", False) is True  # see tf.cacheable
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}.forward takes {len(inputs)} inputs; one is supported")
    for node in gm.graph.nodes:
        if node.op == "call_module":
            layer = gm.get_submodule(node.target)
            if type(layer) not in _LAYERS:
                supported = ", ".join(sorted(t.__name__ for t in _LAYERS))
                raise UnsupportedModelError(
                    f"{_describe(gm, node)} is not supported under MPC (supported layers: {supported})"
                )
            _LAYERS[type(layer)][0](layer)  # refuses unsupported settings early
        elif node.op == "call_function" and (
            node.target not in _FUNCTIONS or (node.target is getattr and node.args[1] != "shape")
        ):
            raise UnsupportedModelError(f"{_describe(gm, node)} is not supported under MPC")
        elif node.op == "call_method" and node.target not in _METHODS | _IDENTITY_METHODS | _OWN_METHODS.keys():
            raise UnsupportedModelError(f"{_describe(gm, node)} is not supported under MPC")
    _check_masks(gm)
    _check_embeddings(gm, inputs[0])
    _pool_before_relu(gm)
    return gm


def _is_softmax(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return _is(gm, node, nn.Softmax, (F.softmax, torch.softmax), "softmax")


def _check_masks(gm: torch.fx.GraphModule) -> None:
    """A public mask added to scores (a float mask holding -inf) must go straight to a softmax:
    fixed point cannot hold -inf, so the sum exists only inside the softmax."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not tf.is_public_mask(_fetch_attr(gm, node.target)):
            continue
        for user in node.users:
            if user.op == "call_function" and user.target in (operator.add, torch.add):
                if not all(_is_softmax(gm, n) for n in user.users):
                    raise UnsupportedModelError(
                        f"the mask {node.target!r} is added in node {user.name}, whose result must go straight "
                        "to a softmax (a mask with -inf is public and cannot be secret-shared)"
                    )


def _check_embeddings(gm: torch.fx.GraphModule, placeholder: torch.fx.Node) -> None:
    """nn.Embedding only on the model's input (token ids), all of one vocabulary: the data owner
    one-hot encodes its ids before sharing (encode_inputs), so a lookup is a product."""
    embeddings = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Embedding)]
    for node in embeddings:
        if node.args[0] is not placeholder:
            raise UnsupportedModelError(
                f"{_describe(gm, node)} must take the model's input (token ids owned by the data owner) directly"
            )
    if embeddings:
        others = [u for u in placeholder.users if u not in embeddings]
        sizes = {gm.get_submodule(n.target).num_embeddings for n in embeddings}
        if others or len(sizes) > 1:
            raise UnsupportedModelError(
                "a model whose input feeds nn.Embedding must use it only there, with one vocabulary size"
            )


def one_hot_width(gm: torch.fx.GraphModule) -> int | None:
    """The vocabulary size where the model's input is token ids (it feeds nn.Embedding), else None."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Embedding):
            return gm.get_submodule(node.target).num_embeddings
    return None


def encode_inputs(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """What the data owner secret-shares: ``x`` itself, or, for a model that embeds token ids,
    their one-hot encoding (float, one more dim of the vocabulary's size), made locally in plaintext.

    Raises:
        UnsupportedModelError: token ids that are not integers in [0, vocabulary).
    """
    width = one_hot_width(gm)
    if width is None:
        return x
    ids = x.long()
    if not torch.equal(ids.to(x.dtype), x) or bool((ids < 0).any()) or bool((ids >= width).any()):
        raise UnsupportedModelError(f"token ids must be integers in [0, {width}) for the model's nn.Embedding")
    return F.one_hot(ids, width).float()


def plain_parameters(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the model owner shares, by name, in graph order (batch norm folded)."""
    tensors: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            layer = gm.get_submodule(node.target)
            for name, value in _LAYERS[type(layer)][0](layer).items():
                tensors.setdefault(f"{node.target}.{name}", value.float())
        elif node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if not tf.is_public_mask(value):
                tensors.setdefault(node.target, value.detach().float())
    return tensors


def public_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The attention masks the model reads (bool, or holding -inf): part of the public
    architecture, used in plaintext at every party, never shared."""
    return {
        node.target: _fetch_attr(gm, node.target).detach()
        for node in gm.graph.nodes
        if node.op == "get_attr" and tf.is_public_mask(_fetch_attr(gm, node.target))
    }


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    if not torch.is_tensor(value):
        raise UnsupportedModelError(f"attribute {target!r} is not a tensor")
    return value


def run_graph(gm: torch.fx.GraphModule, x: Any, tensors: Callable[[str], Any]) -> Any:
    """Runs the traced graph on ``x`` with CrypTen's operations.

    Args:
        tensors: a layer's target -> its tensors by local name (a ``call_module``),
            or an attribute's target -> the tensor itself (a ``get_attr``).
    """
    env: dict[str, Any] = {}

    def load(arg: Any) -> Any:
        return torch.fx.node.map_arg(arg, lambda n: env[n.name])

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = x
        elif node.op == "get_attr":
            env[node.name] = tensors(node.target)
        elif node.op == "call_module":
            layer = gm.get_submodule(node.target)
            arg, *rest = load(node.args)
            env[node.name] = _LAYERS[type(layer)][1](layer, arg, tensors(node.target), *rest, **load(node.kwargs))
        elif node.op == "call_function":
            env[node.name] = _FUNCTIONS[node.target](*load(node.args), **load(node.kwargs))
        elif node.op == "call_method":
            target, *rest = load(node.args)
            if node.target in _IDENTITY_METHODS:
                env[node.name] = target
            elif node.target in _OWN_METHODS:
                env[node.name] = _OWN_METHODS[node.target](target, *rest, **load(node.kwargs))
            else:
                env[node.name] = getattr(target, node.target)(*rest, **load(node.kwargs))
        elif node.op == "output":
            return load(node.args[0])
    raise UnsupportedModelError("the traced graph has no output")


def emulate(model: nn.Module, x: torch.Tensor, approximations: tf.Approximations = "mpc_friendly") -> torch.Tensor:
    """``model`` on ``x`` in plaintext with the operators of ``approximations``, differentiably
    through ``model``'s own parameters: to score a model in the MPC-friendly mode before serving
    it, and to distil it to that mode (examples/make_digits_vit.py). Token ids are one-hot encoded
    as for sharing. Layers whose tensors the owner transforms before sharing (batch norm) take
    those, detached.

    Raises:
        UnsupportedModelError: as :func:`trace`.
    """
    gm = trace(model)
    root = _traced_root(model)
    modules = dict(root.named_modules())

    def tensors(target: str) -> Any:
        if target not in modules:  # a get_attr: a parameter, buffer or mask
            return _fetch_attr(root, target)
        module = modules[target]
        return _LAYERS[type(module)][0](module) if isinstance(module, _TRANSFORMED) else dict(module.named_parameters())

    with tf.approximations(approximations):
        return run_graph(gm, encode_inputs(gm, x), tensors)


@dataclass
class SecureModel:
    """A traced model whose tensors are secret-shared; call it on a CrypTensor."""

    graph_module: torch.fx.GraphModule
    tensors: dict[str, Any]  # shared tensors by name, as plain_parameters names them

    def _tensors_of(self, target: str) -> Any:
        if target in self.tensors:
            return self.tensors[target]
        prefix = f"{target}."  # a leaf's tensors, nested ones too (attention, encoder layers)
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def __call__(self, x: Any) -> Any:
        return run_graph(self.graph_module, x, self._tensors_of)


def encrypt_model(gm: torch.fx.GraphModule, *, src: int, device: torch.device | str = "cpu") -> SecureModel:
    """Secret-shares the traced model's tensors from rank ``src``.

    Every party calls this with a model of the same architecture; only ``src``'s
    tensor values matter, the others' are placeholders of the right shape.
    """
    crypten = import_crypten()
    tensors = {name: crypten.cryptensor(t, src=src, device=device) for name, t in plain_parameters(gm).items()}
    return SecureModel(graph_module=gm, tensors={**tensors, **public_tensors(gm)})


# Layers whose training behaviour differs from eval: CrypTen would train them as in eval.
_EVAL_ONLY = (nn.Dropout, nn.modules.batchnorm._BatchNorm)
# Layers with dropout inside them (attention, encoder and decoder layers): trainable when it is 0.
_DROPOUT_INSIDE = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder,
                   nn.TransformerDecoderLayer, nn.TransformerDecoder)


def _dropout_inside(layer: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules()) or (
        isinstance(layer, nn.MultiheadAttention) and layer.dropout > 0
    )


def trainable(model: nn.Module) -> Any:
    """An unencrypted CrypTen module that trains ``model``'s graph with CrypTen's autograd.

    Its parameters are ``model``'s, with the names of ``model.state_dict()`` (``features.0.weight``),
    held in nested CrypTen modules that mirror ``model``'s submodules, so ``encrypt``, ``to``,
    ``named_parameters`` and CrypTen's optimisers work on it as on any CrypTen module, and the
    revealed weights load back into ``model``.

    Raises:
        UnsupportedModelError: a layer or construct cannot run under MPC, or cannot be trained.
    """
    if _from_transformers(model):  # the rewrite (mpcfl.models.huggingface) runs as in eval: no dropout
        raise UnsupportedModelError(f"{type(model).__name__}: Hugging Face models run under MPC for inference only "
                                    "(their rewrite leaves out dropout)")
    gm = trace(model)
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _EVAL_ONLY):
            raise UnsupportedModelError(
                f"{_describe(gm, node)} behaves differently in training and cannot be trained under MPC here; "
                "remove it (it works for secure inference)"
            )
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _DROPOUT_INSIDE) and _dropout_inside(
            gm.get_submodule(node.target)
        ):
            raise UnsupportedModelError(
                f"{_describe(gm, node)} has dropout > 0, which behaves differently in training and cannot be trained "
                "under MPC here; set dropout=0.0 (it works for secure inference)"
            )
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention and node.kwargs.get("dropout_p"):
            raise UnsupportedModelError(f"{_describe(gm, node)} with dropout_p > 0 cannot be trained under MPC here")
    return _trainable_class()(gm, dict(model.named_parameters()))


@functools.cache
def _trainable_class() -> type:
    """The CrypTen module class; made on first use, as importing crypten is heavy."""
    crypten = import_crypten()

    class TrainableGraph(crypten.nn.Module):
        """A traced torch model whose tensors live in a tree of CrypTen modules."""

        def __init__(self, gm: torch.fx.GraphModule, parameters: dict[str, torch.Tensor]) -> None:
            super().__init__()
            object.__setattr__(self, "graph_module", gm)  # not a CrypTen submodule
            # attention masks: public, the same at every party, never encrypted (nor trained)
            object.__setattr__(self, "masks", public_tensors(gm))
            for name, value in plain_parameters(gm).items():
                where, _, local = name.rpartition(".")
                holder = self._holder(where, create=True)
                if name in parameters:
                    holder.register_parameter(local, value.clone())
                else:  # a tensor attribute the forward reads but does not train
                    holder.register_buffer(local, value.clone())

        def _holder(self, path: str, *, create: bool = False) -> Any:
            """The CrypTen module at ``path``; None where the torch module holds no tensors."""
            module = self
            for part in filter(None, path.split(".")):
                if part not in module._modules:
                    if not create:
                        return None
                    module.add_module(part, crypten.nn.Module())
                module = module._modules[part]
            return module

        def _tensors_of(self, target: str) -> Any:
            if target in self.masks:
                return self.masks[target]
            where, _, local = target.rpartition(".")
            holder = self._holder(where)
            if holder is not None and (local in holder._parameters or local in holder._buffers):  # a get_attr
                return holder._parameters.get(local, holder._buffers.get(local))
            layer = self._holder(target)
            return {} if layer is None else self._nested(layer)

        @staticmethod
        def _nested(module: Any, prefix: str = "") -> dict[str, Any]:
            """A leaf layer's tensors by dotted local name, its sublayers' too (attention, encoder layers)."""
            tensors = {f"{prefix}{k}": v for k, v in {**module._parameters, **module._buffers}.items()}
            for name, child in module._modules.items():
                tensors.update(TrainableGraph._nested(child, f"{prefix}{name}."))
            return tensors

        def forward(self, x: Any) -> Any:
            return run_graph(self.graph_module, x, self._tensors_of)

    return TrainableGraph
