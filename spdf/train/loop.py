"""The one training loop, shared by pre-training and fine-tuning.

A phase is: AdamW (decay/no-decay groups), a step-indexed LR schedule, gradient accumulation, grad-norm clipping,
mixed precision through accelerate, periodic validation, checkpoints, metrics and a progress bar. Everything a
resumed run needs is in the checkpoint, and the LR is a pure function of the step, so a run killed at any point
and resumed from its last checkpoint replays exactly the losses of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..export import layout_meta
from ..layout import PhaseLayout
from .checkpoint import resume_checkpoint, save_checkpoint
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
    downstream_before: bool = False  # score generations on the task before the first step (eval.generate.before)
    downstream_every: int | None = None  # ... and every N steps on a sample (eval.generate.every_steps)


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


def run_phase(accelerator, model, sparsifier, source, plan: PhasePlan, state: TrainState, phase_dir: Path,
              metrics: MetricsLog, flops, later_phases=(), meta_extra=None, downstream=None, stop=None):
    """Train `model` for one phase; resumes from the newest checkpoint in phase_dir/checkpoints if any.

    `source` gives this rank's micro-batches (`next_step(accum, micro)`, `val_batches(n)`, state_dict / load_state_dict,
    `tokens_by_source()`: for a mixture the tokens all ranks drew from each source, logged as "tokens_by_source").
    `flops.per_token()` is (dense-equivalent, actually needed) training FLOPs per token of the next step
    (spdf.flops.TrainingFlops: it follows masks that a dynamic sparsity algorithm changes).
    An attached sparsifier does its work in the optimizer's step hooks: masks re-zeroed, and for a dynamic
    algorithm updated, after each real optimizer step (not after a step skipped by AMP, not mid-accumulation).
    `downstream(model, scope, step, tokens)`, if given, scores generations (spdf.train.downstream.DownstreamEval).
    `stop` (spdf.train.preemption.StopRequest), if given and signalled, ends the phase after the current step with a
    checkpoint and raises Preempted. A step with a non-finite loss or gradient norm is skipped (NonFiniteGuard); state
    that is non-finite anyway is never checkpointed (check_state_finite: exit 3).
    """
    optimizer = build_adamw(model, plan.lr, plan.betas, plan.eps, plan.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if sparsifier is not None:
        sparsifier.attach(optimizer)
    learning_rates = LearningRates(optimizer, accelerator.unwrap_model(model), sparsifier)  # × µP/SµPar LR scales
    ckpt_root = PhaseLayout(phase_dir).checkpoints
    meta = {"phase": plan.name, "kind": plan.kind, **layout_meta(accelerator.unwrap_model(model)),
            "sparsity": sparsifier.config if sparsifier is not None else None, **(meta_extra or {})}
    state.load_state_dict(TrainState(phase=plan.name).state_dict())
    def warn(message: str) -> None:
        if accelerator.is_main_process:
            print(f"spdf: warning: {message}", file=sys.stderr, flush=True)

    resumed = resume_checkpoint(accelerator, ckpt_root, layout_meta(accelerator.unwrap_model(model)), warn)
    if resumed is not None:
        source.load_state_dict(state.data)
        if sparsifier is not None and state.sparsity is not None:
            sparsifier.load_state_dict(state.sparsity)
        accelerator.print(f"[{plan.name}] resumed from {resumed} (step {state.step}/{plan.total_steps})")
    # Records a killed run wrote after its last checkpoint (all of them, if it had none) are written again.
    metrics.rewind(plan.name, state.step if resumed is not None else -1, later_phases)
    guard = NonFiniteGuard(plan.name, plan.max_nonfinite_steps)
    saved_at = {"step": state.step if resumed is not None else None}  # the step of the newest checkpoint on disk
    def checkpoint() -> None:
        # never a checkpoint (nor, after the phase's last one, an export or done.json) of non-finite state
        check_state_finite(accelerator, model, optimizer, plan.name, state.step, saved_at["step"])
        state.data = source.state_dict()
        state.sparsity = sparsifier.state_dict() if sparsifier is not None else None
        totals = accelerator.reduce(window_loss.clone(), reduction="sum")
        state.window = (totals[0].item(), int(totals[1].item()))
        save_checkpoint(accelerator, ckpt_root, state.step, {**meta, "step": state.step}, plan.keep_checkpoints)
        saved_at["step"] = state.step

    def validate() -> float:
        loss = evaluate(accelerator, model, source.val_batches(plan.eval_batches, plan.micro_batch_size))
        state.last_val_loss = loss
        if not math.isfinite(loss):
            warn(f"[{plan.name}] validation loss at step {state.step} is {loss} (recorded as null)")
        metrics.write({"phase": plan.name, "step": state.step, "tokens": state.tokens, "val_loss": loss,
                       "val_ppl": math.exp(min(loss, 50.0))})
        return loss

    finished_before_resume = state.step >= plan.total_steps
    # On a terminal a redrawn bar; otherwise (a log file) one plain line per logging interval.
    terminal = sys.stderr.isatty()
    bar = tqdm(total=plan.total_steps, initial=state.step, desc=plan.name, unit="step", dynamic_ncols=True,
               disable=not (plan.progress and accelerator.is_main_process and terminal))
    log_lines = plan.progress and not terminal
    if state.step == 0:
        validate()  # the loss before any training, to compare with the end of the phase
        if downstream is not None and plan.downstream_before:
            downstream(accelerator.unwrap_model(model), "before", 0, 0)
    window_loss = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    if accelerator.is_main_process:  # the saved window is a sum over ranks: one rank carries it
        window_loss += torch.tensor(state.window, dtype=torch.float64, device=accelerator.device)
    window_tokens, window_start = 0, time.perf_counter()
    model.train()
    while state.step < plan.total_steps:
        step_start = time.perf_counter()
        learning_rates.set(plan.lr * lr_factor(state.step, plan.total_steps, plan.warmup_steps, plan.decay,
                                               plan.min_lr_ratio))
        dense_per_token, spent_per_token = flops.per_token()  # before the step: a mask update follows it
        micro = source.next_step(plan.accum_steps, plan.micro_batch_size)
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
        # [this step is non-finite, a stop was requested]: one all-reduce gives every rank the same decisions
        flags = torch.tensor([float(bad), float(stop is not None and stop.requested)], device=accelerator.device)
        flags = accelerator.reduce(flags, reduction="sum") if accelerator.num_processes > 1 else flags
        bad, stopping = bool(flags[0] > 0), bool(flags[1] > 0)
        if guard.skip(bad, state.step + 1, saved_at["step"]):
            # no optimizer.step(): the sparsifier's step hooks do not run either, so the masks stay as they are
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:  # close the scaler's step (clip unscaled the grads) and lower its scale
                scaler.update()
            if stopping:
                _stop(stop, plan, state, checkpoint, saved=saved_at["step"] == state.step)
            continue
        window_loss[0] += step_loss
        window_loss[1] += n_targets
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_tokens = step_tokens * accelerator.num_processes
        state.step += 1
        state.tokens += global_tokens
        state.flops_dense += dense_per_token * global_tokens
        state.flops_spent += spent_per_token * global_tokens
        state.elapsed += time.perf_counter() - step_start
        window_tokens += global_tokens
        bar.update(1)
        if state.step % plan.log_every == 0 or state.step == plan.total_steps:
            totals = accelerator.reduce(window_loss.clone(), reduction="sum")
            loss = (totals[0] / totals[1].clamp(min=1)).item()
            tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            lr = optimizer.param_groups[0]["lr"]
            record = {"phase": plan.name, "step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr,
                      "tokens_per_s": tok_s, "flops_dense": state.flops_dense, "flops_spent": state.flops_spent}
            if plan.grad_clip:
                record["grad_norm"] = float(grad_norm)
            by_source = source.tokens_by_source()  # global: every rank follows the mixture's whole order
            if by_source is not None:
                record["tokens_by_source"] = by_source
            metrics.write(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if log_lines and accelerator.is_main_process:
                print(f"[{plan.name}] step {state.step}/{plan.total_steps} loss {loss:.4f} lr {lr:.3e} "
                      f"{tok_s:,.0f} tok/s{_shares(record.get('tokens_by_source'))}", file=sys.stderr, flush=True)
            window_loss.zero_()
            window_tokens, window_start = 0, time.perf_counter()
        if state.step % plan.eval_every == 0 and state.step < plan.total_steps:
            validate()
        if (downstream is not None and plan.downstream_every and state.step % plan.downstream_every == 0
                and state.step < plan.total_steps):
            downstream(accelerator.unwrap_model(model), "sample", state.step, state.tokens)
        if state.step % plan.checkpoint_every == 0 and state.step < plan.total_steps:
            checkpoint()
        if stopping and state.step < plan.total_steps:
            bar.close()
            _stop(stop, plan, state, checkpoint, saved=saved_at["step"] == state.step)
    bar.close()
    if finished_before_resume:  # killed after its final checkpoint: nothing left to do
        return accelerator.unwrap_model(model), state.last_val_loss
    val_loss = validate()
    checkpoint()
    return accelerator.unwrap_model(model), val_loss


def _shares(tokens_by_source: dict | None) -> str:
    """' | tokens code 70.0% text 30.0%' for a mixture's progress line, '' otherwise."""
    if not tokens_by_source:
        return ""
    total = max(sum(tokens_by_source.values()), 1)
    return " | tokens " + " ".join(f"{name} {100 * n / total:.1f}%" for name, n in tokens_by_source.items())


def _stop(stop, plan: PhasePlan, state: TrainState, checkpoint, saved: bool) -> None:
    """End the phase on a stop request: checkpoint the current step (unless just done) and raise Preempted."""
    if not saved:
        checkpoint()
    signum = stop.signum if stop.signum is not None else signal.SIGTERM  # another rank was signalled
    raise Preempted(signum, f"{signal.Signals(signum).name}: stopped at step {state.step} of phase '{plan.name}' "
                            f"with a checkpoint; run the same command again to resume")
