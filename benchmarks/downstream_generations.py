"""The generations behind a run's downstream scores, saved so anyone can re-score them.

A fine-tuning phase with an `eval.generate` block logs only its metrics (done.json, metrics.jsonl). For each such
phase of a finished run this decodes again, with the phase's own settings, from the exports the scores were taken
from (before: the model the phase started from; after: the phase's export), checks that the metrics computed from
these generations are the run's own, and writes every input, its references and the generation:

    {"<phase>": {"after": {"task", "split", "decoding", "metrics", "examples": [{"input", "references",
                                                                                "output"}, ...]},
                 "before": {...}}}

Imported by demo_run.py and replicate.py; `python benchmarks/downstream_generations.py RUN_DIR OUT.json` for a run
made by hand.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from spdf.data import load_finetune_task
from spdf.eval.evaluate import evaluate_model, load_for_evaluation
from spdf.fswrite import write_text_atomic
from spdf.recipe import load_recipe


class ScoreMismatch(RuntimeError):
    """Re-decoding did not reproduce the run's scores: the saved generations would not be the ones scored."""


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9) for k in a)


def phase_generations(phase, export_dir: Path, logged: dict) -> dict:
    """Decode the phase's eval.generate inputs with the model at export_dir; the metrics must equal `logged`'s."""
    spec = phase.eval.generate
    _, exported, tokenizer = load_for_evaluation(export_dir)
    examples = load_finetune_task(phase.task, spec.split).examples[:spec.limit]
    report = evaluate_model(exported.model.eval(), tokenizer, examples, phase.task.task, spec.decoding_config(),
                            spec.decoding, batch_size=spec.batch_size, truncate_prompts=True, with_loss=False)
    if not _same(report["metrics"], logged["metrics"]):
        raise ScoreMismatch(f"{export_dir}: re-decoded metrics {report['metrics']} differ from the run's "
                            f"{logged['metrics']}")
    return {"task": phase.task.task, "split": spec.split, "decoding": report["decoding"], "metrics": report["metrics"],
            "examples": [{"input": ex.prompt, "references": list(ex.references), "output": out}
                         for ex, out in zip(examples, report["predictions"])]}


def run_generations(run_dir: Path, start_from: Path | None = None) -> dict:
    """{phase: {"before"?: ..., "after": ...}} of every fine-tuning phase of `run_dir` that logged downstream scores.
    start_from: the export the first fine-tuning phase started from when it is not the run's previous phase
    (`spdf finetune --from`)."""
    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    out, previous = {}, start_from
    for phase in recipe.phases:
        phase_dir = run_dir / "phases" / phase.name
        done_file = phase_dir / "done.json"
        if not done_file.is_file():  # not run here (a run of `spdf finetune --from`): start_from stands
            continue
        done = json.loads(done_file.read_text(encoding="utf-8"))
        if phase.kind == "finetune" and phase.eval.generate is not None:
            scopes = {"after": (phase_dir / "export", done.get("downstream_after"))}
            if previous is not None:
                scopes["before"] = (previous, done.get("downstream_before"))
            out[phase.name] = {scope: phase_generations(phase, export, logged)
                               for scope, (export, logged) in scopes.items() if logged}
        previous = phase_dir / "export"
    return out


def write_generations(run_dir: Path, out_file: Path, start_from: Path | None = None) -> Path | None:
    """run_generations into out_file (None, nothing written, for a run without downstream scores)."""
    generations = run_generations(run_dir, start_from)
    if not generations:
        return None
    out_file = Path(out_file)
    write_text_atomic(out_file, json.dumps(generations, indent=1, ensure_ascii=False) + "\n")
    return out_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--from", dest="start_from", type=Path, default=None,
                    help="the export the first fine-tuning phase started from (spdf finetune --from)")
    args = ap.parse_args()
    print(write_generations(args.run_dir, args.out, args.start_from) or "no downstream scores in this run")


if __name__ == "__main__":
    main()
