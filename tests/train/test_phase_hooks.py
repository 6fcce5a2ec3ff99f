"""The phase run's hook seam: a PhaseHook sees every optimizer step and every validation, at the documented points
of the loop (after a step's log and validation, before its checkpoint), and a resumed phase shows it only the
steps it runs. A tiny GPT on a packed split, one process on the CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spdf.data import PackedDataset
from spdf.flops import TrainingFlops
from spdf.model import GPT, GPTConfig
from spdf.train.batches import BatchSource
from spdf.train.loop import PhaseHook, PhaseInputs, PhasePlan, PhaseRecords, PhaseRun, TrainState
from spdf.train.metrics import MetricsLog

SEQ, STEPS = 16, 5


class Recorder(PhaseHook):
    """Writes down what it is shown, and whether the step's checkpoint was on disk when it was."""

    def __init__(self):
        self.events = []

    def at_start(self, run):
        self.events.append(("start", run.state.step))

    def after_validation(self, run, loss):
        self.events.append(("validation", run.state.step, loss))

    def after_step(self, run):
        saved = (run.ckpt_root / f"step-{run.state.step:08d}").exists()
        self.events.append(("step", run.state.step, saved))


def _plan(**overrides) -> PhasePlan:
    settings = dict(name="pretrain", kind="pretrain", total_steps=STEPS, micro_batch_size=2, accum_steps=1, lr=1e-3,
                    betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0, warmup_steps=1, decay="cosine",
                    min_lr_ratio=0.1, eval_every=2, eval_batches=1, checkpoint_every=3, keep_checkpoints=5,
                    log_every=1, progress=False)
    return PhasePlan(**{**settings, **overrides})


def _run_phase(tmp_path, hooks, plan: PhasePlan | None = None):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rows = np.arange(40 * SEQ + 1) % 128
    for split, n in (("train", 40 * SEQ + 1), ("val", 4 * SEQ + 1)):
        rows[:n].astype(np.uint16).tofile(tmp_path / f"{split}.bin")
    train, val = PackedDataset(tmp_path / "train.bin", SEQ), PackedDataset(tmp_path / "val.bin", SEQ)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny-test"))
    source = BatchSource(train, val, seed=0, rank=0, world_size=1, vocab_size=128)
    metrics = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    state = TrainState()
    accelerator.register_for_checkpointing(state)  # as the runner does: the counters travel with the checkpoint
    run = PhaseRun(accelerator, plan or _plan(), state, PhaseInputs(model, None, source, TrainingFlops(model, SEQ)),
                   PhaseRecords(tmp_path / "run" / "phases" / "pretrain", metrics), hooks=hooks)
    run.run()
    return [json.loads(line) for line in metrics.path.read_text().splitlines()]


def test_a_hook_sees_every_step_and_every_validation_before_the_checkpoint(tmp_path):
    hook = Recorder()
    records = _run_phase(tmp_path, [hook])
    shown = [event[:2] for event in hook.events]
    assert shown == [("validation", 0), ("start", 0), ("step", 1), ("validation", 2), ("step", 2), ("step", 3),
                     ("validation", 4), ("step", 4), ("step", 5), ("validation", 5)]
    # after_step runs before the step's checkpoint (step 3): a hook's work is in the checkpoint that follows it
    assert [saved for kind, step, *rest in hook.events if kind == "step" for saved in rest] == [False] * STEPS
    assert (tmp_path / "run/phases/pretrain/checkpoints/step-00000003").is_dir()
    # the loss a hook sees is the one the metrics log records
    logged = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert logged == [(step, loss) for kind, step, *loss in hook.events if kind == "validation" for loss in loss]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))


def test_a_resumed_phase_shows_its_hooks_only_the_steps_it_runs(tmp_path):
    first = Recorder()
    with pytest.raises(RuntimeError, match="killed"):
        _run_phase(tmp_path, [first, _KillAfter(4)])
    again = Recorder()
    records = _run_phase(tmp_path, [again])  # resumes from step 3's checkpoint
    assert [event[:2] for event in again.events] == [("validation", 4), ("step", 4), ("step", 5), ("validation", 5)]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # step 4's record rewritten once


class _KillAfter(PhaseHook):
    def __init__(self, step: int):
        self.step = step

    def after_step(self, run):
        if run.state.step == self.step:
            raise RuntimeError("killed")
