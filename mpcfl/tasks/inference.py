"""Secure inference: one party's model on another party's inputs.

The data owner learns only the predictions; the model owner learns nothing about
the inputs; the weights stay hidden from the data owner. The architecture (the
model's code) and the tensor shapes are public: every party runs the same code,
and the input shape is exchanged before sharing.

Three ways in:

- :func:`secure_predict` inside a party process (a script started by ``mpcfl launch``
  and joined with :func:`mpcfl.join`, or a job's party);
- :func:`secure_predict_local`, one call that spawns both parties and the dealer on
  this machine and returns the predictions to the caller, for trying things out;
- a YAML job with ``task: inference`` (:func:`run_inference_party`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mpcfl.mpc.compat import import_crypten
from mpcfl.jobs.schema import InferenceJob
from mpcfl.mpc.auth import Credentials, new_secret
from mpcfl.models.convert import encrypt_model, trace
from mpcfl.errors import MpcflError
from mpcfl.models.factory import build_factory_model
from mpcfl.outputs import write_json, write_npy
from mpcfl.mpc.reveal import ledger, reveal
from mpcfl.mpc.session import Session, agreed, all_gather_public, communication_stats, current_party, party_session

log = logging.getLogger(__name__)

# Inputs beyond this magnitude risk wrapping CrypTen's 64-bit fixed-point ring
# (16 fractional bits) once multiplied by weights.
MAX_ABS_INPUT = 1e4
_MAX_DIMS = 8


def _check_inputs(inputs: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.is_tensor(inputs):
        raise MpcflError(f"{where}: inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.dim() > _MAX_DIMS or inputs.shape[0] == 0:
        raise MpcflError(f"{where}: inputs need a batch dimension and at most {_MAX_DIMS} dimensions, got shape {tuple(inputs.shape)}")
    inputs = inputs.detach().float().cpu()
    if not torch.isfinite(inputs).all():
        raise MpcflError(f"{where}: inputs contain NaN or infinite values")
    peak = inputs.abs().max().item()
    if peak > MAX_ABS_INPUT:
        raise MpcflError(
            f"{where}: inputs reach {peak:.4g}, beyond {MAX_ABS_INPUT:g}: fixed point would overflow; rescale them"
        )
    return inputs


def _exchange_shape(inputs: torch.Tensor | None, owner: int) -> tuple[int, ...]:
    """Every party learns the (public) input shape from the data owner."""
    mine = [0] * (_MAX_DIMS + 1)
    if inputs is not None:
        mine = [inputs.dim(), *inputs.shape, *([0] * (_MAX_DIMS - inputs.dim()))]
    row = all_gather_public(mine)[owner]
    return tuple(row[1 : 1 + row[0]])


def _dry_run(gm: torch.fx.GraphModule, shape: tuple[int, ...], *, where: str, data_owner: str) -> None:
    """Runs the architecture in plaintext on zeros, so a shape mismatch fails clearly, before sharing."""
    try:
        with torch.no_grad():
            gm(torch.zeros(min(shape[0], 2), *shape[1:]))
    except Exception as err:  # torch raises RuntimeError, ValueError, IndexError... for bad shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MpcflError(f"{where}: party {data_owner}'s inputs of shape {shape} do not fit the model: {first}") from None


def secure_predict(
    model: nn.Module,
    inputs: torch.Tensor | None,
    *,
    model_owner: str,
    data_owner: str,
    batch_size: int = 64,
) -> torch.Tensor | None:
    """Runs ``model`` on ``inputs`` under MPC, inside a joined session.

    Every party calls it at the same point. Each passes a model of the same
    architecture; only the model owner's weights are used. Only the data owner
    passes inputs.

    Args:
        model: a ``torch.nn.Module`` built from supported layers (see :mod:`mpcfl.models.convert`).
        inputs: the data owner's batch (first dimension = examples); ``None`` elsewhere.
        model_owner: the party whose weights are used.
        data_owner: the party whose inputs are used; the only one to see predictions.
        batch_size: examples per secure forward pass.

    Returns:
        The model's outputs on the data owner; ``None`` on every other party.

    Raises:
        MpcflError: not in a session, an unsupported model, bad inputs, or a peer failed.
    """
    me = current_party()
    session = me.session
    owner_rank, data_rank = session.rank_of(model_owner), session.rank_of(data_owner)
    if owner_rank == data_rank:
        raise MpcflError("secure_predict: model_owner and data_owner must be different parties")
    if batch_size < 1:
        raise MpcflError(f"secure_predict: batch_size must be positive, got {batch_size}")
    where = f"party {me.name}"
    if me.rank == data_rank:
        inputs = agreed("input checks", session.parties, lambda: _check_inputs(inputs, where))
    else:
        agreed("input checks", session.parties, lambda: None)
    gm = agreed("model checks", session.parties, lambda: trace(model))
    shape = _exchange_shape(inputs if me.rank == data_rank else None, data_rank)
    agreed("shape checks", session.parties, lambda: _dry_run(gm, shape, where=where, data_owner=data_owner))

    crypten = import_crypten()
    device = session.device
    secure = encrypt_model(gm, src=owner_rank, device=device)
    outputs = []
    starts = range(0, shape[0], batch_size)
    with crypten.no_grad():
        for start in tqdm(starts, desc="secure inference", unit="batch", disable=me.rank != data_rank or len(starts) < 2):
            rows = min(batch_size, shape[0] - start)
            local = inputs[start : start + rows] if me.rank == data_rank else torch.zeros(rows, *shape[1:])
            outputs.append(secure(crypten.cryptensor(local, src=data_rank, device=device)))
    joined = crypten.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
    opened = reveal(joined, to=[data_rank], what="predictions")
    return None if opened is None else opened.cpu()


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
    from mpcfl.data.party import load_array, load_table

    if path.suffix == ".npy":
        return torch.from_numpy(np.asarray(load_array(path, party=party, what="inputs"), dtype=np.float32))
    return torch.from_numpy(load_table(path, party=party).values.astype(np.float32))


def run_inference_party(
    job: InferenceJob, party: str, *, rendezvous: str | None = None, key_file: Path | None = None
) -> None:
    """One party's side of an inference job; only the data owner writes predictions.

    ``key_file`` is this party's private key, for a job with ``runtime.identity``.
    """
    is_owner, is_data = party == job.model.owner, party == job.inputs.owner
    started = time.perf_counter()
    with party_session(Session.of_job(job, rendezvous=rendezvous, key_file=key_file), party):
        model = agreed("model loading", job.party_names, lambda: build_model(job))
        if is_owner:
            agreed("weights loading", job.party_names, lambda: load_weights(model, job.model.weights, party=party))
        else:
            agreed("weights loading", job.party_names, lambda: None)
        inputs = agreed(
            "input loading", job.party_names, lambda: load_inputs(job.inputs.file, party=party) if is_data else None
        )
        predictions = secure_predict(
            model, inputs, model_owner=job.model.owner, data_owner=job.inputs.owner, batch_size=job.batch_size
        )
        totals = communication_stats()
    out = job.party_dir(party)
    record: dict[str, Any] = {
        "job": job.name,
        "party": party,
        "seconds": time.perf_counter() - started,
        "communication": totals,
        "reveals": ledger(),
    }
    if is_data:
        write_npy(out / "predictions.npy", predictions.numpy())
        record["predictions"] = {"file": "predictions.npy", "shape": list(predictions.shape)}
        log.info("saved %d predictions to %s", predictions.shape[0], out / "predictions.npy")
    write_json(out / "metrics.json", record)


# --- one call, all parties on this machine --------------------------------------------------

_MODEL_OWNER, _DATA_OWNER = "model_owner", "data_owner"


def _child(role: str, errors: Any, work: Callable[[], None]) -> None:
    """Body of a forked child: run, report any error as one line, exit non-zero on failure."""
    # GNU OpenMP's thread pool does not survive fork: a child entering a parallel
    # region the parent already used hangs. One thread per party process avoids it.
    torch.set_num_threads(1)
    try:
        work()
    except BaseException as err:  # report everything: the caller has no other view of this child
        message = str(err) if isinstance(err, MpcflError) else "".join(traceback.format_exception_only(err)).strip()
        errors.put((role, message))
        os._exit(1)
    os._exit(0)


def secure_predict_local(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
    timeout_s: float = 60.0,
    insecure_dealer: bool = False,
) -> torch.Tensor:
    """One call: secure inference with both parties and the dealer on this machine.

    The caller plays the data owner and gets the predictions; a forked process
    plays the model owner, and another the dealer. This is for trying things out:
    both roles start from the caller's memory, so it protects nothing. In a real
    deployment each party runs :func:`secure_predict` in its own process.

    Args:
        model: the model, with its trained weights.
        inputs: a batch of inputs (first dimension = examples).
        batch_size: examples per secure forward pass.
        timeout_s: how long a silent peer may block the others.
        insecure_dealer: skip the dealer process (CrypTen's TFP; tests only).

    Returns:
        The model's outputs, computed under MPC.

    Raises:
        MpcflError: bad inputs, an unsupported model, or a failed process, named.
    """
    from mpcfl.launch.local import local_rendezvous

    _check_inputs(inputs, "secure_predict_local")
    trace(model)  # fail in the caller, before forking, on an unsupported model
    with local_rendezvous() as rendezvous:
        session = Session(
            parties=(_MODEL_OWNER, _DATA_OWNER),
            rendezvous=rendezvous,
            timeout_s=timeout_s,
            insecure_dealer=insecure_dealer,
            label="local secure inference",
            credentials=Credentials(secret=new_secret().encode()),
            fingerprint="local secure inference",
        )
        context = multiprocessing.get_context("fork")
        errors = context.SimpleQueue()
        receive, send = context.Pipe(duplex=False)
        blank = copy.deepcopy(model)
        with torch.no_grad():
            for tensor in [*blank.parameters(), *blank.buffers()]:
                tensor.zero_()  # the data owner holds the architecture, never the weights

        def model_owner() -> None:
            with party_session(session, _MODEL_OWNER):
                secure_predict(model, None, model_owner=_MODEL_OWNER, data_owner=_DATA_OWNER, batch_size=batch_size)

        def data_owner() -> None:
            with party_session(session, _DATA_OWNER):
                out = secure_predict(blank, inputs, model_owner=_MODEL_OWNER, data_owner=_DATA_OWNER, batch_size=batch_size)
            send.send(out.numpy())  # numpy, not torch: torch would share memory with a process about to exit

        roles: list[tuple[str, Callable[[], None]]] = [(_MODEL_OWNER, model_owner), (_DATA_OWNER, data_owner)]
        if not insecure_dealer:
            from mpcfl.mpc.session import run_dealer

            roles.insert(0, ("dealer", lambda: run_dealer(session)))
        with _isolated_env():
            processes = {
                role: context.Process(target=_child, args=(role, errors, work), daemon=True) for role, work in roles
            }
            for process in processes.values():
                process.start()
        try:
            result = _await(processes, errors, receive)
        finally:
            for process in processes.values():
                if process.is_alive():
                    process.kill()
                process.join()
        return result


@contextlib.contextmanager
def _isolated_env() -> Any:
    """Forked children set CrypTen's variables themselves; hide the caller's, and bind gloo to loopback."""
    from mpcfl.launch.local import LOOPBACK_ENV

    keys = ("RANK", "WORLD_SIZE", "RENDEZVOUS", "DISTRIBUTED_BACKEND", *LOOPBACK_ENV)
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    os.environ.update(LOOPBACK_ENV)
    try:
        yield
    finally:
        for key in LOOPBACK_ENV:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _await(processes: dict[str, Any], errors: Any, receive: Any) -> torch.Tensor:
    """Waits for the data owner's result; if any process fails, stops and names it."""
    result = None
    while True:
        if result is None and receive.poll(0.05):
            result = torch.from_numpy(receive.recv())
        failed = [role for role, p in processes.items() if p.exitcode not in (None, 0)]
        if failed:
            reports = []
            while not errors.empty():
                reports.append(errors.get())
            own = [r for r in reports if "lost a peer" not in r[1] and "failed during" not in r[1]]
            role, message = (own or reports or [(failed[0], f"exited with status {processes[failed[0]].exitcode}")])[0]
            raise MpcflError(f"{role} failed: {message}")
        if all(p.exitcode == 0 for p in processes.values()):
            if result is None and receive.poll(1.0):
                result = torch.from_numpy(receive.recv())
            if result is None:
                raise MpcflError("the data owner finished without returning predictions")
            return result
        time.sleep(0.02)
