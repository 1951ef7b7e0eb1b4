"""The job schema: one YAML file describes parties, data, model, the task and outputs.

A job's ``task`` is ``train`` (the default; :class:`TrainJob`), ``inference``
(:class:`InferenceJob`), ``federated`` (:class:`FederatedJob`) or ``predict``
(:class:`PredictJob`), each in its own module; what they share is in
:mod:`~mpcfl.jobs.schema.common`. :func:`load_job` turns a file into an immutable job or
raises a :class:`~mpcfl.errors.ConfigError` that names the file and the key. Unknown keys
are errors, so typos are caught. Relative paths are resolved against the folder
of the job file, so a job runs the same from any working directory.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from mpcfl.errors import ConfigError
from mpcfl.jobs.schema.common import _MODEL_TAGS, NAME_PATTERN, JobBase, ModelSpec, resolve_paths
from mpcfl.jobs.schema.federated import FederatedJob, FederatedSpec, StrategySpec
from mpcfl.jobs.schema.inference import InferenceJob
from mpcfl.jobs.schema.predict import PredictJob
from mpcfl.jobs.schema.train import TrainJob

# What callers import from mpcfl.jobs.schema (the task modules hold the rest).
__all__ = [
    "INTERNAL_KEYS", "NAME_PATTERN", "FederatedJob", "FederatedSpec", "InferenceJob", "Job", "JobBase", "ModelSpec",
    "PredictJob", "StrategySpec", "TrainJob", "load_job", "resolve_paths",
]

Job = Annotated[Union[TrainJob, InferenceJob, FederatedJob, PredictJob], Field(discriminator="task")]
_JOB = TypeAdapter(Job)


# The tags pydantic puts in an error's location under these keys.
_NESTED_TAGS = {
    "strategy": tuple(typing.get_args(spec.model_fields["name"].annotation)[0] for spec in typing.get_args(typing.get_args(StrategySpec)[0])),
}

# Keys a job file may no longer use, and what took their place.
_REPLACED = {("runtime", "insecure_dealer"): "runtime.provider: tfp"}


def _error_line(error: Any) -> str:
    """One pydantic error as ``key: message``, the key as the job file spells it."""
    loc = list(error["loc"])
    if loc[:1] in (["train"], ["federated"]) and loc[1:2] == ["model"] and len(loc) > 2 and loc[2] in _MODEL_TAGS:
        del loc[2]  # a training model's kind, not a key of the file
    if loc and loc[0] in ("train", "inference", "federated", "predict"):
        loc = loc[1:]  # the union's tag, not a key of the file
    # Nested unions' tags are not keys of the file either: federated.strategy.fedavg.mu is strategy.mu.
    loc = [part for i, part in enumerate(loc) if not (i and part in _NESTED_TAGS.get(str(loc[i - 1]), ()))]
    if error["type"].startswith("union_tag") and not loc:
        loc = ["task"]
    message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    if error["type"] == "model_type":  # pydantic names its class ("instance of DPCenterSpec"), not the file's keys
        message = f"expected a section of keys ({', '.join(_keys_at(tuple(error['loc'])))}), got {error['input']!r}"
    if not loc and re.match(r"[\w.]+: ", message):  # a whole-job check that names its key itself
        return message
    key = ".".join(str(part) for part in loc) or "(top level)"
    return f"{key}: {message}"


_TASKS: dict[str, type[BaseModel]] = {"train": TrainJob, "inference": InferenceJob, "federated": FederatedJob,
                                      "predict": PredictJob}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation may hold (through optionals, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _keys_at(loc: tuple) -> list[str]:
    """Every key a job file may write in the section at an error's location (each union member's)."""
    models: list[type[BaseModel]] = [_TASKS[loc[0]]] if loc and loc[0] in _TASKS else list(_TASKS.values())
    for part in loc[1:] if loc and loc[0] in _TASKS else loc:
        fields = [model.model_fields[part] for model in models if isinstance(part, str) and part in model.model_fields]
        if fields:  # else a list index or a union's tag: the same section
            models = [model for field in fields for model in _models_in(field.annotation)]
    return sorted({key for model in models for key in model.model_fields} - set(INTERNAL_KEYS))


def _format_error(path: Path, err: ValidationError) -> str:
    """Every error of ``err``, one line each, ``path: key: message``, in the order pydantic found them."""
    for error in err.errors():
        loc = tuple(str(part) for part in error["loc"] if part not in ("train", "inference", "federated"))
        if error["type"] == "extra_forbidden" and loc in _REPLACED:
            return f"{path}: {'.'.join(loc)} was replaced by {_REPLACED[loc]}"
    # A misspelt required key is one mistake, not two: "partiton: unknown key (did you mean partition?)",
    # without "partition: Field required" besides.
    missing = [tuple(error["loc"]) for error in err.errors() if error["type"] == "missing"]
    meant: dict[tuple, str] = {}
    for error in err.errors():
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            siblings = [str(other[-1]) for other in missing if other[:-1] == loc[:-1]]
            # a missing required key first (the typo is most likely it), else any key the section takes
            close = (difflib.get_close_matches(str(loc[-1]), siblings, n=1)
                     or difflib.get_close_matches(str(loc[-1]), _keys_at(loc[:-1]), n=1, cutoff=0.75))
            if close:
                meant[loc] = close[0]
    fixed = {loc[:-1] + (name,) for loc, name in meant.items()}
    lines = dict.fromkeys(  # a union's members may repeat one
        _error_line(error) + (f" (did you mean {meant[tuple(error['loc'])]}?)" if tuple(error["loc"]) in meant else "")
        for error in err.errors()
        if not (error["type"] == "missing" and tuple(error["loc"]) in fixed)
    )
    return "\n".join(f"{path}: {line}" for line in lines)


#: Job attributes the program sets, never a job file.
INTERNAL_KEYS = ("source", "run_id", "train")


def load_job(path: str | Path) -> TrainJob | InferenceJob | FederatedJob | PredictJob:
    """Reads and validates a job file.

    Args:
        path: the YAML job file.

    Returns:
        The validated, immutable job.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a valid job;
            the message names the file and every offending key, one line each.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read job file: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file is a YAML mapping of keys, got {type(raw).__name__}")
    for key in INTERNAL_KEYS:
        if key in raw:
            raise ConfigError(f"{path}: {key}: unknown key")
    raw = resolve_paths(path.resolve().parent, raw)
    mode = raw.pop("mode", None)
    if mode is not None:  # the spelling: `mode: federated` is `task: federated`
        if mode != "federated" or raw.get("task", "federated") != "federated":
            raise ConfigError(f"{path}: mode: only `mode: federated` is known (the same as `task: federated`)")
        raw["task"] = "federated"
    raw.setdefault("task", "train")
    try:
        job = _JOB.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None
    return job.model_copy(update={"source": path})
