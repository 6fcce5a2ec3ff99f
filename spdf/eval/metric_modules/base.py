"""The shared body of spdf's `evaluate` modules: spdf.eval.metrics computes them.

A module computes the metrics registered with its name (spdf.eval.metric_registry: `Metric(..., module=...)`), so a
metric added to the registry is in its module with no edit here or in the module script.

The module scripts import this file as a module (`from spdf.eval.metric_modules import base`), never the class by
name: evaluate takes the first EvaluationModule subclass it finds in a script's namespace as the script's metric.
"""
import datasets
import evaluate

from spdf.eval import metrics

_INPUTS = """
Args:
    predictions: list of str, one generated text per input.
    references: list of list of str, every reference of that input (inputs may have different numbers).
    lowercase (bool, default True), tokenize (str, sacrebleu's tokenizer name, default "13a"),
    rouge_stemmer (bool, default False): text conventions, see spdf.eval.metrics.
Returns:
    dict metric name -> float, or a string starting with "skipped:" for a metric that cannot run here
    (METEOR without Java).
"""


class SpdfMetric(evaluate.Metric):
    """Computes the metrics registered for this module (or, under config_name=<metric>, that one metric) with
    spdf.eval.metrics.compute_metrics."""

    DESCRIPTION = ""
    CITATION = ""
    REFERENCE_URLS: tuple[str, ...] = ()

    def _names(self) -> tuple[str, ...]:
        module = self.__module__.rsplit(".", 1)[-1]  # the script's name, also where evaluate loaded a copy of it
        family = metrics.MODULE_FAMILIES.get(module, ())
        if self.config_name == "default":
            return family
        if self.config_name not in family:
            raise ValueError(f"unknown config_name {self.config_name!r} for {module}; "
                             f"use 'default' or one of: {', '.join(family)}")
        return (self.config_name,)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=f"{self.DESCRIPTION} Computes: {', '.join(self._names())}.",
            citation=self.CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
            reference_urls=list(self.REFERENCE_URLS),
        )

    def _compute(self, predictions, references, **options):
        return metrics.compute_metrics(self._names(), predictions, references, **options)
