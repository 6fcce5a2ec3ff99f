"""A fine-tuning phase's downstream evaluation (its `eval.generate` block), logged to metrics.jsonl.

Scopes: "before" as the phase starts (the model it fine-tunes), "sample" every `every_steps` on the first `sample`
inputs, "final" at the end on the first `limit` inputs (all by default). Generation runs on the main process only;
the other ranks wait. Prompts longer than the context (minus the new tokens) lose their middle, as the phase's
training rows did. A record: {"phase", "step", "tokens", "eval": scope, "eval_split", "eval_examples",
"eval_<metric>" ..., "eval_reference_loss", "eval_seconds"}.
"""
from __future__ import annotations

from ..data import load_finetune_task
from ..eval.evaluate import evaluate_model
from ..eval.metrics import TASK_METRICS, compute_metrics
from ..recipe import PhaseSpec, RecipeError
from .loop import PhaseHook


def check_metrics_available(phase: PhaseSpec) -> None:
    """Fail before any training if the metric packages of the phase's eval.generate block are missing."""
    names = [n for n in TASK_METRICS[phase.task.task] if n != "meteor"]  # METEOR reports a missing Java itself
    try:
        compute_metrics(names, ["a b c d e"], [["a b c d e"]])
    except ImportError as err:
        raise RecipeError(f"phases.{phase.name}.eval.generate: {err}") from None


class DownstreamEval(PhaseHook):
    """Scores generations of a fine-tuning phase's model on its task; a hook of the phase's run."""

    def __init__(self, phase: PhaseSpec, tokenizer, metrics, accelerator):
        self.spec, self.task = phase.eval.generate, phase.task
        self.phase, self.tokenizer, self.metrics, self.accelerator = phase.name, tokenizer, metrics, accelerator
        self.decoding = self.spec.decoding_config()
        self._examples = None

    @property
    def examples(self):
        if self._examples is None:  # read once, when first needed
            self._examples = load_finetune_task(self.task, self.spec.split).examples
        return self._examples

    def at_start(self, run) -> None:
        if self.spec.before:
            self(run.unwrapped_model, "before", 0, 0)

    def after_step(self, run) -> None:
        every, step = self.spec.every_steps, run.state.step
        if every and step % every == 0 and step < run.plan.total_steps:  # the end is "final", scored by the runner
            self(run.unwrapped_model, "sample", step, run.state.tokens)

    def record(self, scope: str, step: int) -> dict | None:
        """The scope's record of this phase at `step` already in metrics.jsonl (a resumed run), if any."""
        return next((r for r in reversed(self.metrics.read()) if r.get("phase") == self.phase
                     and r.get("eval") == scope and r.get("step") == step), None)

    def __call__(self, model, scope: str, step: int, tokens: int) -> None:
        limit = self.spec.sample if scope == "sample" else self.spec.limit
        if self.accelerator.is_main_process and self.record(scope, step) is None:
            report = evaluate_model(model, self.tokenizer, self.examples[:limit], self.task.task, self.decoding,
                                    self.spec.decoding, batch_size=self.spec.batch_size, truncate_prompts=True)
            seconds = sum(report["seconds"].values())
            self.metrics.write({"phase": self.phase, "step": step, "tokens": tokens, "eval": scope,
                                "eval_split": self.spec.split, "eval_examples": report["examples"],
                                "eval_decoding": self.spec.decoding, "eval_seconds": seconds,
                                "eval_reference_loss": report["reference_loss"],
                                **{f"eval_{name}": value for name, value in report["metrics"].items()}})
        self.accelerator.wait_for_everyone()

    def summary(self, scope: str) -> dict | None:
        """{"task", "split", "examples", "decoding", "metrics", ...} of the phase's last `scope` record (done.json)."""
        r = next((r for r in reversed(self.metrics.read()) if r.get("phase") == self.phase and r.get("eval") == scope),
                 None)
        if r is None:
            return None
        return {"task": self.task.task, "split": r["eval_split"], "examples": r["eval_examples"],
                "decoding": r["eval_decoding"],
                "seconds": r["eval_seconds"], "reference_loss": r["eval_reference_loss"],
                "metrics": {name: r[f"eval_{name}"] for name in TASK_METRICS[self.task.task] if f"eval_{name}" in r}}
