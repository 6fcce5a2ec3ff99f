"""The downstream tasks spdf knows: one entry per task, and the lookups every other place reads.

A task's entry says everything spdf needs of it: how to read a split, its split names, the metrics that score it,
the TaskSpec settings it reads (with their defaults) and whether it needs a local `path`. Everything else reads
these entries: the recipe schema (TaskSpec.task's allowed values, which settings a task takes, `eval.generate.split`),
`spdf evaluate --help` and its default split, evaluation (spdf.eval.metrics.TASK_METRICS) and reports. The shipped
tasks register in spdf.data.tasks, each next to its loader; adding a task is one `register_task` call there.

Metrics are named here, not imported: spdf.data sits below spdf.eval, whose registry defines each metric
(spdf.eval.metric_registry); a test checks that every task's metrics are registered there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

from .errors import DataError


@dataclass(frozen=True)
class Task:
    name: str
    # (spec, split) -> [(prompt, reference)], one pair per reference; inputs are grouped by prompt afterwards
    pairs: Callable[..., list[tuple[str, str]]]
    metrics: tuple[str, ...]  # spdf.eval metric names, in the order reports list them
    splits: tuple[str, ...] = ("train", "validation")  # the last is `spdf evaluate`'s default
    options: Mapping[str, object] = field(default_factory=dict)  # TaskSpec settings it reads -> their defaults
    path: Literal["required", "optional", "unused"] = "optional"  # TaskSpec.path
    path_note: str = ""  # why, said in the error when a recipe breaks the `path` rule


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_splits(name: str) -> tuple[str, ...]:
    return get_task(name).splits


def task_options() -> dict[str, dict[str, object]]:
    """TaskSpec setting -> {task that reads it: its default there}, in registration order."""
    table: dict[str, dict[str, object]] = {}
    for task in TASKS.values():
        for option, default in task.options.items():
            table.setdefault(option, {})[task.name] = default
    return table
