"""The `spdf` command line: help, flops, inspect, and every user error as one line with exit code 2.

A user error must print exactly one line `spdf: error: …` naming the key or path, exit with status 2, show no
traceback and leave whatever is already on disk byte for byte as it was. The run directories come from
tiny_runs.py (fixtures in conftest.py): the session's finished tiny demo run, copied wherever a test could change it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import spdf.cli as cli
from spdf.cli import build_parser, main
from spdf.data import DataError
from spdf.errors import CheckpointError, SpdfUserError
from spdf.eval.evaluate import EvaluationError
from spdf.fswrite import WriteError
from spdf.manifest import ManifestError
from spdf.recipe import RecipeError
from spdf.train.checkpoint import DamagedCheckpoint
from spdf.train.lock import RunDirLocked
from spdf.flops import analytic_flops
from spdf.model.config import GPTConfig
from tiny_runs import (assert_user_error, copy_run, loss_trace, run_cli, set_args, spdf_subprocess, subprocess_env,
                       tree_digest, truncate_to_kill, write_recipe)

SUBCOMMANDS = ("run", "pretrain", "finetune", "evaluate", "inspect", "flops")
SPARSE_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _recipe_file(tmp_path: Path, edit) -> Path:
    """The tiny demo recipe (run_dir under tmp_path) as YAML, changed by edit(data) before it is written."""
    path = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- help ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], *[[cmd, "--help"] for cmd in SUBCOMMANDS]], ids=" ".join)
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith(f"usage: spdf {argv[0] if len(argv) == 2 else ''}".rstrip())
    if len(argv) == 1:
        for cmd in SUBCOMMANDS:
            assert cmd in out
    elif argv[0] in ("run", "pretrain", "finetune"):
        assert "--set KEY=VALUE" in out and "recipe" in out
    if argv[0] == "finetune":
        assert "--from CHECKPOINT" in out
    if argv[0] == "flops":
        assert "--sparsity" in out and "--list" in out and "--json" in out
    if argv[0] == "evaluate":
        assert all(option in out for option in ("--task", "--split", "--decoding", "--limit", "--batch-size"))


def test_python_dash_m_spdf(cache_dir, tmp_path):
    proc = spdf_subprocess(["--help"], cache_dir, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: spdf") and "flops" in proc.stdout
    # a user error through the real entry point: exit status 2 and one line, no traceback
    proc = spdf_subprocess(["flops", "gpt3-xl", "--sparsity", "1.5"], cache_dir, cwd=tmp_path, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, "sparsity", "1.5")
    assert proc.stdout == ""


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert_user_error(exit_info.value.code, capsys.readouterr().err, "required: COMMAND", "spdf --help")


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate", "gpt3-xl"])
    assert_user_error(exit_info.value.code, capsys.readouterr().err, "invalid choice: 'frobnicate'", "flops")


def test_every_command_names_its_own_handler():
    """Dispatch is by each subcommand's own handler: none falls through to another command's."""
    parser = build_parser()
    minimal = {"run": ["r.yaml"], "pretrain": ["r.yaml"], "finetune": ["r.yaml"], "prepare": ["r.yaml"],
               "evaluate": ["p", "--task", "e2e"], "export": ["p", "o"], "inspect": ["p"], "flops": []}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(minimal)
    handlers = {cmd: parser.parse_args([cmd, *minimal[cmd]]).func.__name__ for cmd in commands}
    assert handlers == {**{cmd: "_cmd_train" for cmd in ("run", "pretrain", "finetune")}, "prepare": "_cmd_prepare",
                        "evaluate": "_cmd_evaluate", "export": "_cmd_export", "inspect": "_cmd_inspect",
                        "flops": "_cmd_flops"}
    assert [parser.parse_args([cmd, "r.yaml"]).kinds for cmd in ("run", "pretrain", "finetune")] == [
        ("pretrain", "finetune"), ("pretrain",), ("finetune",)]


def test_export_format_chooses_the_writer(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setitem(cli.EXPORT_FORMATS, "hf", lambda source, out, force: calls.append((source, out, force)) or out)
    rc, out, _ = run_cli(["export", tmp_path / "run", tmp_path / "hf", "--format", "hf", "--force"], capsys)
    assert rc == 0 and calls == [(tmp_path / "run", tmp_path / "hf", True)] and out.strip() == str(tmp_path / "hf")


def test_a_bug_inside_a_command_shows_its_traceback(cache_dir, tmp_path):
    """Only spdf's user errors are one line and exit 2: a ValueError from deep inside a library (a bug) reaches the
    user as a traceback with exit status 1, not as if the user had made a mistake."""
    code = ("import sys, spdf.flops\n"
            "def broken(*args, **kwargs):\n"
            "    raise ValueError('simulated bug inside torch')\n"
            "spdf.flops.analytic_flops = broken\n"
            "from spdf.cli import main\n"
            "sys.exit(main(['flops', 'gpt3-xl']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(cache_dir),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "ValueError: simulated bug inside torch" in proc.stderr
    assert "spdf: error" not in proc.stderr


@pytest.mark.parametrize("error", [RecipeError("x"), DataError("x"), CheckpointError("x"), DamagedCheckpoint("x"),
                                   WriteError("x"), ManifestError("x"), RunDirLocked("x"), EvaluationError("x")],
                         ids=lambda e: type(e).__name__)
def test_every_user_error_class_is_an_spdf_user_error(error):
    assert isinstance(error, SpdfUserError) and isinstance(error, ValueError)  # library callers' except ValueError


def test_unknown_model_name_is_a_user_error(capsys):
    rc, _, err = run_cli(["flops", "gpt3-xll"], capsys)
    assert_user_error(rc, err, "unknown model name 'gpt3-xll'", "did you mean 'gpt3-xl'")


# ---- flops ---------------------------------------------------------------------------------------------------------
def test_flops_table_of_gpt3_xl_at_75_percent(capsys):
    rc, out, err = run_cli(["flops", "gpt3-xl", "--sparsity", "0.75"], capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == ("gpt3-xl: training FLOPs per token at sequence length 2048 "
                        "(75% sparse attention and MLP weights)")
    rows = {line[:40].strip(): line[40:].split() for line in lines[2:-1]}
    for label in ("attention Q, K, V projections", "attention output projection", "MLP up-projection",
                  "MLP down-projection"):
        assert rows[label][2] == "4.00x", label  # a quarter of the weights: a quarter of the FLOPs
    assert rows["attention scores QKᵀ and AV (dense)"][2] == "1.00x"
    assert rows["logits / LM head (dense)"][2] == "1.00x"
    total = rows["total (forward + backward)"]
    fb = analytic_flops(GPTConfig.from_name("gpt3-xl"), 0.75)
    assert total == [f"{fb.dense_train:.4e}", f"{fb.sparse_train:.4e}", "2.49x"]  # the paper's ~2.5x
    assert lines[-1].startswith("convention: FLOPs = 2·MACs")


def test_flops_json_agrees_with_analytic_flops(capsys):
    rc, out, _ = run_cli(["flops", "gpt3-xl", "--sparsity", "0.75", "--json", "--tokens", "26e9", "--seq-len", "1024"],
                         capsys)
    assert rc == 0
    data = json.loads(out)
    fb = analytic_flops(GPTConfig.from_name("gpt3-xl"), 0.75, seq_len=1024)
    assert data["model"] == "gpt3-xl" and data["seq_len"] == 1024 and data["tokens"] == 26e9
    assert data["dense_forward"] == fb.dense_forward and data["sparse_forward"] == fb.sparse_forward
    assert data["dense_train_per_token"] == fb.dense_train and data["sparse_train_per_token"] == fb.sparse_train
    assert data["reduction"] == fb.reduction
    assert data["reduction"] > analytic_flops(GPTConfig.from_name("gpt3-xl"), 0.75).reduction  # shorter context
    rc, out, _ = run_cli(["flops", "gpt3-small", "--json"], capsys)  # dense by default
    data = json.loads(out)
    assert data["reduction"] == 1.0 and data["seq_len"] == 2048 and data["tokens"] is None


def test_flops_table_with_tokens_prints_totals(capsys):
    rc, out, _ = run_cli(["flops", "gpt3-xl", "--sparsity", "0.5", "--tokens", "26e9"], capsys)
    fb = analytic_flops(GPTConfig.from_name("gpt3-xl"), 0.5)
    (line,) = [x for x in out.splitlines() if x.startswith("total for 2.6e+10 tokens")]
    assert line.split()[-3:] == [f"{fb.dense_train * 26e9:.4e}", f"{fb.sparse_train * 26e9:.4e}", "1.67x"]


def test_flops_list(capsys):
    rc, out, _ = run_cli(["flops", "--list", "ignored"], capsys)
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert {"gpt3-small", "gpt3-xl", "tiny", "tiny-test"} <= set(rows)
    assert rows["gpt3-xl"].split()[1:7] == ["24", "layers", "d_model", "2048", "heads", "16"]
    assert rows["gpt3-small"].split()[1:5] == ["12", "layers", "d_model", "768"]


def test_flops_of_exports_reads_the_masks(finished_run, capsys):
    run_dir = finished_run["run_dir"]
    config = json.loads((run_dir / "phases/pretrain/export/config.json").read_text())
    cfg = GPTConfig(**config["model"])
    rc, out, err = run_cli(["flops", run_dir / "phases/pretrain/export", "--json"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    expected = analytic_flops(cfg, 0.75)  # every attention and MLP weight at exactly 75%
    assert data["reduction"] == pytest.approx(expected.reduction, rel=1e-12) and data["reduction"] > 1.5
    assert data["sparse_forward"] == pytest.approx(expected.sparse_forward, rel=1e-12)
    # a run directory means its last finished phase: the dense fine-tuning
    rc, out, _ = run_cli(["flops", run_dir, "--json"], capsys)
    assert rc == 0 and json.loads(out)["reduction"] == 1.0
    assert tree_digest(run_dir) == finished_run["digest"]


@pytest.mark.parametrize("argv,fragments", [
    (["gpt3-xl", "--sparsity", "1.5"], ["sparsity must be in [0, 1)", "1.5"]),
    (["gpt3-xl", "--sparsity", "-0.1"], ["sparsity must be in [0, 1)", "-0.1"]),
    (["unknown-model"], ["unknown model name 'unknown-model'", "known:", "gpt3-xl"]),
    (["gpt3-xxl"], ["unknown model name 'gpt3-xxl'", "did you mean 'gpt3-xl'"]),
    # a recipe and a directory bring their own sparsity: --sparsity was ignored, printing another level's FLOPs
    ([str(Path(__file__).parents[2] / "recipes/demo.yaml"), "--sparsity", "0.5"],
     ["--sparsity applies to a named model", "demo.yaml", "sparsity.level"]),
    ([str(Path(__file__).parent), "--sparsity", "0.5"], ["--sparsity applies to a named model", "its masks"]),
])
def test_flops_user_errors(argv, fragments, capsys):
    rc, out, err = run_cli(["flops", *argv], capsys)
    assert_user_error(rc, err, *fragments)
    assert out == ""


# ---- inspect -------------------------------------------------------------------------------------------------------
def test_inspect_pretrain_export_shows_75_percent_per_layer(finished_run, capsys):
    export = finished_run["run_dir"] / "phases/pretrain/export"
    rc, out, err = run_cli(["inspect", export], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{export / 'model.safetensors'} (sparse: masks present)"
    sparse_rows = [line.split() for line in lines[2:] if line.split()[0].endswith(SPARSE_SUFFIXES)]
    assert len(sparse_rows) == 2 * len(SPARSE_SUFFIXES)
    for name, shape, target, mask, zeros, nnz in sparse_rows:
        assert (target, mask) == ("75.00%", "75.00%"), name
        assert float(zeros.rstrip("%")) >= 75.0, name
        rows, cols = map(int, shape.split("x"))
        assert int(nnz.replace(",", "")) <= rows * cols // 4, name
    rc, out, _ = run_cli(["inspect", export, "--json"], capsys)
    stats = json.loads(out)
    assert stats["sparse"] is True
    layers = [r for r in stats["layers"] if r["name"].endswith(SPARSE_SUFFIXES)]
    assert len(layers) == 8 and all(r["mask_sparsity"] == 0.75 and r["target"] == 0.75 for r in layers)
    assert all(r["actual"] == pytest.approx(0.75, abs=0.01) for r in layers)


def test_inspect_of_a_run_dir_is_its_dense_fine_tuned_export(finished_run, capsys):
    run_dir = finished_run["run_dir"]
    rc, out, _ = run_cli(["inspect", run_dir], capsys)
    assert rc == 0
    assert out.splitlines()[0] == f"{run_dir / 'phases/finetune/export/model.safetensors'} (dense: no masks)"


def test_inspect_missing_path(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    rc, out, err = run_cli(["inspect", missing], capsys)
    assert_user_error(rc, err, str(missing), "no model.safetensors")
    assert out == "" and not missing.exists()


def test_inspect_truncated_weights_file(finished_run, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    src = finished_run["run_dir"] / "phases/pretrain/export/model.safetensors"
    (export / "model.safetensors").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    rc, _, err = run_cli(["inspect", export], capsys)
    assert_user_error(rc, err, str(export / "model.safetensors"), "corrupt or truncated")


# ---- recipe errors -------------------------------------------------------------------------------------------------
def test_missing_recipe_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    for cmd in ("run", "pretrain", "finetune"):
        rc, out, err = run_cli([cmd, missing], capsys)
        assert_user_error(rc, err, str(missing), "recipe file not found")
    assert list(tmp_path.iterdir()) == []


def test_malformed_yaml(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\nmodel:\n  name: [tiny\nphases: 3\n")
    rc, _, err = run_cli(["run", recipe], capsys)
    assert_user_error(rc, err, f"{recipe}:4:7: malformed YAML")
    assert not (tmp_path / "run").exists()


def test_recipe_that_is_not_a_mapping(tmp_path, capsys):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- a\n- b\n")
    rc, _, err = run_cli(["run", recipe], capsys)
    assert_user_error(rc, err, str(recipe), "must be a mapping")


@pytest.mark.parametrize("edit,fragments", [
    (lambda d: d["model"].update(colour="blue"), ["unknown key 'model.colour'", "allowed: name, n_layer"]),
    (lambda d: d.update(phasez=[]), ["unknown key 'phasez'", "did you mean"]),
    (lambda d: d["phases"][0].update(steps="many"), ["phases[0].steps must be an integer", "'many'"]),
    (lambda d: d["sparsity"].update(level="high"), ["sparsity.level must be a number", "'high'"]),
    (lambda d: d["sparsity"].update(level=1.5), ["sparsity.level", "1.5"]),
    (lambda d: d["model"].update(name="gpt5"), ["model.name", "unknown model 'gpt5'", "gpt3-xl"]),
], ids=["unknown-key", "unknown-top-level-key", "wrong-type", "wrong-type-number", "out-of-range", "unknown-model"])
def test_bad_recipe_values(tmp_path, capsys, edit, fragments):
    recipe = _recipe_file(tmp_path, edit)
    rc, out, err = run_cli(["run", recipe], capsys)
    line = assert_user_error(rc, err, str(recipe), *fragments)
    assert "EXCLUSIVE" not in line and "SHAPE_KEYS" not in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("sets,fragments", [
    (["phases.pretrain.steps"], ["--set 'phases.pretrain.steps'", "expected KEY=VALUE"]),
    (["=3"], ["--set '=3'", "expected KEY=VALUE"]),
    (["model.colour=1"], ["--set model.colour", "unknown key 'model.colour'"]),
    (["model.d_modle=64"], ["unknown key 'model.d_modle'", "did you mean 'd_model'"]),
    (["model.SHAPE_KEYS=1"], ["unknown key 'model.SHAPE_KEYS'"]),
    (["phases.warmup.steps=1"], ["phases", "no item named 'warmup'"]),
    (["model.n_layer=two"], ["model.n_layer must be an integer", "'two'"]),
    (["model.name=gpt5"], ["unknown model 'gpt5'"]),
])
def test_bad_set_overrides(tmp_path, capsys, sets, fragments):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    rc, out, err = run_cli(["run", recipe, *set_args(*sets)], capsys)
    line = assert_user_error(rc, err, *fragments)
    assert "EXCLUSIVE" not in line and "SHAPE_KEYS," not in line  # class constants are not keys
    assert not (tmp_path / "run").exists()


# ---- run directories and checkpoints on disk ----------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["run", "pretrain", "finetune"])
def test_run_dir_of_another_recipe_is_refused_untouched(finished_copy, capsys, cmd):
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    rc, out, err = run_cli([cmd, recipe, *set_args("model.d_model=64")], capsys)
    assert_user_error(rc, err, str(run_dir), "different recipe", "run_dir")
    assert tree_digest(run_dir) == before


def test_run_dir_with_budget_changes_is_not_another_recipe(finished_copy, capsys):
    """Only what shapes the run counts: another logging cadence is the same run directory (a finished phase is skipped)."""
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    rc, out, err = run_cli(["pretrain", recipe, *set_args("logging.every_steps=5")], capsys)
    assert rc == 0, err
    assert "[pretrain] already finished" in out
    changed = {k for k in before if tree_digest(run_dir).get(k) != before[k]}
    assert changed <= {"recipe.yaml"}  # the resolved recipe is rewritten; nothing else


@pytest.mark.parametrize("damaged,how", [("model.safetensors", "truncate"), ("optimizer.bin", "truncate"),
                                         ("random_states_0.pkl", "truncate"), ("custom_checkpoint_0.pkl", "truncate"),
                                         ("random_states_0.pkl", "delete")])
def test_unloadable_checkpoint_without_manifest_falls_back(finished_copy, finished_run, capsys, damaged, how):
    """Killed after the last checkpoint but before the export, in a run directory of an spdf without manifests;
    then a file of the newest checkpoint is cut short or deleted (accelerate itself would resume without the RNG
    states, and so not exactly). The run warns naming the file and resumes from the older checkpoint."""
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", 8, keep_checkpoints_upto=8)
    ckpts = run_dir / "phases/pretrain/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000006", "step-00000008"]
    for manifest in ckpts.glob("*/manifest.json"):
        manifest.unlink()  # as an spdf before manifests wrote them
    file = ckpts / "step-00000008" / damaged
    if how == "delete":
        file.unlink()
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    rc, out, err = run_cli(["pretrain", recipe], capsys)
    assert rc == 0, err
    assert "could not be loaded" in err and (str(file) in err or (how == "delete" and str(file.parent) in err))
    assert "resumed from" in out and "step-00000006" in out
    assert loss_trace(run_dir, "pretrain") == loss_trace(finished_run["run_dir"], "pretrain")


def test_finetune_from_a_missing_path(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    missing = tmp_path / "no-such-export"
    rc, out, err = run_cli(["finetune", recipe, "--from", missing], capsys)
    assert_user_error(rc, err, str(missing), "does not exist")
    assert tree_digest(run_dir) == before and not missing.exists()


def test_finetune_from_a_missing_path_into_a_new_run_dir_creates_nothing(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    rc, out, err = run_cli(["finetune", recipe, "--from", tmp_path / "missing"], capsys)
    assert_user_error(rc, err, "does not exist")
    assert not (tmp_path / "run").exists()


def test_finetune_from_a_dir_that_is_not_an_export(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_cli(["finetune", recipe, "--from", empty], capsys)
    assert_user_error(rc, err, str(empty), "not an spdf export")
    assert tree_digest(run_dir) == before

