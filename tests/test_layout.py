"""The run layout (spdf.layout): the on-disk names every existing run directory has, named in one place only.

The paths are pinned literally: a run directory written by any earlier spdf must still be found where it is.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

from spdf import layout
from spdf.layout import PhaseLayout, RunLayout, checkpoint_name, is_temporary, temporary_dir

REPO = Path(__file__).resolve().parents[1]


def test_run_and_phase_paths_are_those_of_existing_run_directories(tmp_path):
    run = RunLayout(tmp_path / "run")
    root = tmp_path / "run"
    assert (run.recipe, run.fingerprint, run.tokenizer, run.metrics, run.lock, run.phases) == (
        root / "recipe.yaml", root / "fingerprint.json", root / "tokenizer.json", root / "metrics.jsonl",
        root / ".lock", root / "phases")
    phase = run.phase("pretrain")
    assert (phase.root, phase.name, phase.checkpoints, phase.export, phase.done) == (
        root / "phases" / "pretrain", "pretrain", root / "phases" / "pretrain" / "checkpoints",
        root / "phases" / "pretrain" / "export", root / "phases" / "pretrain" / "done.json")
    assert phase.checkpoint(100) == root / "phases" / "pretrain" / "checkpoints" / "step-00000100"
    assert phase.run == run and checkpoint_name(7) == "step-00000007"
    assert (layout.WEIGHTS_FILE, layout.CONFIG_FILE, layout.MASKS_FILE, layout.CHECKPOINT_META,
            layout.MANIFEST_FILE, layout.TOKENIZER_RECORD_FILE) == (
        "model.safetensors", "config.json", "masks.safetensors", "spdf.json", "manifest.json", "tokenizer_spec.json")


def test_temporary_names(tmp_path):
    final = tmp_path / "phases" / "a" / "export"
    assert temporary_dir(final) == final.with_name(".tmp-export")
    assert temporary_dir(final, 123) == final.with_name(".tmp-export.123")
    assert is_temporary(temporary_dir(final) / "model.safetensors") and not is_temporary(final / "model.safetensors")


def test_finished_phases_in_the_order_they_finished(tmp_path):
    run = RunLayout(tmp_path)
    assert run.finished_phases() == []  # no phases/ at all
    for name, when in (("finetune", 2000), ("pretrain", 1000), ("unfinished", None)):
        run.phase(name).root.mkdir(parents=True)
        if when is not None:
            run.phase(name).done.write_text("{}")
            os.utime(run.phase(name).done, (when, when))
    assert [p.name for p in run.finished_phases()] == ["pretrain", "finetune"]
    assert run.phase("pretrain").finished and not run.phase("unfinished").finished


def test_finished_phases_in_the_order_their_done_json_records(tmp_path):
    """A copy of a run directory (cp -r, scp, an unpacked zip) gives each done.json the time it was copied, in the
    order the copy went; the recorded time keeps the order the phases finished in. Older done.json: the mtime."""
    run = RunLayout(tmp_path)
    for name, recorded, copied in (("pretrain", 1000.5, 3000), ("finetune", 2000.5, 2500), ("older", None, 1500)):
        run.phase(name).root.mkdir(parents=True)
        run.phase(name).done.write_text(json.dumps({layout.FINISHED_AT: recorded} if recorded else {}))
        os.utime(run.phase(name).done, (copied, copied))
    assert [p.name for p in run.finished_phases()] == ["pretrain", "older", "finetune"]


def test_a_path_inside_a_run_finds_its_run_phase_and_tokenizer(tmp_path):
    run = RunLayout(tmp_path / "run")
    step = run.phase("pretrain").checkpoint(4)
    step.mkdir(parents=True)
    assert RunLayout.containing(step) == RunLayout(run.root.resolve())
    assert RunLayout.containing(tmp_path) is None
    assert RunLayout.of_checkpoint(step) == run
    assert PhaseLayout.of_export(run.phase("pretrain").export) == run.phase("pretrain")
    assert PhaseLayout.of_export(tmp_path / "my-export") is None
    assert PhaseLayout.of_export(tmp_path / "elsewhere" / "x" / "export") is None


# every file name of the layout; directory names ("phases", "export") are also ordinary words and dict keys
_FILE_NAMES = {value for name, value in vars(layout).items()
               if name.endswith(("_FILE", "_META")) or name in ("CHECKPOINTS_DIR", "SHARDED_MODEL_DIR")}


def test_no_module_but_the_layout_spells_a_file_name_of_it():
    """One place names every path: a string literal equal to a layout file name anywhere else in spdf is a second
    definition that the next change of the layout would miss."""
    assert "done.json" in _FILE_NAMES and "spdf.json" in _FILE_NAMES and "metrics.jsonl" in _FILE_NAMES
    found = []
    for path in sorted((REPO / "spdf").rglob("*.py")):
        if path == REPO / "spdf" / "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in _FILE_NAMES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, found
