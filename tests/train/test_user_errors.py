"""Every user-caused error is one `spdf: error:` line and exit code 2: filesystem trouble (disk full, a run_dir
that is a file or lies under one), unreadable inputs, impossible flag values; and, property-based, whatever a user
types into a recipe, `--set` or the flags is a valid configuration or such a line, never a traceback."""
from __future__ import annotations

import errno
import math

import accelerate
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spdf.train
from tiny_runs import DEMO, TINY_SETS, assert_user_error, run_cli, set_args, truncate_to_kill, tree_digest


def test_disk_full_while_checkpointing(finished_copy, capsys, monkeypatch):
    """The serializer fails half-way with ENOSPC: one line naming the directory and the space needed, the partial
    temporary directory removed, the older checkpoints untouched."""
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=6, keep_checkpoints_upto=6)
    ckpts = run_dir / "phases/pretrain/checkpoints"
    before = tree_digest(ckpts)

    def full_disk(self, output_dir, **kwargs):
        with open(f"{output_dir}/model.safetensors", "wb") as f:  # a partial file, as a real full disk leaves
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    line = assert_user_error(rc, err, "no space left", str(ckpts), "needs about", "MB", "temporary files removed")
    assert "free" in line
    assert not list(ckpts.glob(".tmp*"))
    assert tree_digest(ckpts) == before


def test_disk_full_while_exporting(finished_copy, capsys, monkeypatch):
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=8, keep_checkpoints_upto=8)
    import spdf.export

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spdf.export, "save_file", full_disk)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert_user_error(rc, err, "no space left", "the export", str(run_dir / "phases/pretrain"))
    assert not list((run_dir / "phases/pretrain").glob(".tmp*"))


@pytest.mark.parametrize("where", ["is", "under"])
def test_run_dir_that_is_a_file_or_under_one(tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run_dir = blocker if where == "is" else blocker / "run"
    rc, _, err = run_cli(["pretrain", DEMO, *set_args(*TINY_SETS, f"run_dir={run_dir}")], capsys)
    assert_user_error(rc, err, str(blocker), "is a file")
    assert blocker.read_text() == "not a directory"


def test_fp16_on_cpu_is_refused(tmp_path, capsys):
    rc, _, err = run_cli(["pretrain", DEMO, *set_args(*TINY_SETS, f"run_dir={tmp_path / 'run'}", "precision=fp16")],
                         capsys)
    assert_user_error(rc, err, "fp16 needs a CUDA GPU", "fp32, bf16 or auto")
    assert not (tmp_path / "run").exists()


def test_inspect_of_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    for name, data in (("notes.pt", b"hello, not a pickle"), ("weights.bin", b"\x80\x04garbage")):
        (tmp_path / name).write_bytes(data)
        rc, _, err = run_cli(["inspect", tmp_path / name], capsys)
        assert_user_error(rc, err, str(tmp_path / name), "could not be read")


def test_truncated_masks_in_inspect_and_finetune_from(finished_run, tmp_path, capsys):
    import shutil

    export = tmp_path / "export"
    shutil.copytree(finished_run["run_dir"] / "phases/pretrain/export", export)
    (export / "manifest.json").unlink()  # as a user's own export: nothing to verify against, the reader must cope
    masks = export / "masks.safetensors"
    masks.write_bytes(masks.read_bytes()[: masks.stat().st_size // 2])
    rc, _, err = run_cli(["inspect", export], capsys)
    assert_user_error(rc, err, str(masks), "could not be read")
    rc, _, err = run_cli(["finetune", finished_run["recipe"], "--from", export,
                          "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, str(masks), "could not be read")


def test_masks_of_another_model_in_an_export(finished_run, tmp_path, capsys):
    """A user's own export whose masks.safetensors names a layer its model does not have (masks copied from another
    model): one line naming the file from every reader, not a traceback from inside sparsify."""
    import shutil

    import torch

    from spdf.export import write_masks

    export = tmp_path / "export"
    shutil.copytree(finished_run["run_dir"] / "phases/pretrain/export", export)
    (export / "manifest.json").unlink()  # as a user's own export: nothing to verify against
    write_masks({"transformer.h.7.mlp.c_fc": torch.ones(8, 4, dtype=torch.bool)}, export / "masks.safetensors")
    for argv in (["flops", export], ["export", export, tmp_path / "hf", "--format", "hf"],
                 ["finetune", finished_run["recipe"], "--from", export, "--set", f"run_dir={tmp_path / 'ft'}"]):
        rc, _, err = run_cli(argv, capsys)
        assert_user_error(rc, err, str(export), "'transformer.h.7.mlp.c_fc'", "masks.safetensors fit no linear layer")


@pytest.mark.parametrize("argv,fragment", [
    (["--seq-len", "0"], "--seq-len must be a positive"), (["--seq-len", "-5"], "--seq-len must be a positive"),
    (["--tokens=-1e9"], "--tokens must be a positive finite"), (["--tokens", "nan"], "--tokens must be a positive"),
    (["--tokens", "inf"], "--tokens must be a positive"), (["--sparsity", "nan"], "--sparsity must be in [0, 1)"),
])
def test_impossible_flops_flags(argv, fragment, capsys):
    rc, out, err = run_cli(["flops", "gpt3-small", *argv], capsys)
    assert_user_error(rc, err, fragment)
    assert out == ""


# ---- property-based: adversarial recipe values, --set and flags --------------------------------------------------
KEYS = ["model.n_layer", "model.d_model", "model.n_head", "model.n_ctx", "model.name", "sparsity.level",
        "sparsity.method", "sparsity.init", "seed", "precision", "run_dir", "name", "logging.every_steps",
        "logging.progress", "tokenizer.vocab_size", "phases.pretrain.steps", "phases.pretrain.tokens",
        "phases.pretrain.seq_len", "phases.pretrain.batch_size", "phases.pretrain.micro_batch_size",
        "phases.pretrain.optimizer.lr", "phases.pretrain.optimizer.betas", "phases.pretrain.optimizer.grad_clip",
        "phases.pretrain.optimizer.max_nonfinite_steps", "phases.pretrain.schedule.warmup_steps",
        "phases.pretrain.checkpoint.keep", "phases.pretrain.checkpoint.every_steps", "phases.finetune.epochs",
        "phases.finetune.init", "phases.0.steps", "phases.7.steps", "no.such.key", "phases.pretrain.unknown",
        "model", "phases", ""]
VALUES = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x) if math.isfinite(x) else str(x)),
    st.sampled_from([".nan", "-.inf", "NaN", "1e400", "null", "~", "true", "[]", "{}", "[1, 2, 3]", "{a: 1}",
                     "''", "'", "\"", "[", "/", "/dev/null", "..", "../../x", "a\x00b", "\u00e9\u00e8",
                     "0x10", "1_000", "-0", "bf16", "none", "gpt3-xl"]),
    st.text(max_size=12),
)


@pytest.fixture
def no_training(monkeypatch):
    """Valid configurations stop here instead of training: what is checked is that no input becomes a traceback."""
    seen = []

    def fake_run_recipe(recipe, kinds=(), init_from=None):
        seen.append(recipe)
        return {"main_process": False}

    monkeypatch.setattr(spdf.train, "run_recipe", fake_run_recipe)
    return seen


def _cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        from spdf.cli import main
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def _valid_or_one_line(rc, err):
    assert "Traceback" not in err, err
    if rc != 0:
        assert_user_error(rc, err)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3),
       command=st.sampled_from(["run", "pretrain", "finetune"]))
def test_set_overrides_never_give_a_traceback(sets, command, no_training, capsys, tmp_path):
    args = set_args(*TINY_SETS, f"run_dir={tmp_path / 'run'}", *(f"{k}={v}" for k, v in sets))
    rc, err = _cli([command, DEMO, *args], capsys)
    _valid_or_one_line(rc, err)


def _put(node, parts: list[str], value) -> None:
    """Set data[a][b]... = value; list items by index or by their `name` (as --set does); paths that lead nowhere
    are left alone."""
    for i, part in enumerate(parts):
        if isinstance(node, list):
            match = [x for j, x in enumerate(node) if str(j) == part or (isinstance(x, dict) and x.get("name") == part)]
            if not match:
                return
            if i == len(parts) - 1:
                node[node.index(match[0])] = value
                return
            node = match[0]
        elif isinstance(node, dict):
            if i == len(parts) - 1:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            return


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.dictionaries(st.sampled_from(KEYS[:-5] + ["extra", "phases.pretrain.data.max_bytes"]),
                             st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(),
                                       st.text(max_size=8), st.lists(st.integers(), max_size=3)), max_size=3))
def test_recipe_files_never_give_a_traceback(edits, no_training, capsys, tmp_path):
    from spdf.recipe import apply_overrides

    data = apply_overrides(yaml.safe_load(DEMO.read_text()), [*TINY_SETS, f"run_dir={tmp_path / 'run'}"])
    for key, value in edits.items():  # set the raw Python value (not YAML text): types the parser never makes
        _put(data, key.split("."), value)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data, allow_unicode=True))
    rc, err = _cli(["pretrain", recipe], capsys)
    _valid_or_one_line(rc, err)
    rc, err = _cli(["flops", recipe], capsys)
    _valid_or_one_line(rc, err)


FLAG_VALUES = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(str),
                        st.sampled_from(["", "nan", "inf", "-inf", "1e400", "abc", "--", "0", "-0"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(["gpt3-small", "gpt3-xl", "nope", "", "/", "/dev/null", "x.yaml", "."]),
       flags=st.lists(st.tuples(st.sampled_from(["--seq-len", "--tokens", "--sparsity"]), FLAG_VALUES), max_size=3))
def test_flops_flags_never_give_a_traceback(model, flags, capsys):
    rc, err = _cli(["flops", model, *[part for flag in flags for part in flag]], capsys)
    _valid_or_one_line(rc, err)
