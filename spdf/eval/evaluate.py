"""Downstream evaluation: generate for every input of a task split, score against its grouped references, report.

    report = evaluate_export(path, TaskSpec(task="e2e"), "test", DecodingConfig.from_name("paper"), "paper")
    write_report(report, out_dir)          # <out_dir>/<task>-<split>.json and .md, each written atomically
    print(format_table(report))

`evaluate_model` does the same for a model in memory (the training runner's evaluation at the end of a phase).
A report holds the metrics of `spdf.eval.metrics.TASK_METRICS[task]`, the mean loss (and perplexity) of the
references given their prompts, the decoding settings, what was evaluated, timings, every prediction and a sample
of inputs, references and generations. Nothing here imports spdf.train: a model comes from an export.
"""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import Example, FinetuneDataset, TaskSpec, TextTokenizer, load_finetune_task, pad_collate
from ..data.finetune import IGNORE_INDEX, truncate_pair
from ..errors import SpdfUserError
from ..export import CheckpointError, find_export, is_checkpoint, model_fingerprint, read_export
from ..fswrite import write_text_atomic
from ..layout import PhaseLayout
from ..model import family_of
from ..typed_spec import to_plain
from .generate import DecodingConfig, generate
from .metric_registry import METRICS, RegistryView
from .metrics import TASK_METRICS, compute_metrics

METRIC_LABELS = RegistryView(lambda: {name: metric.label for name, metric in METRICS.items()})  # "rouge_l": "ROUGE-L"
SAMPLE_SIZE = 5  # inputs shown with their references and generation in the .md report


class EvaluationError(SpdfUserError):
    """A user-fixable problem with what was asked to be evaluated (limit, context, decoding)."""


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise EvaluationError(f"limit must be a positive number of inputs, got {limit!r}")


def check_report_dir(out_dir: Path, what: str) -> None:
    """Refuse a report folder inside a training checkpoint: its manifest lists every file in it, so a report there
    would make it fail verification (a resume would skip it as damaged, --from would refuse it)."""
    out_dir = Path(out_dir).resolve()
    for folder in (out_dir, *out_dir.parents):
        if is_checkpoint(folder):
            raise EvaluationError(f"{what} {out_dir} lies inside the training checkpoint {folder}, whose manifest "
                                  f"lists every file in it: a report there would make it fail verification; give "
                                  f"--out DIR outside it")


def encode_prompts(tokenizer, examples: list[Example], n_ctx: int, max_new_tokens: int,
                   truncate: bool) -> list[list[int]]:
    """Token ids of each prompt, leaving room for `max_new_tokens` in the model's context.

    A longer prompt is an error, or with `truncate` it loses its middle as training rows do (truncate_pair: the head
    with the task's instruction and the tail with the cue right before the output stay)."""
    budget = n_ctx - max_new_tokens
    if budget < 2:
        raise EvaluationError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's context "
                              f"of {n_ctx} tokens")
    out = []
    for i, example in enumerate(examples):
        ids = tokenizer.encode(example.prompt)
        if len(ids) > budget:
            if not truncate:
                raise EvaluationError(
                    f"input {i} has a prompt of {len(ids)} tokens: with max_new_tokens {max_new_tokens} it does not "
                    f"fit the model's context of {n_ctx} tokens; truncate prompts (--truncate-prompts: the middle "
                    f"is cut, as in training) or lower max_new_tokens")
            ids, _ = truncate_pair(ids, [], budget)
        out.append(ids)
    return out


@torch.inference_mode()
def reference_loss(model, tokenizer, examples: list[Example], batch_size: int, device) -> float:
    """Mean loss per token of every reference (and its EOS) given its prompt, rows cut as training cuts them."""
    rows = FinetuneDataset(examples, tokenizer, model.config.n_ctx + 1)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = pad_collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))],
                                pad_id=tokenizer.eos_id)
            idx = batch["input_ids"][:, :-1].to(device)
            targets = batch["labels"][:, 1:].to(device)
            logits, _ = model(idx)
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _as_prediction(text: str, single_line: bool) -> str:
    text = text.strip()
    # References of one line (E2E, WebNLG, DART, docstring summaries): what follows a line break is not the answer.
    return text.split("\n", 1)[0].strip() if single_line else text


def evaluate_model(model, tokenizer, examples: list[Example], task: str, decoding: DecodingConfig,
                   decoding_name: str | None = None, *, batch_size: int = 16, truncate_prompts: bool = False,
                   progress: bool = False, with_loss: bool = True) -> dict:
    """Generate for each example, score with TASK_METRICS[task], and return the report (see the module docstring)."""
    if not examples:
        raise EvaluationError(f"no inputs to evaluate for task '{task}'")
    device = next(model.parameters()).device
    start = time.perf_counter()
    prompts = encode_prompts(tokenizer, examples, model.config.n_ctx, decoding.max_new_tokens, truncate_prompts)
    new_tokens = generate(model, prompts, decoding, eos_id=tokenizer.eos_id, batch_size=batch_size,
                          progress=progress, device=device)
    single_line = not any("\n" in ref for ex in examples for ref in ex.references)
    predictions = [_as_prediction(tokenizer.decode(ids), single_line) for ids in new_tokens]
    generated = time.perf_counter()
    references = [list(ex.references) for ex in examples]
    metrics = compute_metrics(TASK_METRICS[task], predictions, references)
    scored = time.perf_counter()
    report = {
        "task": task, "examples": len(examples), "references": sum(map(len, references)),
        "metrics": metrics, "decoding": {"name": decoding_name, **decoding.to_dict()},
        "truncated_prompts": truncate_prompts,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"generate": round(generated - start, 3), "score": round(scored - generated, 3)},
        "generated_tokens": sum(map(len, new_tokens)),
    }
    if with_loss:
        loss = reference_loss(model, tokenizer, examples, batch_size, device)
        report.update(reference_loss=loss, reference_perplexity=math.exp(min(loss, 50.0)))
        report["seconds"]["loss"] = round(time.perf_counter() - scored, 3)
    report["samples"] = [{"input": ex.prompt, "references": list(ex.references), "generation": pred}
                         for ex, pred in zip(examples[:SAMPLE_SIZE], predictions)]
    report["predictions"] = predictions
    return report


def load_for_evaluation(path) -> tuple[Path, object, TextTokenizer]:
    """(export directory, model, tokenizer) of an export, phase or run directory."""
    export_dir = find_export(path)
    exported = read_export(export_dir)
    if exported.tokenizer_path is None:
        raise CheckpointError(f"{export_dir} has no tokenizer.json next to its weights: evaluation needs the "
                              f"tokenizer the model was trained with (copy it there)")
    return export_dir, exported, TextTokenizer(exported.tokenizer_path)


def evaluate_export(path, task: TaskSpec, split: str, decoding: DecodingConfig, decoding_name: str | None = None,
                    *, limit: int | None = None, batch_size: int = 16, truncate_prompts: bool = False,
                    progress: bool = False, device=None) -> dict:
    """Evaluate the export at (or of the phase / run at) `path` on `split` of `task`; the first `limit` inputs."""
    check_limit(limit)
    export_dir, exported, tokenizer = load_for_evaluation(path)
    examples = load_finetune_task(task, split).examples[:limit]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate_model(exported.model.to(device), tokenizer, examples, task.task, decoding, decoding_name,
                            batch_size=batch_size, truncate_prompts=truncate_prompts, progress=progress)
    report.update(split=split, limit=limit, task_spec=to_plain(task))
    report["model"] = {"export": str(export_dir.resolve()), "fingerprint": "sha256:" + model_fingerprint(export_dir),
                       "family": family_of(exported.model).name,
                       **{k: exported.config.get(k) for k in ("recipe", "phase", "sparse")},
                       "shape": exported.config.get("model")}
    return report


# ---- reports -----------------------------------------------------------------------------------------------------
def recorded_generation(path, task: str) -> dict | None:
    """The `eval.generate` settings a run recorded for the phase whose export `path` leads to, if that phase scored
    the same task: {"where", "decoding", "max_new_tokens", "num_beams", "split"} (None where it recorded none), so
    evaluating a run afterwards repeats how the run evaluated itself. None for an export outside a run directory."""
    try:
        export = find_export(path)
    except CheckpointError:
        return None  # said by load_for_evaluation, with the reason
    phase_paths = PhaseLayout.of_export(export)
    if phase_paths is None or not phase_paths.run.recipe.is_file():
        return None
    phase_name, recipe_file = phase_paths.name, phase_paths.run.recipe
    import yaml

    try:
        recorded = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        phase = next(p for p in recorded["phases"] if p.get("name") == phase_name)
        generate_spec, task_spec = (phase.get("eval") or {}).get("generate"), phase.get("task") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError, StopIteration):
        return None  # no usable record: the flags' defaults apply
    if not generate_spec or task_spec.get("task") != task:
        return None
    return {"where": f"phases.{phase_name}.eval.generate of {recipe_file}",
            **{k: generate_spec.get(k) for k in ("decoding", "max_new_tokens", "num_beams", "split")}}


def _value(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def format_table(report: dict) -> str:
    d = report["decoding"]
    how = (f"beam {d['num_beams']}, length penalty {d['length_penalty']}" if d["num_beams"] > 1
           else "sampling" if d["do_sample"] else "greedy")
    lines = [f"{report['task']} {report.get('split', '')}: {report['examples']} inputs, {report['references']} "
             f"references; decoding {d['name'] or 'custom'} ({how}, at most {d['max_new_tokens']} new tokens)"]
    width = max(len(label) for label in METRIC_LABELS.values())
    lines += [f"  {METRIC_LABELS.get(name, name):{width}s} {_value(value):>8s}"
              for name, value in report["metrics"].items()]
    if "reference_loss" in report:
        lines.append(f"  reference loss {report['reference_loss']:.3f} "
                     f"(perplexity {report['reference_perplexity']:.2f})")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    model = report.get("model", {})
    lines = [f"# {report['task']} {report.get('split', '')}: downstream evaluation", "",
             f"{report['examples']} inputs ({report['references']} references), evaluated {report['time']}; "
             f"model `{model.get('export', '?')}` ({model.get('fingerprint', '?')}).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {METRIC_LABELS.get(name, name)} | {_value(value)} |" for name, value in report["metrics"].items()]
    if "reference_loss" in report:
        lines.append(f"| reference loss (perplexity) | {report['reference_loss']:.3f} "
                     f"({report['reference_perplexity']:.2f}) |")
    lines += ["", f"Decoding: `{json.dumps(report['decoding'], sort_keys=True)}`; seconds: "
                  f"`{json.dumps(report['seconds'], sort_keys=True)}`.", "", "## Sample", ""]
    for i, sample in enumerate(report["samples"]):
        lines += [f"### Input {i}", "", "```", sample["input"], "```", "", "References:", ""]
        lines += [f"- {ref}" for ref in sample["references"]]
        lines += ["", f"Generation: {sample['generation'] or '(empty)'}", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    """Write <out_dir>/<task>-<split>.json and .md (each atomically); nothing else in out_dir is touched."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['task']}-{report.get('split', 'eval')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md_path, format_markdown(report) + "\n")
    return json_path, md_path
