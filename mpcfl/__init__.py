"""mpcfl: secure multi-party training and inference on CrypTen.

The Python API, for party scripts and notebooks (every function also takes numpy arrays and
DataFrames where it takes tensors or row files)::

    import mpcfl

    # what the CLI does, every process on this machine (mpcfl.api)
    run = mpcfl.run("configs/breast_cancer_lr.yaml")          # or a dict
    run.metrics("hospital_b"), run.model("hospital_b")
    scored = mpcfl.predict("configs/breast_cancer_lr.yaml", {"hospital_a": a, "hospital_b": b}, to=["hospital_b"])
    mpcfl.validate("job.yaml", party="hospital_a"); mpcfl.baseline("job.yaml")
    scorer = mpcfl.load_model(run_folder_b, run_folder_a)  # raw columns in, logits out, plain torch

    # one call, everything on this machine (for trying things out)
    predictions = mpcfl.secure_predict_local(model, inputs)

    # in a party script started by `mpcfl launch --parties bank,clinic script.py`
    with mpcfl.join() as me:
        predictions = mpcfl.secure_predict(model, inputs if me.name == "clinic" else None,
                                           model_owner="bank", data_owner="clinic")
"""

from __future__ import annotations

import types
from typing import Any

from mpcfl.mpc import on_import


def _import_crypten() -> types.ModuleType:
    from mpcfl.mpc.engine import import_crypten

    return import_crypten()


# `import crypten` anywhere in this process now imports it patched for the torch we run on (without,
# it fails on torch >= 2.9). A finder, not the import itself: crypten and torch take seconds to load,
# and the launcher and `mpcfl validate` never load them.
on_import.install(_import_crypten)


# Imported on first use: `mpcfl validate` and the launcher should not pay for torch.
_API = {
    "run": "mpcfl.api",
    "predict": "mpcfl.api",
    "validate": "mpcfl.api",
    "baseline": "mpcfl.api",
    "score": "mpcfl.api",
    "Run": "mpcfl.api",
    "load_model": "mpcfl.tasks.train.export",
    "join": "mpcfl.launch.env",
    "Session": "mpcfl.mpc.session",
    "secure_predict": "mpcfl.tasks.inference",
    "serve": "mpcfl.tasks.inference",
    "secure_predict_local": "mpcfl.launch.fork",
    "load_job": "mpcfl.jobs.schema",
    "MpcflError": "mpcfl.errors",
    "UnsupportedModelError": "mpcfl.models.convert",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name == "__version__":  # the installed distribution's, so pyproject.toml is the one place it is written
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("mpcfl")
        except PackageNotFoundError:
            return "unknown (not installed; `pip install -e .`)"
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mpcfl' has no attribute {name!r}")
