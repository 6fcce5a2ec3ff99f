"""Where everything spdf writes lives: every file and directory name of a run, a phase, a checkpoint and an export,
named once here. The modules that write and read them (spdf.export, spdf.train, spdf inspect/evaluate/export) ask
this module; none spells a file name itself.

    <run_dir>/                      RunLayout
        recipe.yaml                 the resolved recipe, written once a start passed every check (spdf.train.run_dir)
        fingerprint.json            its fingerprint: another recipe's start in this directory is refused
        tokenizer.json              trained offline on the corpus, or a copy of the file/hub tokenizer
        tokenizer_spec.json         how tokenizer.json was made, and its sha256 (checked whenever a run loads it)
        metrics.jsonl               every logged step and validation, all phases
        .lock                       the run lock (spdf.train.lock)
        phases/<name>/              PhaseLayout
            checkpoints/step-XXXXXXXX/   resumable training state (last K kept; spdf.train.checkpoint): accelerate's
                                         files (model.safetensors, or pytorch_model_fsdp_0/ under FSDP2), spdf.json,
                                         manifest.json
            export/                 model.safetensors, config.json, masks.safetensors, tokenizer.json, manifest.json
                                    (spdf.export)
            done.json               the phase's summary; a finished phase is skipped on resume
        eval/                       `spdf evaluate`'s reports (in whichever run, phase or export it was given)

A directory is filled under a temporary sibling `.tmp-<name>[.<pid>]` and renamed into place when complete.
This module only names paths: it reads nothing but directory listings (and the time each done.json records) and
imports nothing of spdf.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# ---- files of an export (spdf.export) and of a training checkpoint (spdf.train.checkpoint) --------------------------
WEIGHTS_FILE = "model.safetensors"  # an export's dense weights; a checkpoint's model state (accelerate's name too)
CONFIG_FILE = "config.json"  # an export's description: model shape, targets, sparse, ...
MASKS_FILE = "masks.safetensors"  # a sparse export's masks, packed 8 per byte
TOKENIZER_FILE = "tokenizer.json"  # an export's tokenizer, and a run's
CHECKPOINT_META = "spdf.json"  # a checkpoint's description: model shape and targets (what `--from` reads)
MANIFEST_FILE = "manifest.json"  # written last into a checkpoint or export: every file's size and CRC-32
SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"  # where accelerate puts an FSDP2 run's sharded model state
RNG_STATE_FILE = "random_states_{}.pkl"  # accelerate's, one per process (its index) in every checkpoint
CHECKPOINT_PREFIX = "step-"
EVAL_DIR = "eval"  # `spdf evaluate`'s reports, by default inside the run, phase or export they are about

# ---- files of a run directory ----------------------------------------------------------------------------------------
RECIPE_FILE = "recipe.yaml"
FINGERPRINT_FILE = "fingerprint.json"
TOKENIZER_RECORD_FILE = "tokenizer_spec.json"  # beside a run's tokenizer.json
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
PHASES_DIR = "phases"  # every run directory has it: what marks a directory as a run's
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
DONE_FILE = "done.json"
INIT_FROM_FILE = "init_from.json"  # a pre-training phase started from `--from`: which weights (checked on resume)
FINISHED_AT = "finished_at"  # done.json's key for when the phase finished (Unix time): the order phases finished in

TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX)


def temporary_dir(final: Path, owner: int | None = None) -> Path:
    """The sibling a directory is written under before it is renamed to `final`: `.tmp-<name>`, with `.<owner>` (a
    process id) where each writing process needs its own."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}" + ("" if owner is None else f".{owner}"))


def is_temporary(path: Path) -> bool:
    """Whether `path` is, or lies in, a directory still being written (see temporary_dir)."""
    return any(part.startswith(TMP_PREFIX) for part in Path(path).parts)


def _finished_at(phase: "PhaseLayout") -> float:
    """When `phase` finished: the time its done.json records, not the file's mtime, which a copy of the run
    directory (cp -r, scp, an unpacked zip) resets in whatever order it copied the phases. A done.json of an older
    spdf records none: its mtime then."""
    try:
        recorded = json.loads(phase.done.read_text(encoding="utf-8")).get(FINISHED_AT)
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded if isinstance(recorded, (int, float)) else phase.done.stat().st_mtime


def _under_root(name: str) -> property:
    """A path named `name` in the layout's root directory."""
    return property(lambda self: self.root / name)


@dataclass(frozen=True)
class _Directory:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))


class PhaseLayout(_Directory):
    """The paths of one phase of a run: `<run_dir>/phases/<name>/`."""
    checkpoints = _under_root(CHECKPOINTS_DIR)
    export = _under_root(EXPORT_DIR)
    done = _under_root(DONE_FILE)
    init_from = _under_root(INIT_FROM_FILE)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def run(self) -> "RunLayout":
        return RunLayout(self.root.parent.parent)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    @property
    def finished(self) -> bool:
        return self.done.is_file()

    @classmethod
    def of_export(cls, export: Path) -> "PhaseLayout | None":
        """The phase whose export `export` is (`<run>/phases/<name>/export`), or None for an export outside a run."""
        export = Path(export)
        if export.name != EXPORT_DIR or export.parent.parent.name != PHASES_DIR:
            return None
        return cls(export.parent)


class RunLayout(_Directory):
    """The paths of one run directory (see the module's docstring)."""
    recipe = _under_root(RECIPE_FILE)
    fingerprint = _under_root(FINGERPRINT_FILE)
    tokenizer = _under_root(TOKENIZER_FILE)
    metrics = _under_root(METRICS_FILE)
    lock = _under_root(LOCK_FILE)
    phases = _under_root(PHASES_DIR)

    def phase(self, name: str) -> PhaseLayout:
        return PhaseLayout(self.phases / name)

    def finished_phases(self) -> list[PhaseLayout]:
        """The phases that have finished, in the order they finished (the time their done.json records)."""
        if not self.phases.is_dir():
            return []
        done = [PhaseLayout(p) for p in self.phases.iterdir() if (p / DONE_FILE).exists()]
        return sorted(done, key=_finished_at)

    @classmethod
    def containing(cls, path: Path) -> "RunLayout | None":
        """The run directory `path` is or lies in (a phase, its export, a checkpoint), resolved; None if none."""
        path = Path(path).resolve()
        for candidate in (path, *path.parents):
            if (candidate / PHASES_DIR).is_dir():
                return cls(candidate)
        return None

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> "RunLayout | None":
        """The run a checkpoint directory `<run>/phases/<phase>/checkpoints/step-X` belongs to (None if the path is
        too short to be one)."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parents[3]) if len(checkpoint.parents) > 3 else None
