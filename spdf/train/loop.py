"""The one training loop, shared by pre-training and fine-tuning.

A phase is: AdamW (decay/no-decay groups), a step-indexed LR schedule, gradient accumulation, grad-norm clipping,
mixed precision through accelerate, periodic validation, checkpoints, metrics and a progress bar. Everything a
resumed run needs is in the checkpoint, and the LR is a pure function of the step, so a run killed at any point
and resumed from its last checkpoint replays exactly the losses of an uninterrupted run.

A phase runs as a PhaseRun: the training step and the loop's own steps (validate, checkpoint, log, the stop
decisions) are its methods, and anything else that rides along (a fine-tuning phase's downstream evaluation) is a
PhaseHook, called at fixed points of each step: a new feature is a hook, not an edit in the middle of the loop.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..export import layout_meta
from ..layout import PhaseLayout
from .checkpoint import remove_interrupted_writes, resume_checkpoint, save_checkpoint
from .metrics import MetricsLog
from .nonfinite import NonFiniteGuard, check_state_finite
from .preemption import Preempted
from .optim import build_adamw
from .parametrization import LearningRates
from .schedule import lr_factor


@dataclass
class PhasePlan:
    """A phase's settings, resolved from the recipe into plain numbers."""

    name: str
    kind: str
    total_steps: int
    micro_batch_size: int
    accum_steps: int
    lr: float
    betas: tuple
    eps: float
    weight_decay: float
    grad_clip: float | None
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    max_nonfinite_steps: int = 3  # consecutive non-finite steps skipped before the run stops
    progress: bool = True


@dataclass
class TrainState:
    """Counters and positions saved with every checkpoint (registered with accelerate)."""

    phase: str = ""
    step: int = 0
    tokens: int = 0
    flops_dense: float = 0.0
    flops_spent: float = 0.0
    elapsed: float = 0.0
    data: dict = field(default_factory=dict)
    last_val_loss: float | None = None
    sparsity: dict | None = None  # the sparsifier's state (masks, its step count for dynamic algorithms)
    # (loss sum, target count) of the steps since the last training log, summed over ranks: a resume between two
    # logs then logs the same mean loss as the uninterrupted run.
    window: tuple = (0.0, 0)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _loss_sum(model, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def evaluate(accelerator, model, batches) -> float:
    """Mean loss per target token over `batches`, summed over every rank."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for idx, targets in batches:
        idx, targets = idx.to(accelerator.device), targets.to(accelerator.device)
        with accelerator.autocast():
            total[0] += _loss_sum(model, idx, targets).double()
        total[1] += (targets != -100).sum()
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


class PhaseHook:
    """Work that rides along a phase without being the training step: override any of these (each runs on every
    rank; the default does nothing). The loop's own steps run around them in a fixed order, so a hook sees a state
    that is already logged and validated, and not yet checkpointed:

        at_start          a fresh phase (step 0), after the validation before any training
        after_validation  every validation loss (step 0, every eval_every steps, the end of the phase)
        after_step        every optimizer step (not a skipped non-finite one), after its log line and validation,
                          before its checkpoint and before a requested stop
    """

    def at_start(self, run: "PhaseRun") -> None:
        pass

    def after_validation(self, run: "PhaseRun", loss: float) -> None:
        pass

    def after_step(self, run: "PhaseRun") -> None:
        pass


@dataclass
class PhaseInputs:
    """What a phase trains on.

    `source` gives this rank's micro-batches (`next_step(accum, micro)`, `val_batches(n)`, state_dict /
    load_state_dict, `tokens_by_source()`: for a mixture the tokens all ranks drew from each source, logged as
    "tokens_by_source"). `flops.per_token()` is (dense-equivalent, actually needed) training FLOPs per token of the
    next step (spdf.flops.TrainingFlops: it follows masks that a dynamic sparsity algorithm changes). An attached
    sparsifier does its work in the optimizer's step hooks: masks re-zeroed, and for a dynamic algorithm updated,
    after each real optimizer step (not after a step skipped by AMP, not mid-accumulation)."""

    model: torch.nn.Module
    sparsifier: object | None
    source: object
    flops: object


@dataclass
class PhaseRecords:
    """Where a phase leaves its traces: checkpoints under phase_dir/checkpoints (their meta.json gets `meta_extra`),
    records in the run's metrics log; a resume drops the records of `later_phases` (they will be written again)."""

    phase_dir: Path
    metrics: MetricsLog
    later_phases: Sequence[str] = ()
    meta_extra: dict | None = None


class PhaseRun:
    """Train one phase; resumes from the newest checkpoint in phase_dir/checkpoints if any.

        model, val_loss = PhaseRun(accelerator, plan, state, inputs, records, hooks=[...], stop=stop).run()

    Each step of the phase is a named method (validate, checkpoint, log, the stop decisions) and everything else is
    a PhaseHook (a fine-tuning phase's downstream evaluation is one: spdf.train.downstream.DownstreamEval).
    `stop` (spdf.train.preemption.StopRequest), if given and signalled, ends the phase after the current step with a
    checkpoint and raises Preempted. A step with a non-finite loss or gradient norm is skipped (NonFiniteGuard); state
    that is non-finite anyway is never checkpointed (check_state_finite: exit 3).
    """

    def __init__(self, accelerator, plan: PhasePlan, state: TrainState, inputs: PhaseInputs, records: PhaseRecords,
                 hooks: Sequence[PhaseHook] = (), stop=None):
        self.accelerator, self.plan, self.state, self.stop = accelerator, plan, state, stop
        self.model, self.sparsifier = inputs.model, inputs.sparsifier
        self.source, self.flops = inputs.source, inputs.flops
        self.records, self.metrics, self.hooks = records, records.metrics, tuple(hooks)
        self.ckpt_root = PhaseLayout(records.phase_dir).checkpoints
        self.saved_step: int | None = None  # the step of the newest checkpoint on disk
        self.stopping = False  # a stop was requested (on any rank) during the current step

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def run(self) -> tuple[torch.nn.Module, float | None]:
        """(the trained model, unwrapped; the final validation loss)."""
        self._prepare()
        self._resume()
        finished_before_resume = self.state.step >= self.plan.total_steps
        self._open_progress()
        if self.state.step == 0:
            self.validate()  # the loss before any training, to compare with the end of the phase
            for hook in self.hooks:
                hook.at_start(self)
        self._open_window()
        self.model.train()
        while self.state.step < self.plan.total_steps:
            if self._train_step():
                self._after_step()
        self.bar.close()
        if finished_before_resume:  # killed after its final checkpoint: nothing left to do
            return self.unwrapped_model, self.state.last_val_loss
        val_loss = self.validate()
        self.checkpoint()
        return self.unwrapped_model, val_loss

    # ------------------------------------------------------------------------------------------------- start
    def _prepare(self) -> None:
        plan, accelerator = self.plan, self.accelerator
        optimizer = build_adamw(self.model, plan.lr, plan.betas, plan.eps, plan.weight_decay)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        if self.sparsifier is not None:
            self.sparsifier.attach(self.optimizer)
        # × µP/SµPar LR scales
        self.learning_rates = LearningRates(self.optimizer, self.unwrapped_model, self.sparsifier)
        self.meta = {"phase": plan.name, "kind": plan.kind, **layout_meta(self.unwrapped_model),
                     "sparsity": self.sparsifier.config if self.sparsifier is not None else None,
                     **(self.records.meta_extra or {})}

    def _resume(self) -> None:
        plan, state = self.plan, self.state
        state.load_state_dict(TrainState(phase=plan.name).state_dict())
        if self.accelerator.is_main_process:
            remove_interrupted_writes(self.ckpt_root)
        resumed = resume_checkpoint(self.accelerator, self.ckpt_root, layout_meta(self.unwrapped_model), self._warn)
        if resumed is not None and state.step > plan.total_steps:
            # it would "finish" at once with more steps than recipe.yaml and done.json would then say were trained
            raise CheckpointError(f"phases.{plan.name}.steps: the phase's newest checkpoint {resumed} is at step "
                                  f"{state.step}, past the {plan.total_steps} steps the recipe now asks for (steps, "
                                  f"tokens or epochs); ask for at least {state.step} steps, or choose another run_dir")
        if resumed is not None:
            self.source.load_state_dict(state.data)
            if self.sparsifier is not None and state.sparsity is not None:
                self.sparsifier.load_state_dict(state.sparsity)
            self.accelerator.print(f"[{plan.name}] resumed from {resumed} (step {state.step}/{plan.total_steps})")
        # Records a killed run wrote after its last checkpoint (all of them, if it had none) are written again.
        self.metrics.rewind(plan.name, state.step if resumed is not None else -1, self.records.later_phases)
        self.guard = NonFiniteGuard(plan.name, plan.max_nonfinite_steps)
        self.saved_step = state.step if resumed is not None else None

    def _open_progress(self) -> None:
        plan = self.plan
        # On a terminal a redrawn bar; otherwise (a log file) one plain line per logging interval.
        terminal = sys.stderr.isatty()
        shown = plan.progress and self.accelerator.is_main_process and terminal
        self.bar = tqdm(total=plan.total_steps, initial=self.state.step, desc=plan.name, unit="step",
                        dynamic_ncols=True, disable=not shown)
        self.log_lines = plan.progress and not terminal

    def _open_window(self) -> None:
        """The (loss sum, target count) of the steps since the last training log, and their tokens and start time."""
        device = self.accelerator.device
        self.window_loss = torch.zeros(2, device=device, dtype=torch.float64)
        if self.accelerator.is_main_process:  # the saved window is a sum over ranks: one rank carries it
            self.window_loss += torch.tensor(self.state.window, dtype=torch.float64, device=device)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    # -------------------------------------------------------------------------------------------- one step
    def _train_step(self) -> bool:
        """One optimizer step over the accumulated micro-batches; False if it was skipped (non-finite)."""
        accelerator, plan, state, model = self.accelerator, self.plan, self.state, self.model
        step_start = time.perf_counter()
        self.learning_rates.set(plan.lr * lr_factor(state.step, plan.total_steps, plan.warmup_steps, plan.decay,
                                                    plan.min_lr_ratio))
        dense_per_token, spent_per_token = self.flops.per_token()  # before the step: a mask update follows it
        micro = self.source.next_step(plan.accum_steps, plan.micro_batch_size)
        n_targets = sum(int((t != -100).sum()) for _, t in micro)
        step_tokens = sum(idx.numel() for idx, _ in micro)
        step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        for i, (idx, targets) in enumerate(micro):
            idx, targets = idx.to(accelerator.device), targets.to(accelerator.device)
            sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss_sum = _loss_sum(model, idx, targets)
                accelerator.backward(loss_sum / max(n_targets, 1))
            step_loss += loss_sum.detach().double()
        # The norm is needed for the guard even without clipping (an infinite max_norm clips nothing).
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), plan.grad_clip or float("inf"))
        # Under fp16 loss scaling an overflowing gradient is routine: the scaler skips that step in optimizer.step()
        # and lowers its scale, so only a non-finite loss counts then.
        scaler = getattr(accelerator, "scaler", None)
        bad = not bool(torch.isfinite(step_loss)) or (scaler is None and not bool(torch.isfinite(grad_norm)))
        bad, self.stopping = self._agreed(bad, self.stop is not None and self.stop.requested)
        if self.guard.skip(bad, state.step + 1, self.saved_step):
            # no optimizer.step(): the sparsifier's step hooks do not run either, so the masks stay as they are
            self.optimizer.zero_grad(set_to_none=True)
            if scaler is not None:  # close the scaler's step (clip unscaled the grads) and lower its scale
                scaler.update()
            if self.stopping:
                self._stop()
            return False
        self.window_loss[0] += step_loss
        self.window_loss[1] += n_targets
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        global_tokens = step_tokens * accelerator.num_processes
        state.step += 1
        state.tokens += global_tokens
        state.flops_dense += dense_per_token * global_tokens
        state.flops_spent += spent_per_token * global_tokens
        state.elapsed += time.perf_counter() - step_start
        self.window_tokens += global_tokens
        self.grad_norm = grad_norm
        self.bar.update(1)
        return True

    def _agreed(self, bad: bool, stop_requested: bool) -> tuple[bool, bool]:
        """[this step is non-finite, a stop was requested] on any rank: one all-reduce gives every rank the same
        decisions."""
        flags = torch.tensor([float(bad), float(stop_requested)], device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, reduction="sum") if self.accelerator.num_processes > 1 else flags
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _after_step(self) -> None:
        """The loop's own steps and the hooks, in their fixed order, after an optimizer step."""
        plan, step = self.plan, self.state.step
        within = step < plan.total_steps  # the phase's end validates and checkpoints once, after the loop
        if step % plan.log_every == 0 or step == plan.total_steps:
            self.log()
        if step % plan.eval_every == 0 and within:
            self.validate()
        for hook in self.hooks:
            hook.after_step(self)
        if step % plan.checkpoint_every == 0 and within:
            self.checkpoint()
        if self.stopping and within:
            self.bar.close()
            self._stop()

    # ------------------------------------------------------------------------------------- the named steps
    def validate(self) -> float:
        """The validation loss, recorded in the state and the metrics log; the hooks see it."""
        plan, state = self.plan, self.state
        batches = self.source.val_batches(plan.eval_batches, plan.micro_batch_size)
        loss = evaluate(self.accelerator, self.model, batches)
        state.last_val_loss = loss
        if not math.isfinite(loss):
            self._warn(f"[{plan.name}] validation loss at step {state.step} is {loss} (recorded as null)")
        self.metrics.write({"phase": plan.name, "step": state.step, "tokens": state.tokens, "val_loss": loss,
                            "val_ppl": math.exp(min(loss, 50.0))})
        for hook in self.hooks:
            hook.after_validation(self, loss)
        return loss

    def checkpoint(self) -> None:
        """Save everything a resumed run needs at the current step (never non-finite state: exit 3 instead)."""
        accelerator, state = self.accelerator, self.state
        # never a checkpoint (nor, after the phase's last one, an export or done.json) of non-finite state
        check_state_finite(accelerator, self.model, self.optimizer, self.plan.name, state.step, self.saved_step)
        state.data = self.source.state_dict()
        state.sparsity = self.sparsifier.state_dict() if self.sparsifier is not None else None
        totals = accelerator.reduce(self.window_loss.clone(), reduction="sum")
        state.window = (totals[0].item(), int(totals[1].item()))
        save_checkpoint(accelerator, self.ckpt_root, state.step, {**self.meta, "step": state.step},
                        self.plan.keep_checkpoints)
        self.saved_step = state.step

    def log(self) -> None:
        """The training record of the steps since the last one (mean loss, LR, throughput, FLOPs) and its line."""
        accelerator, plan, state = self.accelerator, self.plan, self.state
        totals = accelerator.reduce(self.window_loss.clone(), reduction="sum")
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        tok_s = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"phase": plan.name, "step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr,
                  "tokens_per_s": tok_s, "flops_dense": state.flops_dense, "flops_spent": state.flops_spent}
        if plan.grad_clip:
            record["grad_norm"] = float(self.grad_norm)
        by_source = self.source.tokens_by_source()  # global: every rank follows the mixture's whole order
        if by_source is not None:
            record["tokens_by_source"] = by_source
        self.metrics.write(record)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if self.log_lines and accelerator.is_main_process:
            print(f"[{plan.name}] step {state.step}/{plan.total_steps} loss {loss:.4f} lr {lr:.3e} "
                  f"{tok_s:,.0f} tok/s{_shares(record.get('tokens_by_source'))}", file=sys.stderr, flush=True)
        self.window_loss.zero_()
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def _stop(self) -> None:
        """End the phase on a stop request: checkpoint the current step (unless just done) and raise Preempted."""
        if self.saved_step != self.state.step:
            self.checkpoint()
        signum = self.stop.signum if self.stop.signum is not None else signal.SIGTERM  # another rank was signalled
        raise Preempted(signum, f"{signal.Signals(signum).name}: stopped at step {self.state.step} of phase "
                                f"'{self.plan.name}' with a checkpoint; run the same command again to resume")

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"spdf: warning: {message}", file=sys.stderr, flush=True)


def _shares(tokens_by_source: dict | None) -> str:
    """' | tokens code 70.0% text 30.0%' for a mixture's progress line, '' otherwise."""
    if not tokens_by_source:
        return ""
    total = max(sum(tokens_by_source.values()), 1)
    return " | tokens " + " ".join(f"{name} {100 * n / total:.1f}%" for name, n in tokens_by_source.items())
