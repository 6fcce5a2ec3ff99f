"""The text metrics spdf computes: one entry per metric, and the lookups every other place reads.

A metric's entry says its name (the key in reports, in metrics.jsonl as `eval_<name>`, in a task's metric list),
how tables label it, the `evaluate` module that computes it (spdf/eval/metric_modules/<module>/<module>.py: a module
computes every metric that names it) and its scorer. The shipped metrics register in spdf.eval.metrics, next to their
scorers; the tasks that use them name them in their own entries (spdf.data.task_registry).

A scorer is `score(names, predictions, references, options) -> {name: value}`; metrics that share a scorer are computed
in one call (ROUGE-1, -2 and -L from one pass of rouge-score). `options` holds the text conventions (lowercase,
tokenize, rouge_stemmer: see spdf.eval.metrics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

Scorer = Callable[[tuple, list, list, dict], dict]


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # e.g. "ROUGE-L"
    module: str  # the `evaluate` module that computes it, e.g. "spdf_rouge"
    score: Scorer


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def metric_names() -> tuple[str, ...]:
    return tuple(METRICS)


def module_families() -> dict[str, tuple[str, ...]]:
    """Each `evaluate` module -> the metrics it computes, in registration order."""
    families: dict[str, tuple[str, ...]] = {}
    for metric in METRICS.values():
        families[metric.module] = (*families.get(metric.module, ()), metric.name)
    return families


class RegistryView(Mapping):
    """A read-only mapping computed from a registry whenever it is read, so it never lags a registration."""

    def __init__(self, table: Callable[[], Mapping]):
        self._table = table

    def __getitem__(self, key):
        return self._table()[key]

    def __iter__(self) -> Iterator:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(dict(self._table()))
