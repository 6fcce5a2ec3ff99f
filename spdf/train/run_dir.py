"""A run directory's recipe record, and starts that are refused without leaving anything behind.

A start is checked read-only first (another recipe's directory; a finished phase whose settings changed) and
`recipe.yaml` + `fingerprint.json` are written only once the model is built and every phase's settings checked, so
a refused start never rewrites what an earlier run recorded. A directory this start created itself is removed again
when the start is refused before any phase wrote into it (RefusedStart): fixing the recipe and running again is
then a first start, not "a directory made by a different recipe".
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import yaml

from ..errors import SpdfUserError
from ..fswrite import check_dir_target, read_json, write_json_atomic
from ..layout import CONFIG_FILE, WEIGHTS_FILE, RunLayout
from ..recipe import Recipe, RecipeError, dump_recipe, recipe_fingerprint

# top-level settings that shape every phase's training beyond the fingerprint (model, sparsity, tokenizer, data)
_TRAINING_KEYS = ("seed", "precision")


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory, or say in one line why it cannot be (a file, under a file, not writable)."""
    check_dir_target(run_dir, "run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"run_dir {run_dir} cannot be created: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RecipeError(f"run_dir {run_dir} is not writable; choose another run_dir (--set run_dir=...)")


def check_run_dir(recipe: Recipe) -> None:
    """Refuse (read-only) a directory made by a different recipe, or a recipe that changes a finished phase."""
    run_dir, run = recipe.run_path, RunLayout(recipe.run_path)
    held = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (run_dir / name).exists()]
    if held:  # an export, checkpoint or Hugging Face directory: a run would write its files among the model's
        raise RecipeError(f"run_dir {run_dir} holds a model ({', '.join(held)}), not a run; choose another run_dir "
                          f"(--set run_dir=...)")
    saved = run.recipe
    if not saved.is_file():
        return
    previous = read_json(run.fingerprint, "run directory").get("fingerprint")
    if previous != recipe_fingerprint(recipe):
        raise RecipeError(
            f"run directory {run_dir} was made by a different recipe (model, sparsity, tokenizer or data differ); "
            f"choose another run_dir (--set run_dir=...) or delete it")
    finished = [p.name for p in recipe.phases if run.phase(p.name).finished]
    if finished:
        _check_finished_unchanged(recipe, saved, finished)


def _check_finished_unchanged(recipe: Recipe, saved: Path, finished: list[str]) -> None:
    """A finished phase is skipped, so a change to its settings (more steps, another LR) would train nothing and
    leave a recipe.yaml that no longer describes what was trained: refused, naming the first changed key."""
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
        old_phases = {p["name"]: p for p in old["phases"]}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
        raise RecipeError(f"{saved} is unreadable ({type(e).__name__}); restore it or choose another run_dir") from None
    new = yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))  # the form it would be recorded in
    new_phases = {p["name"]: p for p in new["phases"]}
    pairs = [(key, old.get(key), new.get(key), finished[0]) for key in _TRAINING_KEYS]
    pairs += [(f"phases.{name}", old_phases.get(name), new_phases[name], name) for name in finished]
    for key, was, asked, phase in pairs:
        change = _first_difference(key, was, asked)
        if change is not None:
            where, was_value, new_value = change
            raise RecipeError(
                f"{where}: phase '{phase}' of {recipe.run_path} finished with {was_value!r}, the recipe now asks "
                f"{new_value!r}; a finished phase is not trained again (nor extended): restore the setting, or "
                f"choose another run_dir to train with it")


def _first_difference(key: str, was, asked):
    if isinstance(was, dict) and isinstance(asked, dict):
        for k in sorted(set(was) | set(asked), key=str):
            change = _first_difference(f"{key}.{k}", was.get(k), asked.get(k))
            if change is not None:
                return change
        return None
    return None if was == asked else (key, was, asked)


def record_recipe(recipe: Recipe) -> None:
    """Write the resolved recipe and its fingerprint (after every check of the start has passed). recipe.yaml last:
    check_run_dir takes its presence to mean the record is complete, so a start killed between the two files is
    a first start again, not a directory refused for its missing fingerprint.json."""
    run = RunLayout(recipe.run_path)
    write_json_atomic(run.fingerprint, {"fingerprint": recipe_fingerprint(recipe)})
    dump_recipe(recipe, run.recipe)


class RefusedStart:
    """`with RefusedStart(run_dir) as start:` … `start.claim(created)` once this process holds the run's lock,
    `start.began()` once a phase may write state: a user error (SpdfUserError, which RecipeError, DataError and
    CheckpointError are, or an OSError: both exit 2) raised in between, in a directory this start created, removes
    the directory again. Only the lock holder removes anything: a second start refused by the lock never does."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.created, self.started = Path(run_dir), False, False

    def claim(self, created: bool) -> None:
        self.created = created

    def began(self) -> None:
        self.started = True

    def __enter__(self) -> "RefusedStart":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if (self.created and not self.started and kind is not None
                and issubclass(kind, (SpdfUserError, OSError)) and self.run_dir.is_dir()):
            with contextlib.suppress(OSError):
                shutil.rmtree(self.run_dir)
        return False
