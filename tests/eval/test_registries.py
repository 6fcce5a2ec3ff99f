"""The task and metric registries: each task and each metric is one entry, and every other place reads them.

A task and a metric registered here (and nowhere else) are allowed by the recipe schema with their own settings,
listed by `spdf evaluate --help`, loaded, scored, labelled in reports and computed by the metric's `evaluate`
module; the shipped entries are consistent with each other.
"""
from __future__ import annotations

import dataclasses

import pytest

from spdf.cli import build_parser
from spdf.data import TASKS, TaskSpec, load_finetune_task, task_splits
from spdf.data.task_registry import Task, register_task
from spdf.eval import metrics
from spdf.eval.evaluate import METRIC_LABELS, format_table
from spdf.eval.metric_registry import METRICS, Metric, register_metric
from spdf.typed_spec import RecipeError, build

ROWS = [("Data: a b\nText:", "b a"), ("Data: c d e\nText:", "e d c"), ("Data: c d e\nText:", "e c d")]


def _length_ratio(names, predictions, references, options):
    """A toy metric: words predicted per word of the first reference, in percent."""
    predicted = sum(len(p.split()) for p in predictions)
    return {names[0]: 100.0 * predicted / sum(len(refs[0].split()) for refs in references)}


@pytest.fixture
def registered(monkeypatch):
    """The task 'reverse' and the metric 'length_ratio', registered for this test only."""
    monkeypatch.setitem(METRICS, "length_ratio", None)  # monkeypatch removes both entries after the test ...
    monkeypatch.setitem(TASKS, "reverse", None)
    del METRICS["length_ratio"], TASKS["reverse"]  # ... and the registration functions add them as a user would
    register_metric(Metric("length_ratio", "LenRatio", "spdf_bleu", _length_ratio))
    return register_task(Task("reverse", lambda spec, split: ROWS, ("length_ratio", "bleu"),
                              splits=("train", "test"), options={"max_prompt_lines": 3}))


def test_a_registered_task_is_allowed_by_the_schema_with_its_own_settings(registered):
    with pytest.raises(RecipeError, match=r"task.task must be one of 'docstring', .*'jsonl', 'reverse', got 'revers'"
                                          r" \(did you mean 'reverse'\?\)"):
        build(TaskSpec, {"task": "revers"}, "task")
    spec = build(TaskSpec, {"task": "reverse", "max_prompt_lines": 5}, "task")
    assert spec.option("max_prompt_lines") == 5 and TaskSpec(task="reverse").option("max_prompt_lines") == 3
    with pytest.raises(RecipeError, match=r"task.prompt_field is only used when task is 'jsonl' \(task is 'reverse'\)"):
        build(TaskSpec, {"task": "reverse", "prompt_field": "q"}, "task")
    with pytest.raises(RecipeError, match=r"max_prompt_lines is only used when task is 'docstring' or 'reverse'"):
        TaskSpec(task="e2e", max_prompt_lines=2)
    assert task_splits("reverse") == ("train", "test")
    with pytest.raises(ValueError, match="already registered"):
        register_task(registered)


def test_a_registered_task_is_in_the_cli_help(registered, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    assert "docstring, e2e, webnlg, dart, curation, jsonl or reverse" in " ".join(capsys.readouterr().out.split())


def test_a_registered_task_and_metric_are_loaded_scored_and_labelled(registered, offline, tmp_path):
    examples = load_finetune_task(TaskSpec(task="reverse"), "test")
    assert [e.references for e in examples] == [["b a"], ["e d c", "e c d"]]
    assert metrics.TASK_METRICS["reverse"] == ("length_ratio", "bleu")
    predictions = ["b a", "e d"]
    scores = metrics.compute_metrics(metrics.TASK_METRICS["reverse"], predictions, [e.references for e in examples])
    assert list(scores) == ["length_ratio", "bleu"] and scores["length_ratio"] == pytest.approx(80.0)
    assert METRIC_LABELS["length_ratio"] == "LenRatio"
    report = {"task": "reverse", "split": "test", "examples": 2, "references": 3, "metrics": scores,
              "decoding": {"name": "greedy", "num_beams": 1, "do_sample": False, "max_new_tokens": 8}}
    assert "  LenRatio    80.00" in format_table(report).splitlines()
    # the metric's `evaluate` module computes it too, with no edit to the module's script
    assert metrics.MODULE_FAMILIES["spdf_bleu"] == ("bleu", "chrf", "ter", "length_ratio")
    module = metrics.load_metric("length_ratio", cache_dir=str(tmp_path))
    got = module.compute(predictions=predictions, references=[e.references for e in examples])
    assert got == {"length_ratio": pytest.approx(80.0)}


def test_the_shipped_entries_agree_with_each_other():
    assert list(TASKS) == ["docstring", "e2e", "webnlg", "dart", "curation", "jsonl"]
    spec_fields = {f.name for f in dataclasses.fields(TaskSpec)}
    for name, task in TASKS.items():
        assert set(task.metrics) <= set(METRICS), name  # every metric a task names is registered
        assert set(task.options) <= spec_fields, name  # every setting it reads is a TaskSpec field
        assert task.splits[:2] == ("train", "validation"), name
    assert [t for t in TASKS if task_splits(t)[-1] == "test"] == ["e2e", "webnlg", "dart"]
    modules = {p.name for p in metrics.MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file()}
    assert set(metrics.MODULE_FAMILIES) == modules  # a module script per registered module, and no orphan
    assert list(METRICS) == ["bleu", "chrf", "ter", "rouge1", "rouge2", "rouge_l", "nist", "meteor", "cider"]
    assert dict(METRIC_LABELS) == {"bleu": "BLEU", "chrf": "chrF", "ter": "TER", "rouge1": "ROUGE-1",
                                   "rouge2": "ROUGE-2", "rouge_l": "ROUGE-L", "nist": "NIST", "meteor": "METEOR",
                                   "cider": "CIDEr"}
