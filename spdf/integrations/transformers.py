"""Hugging Face Trainer support: a callback that keeps a sparsified model's zeros and masks through training,
checkpoints and resume.

    sp = spdf.sparsify(model, sparsity=0.75)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    add_sparsity(trainer, sp)              # = trainer.add_callback(SparsityCallback(sp))
    trainer.train()                         # or trainer.train(resume_from_checkpoint=True)
    spdf.save_pretrained(model, "out", sparsifier=sp)

The Trainer builds its optimizer lazily, just before `on_train_begin`: the callback attaches the sparsifier there, so
every real optimizer step re-zeroes masked weights and optimizer state and runs the sparsity algorithm (dynamic
methods update their masks from the optimizer's step hooks; nothing else is needed). Checkpoints go through the
model's `save_pretrained`, which the callback binds to `spdf.save_pretrained`: dense weights plus `sparsity.json` and
`masks.safetensors` in every `checkpoint-N`. On resume the Trainer loads those dense weights with strict=False
(a compressed layer would silently keep its old values), so the callback puts the masks, sparse weights and step
count back from the checkpoint before training continues. With `load_best_model_at_end` they come back from the best
checkpoint at the end the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from ..export import CheckpointError
from ..sparsity import TOTAL_ROW, Sparsifier
from .hf_save import bind_save, restore, write_sparsity


class SparsityCallback(TrainerCallback):
    """Attach `sparsifier` to the Trainer's optimizer, log sparsity, save and restore masks with checkpoints.

    resume_from: the checkpoint directory a resumed run starts from, when it is neither
    `args.resume_from_checkpoint` nor `args.output_dir/checkpoint-<global step>`."""

    def __init__(self, sparsifier: Sparsifier, resume_from: str | Path | None = None):
        self.sparsifier = sparsifier
        self.resume_from = resume_from

    def _checkpoint(self, args, state) -> Path:
        # Trainer.train(resume_from_checkpoint=...) does not tell its callbacks where it resumed from: take the
        # checkpoint whose trainer state is the one just loaded, so another run's checkpoint-N is never used.
        for candidate in (self.resume_from, args.resume_from_checkpoint,
                          Path(args.output_dir) / f"checkpoint-{state.global_step}"):
            if not isinstance(candidate, (str, Path)) or not (Path(candidate) / "trainer_state.json").is_file():
                continue
            saved = json.loads((Path(candidate) / "trainer_state.json").read_text(encoding="utf-8"))
            if saved.get("global_step") == state.global_step and saved.get("log_history") == state.log_history:
                return Path(candidate)
        raise CheckpointError(f"resuming at step {state.global_step}, but the checkpoint resumed from is not "
                              f"checkpoint-{state.global_step} in {args.output_dir}: pass "
                              f"SparsityCallback(..., resume_from=CHECKPOINT) so the masks are restored from it")

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        sp = self.sparsifier
        if model is not None and model is not sp.model:
            raise ValueError("the Trainer's model is not the model this sparsifier sparsified")
        sp.detach()
        if state.global_step > 0:  # resumed: weights came back densely, with strict=False
            restore(sp.model, sp, self._checkpoint(args, state))
            trained = {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else None
            if trained is not None and any(id(p) not in trained for layer in sp.layers.values()
                                           for p in layer.weight_parameters()):
                raise CheckpointError("the checkpoint's masks differ from the model's and this backend rebuilt its "
                                      "weights, which the Trainer's optimizer does not hold: load the model with "
                                      "spdf.from_pretrained(..., CHECKPOINT) before building the Trainer")
        if optimizer is None:
            raise ValueError("the Trainer gave its callbacks no optimizer at train start (transformers too old?)")
        sp.attach(optimizer)
        bind_save(sp.model, sp)

    def on_save(self, args, state, control, **kwargs):
        # A PreTrainedModel saved itself through the bound spdf.save_pretrained; any other model only had its state
        # dict written by the Trainer, so the masks are written here.
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and not (checkpoint / "sparsity.json").is_file() and args.should_save:
            write_sparsity(self.sparsifier.model, checkpoint, self.sparsifier)

    def on_log(self, args, state, control, logs=None, **kwargs):
        total = next(row for row in self.sparsifier.stats() if row["name"] == TOTAL_ROW)
        entry = {"sparsity": total["actual"], "sparsity_target": total["target"],
                 "sparsity_mask_updates": self.sparsifier.mask_version}
        if logs is not None:
            logs.update(entry)  # for callbacks after this one (reporters added later)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entry)

    def on_train_end(self, args, state, control, **kwargs):
        self.sparsifier.detach()
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        if args.load_best_model_at_end and best is not None and any(best.glob("model*.safetensors")):
            # The Trainer has just loaded the best checkpoint's dense weights with strict=False: a masked layer took
            # them (not its mask, which a dynamic algorithm may have moved since), a compressed layer took nothing.
            # Masks, sparse weights and step come back from the checkpoint, so the model is the best one throughout.
            restore(self.sparsifier.model, self.sparsifier, best)


def add_sparsity(trainer, sparsifier: Sparsifier, resume_from: str | Path | None = None) -> SparsityCallback:
    """The one call: add a SparsityCallback for `sparsifier` to `trainer` and return it."""
    callback = SparsityCallback(sparsifier, resume_from)
    trainer.add_callback(callback)
    return callback
