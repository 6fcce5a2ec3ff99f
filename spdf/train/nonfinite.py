"""Non-finite training state: the per-step guard, and the check that nothing non-finite is ever saved.

The guard: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer update, so masks, weights,
optimizer state and the LR schedule stay as they were), and too many in a row stop the run. The decision uses flags
already reduced over ranks, so every rank skips (or stops) at the same step.

A finite loss and gradient norm do not make a finite update: an absurd learning rate turns finite gradients into
infinite weights, and a huge gradient can overflow AdamW's second moment. So the state itself is checked before
every checkpoint (and so before the export and done.json, which follow the phase's last checkpoint) and after every
load: one fused 2-norm per tensor (`torch._foreach_norm`: a NaN or inf anywhere makes it non-finite) and one device
sync; benchmarks/results/integrity_cost.md measures it against the checkpoint write it guards.
Stopping raises NonFiniteTraining (exit 3) before anything is written from the bad state.
"""
from __future__ import annotations

import sys

import torch


class NonFiniteTraining(RuntimeError):
    """Training diverged: non-finite loss or gradient norm too many steps in a row, or non-finite weights or
    optimizer state after an update (exit code 3)."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard


def state_tensors(model, optimizer=None) -> list[torch.Tensor]:
    """The floating-point tensors of `model`'s parameters and `optimizer`'s state (this rank's shards)."""
    tensors = [_local(p.detach()) for p in model.parameters()]
    if optimizer is not None:
        tensors += [_local(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return [t for t in tensors if t.is_floating_point()]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True if no tensor holds a NaN or an infinity.

    A NaN or inf anywhere makes a tensor's 2-norm non-finite, and the fused 2-norm is the cheapest pass there is
    (the kernel clip_grad_norm_ uses; max-abs is ~15x slower on CPU). A finite tensor whose 2-norm overflows (values
    near the dtype's limit) is told apart by an exact element check of that tensor only: never a false alarm."""
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for ts in by_device.values():
        norms = torch.stack([n.float() for n in torch._foreach_norm(ts, 2)])
        suspects = (~torch.isfinite(norms)).nonzero().flatten().tolist()  # one device sync
        if any(not bool(torch.isfinite(ts[i]).all()) for i in suspects):
            return False
    return True


def resume_hint(phase: str, saved_step: int | None) -> str:
    """What is on disk to go back to, said truthfully."""
    where = (f"the newest checkpoint of phase '{phase}' is step {saved_step}" if saved_step is not None
             else f"no checkpoint of phase '{phase}' was written, so it starts the phase over")
    return f"{where}; lower the learning rate and run again"


class NonFiniteGuard:
    def __init__(self, phase: str, limit: int):
        self.phase, self.limit, self.in_a_row = phase, limit, 0

    def skip(self, bad: bool, step: int, saved_step: int | None = None) -> bool:
        """Record the outcome of the step that would become `step`; True if it must be skipped. `saved_step`: the
        step of the newest checkpoint on disk (None: none), for the message if the run stops."""
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        print(f"spdf: [{self.phase}] step {step}: non-finite loss or gradient norm; step skipped "
              f"({self.in_a_row} of at most {self.limit} in a row)", file=sys.stderr, flush=True)
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"[{self.phase}] training diverged: {self.limit} steps in a row had a non-finite loss or gradient "
                f"norm at step {step}; nothing was saved from that state: {resume_hint(self.phase, saved_step)} "
                f"(or raise phases.{self.phase}.optimizer.max_nonfinite_steps)")
        return True


def check_state_finite(accelerator, model, optimizer, phase: str, step: int, saved_step: int | None) -> None:
    """Raise NonFiniteTraining if any rank's weights or optimizer state hold NaN/inf (a collective: every rank
    calls it, and every rank raises)."""
    bad = torch.tensor([0.0 if all_finite(state_tensors(model, optimizer)) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bool(bad[0] > 0):
        raise NonFiniteTraining(
            f"[{phase}] the weights or optimizer state after step {step} hold NaN or inf values although that "
            f"step's loss and gradient norm were finite (the update diverged: learning rate too high?); nothing was "
            f"saved from that state: {resume_hint(phase, saved_step)}")
