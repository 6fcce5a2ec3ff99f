"""`spdf evaluate` on the tiny demo's exports with the task fixtures, the network blocked; and the `eval.generate`
block of a fine-tuning phase.

The tiny model writes nonsense, so the scores are near zero: what is tested is that every number is the metric
package's own on exactly the generations and grouped references, and that the reports are complete and atomic.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spdf.data import TaskSpec, load_finetune_task
from spdf.eval.metrics import TASK_METRICS, compute_metrics
from tiny_runs import assert_user_error, loss_trace, read_metrics, run_cli, tree_digest, write_recipe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TASK_FILES = {"e2e": FIXTURES / "e2e_nlg" / "{split}.jsonl", "webnlg": FIXTURES / "web_nlg" / "{split}.jsonl",
              "dart": FIXTURES / "dart" / "{split}.jsonl"}
# n_ctx is 64 in the tiny demo: 8 new tokens, prompts cut in the middle to fit
SHORT = ["--max-new-tokens", "8", "--truncate-prompts"]


def evaluate(capsys, path, task: str, *extra) -> tuple[int, str, str]:
    return run_cli(["evaluate", path, "--task", task, "--task-path", TASK_FILES[task], *extra], capsys)


@pytest.mark.parametrize("task, decoding", [("e2e", "paper"), ("webnlg", "greedy"), ("dart", "greedy")])
def test_metrics_on_the_fixtures_equal_the_packages_offline(task, decoding, finished_run, untouched, offline,
                                                           tmp_path, capsys):
    export = finished_run["run_dir"] / "phases/finetune/export"
    rc, out, err = evaluate(capsys, export, task, "--decoding", decoding, *SHORT, "--out", tmp_path / "out")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{task}-test.json", f"{task}-test.md"]
    report = json.loads((tmp_path / "out" / f"{task}-test.json").read_text())
    examples = load_finetune_task(TaskSpec(task=task, path=str(TASK_FILES[task])), "test")
    references = [e.references for e in examples]
    assert report["examples"] == len(examples) and report["references"] == sum(map(len, references))
    assert list(report["metrics"]) == list(TASK_METRICS[task])  # e2e: BLEU NIST METEOR ROUGE-L CIDEr; others: TER
    # the metrics module is pinned to the packages themselves (tests/eval/test_metrics.py): same inputs, same numbers
    assert report["metrics"] == compute_metrics(TASK_METRICS[task], report["predictions"], references)
    assert report["decoding"]["name"] == decoding and report["decoding"]["max_new_tokens"] == 8
    assert report["decoding"]["num_beams"] == (10 if decoding == "paper" else 1)
    weights = (export / "model.safetensors").read_bytes()
    assert report["model"]["fingerprint"] == "sha256:" + hashlib.sha256(weights).hexdigest()
    assert report["split"] == "test" and report["reference_loss"] > 0 and report["time"]
    assert [s["references"] for s in report["samples"]] == references[:5]
    table = out.splitlines()
    for label in {"e2e": ("BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"), "webnlg": ("BLEU", "METEOR", "TER"),
                  "dart": ("BLEU", "METEOR", "TER")}[task]:
        assert any(line.split()[:1] == [label] for line in table), (label, out)
    md = (tmp_path / "out" / f"{task}-test.md").read_text()
    assert "| BLEU |" in md and examples[0].references[0] in md


def test_default_report_goes_next_to_the_evaluated_run_and_changes_nothing_else(finished_copy, offline, capsys):
    run_dir, _ = finished_copy
    before = tree_digest(run_dir)
    rc, out, err = run_cli(["evaluate", run_dir, "--task", "docstring", "--decoding", "greedy", "--limit", "3",
                            "--max-new-tokens", "6", "--truncate-prompts"], capsys)
    assert rc == 0, err
    after = tree_digest(run_dir)
    assert set(after) - set(before) == {"eval/docstring-validation.json", "eval/docstring-validation.md"}
    assert {k: v for k, v in after.items() if k in before} == before
    report = json.loads((run_dir / "eval/docstring-validation.json").read_text())
    assert report["examples"] == 3 and list(report["metrics"]) == ["bleu", "rouge_l", "chrf"]
    assert report["model"]["phase"] == "finetune"  # a run directory means its last finished phase


@pytest.fixture
def bad_inputs(finished_run, tmp_path):
    """Paths for the error cases: an export without its tokenizer, a task whose input has no reference, a file, a
    copy of a training checkpoint."""
    export = finished_run["run_dir"] / "phases/finetune/export"
    bare = tmp_path / "bare-export"
    shutil.copytree(export, bare)
    (bare / "tokenizer.json").unlink()
    (bare / "manifest.json").unlink()  # a user's own export: with spdf's manifest a missing file would be damage
    empty = tmp_path / "norefs.jsonl"
    empty.write_text(json.dumps({"prompt": "a:", "completion": "fine"}) + "\n" +
                     json.dumps({"prompt": "b:", "completion": ""}) + "\n")
    not_a_dir = tmp_path / "notes.txt"
    not_a_dir.write_text("not a model\n")
    step = sorted((finished_run["run_dir"] / "phases/finetune/checkpoints").glob("step-*"))[-1]
    checkpoint = tmp_path / step.name
    shutil.copytree(step, checkpoint)
    return {"bare": bare, "norefs": empty, "file": not_a_dir, "checkpoint": checkpoint}


@pytest.mark.parametrize("args, fragments", [
    (["--task", "summarize"], ["task must be one of", "'docstring'", "'e2e'", "'curation'", "got 'summarize'"]),
    (["--task", "docstring", "--split", "test"], ["unknown split 'test' for task 'docstring'", "train, validation"]),
    (["--task", "e2e", "--task-path", "/nonexistent/{split}.jsonl"], ["task file not found", "/nonexistent/test"]),
    (["--task", "jsonl", "--task-path", "{norefs}", "--task-set", "validation_fraction=0.01", "--split", "train"],
     ["the input 'b:' has no references"]),
    (["--task", "docstring", "--limit", "0"], ["limit must be a positive number of inputs, got 0"]),
    (["--task", "docstring", "--num-beams", "0"], ["num_beams must be an integer >= 1, got 0"]),
    (["--task", "docstring", "--decoding", "fancy"], ["unknown decoding 'fancy'", "paper, greedy, sample"]),
    (["--task", "docstring", "--batch-size", "0", "--limit", "2"], ["batch_size must be a positive integer, got 0"]),
    (["--task", "e2e", "--task-path", str(TASK_FILES["e2e"]), "--max-new-tokens", "8"],
     ["input 0 has a prompt of", "context of 64 tokens", "--truncate-prompts"]),
    (["--task", "docstring", "--task-set", "promptfield=x"], ["unknown key 'task.promptfield'"]),
    (["PATH={bare}", "--task", "docstring"], ["has no tokenizer.json", "bare-export"]),
    # a file as PATH is named as what it is not, not as a report folder under a file
    (["PATH={file}", "--task", "docstring"], ["notes.txt is not an spdf export"]),
    # a checkpoint's manifest lists every file in it: a report inside would make it fail verification
    (["PATH={checkpoint}", "--task", "docstring", *SHORT, "--decoding", "greedy", "--limit", "1"],
     ["the report folder", "lies inside the training checkpoint", "--out DIR"]),
    (["--task", "docstring", *SHORT, "--limit", "1", "--out", "{checkpoint}/reports"],
     ["--out", "lies inside the training checkpoint"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, fragments, bad_inputs, untouched, offline, capsys):
    def fill(arg: str) -> str:
        for name, value in bad_inputs.items():
            arg = arg.replace(f"{{{name}}}", str(value))
        return arg

    path = untouched["run_dir"]
    if args[0].startswith("PATH="):
        path, args = Path(fill(args[0][len("PATH="):])), args[1:]
    before = tree_digest(path)
    rc, _, err = run_cli(["evaluate", path, *map(fill, args)], capsys)
    assert_user_error(rc, err, *fragments)
    assert tree_digest(path) == before and not (Path(path) / "eval").exists()


def test_evaluation_does_not_import_training():
    code = ("import sys, spdf.eval.evaluate, spdf.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('spdf.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_eval_generate_block_scores_before_during_and_after_without_changing_training(finished_run, tmp_path,
                                                                                      capsys):
    sets = ["phases.finetune.eval.generate.before=true", "phases.finetune.eval.generate.limit=6",
            "phases.finetune.eval.generate.max_new_tokens=6", "phases.finetune.eval.generate.every_steps=2",
            "phases.finetune.eval.generate.sample=3"]
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run", *sets)
    rc, out, err = run_cli(["run", recipe], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "run"
    records = [r for r in read_metrics(run_dir) if "eval" in r]
    assert [(r["eval"], r["step"], r["eval_examples"]) for r in records] == [
        ("before", 0, 6), ("sample", 2, 3), ("final", 4, 6)]
    assert all(r["phase"] == "finetune" and r["eval_split"] == "validation" for r in records)
    assert all(isinstance(r[f"eval_{m}"], float) for r in records for m in TASK_METRICS["docstring"])
    done = json.loads((run_dir / "phases/finetune/done.json").read_text())
    assert done["downstream_before"]["metrics"] == {m: records[0][f"eval_{m}"] for m in TASK_METRICS["docstring"]}
    assert done["downstream_after"]["examples"] == 6
    # generation and scoring leave training exactly as it was: the same losses as the run without the block
    assert loss_trace(run_dir) == loss_trace(finished_run["run_dir"])
    def downstream_table(output: str) -> list[str]:
        lines = output.splitlines()
        header = next(i for i, line in enumerate(lines) if line.strip().startswith("downstream (finetune)"))
        return lines[header:header + 4]

    table = downstream_table(out)
    assert table[1].split() == ["BLEU", "ROUGE-L", "chrF"]
    assert table[2].split()[:2] == ["before", "fine-tuning"] and table[3].split()[:2] == ["after", "fine-tuning"]
    # resumed after it finished: nothing is evaluated again, the summary is the same
    rc, again, _ = run_cli(["run", recipe], capsys)
    assert rc == 0 and [r for r in read_metrics(run_dir) if "eval" in r] == records
    assert downstream_table(again) == table
