"""A plain ``import crypten`` goes through :func:`mpcfl.mpc.engine.import_crypten` once ``import mpcfl`` ran.

Without it, ``import crypten`` fails on torch >= 2.9 (the ONNX registration module moved), and a
crypten imported some other way would miss mpcfl's patches. This module is a finder on
``sys.meta_path`` and nothing else, and imports nothing: ``import mpcfl`` installs it for less than
a millisecond, while crypten and torch (seconds) load only when crypten is imported, as before.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_aside = [False]  # True while import_crypten imports crypten itself
_importer: list[Callable[[], types.ModuleType]] = []  # what install() was handed: imports crypten patched


@contextlib.contextmanager
def standing_aside() -> Iterator[None]:
    """While it lasts, ``import crypten`` is the plain import (the one :func:`import_crypten` patches)."""
    _aside[0] = True
    try:
        yield
    finally:
        _aside[0] = False


class _Patched:
    """The finder, and its loader (protocols, not importlib.abc's classes, which cost more to import than mpcfl)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None) -> Any:
        if fullname != "crypten" or _aside[0]:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: Any) -> types.ModuleType:
        # The module import_crypten made and patched; the import system then files it under "crypten" again.
        module = _importer[0]()
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run (:meth:`create_module` imported the module); gives the module back its own spec."""
        module.__spec__ = module.__spec__.loader_state


def install(importer: Callable[[], types.ModuleType]) -> None:
    """From now on in this process, ``import crypten`` is ``importer()``
    (:func:`mpcfl.mpc.engine.import_crypten`, handed in: this module sits below it)."""
    _importer[:] = [importer]
    if not any(isinstance(finder, _Patched) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Patched())
