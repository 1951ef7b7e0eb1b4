"""The task registry: what the CLI needs for each job ``task``.

Runners live above this layer (``mpcfl.tasks``) and import torch, so they are
named as ``module:function`` and imported only when a party runs: ``mpcfl
validate`` loads no torch. Adding a task is a module in ``mpcfl/tasks/``, its
schema class, and one line in :data:`TASKS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from mpcfl.errors import MpcflError
from mpcfl.jobs.schema import INTERNAL_KEYS, FederatedJob, InferenceJob, Job, JobBase, PredictJob, TrainJob

#: Job-reading CLI features that only some tasks offer.
RESUME, BASELINE, AUDIT = "--resume", "baseline", "audit"


@dataclass(frozen=True)
class Task:
    """One job type.

    Args:
        name: the job file's ``task``.
        job: its schema class.
        runner: ``module:function`` running one party: ``(job, party, *, rendezvous, key_file, resume)``.
        checker: ``module:function`` for ``mpcfl validate --party``: ``(job, party) -> list[str]``, what one
            party can check of its own files without its peers, as lines to print.
        features: which of :data:`RESUME`, :data:`BASELINE`, :data:`AUDIT` apply.
    """

    name: str
    job: type[JobBase]
    runner: str
    checker: str
    features: frozenset[str] = frozenset()

    def require(self, job: JobBase, feature: str) -> None:
        """Raises MpcflError, naming the job file, if ``feature`` does not apply to this task."""
        if feature not in self.features:
            offering = ", ".join(name for name, task in TASKS.items() if feature in task.features)
            raise MpcflError(f"{job.source}: {feature} is for task: {offering}; this job is task: {self.name}")

    def run_party(self) -> Callable[..., Any]:
        """The party runner, imported now."""
        return _imported(self.runner)

    def check_party(self) -> Callable[..., list[str]]:
        """The ``validate --party`` checker, imported now."""
        return _imported(self.checker)


def _imported(name: str) -> Any:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


TASKS: dict[str, Task] = {
    "train": Task(
        "train", TrainJob, "mpcfl.tasks.train.runner:run_party", "mpcfl.tasks.train.dataset:check_party",
        frozenset({RESUME, BASELINE, AUDIT}),
    ),
    "inference": Task("inference", InferenceJob, "mpcfl.tasks.inference:run_inference_party", "mpcfl.tasks.inference:check_party"),
    "federated": Task(
        "federated", FederatedJob, "mpcfl.tasks.federated.runner:run_party", "mpcfl.tasks.federated.runner:check_party",
        frozenset({RESUME}),
    ),
    "predict": Task("predict", PredictJob, "mpcfl.tasks.predict:run_party", "mpcfl.tasks.predict:check_party"),
}


def task_of(job: JobBase) -> Task:
    """The registry entry of a loaded job, by its schema class."""
    return next(task for task in TASKS.values() if isinstance(job, task.job))


def json_schema(task: str | None = None) -> dict[str, Any]:
    """The JSON schema of a job file: one task's, or any task's (told apart by ``task``), for editors.

    Keys that :func:`~mpcfl.jobs.schema.load_job` refuses in a file (set by the program) are left out.
    """
    schema = TASKS[task].job.model_json_schema() if task else TypeAdapter(Job).json_schema()
    jobs = {spec.job.__name__ for spec in TASKS.values()}
    for definition in [schema, *schema.get("$defs", {}).values()]:
        if definition.get("title") in jobs:
            for key in INTERNAL_KEYS:
                definition.get("properties", {}).pop(key, None)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
