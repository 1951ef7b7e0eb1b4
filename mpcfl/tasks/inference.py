"""Secure inference: one party's model on another party's inputs.

The data owner learns only the predictions; the model owner learns nothing about
the inputs; the weights stay hidden from the data owner. The architecture (the
model's code) and the tensor shapes are public: every party runs the same code,
and the input shape is exchanged before sharing.

Three ways in:

- :func:`secure_predict` inside a party process (a script started by ``mpcfl launch``
  and joined with :func:`mpcfl.join`, or a job's party), or :func:`serve` there for many calls
  with the weights shared once;
- :func:`mpcfl.launch.fork.secure_predict_local`, one call that spawns both parties and the dealer on
  this machine and returns the predictions to the caller, for trying things out;
- a YAML job with ``task: inference`` (:func:`run_inference_party`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mpcfl.mpc import fixed_mask
from mpcfl.mpc.engine import import_crypten
from mpcfl.jobs.session import session_of
from mpcfl.jobs.schema import InferenceJob
from mpcfl.models.convert import (UnsupportedModelError, encode_inputs, encrypt_model, one_hot_width, plain_parameters,
                                  public_tensors, trace)
from mpcfl.models.transformer import (Approximations, KeyValueCache, approximations as approximated, cacheable,
                                      decoding, row_argmax)
from mpcfl.errors import MpcflError
from mpcfl.models.factory import build_factory_model
from mpcfl.outputs import progress_bars, write_json, write_npy
from mpcfl.tasks.run import begin_run
from mpcfl.mpc.reveal import reveal
from mpcfl.mpc.session import (
    agreed, agreed_public, all_gather_public, communication_stats, current_party, party_session, prefetching,
)

log = logging.getLogger(__name__)

# Inputs beyond this magnitude risk wrapping CrypTen's 64-bit fixed-point ring
# (16 fractional bits) once multiplied by weights.
MAX_ABS_INPUT = 1e4
_MAX_DIMS = 8


def check_inputs(inputs: Any, where: str, max_abs: float = MAX_ABS_INPUT) -> torch.Tensor:
    """The inputs as a float CPU tensor (from a tensor, a numpy array or a DataFrame), checked.

    Raises:
        MpcflError: not numeric, no batch dimension, no values, non-finite or beyond ``max_abs`` (:func:`input_bound`).
    """
    if hasattr(inputs, "to_numpy") and not torch.is_tensor(inputs):  # a DataFrame, without importing pandas
        inputs = inputs.to_numpy()
    if isinstance(inputs, np.ndarray):
        if not np.issubdtype(inputs.dtype, np.number):
            raise MpcflError(f"{where}: inputs must be numeric, got an array of {inputs.dtype}")
        inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    if not torch.is_tensor(inputs):
        raise MpcflError(f"{where}: inputs must be a torch.Tensor, a numpy array or a DataFrame, got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.dim() > _MAX_DIMS or inputs.shape[0] == 0:
        raise MpcflError(f"{where}: inputs need a batch dimension and at most {_MAX_DIMS} dimensions, got shape {tuple(inputs.shape)}")
    if inputs.numel() == 0:
        raise MpcflError(f"{where}: inputs of shape {tuple(inputs.shape)} hold no values")
    inputs = inputs.detach().float().cpu()
    # One reduction: the extremes carry any NaN (it propagates) or infinity. torch.isfinite(...).all()
    # took 10-50 ms of CPU per 64x784 batch on a loaded 2-core machine (its threads wait for a core).
    low, high = (float(v) for v in torch.aminmax(inputs))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise MpcflError(f"{where}: inputs contain NaN or infinite values")
    peak = max(-low, high)
    if peak > max_abs:
        raise MpcflError(
            f"{where}: inputs reach {peak:.4g}, beyond {max_abs:g}: fixed point would overflow; rescale them"
        )
    return inputs


def input_bound(gm: torch.fx.GraphModule) -> float:
    """How large the data owner's values may be. Token ids are shared as one-hot rows, so
    fixed point does not bound them (a vocabulary of 30,522 is BERT's); encode_inputs checks them
    against the vocabulary."""
    return math.inf if one_hot_width(gm) is not None else MAX_ABS_INPUT


def _shape_row(inputs: torch.Tensor | None) -> list[int]:
    """The (public) input shape as a fixed-width row: its rank, then the sizes, zero-padded."""
    if inputs is None:
        return [0] * (_MAX_DIMS + 1)
    return [inputs.dim(), *inputs.shape, *([0] * (_MAX_DIMS - inputs.dim()))]


#: Module options that shape a layer's computation, and so its dealer requests (the rest, such as
#: BatchNorm's eps or Dropout's p, stay out of the fingerprint: they are the model owner's own).
_SHAPE_OPTIONS = ("kernel_size", "stride", "padding", "dilation", "groups", "output_padding", "ceil_mode",
                  "count_include_pad", "output_size", "start_dim", "end_dim", "dim", "unflattened_size",
                  "approximate", "num_heads", "batch_first", "norm_first", "activation_relu_or_gelu", "num_layers")


def _architecture(gm: torch.fx.GraphModule, approximations: Approximations = "exact") -> int:
    """A public fingerprint of what decides a batch's dealer requests: the traced code (its
    literals every party runs anyway), each module's type and shaping options (an encoder
    layer's too: it runs as one leaf), the tensors' shapes, and the public attention masks'
    values, and the operators' approximations, as one signed 64-bit word. No weight value and no
    other option enters it."""
    modules = [
        (name, type(m).__name__, [(k, repr(getattr(m, k))) for k in _SHAPE_OPTIONS if hasattr(m, k)])
        for name, m in gm.named_modules()
    ]
    tensors = [(name, tuple(t.shape), str(t.dtype)) for name, t in gm.state_dict().items()]
    masks = [(name, t.tolist()) for name, t in public_tensors(gm).items()]
    digest = hashlib.sha256(repr((gm.code, modules, tensors, masks, approximations)).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


_MAX_LAYERS = 256  # per-layer digests exchanged to name where two parties' architectures differ


def _layers(gm: torch.fx.GraphModule) -> list[tuple[str, str, int]]:
    """Each leaf module's name, type and a digest of its shaping options and tensor shapes."""
    layers = []
    for name, module in gm.named_modules():
        if list(module.children()):
            continue
        options = [(k, repr(getattr(module, k))) for k in _SHAPE_OPTIONS if hasattr(module, k)]
        shapes = [(k, tuple(t.shape)) for k, t in module.state_dict().items()]
        digest = hashlib.sha256(repr((type(module).__name__, options, shapes)).encode()).digest()
        layers.append((name, type(module).__name__, int.from_bytes(digest[:8], "little", signed=True)))
    return layers


def _refuse_other_architectures(gm: torch.fx.GraphModule, parties: list[str], rank: int, owner_rank: int) -> None:
    """Every party compares its layers with the model owner's and all refuse, naming the first that
    differs (in one more round, only when the fingerprints differ), before anything is shared."""
    layers = _layers(gm)[:_MAX_LAYERS]
    row = [len(layers), *(digest for _, _, digest in layers), *([0] * (_MAX_LAYERS - len(layers)))]
    rows = all_gather_public(row)
    theirs = rows[owner_rank][1 : 1 + rows[owner_rank][0]]
    mine = [digest for _, _, digest in layers]
    index = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    if index < len(layers):
        name, kind, _ = layers[index]
        where = f"layer {index + 1} ({name}: {kind})"
    else:
        where = f"its {len(layers)} layers, where {parties[owner_rank]}'s model has {len(theirs)}"
    raise MpcflError(
        f"party {parties[rank]}: its model's architecture differs from model owner {parties[owner_rank]}'s at "
        f"{where}, or in the code between layers, its attention masks or its approximations; every party must "
        "build the same architecture and choose the same approximations"
    )


def check_shape(gm: torch.fx.GraphModule, shape: tuple[int, ...], *, where: str, data_owner: str,
                inputs: str | None = None) -> Any:
    """Runs the architecture in plaintext on zeros (at most 2 rows of ``shape``), so a shape mismatch
    fails clearly, before sharing; returns that output. ``inputs`` names them in the error (default:
    the data owner's inputs of that shape)."""
    dtype = torch.float32 if one_hot_width(gm) is None else torch.long  # token ids for nn.Embedding
    try:
        with torch.no_grad():
            return gm(torch.zeros(min(shape[0], 2), *shape[1:], dtype=dtype))
    except Exception as err:  # torch raises RuntimeError, ValueError, IndexError... for bad shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        inputs = inputs or f"{data_owner}'s inputs of shape {shape}"
        raise MpcflError(f"{where}: {inputs} do not fit the model: {first}") from None


def _check_prompt(prompt: Any, where: str) -> torch.Tensor:
    """The data owner's prompt as N x L token ids (int64), checked; the vocabulary is checked where ids are encoded.

    Raises:
        MpcflError: not a tensor or array of non-negative integers with N, L >= 1.
    """
    try:
        ids = torch.as_tensor(np.asarray(prompt)) if isinstance(prompt, (np.ndarray, list)) else prompt
    except (ValueError, TypeError) as err:
        raise MpcflError(f"{where}: generate: the prompt is not a table of token ids: {err}") from None
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.numel() == 0:
        shape = tuple(ids.shape) if torch.is_tensor(ids) else type(prompt).__name__
        raise MpcflError(f"{where}: generate: the prompt must be N x L token ids (N, L >= 1), got {shape}")
    ids = ids.detach().cpu()
    if ids.is_floating_point() and not bool((ids == ids.round()).all()) or ids.is_complex() or bool((ids < 0).any()):
        raise MpcflError(f"{where}: generate: the prompt's token ids must be non-negative integers")
    return ids.long()


def _sampled(sample: Callable[[torch.Tensor], torch.Tensor] | None, logits: torch.Tensor, where: str) -> torch.Tensor:
    """The data owner's next tokens from the opened N x V logits: ``sample``'s, or their argmax."""
    if sample is None:
        return logits.argmax(-1)
    try:
        chosen = torch.as_tensor(sample(logits))
    except Exception as err:  # the caller's code: any failure is reported as this party's, by name
        raise MpcflError(f"{where}: generate: sample failed: {type(err).__name__}: {err}") from None
    rows, vocabulary = logits.shape
    if (chosen.numel() != rows or chosen.is_floating_point() or chosen.is_complex()
            or bool(((chosen < 0) | (chosen >= vocabulary)).any())):
        raise MpcflError(f"{where}: generate: sample must return {rows} integer token ids below {vocabulary}, "
                         f"got {tuple(chosen.shape)} of {chosen.dtype}")
    return chosen.long().reshape(rows)


def _check_next_token_logits(gm: torch.fx.GraphModule, rows: int, length: int, steps: int, *, where: str,
                             data_owner: str) -> None:
    """Runs the architecture in plaintext on zeros of the longest prefix (:func:`check_shape`): it fits,
    and the output is next-token logits for each of the ``rows`` prompts, (N, L, V) or (N, V), before
    anything is shared."""
    longest = length + steps - 1
    out = check_shape(gm, (rows, longest), where=where, data_owner=data_owner,
                      inputs=f"generate: the {longest} positions of {data_owner}'s prompt of {length} tokens and {steps} steps")
    n = min(rows, 2)
    if not torch.is_tensor(out) or not (out.dim() == 3 and tuple(out.shape[:2]) == (n, longest)
                                        or out.dim() == 2 and out.shape[0] == n):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise MpcflError(f"{where}: generate needs next-token logits, (N, L, V) or (N, V); on {n} prompts of "
                         f"{longest} tokens the model gives {shape}")


class SecureServer:
    """A model shared under MPC for one call of :func:`secure_predict` or many (:func:`serve`).

    Every party makes the same calls in the same order. The first call traces the model, shares the
    model owner's weights and, under the TTP dealer with ``mask_reuse``, fixes their masks
    (:func:`mpcfl.mpc.fixed_mask.fix_weights`): for the server's whole life when it serves ``many``
    calls, else only when that one call has two or more batches. Later calls reuse those shares and
    masks, so a call opens only its activations; the model owner's later changes to ``model`` are not
    seen. :meth:`close` has the dealer forget the masks.
    """

    def __init__(
        self, model: nn.Module, *, model_owner: str, data_owner: str, prefetch: bool = True,
        approximations: Approximations = "exact", mask_reuse: bool = True, many: bool = False,
    ) -> None:
        self._me = current_party()
        session = self._me.session
        self._owner_rank, self._data_rank = session.rank_of(model_owner), session.rank_of(data_owner)
        if self._owner_rank == self._data_rank:
            raise MpcflError("secure_predict: model_owner and data_owner must be different parties")
        self._model, self._data_owner, self._approximations = model, data_owner, approximations
        self._prefetch, self._mask_reuse, self._many = prefetch, mask_reuse, many
        self._gm: torch.fx.GraphModule | None = None
        self._secure: Any = None
        self._fixed: str | None = None

    def __call__(self, inputs: torch.Tensor | None, *, batch_size: int = 64) -> torch.Tensor | None:
        """The model's outputs on ``inputs`` (the data owner's; ``None`` elsewhere), to the data owner alone.

        Raises:
            MpcflError: an unsupported model, bad inputs, or a peer failed.
        """
        if batch_size < 1:
            raise MpcflError(f"secure_predict: batch_size must be positive, got {batch_size}")
        return reveal(self._outputs(inputs, batch_size), to=[self._data_rank], what="predictions")

    def generate(
        self, prompt: torch.Tensor | None, steps: int, *, reveal_logits: bool = False,
        sample: Callable[[torch.Tensor], torch.Tensor] | None = None, key_value_cache: bool = True,
    ) -> torch.Tensor | None:
        """Extends the data owner's token ids ``prompt`` (N x L; ``None`` elsewhere) by ``steps`` tokens,
        one model call each, the weights shared and their masks fixed once for all of them.

        A decoder that :func:`~mpcfl.models.transformer.cacheable` accepts (Hugging Face's GPT-2) keeps
        its attention's keys and values secret-shared from call to call (``key_value_cache``, every
        party the same): the prompt runs once, then each token on its one new position. Any other
        model, or ``key_value_cache=False``, runs the whole prefix for each token.

        The model gives next-token logits: (N, L, V), as a language model's head (the last position
        is used), or (N, V). By default each next token is the logits' argmax taken under MPC
        (:func:`~mpcfl.models.transformer.row_argmax`), and only the token ids are opened, to the data
        owner: it learns the tokens and nothing else of the logits. With ``reveal_logits`` (every party
        must pass the same: the model owner consents to it), the last position's logits are opened to
        the data owner, whose ``sample`` (logits N x V -> token ids N; default argmax) picks each token.
        Every party makes the call with the same ``steps``; the shapes are public, so the model owner
        learns N, L and ``steps``, never a token.

        Returns:
            The data owner's N x (L + steps) token ids; ``None`` elsewhere.

        Raises:
            MpcflError: bad arguments or prompt, a mismatch between the parties' ``steps``,
                ``reveal_logits`` or ``key_value_cache``, a model that gives no next-token logits, or a
                peer failed.
        """
        me, data_rank = self._me, self._data_rank
        where, parties = f"party {me.name}", list(me.session.parties)

        def checks() -> torch.Tensor | None:  # every party's arguments, and the data owner's prompt, in one round
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise MpcflError(f"{where}: generate: steps must be a positive integer, got {steps!r}")
            for name, flag in (("reveal_logits", reveal_logits), ("key_value_cache", key_value_cache)):
                if not isinstance(flag, bool):
                    raise MpcflError(f"{where}: generate: {name} must be True or False, got {flag!r}")
            return _check_prompt(prompt, where) if me.rank == data_rank else None

        ids, public = agreed_public("generation checks", parties, checks,
                                    lambda done: [steps, int(reveal_logits), int(key_value_cache),
                                                  *(done.shape if done is not None else (0, 0))],
                                    width=5)
        for column, what in ((0, "steps"), (1, "reveal_logits"), (2, "key_value_cache")):
            if len({row[column] for row in public}) > 1:
                told = ", ".join(f"{name} {bool(row[column]) if column else row[column]}" for name, row in zip(parties, public))
                raise MpcflError(f"{where}: the parties asked for different {what} ({told}); every party must pass the same")
        rows, length = public[data_rank][3:]
        gm = self._graph()
        agreed("generation shape checks", parties, lambda: _check_next_token_logits(
            gm, rows, length, steps, where=where, data_owner=f"party {self._data_owner}"))
        cache = KeyValueCache() if key_value_cache and cacheable(gm) else None
        if key_value_cache and cache is None:
            log.info("generate: %s is not a decoder the key-value cache serves; each token runs the whole prefix",
                     type(self._model).__name__)
        crypten = import_crypten()
        for step in tqdm(range(steps), desc="secure generation", unit="token", disable=me.rank != data_rank or steps < 2 or not progress_bars()):
            # with the cache, a token runs its one new position (the data owner's last id)
            new = ids[:, -1:] if cache is not None and step > 0 and ids is not None else ids
            logits = self._outputs(new, rows, calls=steps, cache=cache)
            logits = logits[:, -1] if logits.dim() == 3 else logits  # the shapes were checked in plaintext above
            if reveal_logits:
                opened = reveal(logits, to=[data_rank], what="next-token logits")
                # in an agreement round: a failing sampler stops every party at the same step, named
                chosen = agreed("sampling", parties, lambda: None if opened is None else _sampled(sample, opened, where))
            else:
                with crypten.no_grad():
                    token = row_argmax(logits)
                opened = reveal(token, to=[data_rank], what="generated tokens")
                chosen = None if opened is None else opened.round().long()
            if ids is not None:
                ids = torch.cat([ids, chosen.reshape(-1, 1)], dim=1)
        return ids

    def _graph(self) -> torch.fx.GraphModule:
        if self._gm is None:
            self._gm = trace(self._model)
        return self._gm

    def _outputs(self, inputs: torch.Tensor | None, batch_size: int, *, calls: int = 1,
                 cache: KeyValueCache | None = None) -> Any:
        """The model's outputs on ``inputs``, secret-shared; ``calls``: how many such calls are planned
        (a first call of several fixes the weights' masks, as a call of several batches does); ``cache``:
        the decoder's keys and values so far, for inputs that are its next positions (one batch)."""
        me, data_rank = self._me, self._data_rank
        session, where = me.session, f"party {me.name}"

        def checks() -> tuple[torch.Tensor | None, torch.fx.GraphModule]:
            gm = self._graph()
            if me.rank != data_rank:
                return None, gm
            checked = check_inputs(inputs, where, input_bound(gm))
            try:  # token ids become one-hot rows here, at their owner, in plaintext: what is shared is (..., vocabulary)
                return encode_inputs(gm, checked), gm
            except UnsupportedModelError as err:  # ids outside the vocabulary: named as this party's inputs
                raise MpcflError(f"{where}: {err}") from None

        # The checks' agreement carries the input shape and the architecture's fingerprint: every
        # party learns them in the same round (2 agreement rounds before sharing, not 4).
        (inputs, gm), public = agreed_public(
            "input and model checks", session.parties, checks,
            lambda done: [*_shape_row(done[0]), _architecture(done[1], self._approximations), int(self._prefetch),
                          int(self._mask_reuse), int(self._many)],
            width=_MAX_DIMS + 5,
        )
        shape = tuple(public[data_rank][1 : 1 + public[data_rank][0]])  # as shared: one-hot token ids included
        fingerprints = {row[-4] for row in public}
        # A batch's dealer requests depend on public shapes only: the same architecture on the same
        # batch shape repeats them, so every batch after the first of its shape is prefetched, if
        # every party asked for it (a party alone would look to the dealer like a deviating party 0).
        if len(fingerprints) > 1:
            _refuse_other_architectures(gm, list(session.parties), me.rank, self._owner_rank)
        prefetch = all(row[-3] for row in public)
        mask_reuse = all(row[-2] for row in public)  # any party may decline it, as prefetch
        if len({row[-1] for row in public}) > 1:  # one would keep the masks the other releases
            serving = [name for name, row in zip(session.parties, public) if row[-1]]
            raise MpcflError(f"{where}: {', '.join(serving)} serve the model for many calls (mpcfl.serve), the other "
                             "parties for one (secure_predict); every party must call the same")
        ids_shape = shape if one_hot_width(gm) is None else shape[:-1]
        agreed("shape checks", session.parties, lambda: check_shape(gm, ids_shape, where=where, data_owner=f"party {self._data_owner}"))

        crypten = import_crypten()
        device = me.device
        starts = range(0, shape[0], batch_size)
        if self._secure is None:
            log.info("computing on %s", device)
            self._secure = encrypt_model(gm, src=self._owner_rank, device=device)
            # Before the first batch: a mask is registered alone, never inside a prefetched batch.
            if mask_reuse and (self._many or len(starts) > 1 or calls > 1):
                # The model owner multiplies with its own plaintext weights (one-sided products, two parties)
                plain = plain_parameters(gm) if me.rank == self._owner_rank else None
                self._fixed = fixed_mask.fix_weights(self._secure.tensors, label="served weights",
                                                     owner=self._owner_rank, plain=plain)
        outputs = []
        if cache is not None and len(starts) > 1:
            raise MpcflError(f"{where}: a key-value cache runs one batch per call, not {len(starts)}")
        past = None if cache is None else cache.past  # the dealer's requests depend on it: part of the key
        with crypten.no_grad(), approximated(self._approximations):
            for start in tqdm(starts, desc="secure inference", unit="batch", disable=me.rank != data_rank or not progress_bars() or len(starts) < 2):
                rows = min(batch_size, shape[0] - start)
                local = inputs[start : start + rows] if me.rank == data_rank else torch.zeros(rows, *shape[1:])
                # The fixed masks' binding is in the key: a recording names the masks it was made with.
                with prefetching(("secure_predict", *fingerprints, rows, *shape[1:], self._fixed, past), enabled=prefetch), \
                        decoding(cache, shape[1]) if cache is not None else contextlib.nullcontext():
                    outputs.append(self._secure(crypten.cryptensor(local, src=data_rank, device=device)))
        return crypten.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]

    def close(self) -> None:
        """Has the dealer forget the weights' masks; every party calls it at the same point."""
        if self._fixed is not None:
            fixed_mask.release_weights(self._secure.tensors)
            self._fixed = None
            # Party 0 hears the dealer's answer only once every party's digest of the release arrived:
            # until this round, no party ends its session (and drops a digest still in flight).
            agreed("releasing the weights' masks", self._me.session.parties, lambda: None)


def secure_predict(
    model: nn.Module,
    inputs: torch.Tensor | None,
    *,
    model_owner: str,
    data_owner: str,
    batch_size: int = 64,
    prefetch: bool = True,
    approximations: Approximations = "exact",
    mask_reuse: bool = True,
) -> torch.Tensor | None:
    """Runs ``model`` on ``inputs`` under MPC, inside a joined session.

    Every party calls it at the same point. Each passes a model of the same
    architecture; only the model owner's weights are used. Only the data owner
    passes inputs. To serve many calls with the weights shared once, see :func:`serve`.

    Args:
        model: a ``torch.nn.Module`` built from supported layers (see :mod:`mpcfl.models.convert`).
        inputs: the data owner's batch (first dimension = examples); ``None`` elsewhere.
        model_owner: the party whose weights are used.
        data_owner: the party whose inputs are used; the only one to see predictions.
        batch_size: examples per secure forward pass.
        prefetch: under the TTP dealer, fetch a batch's triples in one request (a job's
            ``runtime.prefetch``): the first batch of each shape in a session is recorded, every later
            one (later batches of this call, or later calls with the same architecture) is served from
            a single dealer round trip instead of one per triple. Only when every party's
            architecture fingerprint matches (exchanged with the input shape, no extra round).
        approximations: the transformer operators, ``exact`` or ``mpc_friendly`` (quadratic GELU,
            2Quad softmax: see :mod:`mpcfl.models.transformer`); part of the fingerprint, so the
            parties agree on it.
        mask_reuse: under the TTP dealer, with two or more batches (a job's ``runtime.mask_reuse``):
            open each weight matrix masked once for the whole call (:func:`mpcfl.mpc.fixed_mask.fix_weights`),
            so that every batch opens only its activations, not the weights again. Only if every party
            asks for it (exchanged with the input shape, no extra round).

    Returns:
        The model's outputs on the data owner; ``None`` on every other party.

    Raises:
        MpcflError: not in a session, an unsupported model, bad inputs, or a peer failed.
    """
    server = SecureServer(model, model_owner=model_owner, data_owner=data_owner, prefetch=prefetch,
                          approximations=approximations, mask_reuse=mask_reuse)
    predictions = server(inputs, batch_size=batch_size)
    server.close()  # not after a failure: the session is ending, and its dealer with it
    return predictions


@contextlib.contextmanager
def serve(
    model: nn.Module,
    *,
    model_owner: str,
    data_owner: str,
    prefetch: bool = True,
    approximations: Approximations = "exact",
    mask_reuse: bool = True,
) -> Iterator[SecureServer]:
    """Serves ``model`` to many calls, inside a joined session: ``served(inputs, batch_size=64)``
    answers as :func:`secure_predict` does, with the weights shared once (at the first call) and,
    under the TTP dealer with ``mask_reuse``, each weight matrix opened masked once for all calls,
    so that each call opens only its activations.

    Every party enters it and makes the same calls in the same order. The arguments are
    :func:`secure_predict`'s; the model owner's later changes to ``model`` are not served. On
    leaving (without an error), the dealer forgets the weights' masks.

    Raises:
        MpcflError: not in a session, or the two owners are the same party.
    """
    server = SecureServer(model, model_owner=model_owner, data_owner=data_owner, prefetch=prefetch,
                          approximations=approximations, mask_reuse=mask_reuse, many=True)
    yield server
    server.close()


# --- the YAML task -----------------------------------------------------------------------


def build_model(job: InferenceJob) -> nn.Module:
    """The job's architecture from its factory (load_job already checked it once)."""
    try:
        return build_factory_model(job.model.factory)
    except MpcflError as err:
        raise MpcflError(f"model.factory: {err}") from None


def load_weights(model: nn.Module, path: Path, *, party: str) -> None:
    """Loads a state_dict file into ``model`` (safely: tensors only, no pickled code).

    Raises:
        MpcflError: the file is missing, unreadable, or does not fit the architecture.
    """
    where = f"party {party}: {path}"
    if not path.is_file():
        raise MpcflError(f"{where}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MpcflError(f"{where}: not a readable torch state_dict: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise MpcflError(f"{where}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise MpcflError(f"{where}: weights do not fit the model: {details}") from None


def load_inputs(path: Path, *, party: str) -> torch.Tensor:
    """Reads the data owner's inputs: any-shaped ``.npy``, or a numeric CSV with a header row.

    Raises:
        MpcflError: the file is missing or not numeric.
    """
    from mpcfl.data.files import load_array, load_table

    if path.suffix == ".npy":
        return torch.from_numpy(np.asarray(load_array(path, party=party, what="inputs"), dtype=np.float32))
    return torch.from_numpy(load_table(path, party=party).values.astype(np.float32))


def run_inference_party(
    job: InferenceJob, party: str, *, rendezvous: str | None = None, run_id: str | None = None, key_file: Path | None = None
) -> None:
    """One party's side of an inference job; only the data owner writes predictions.

    ``run_id`` is the run's id as the launcher proposes it (see :mod:`mpcfl.tasks.run`);
    ``key_file`` is this party's private key, for a job with ``runtime.identity``.
    """
    is_owner, is_data = party == job.model.owner, party == job.inputs.owner
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        with party_session(session_of(job, rendezvous=rendezvous, key_file=key_file), party):
            model = agreed("model loading", job.party_names, lambda: build_model(job))
            if is_owner:
                agreed("weights loading", job.party_names, lambda: load_weights(model, job.model.weights, party=party))
            else:
                agreed("weights loading", job.party_names, lambda: None)
            inputs = agreed(
                "input loading", job.party_names, lambda: load_inputs(job.inputs.file, party=party) if is_data else None
            )
            contents = {"model.weights": b"".join(t.numpy().tobytes() for t in model.state_dict().values())} if is_owner else {}
            if inputs is not None:
                contents["inputs.file"] = inputs.numpy().tobytes()
            run = begin_run(job, party, contents, run_id=run_id)
            stack.enter_context(run.recorded())
            job = run.job
            with run.disclosure(None) as disclosure:
                predictions = secure_predict(
                    model, inputs, model_owner=job.model.owner, data_owner=job.inputs.owner, batch_size=job.batch_size,
                    prefetch=job.runtime.prefetch, approximations=job.model.approximations, mask_reuse=job.runtime.mask_reuse,
                )
            totals = communication_stats()
        out = job.party_dir(party)
        record: dict[str, Any] = {
            "job": job.name,
            "party": party,
            "seconds": time.perf_counter() - started,
            "communication": totals,
            "reveals": disclosure.ledger(),
        }
        if is_data:
            write_npy(out / "predictions.npy", predictions.numpy())
            record["predictions"] = {"file": "predictions.npy", "shape": list(predictions.shape)}
            log.info("saved %d predictions to %s", predictions.shape[0], out / "predictions.npy")
        write_json(out / "metrics.json", record)
        run.run.finish({"predictions": int(predictions.shape[0])} if is_data else {})


def check_party(job: InferenceJob, party: str) -> list[str]:
    """``mpcfl validate --party``: the model owner's weights fit the architecture; the data owner's
    inputs are readable, in range, and fit it."""
    model = build_model(job)
    lines = []
    if party == job.model.owner:
        load_weights(model, job.model.weights, party=party)
        lines.append(f"weights {job.model.weights} fit the model")
    if party == job.inputs.owner:
        where = f"party {party}"
        gm = trace(model)
        inputs = check_inputs(load_inputs(job.inputs.file, party=party), where, input_bound(gm))
        check_shape(gm, tuple(inputs.shape), where=where, data_owner=where)
        encode_inputs(gm, inputs)  # token ids: integers within the vocabulary
        lines.append(f"inputs of shape {tuple(inputs.shape)} fit the model")
    return lines or ["reads no file in this job"]
