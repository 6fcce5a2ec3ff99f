"""Tiny end-to-end runs of the demo recipe, shared by the tests in tests/train.

The recipe is recipes/demo.yaml shrunk with the same `--set` overrides a user would type: a 2-layer, width-32 GPT,
a 300-token BPE trained on 200 KB of the standard library, 8 sparse pre-training steps and 4 dense fine-tuning
steps of 4 x 32 tokens, validation and checkpoints every few steps. Full runs are expensive (~10 s), so the
finished reference run is made once per session and tests that change a run work on a copy of it.
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spdf.cli import main
from spdf.layout import LOCK_FILE
from spdf.recipe import apply_overrides, dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo.yaml"

PRETRAIN_STEPS, FINETUNE_STEPS = 8, 4

# What a user would pass on the command line to make the demo tiny (the run_dir is added per run).
TINY_SETS = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_ctx=64",
    "tokenizer.vocab_size=300",
    "logging.progress=false", "logging.every_steps=1",
    "phases.pretrain.data.max_bytes=200000", "phases.pretrain.data.val_fraction=0.2",
    "phases.pretrain.seq_len=32", "phases.pretrain.batch_size=4", f"phases.pretrain.steps={PRETRAIN_STEPS}",
    "phases.pretrain.schedule.warmup_steps=2",
    "phases.pretrain.eval.every_steps=3", "phases.pretrain.eval.batches=2",
    "phases.pretrain.checkpoint.every_steps=2", "phases.pretrain.checkpoint.keep=2",
    "phases.finetune.task.max_examples=400",
    "phases.finetune.seq_len=32", "phases.finetune.batch_size=4", f"phases.finetune.steps={FINETUNE_STEPS}",
    "phases.finetune.schedule.warmup_steps=1",
    "phases.finetune.eval.every_steps=2", "phases.finetune.eval.batches=2",
    "phases.finetune.checkpoint.every_steps=2", "phases.finetune.checkpoint.keep=2",
]


def set_args(*sets: str) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def write_recipe(path: Path, run_dir: Path, *extra_sets: str, base: Path = DEMO, tiny_sets=TINY_SETS) -> Path:
    """The tiny demo (or another recipe `base` made tiny by `tiny_sets`) as a YAML file of its own (run_dir
    included), so a command line is just `spdf run FILE`."""
    data = apply_overrides(yaml.safe_load(base.read_text()), [*tiny_sets, f"run_dir={run_dir}", *extra_sets])
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def loss_trace(run_dir: Path, phase: str | None = None) -> list[tuple]:
    """(phase, step, kind, value) of every train loss and validation loss, in file order."""
    out = []
    for r in read_metrics(run_dir):
        if phase is not None and r["phase"] != phase:
            continue
        if "val_loss" in r:
            out.append((r["phase"], r["step"], "val", r["val_loss"]))
        if "loss" in r:
            out.append((r["phase"], r["step"], "train", r["loss"]))
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root: "nothing on disk changed" is equality of two digests.
    The run lock file is left out: each run writes its own pid there (it is not run data)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """spdf.cli.main in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env(cache_dir: Path) -> dict:
    env = dict(os.environ, SPDF_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def spdf_subprocess(args: list[str], cache_dir: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spdf", *map(str, args)], cwd=cwd, env=subprocess_env(cache_dir),
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(rc: int, err: str, *fragments: str) -> str:
    """Exit 2, exactly one stderr line `spdf: error: …` naming every fragment, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("spdf: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]



def wait_for(condition, proc, timeout: float, what: str):
    """Poll `condition` until it holds; fail if the subprocess `proc` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def copy_run(src: Path, dst: Path, recipe_file: Path, *extra_sets: str, **recipe) -> tuple[Path, Path]:
    """Copy a run directory to dst and write a recipe file for it (`recipe`: write_recipe's base and tiny_sets);
    the copy's recipe.yaml is rewritten as spdf itself would write it for dst, so a later command that only
    re-claims the directory changes no byte."""
    shutil.copytree(src, dst)
    write_recipe(recipe_file, dst, *extra_sets, **recipe)
    dump_recipe(load_recipe(recipe_file), dst / "recipe.yaml")
    return dst, recipe_file


def truncate_to_kill(run_dir: Path, phase: str, last_step: int, keep_checkpoints_upto: int | None) -> None:
    """Make a finished run directory look like a run killed during `phase` right after it logged `last_step`.

    Records after that point are removed (a half-written line is left at the end, as a kill mid-write leaves),
    the phase's checkpoints after `keep_checkpoints_upto` (all of them if None), its export and done.json, and
    every later phase's directory.
    """
    names = [r["phase"] for r in read_metrics(run_dir)]
    order = list(dict.fromkeys(names))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = []
    for line in lines:
        r = json.loads(line)
        if order.index(r["phase"]) < order.index(phase) or (r["phase"] == phase and r["step"] <= last_step):
            kept.append(line)
    nxt = next((json.loads(line) for line in lines[len(kept):]), None)
    partial = json.dumps(nxt, sort_keys=True)[:25] if nxt else ""
    (run_dir / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept) + partial)
    phase_dir = run_dir / "phases" / phase
    for later in order[order.index(phase) + 1:]:
        shutil.rmtree(run_dir / "phases" / later, ignore_errors=True)
    (phase_dir / "done.json").unlink()
    shutil.rmtree(phase_dir / "export")
    for ckpt in (phase_dir / "checkpoints").glob("step-*"):
        if keep_checkpoints_upto is None or int(ckpt.name.split("-")[1]) > keep_checkpoints_upto:
            shutil.rmtree(ckpt)


# ---- session-wide work, memoized here so every test module of the session shares one copy ----------
_SESSION: dict = {}


def session_cache_dir(tmp_path_factory) -> Path:
    """One packed-data cache for the session (SPDF_CACHE_DIR), so only the first run tokenizes the corpus."""
    if "cache" not in _SESSION:
        _SESSION["cache"] = tmp_path_factory.mktemp("spdf-cache")
    return _SESSION["cache"]


def session_finished_run(tmp_path_factory) -> dict:
    """`spdf run` of the tiny demo (the --set form, in process) to the end. Read-only: copy it to change it."""
    if "finished" not in _SESSION:
        cache = session_cache_dir(tmp_path_factory)
        root = tmp_path_factory.mktemp("finished")
        run_dir = root / "run"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPDF_CACHE_DIR", str(cache))
            rc = main(["run", str(DEMO), *set_args(*TINY_SETS, f"run_dir={run_dir}")])
        assert rc == 0
        recipe = write_recipe(root / "tiny.yaml", run_dir)  # the same recipe as a file, for later commands
        _SESSION["finished"] = {"run_dir": run_dir, "recipe": recipe, "digest": tree_digest(run_dir)}
    return _SESSION["finished"]
