"""Model factories named in job files: ``package.module:function`` or ``path/file.py:function``.

A factory is code: importing and calling it runs whatever it contains, in every
party and in ``mpcfl validate``. Only run job files you trust.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mpcfl.errors import MpcflError


def load_factory(spec: str) -> Callable[[], object]:
    """Resolves ``package.module:function`` or ``/path/file.py:function``.

    Raises:
        MpcflError: the module, file or function is missing (the message leaves the key to the caller).
    """
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise MpcflError(f"{spec}: file {path} not found")
            module_name = "mpcfl_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except MpcflError:
        raise
    except Exception as err:
        raise MpcflError(f"{spec}: cannot import {where!r}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise MpcflError(f"{where!r} has no function {name!r}")
    return factory


def build_factory_model(spec: str) -> nn.Module:
    """Calls the factory with no arguments and checks it returns a ``torch.nn.Module``.

    Raises:
        MpcflError: the factory is missing, fails when called, or returns something else.
    """
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as err:  # user code: any failure becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise MpcflError(
            f"{spec}: calling it with no arguments failed: {type(err).__name__}: {first}"
        ) from None
    if not isinstance(model, nn.Module):
        raise MpcflError(f"{spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model
