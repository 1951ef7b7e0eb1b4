"""One call, every party on this machine: secure inference forked from a notebook or script.

:func:`secure_predict_local` forks the model owner and the dealer, plays the data
owner itself, and supervises the children by their exit codes. For trying things
out: both roles start from the caller's memory, so it protects nothing.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mpcfl.errors import EXIT_OK, MpcflError, exit_code, first_own_failure
from mpcfl.launch.local import LOOPBACK_ENV, local_rendezvous
from mpcfl.models.convert import trace
from mpcfl.mpc import providers
from mpcfl.mpc.auth import Credentials, new_secret
from mpcfl.mpc.compat import CRYPTEN_ENV, DEFAULT_TIMEOUT_S
from mpcfl.mpc.session import Session, party_session, run_dealer
from mpcfl.models.transformer import Approximations, is_public_mask
from mpcfl.tasks.inference import check_shape, check_inputs, secure_predict


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
        os._exit(exit_code(err))
    os._exit(EXIT_OK)


def secure_predict_local(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    provider: str = providers.DEFAULT,
    approximations: Approximations = "exact",
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
        provider: where the triples come from: ``ttp`` (a dealer process) or ``tfp`` (no dealer; tests only).
        approximations: ``exact`` or ``mpc_friendly`` transformer operators (see :mod:`mpcfl.models.transformer`).

    Returns:
        The model's outputs, computed under MPC.

    Raises:
        MpcflError: bad inputs, an unsupported model, or a failed process, named.
    """
    inputs = check_inputs(inputs, "secure_predict_local")
    # fail in the caller, before forking, on an unsupported model or inputs it cannot take
    check_shape(trace(model), tuple(inputs.shape), where="secure_predict_local", data_owner="the caller")
    with local_rendezvous() as rendezvous:
        session = Session(
            parties=(_MODEL_OWNER, _DATA_OWNER),
            rendezvous=rendezvous,
            timeout_s=timeout_s,
            provider=providers.get(provider),
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
                if not is_public_mask(tensor):  # attention masks are architecture, the same at every party
                    tensor.zero_()  # the data owner holds the architecture, never the weights

        def model_owner() -> None:
            with party_session(session, _MODEL_OWNER):
                secure_predict(model, None, model_owner=_MODEL_OWNER, data_owner=_DATA_OWNER, batch_size=batch_size,
                               approximations=approximations)

        def data_owner() -> None:
            with party_session(session, _DATA_OWNER):
                out = secure_predict(blank, inputs, model_owner=_MODEL_OWNER, data_owner=_DATA_OWNER, batch_size=batch_size,
                                     approximations=approximations)
            send.send(out.numpy())  # numpy, not torch: torch would share memory with a process about to exit

        work = {_MODEL_OWNER: model_owner, _DATA_OWNER: data_owner, providers.DEALER: lambda: run_dealer(session)}
        roles = [(role, work[role]) for role in session.process_names]
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
    keys = (*CRYPTEN_ENV, *LOOPBACK_ENV)
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
        failed = [role for role, p in processes.items() if p.exitcode not in (None, EXIT_OK)]
        if failed:
            reports = {}
            while not errors.empty():
                role, message = errors.get()
                reports[role] = message
            role = first_own_failure([(r, processes[r].exitcode) for r in failed]) or failed[0]
            raise MpcflError(f"{role} failed: {reports.get(role, f'exited with status {processes[role].exitcode}')}")
        if all(p.exitcode == 0 for p in processes.values()):
            if result is None and receive.poll(1.0):
                result = torch.from_numpy(receive.recv())
            if result is None:
                raise MpcflError("the data owner finished without returning predictions")
            return result
        time.sleep(0.02)
