"""A start that is refused leaves nothing behind and rewrites nothing: everything that can be checked is checked
before the run directory is written (and a directory this start made is removed again), a finished phase's
settings cannot be changed under it (the recorded recipe always describes what was trained), `spdf evaluate` of a
run repeats the run's own evaluation settings, and every message names the key or file."""
from __future__ import annotations

import json

import pytest

from tiny_runs import DEMO, TINY_SETS, assert_user_error, run_cli, set_args, tree_digest


def test_impossible_sparsity_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, _, err = run_cli(["pretrain", DEMO, *set_args(*TINY_SETS, f"run_dir={run_dir}", "sparsity.method=nm",
                                                      "sparsity.m=7")], capsys)
    assert_user_error(rc, err, "sparsity.m=7", "not divisible by m=7")
    assert not run_dir.exists()


def test_a_refused_start_in_an_existing_directory_records_no_recipe(tmp_path, capsys):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("the user's")
    rc, _, err = run_cli(["pretrain", DEMO, *set_args(*TINY_SETS, f"run_dir={run_dir}", "sparsity.filter=[nothing]")],
                         capsys)
    assert_user_error(rc, err, "sparsity.filter", "'nothing'")
    assert (run_dir / "notes.txt").read_text() == "the user's"  # not ours to remove
    assert not (run_dir / "recipe.yaml").exists() and not (run_dir / "fingerprint.json").exists()


def test_from_a_model_of_another_depth_names_the_shape(finished_run, tmp_path, capsys, untouched):
    run_dir = tmp_path / "ft"
    rc, _, err = run_cli(["finetune", DEMO, *set_args(*TINY_SETS, f"run_dir={run_dir}", "model.n_layer=3"),
                          "--from", finished_run["run_dir"]], capsys)
    assert_user_error(rc, err, "n_layer=2", "model.n_layer=3")
    assert "param_filter" not in err and not run_dir.exists()


@pytest.mark.parametrize("command, setting", [("pretrain", "phases.pretrain.steps=1000"),
                                              ("run", "phases.finetune.optimizer.lr=0.1"),
                                              ("pretrain", "phases.pretrain.schedule.warmup_steps=5")])
def test_a_finished_phase_cannot_be_changed(finished_copy, capsys, command, setting):
    run_dir, recipe = finished_copy
    before = tree_digest(run_dir)
    rc, _, err = run_cli([command, recipe, "--set", setting], capsys)
    key, _, value = setting.partition("=")
    assert_user_error(rc, err, key, f"now asks {value}" if key != "phases.finetune.optimizer.lr" else "now asks 0.1",
                      "finished")
    assert tree_digest(run_dir) == before  # recipe.yaml still says what was trained


def test_evaluating_a_run_uses_its_recorded_generation_settings(finished_copy, capsys):
    """The tiny demo's context is 64 tokens: the paper preset's 64 new tokens leave no room, the run's own
    eval.generate (greedy, 24 new tokens, prompts cut as in training) does."""
    run_dir, _ = finished_copy
    rc, out, err = run_cli(["evaluate", run_dir, "--task", "docstring", "--limit", "2"], capsys)
    assert rc == 0, err
    report = json.loads((run_dir / "eval" / "docstring-validation.json").read_text())
    assert report["decoding"]["name"] == "greedy" and report["decoding"]["max_new_tokens"] == 24
    assert report["truncated_prompts"] is True and report["split"] == "validation"
    assert "phases.finetune.eval.generate" in out
    rc, _, err = run_cli(["evaluate", run_dir, "--task", "docstring", "--limit", "2", "--decoding", "paper"], capsys)
    assert_user_error(rc, err, "max_new_tokens (64) leaves no room")  # an explicit preset is the user's


def test_messages_name_the_file(finished_run, tmp_path, capsys, monkeypatch, untouched):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SPDF_CACHE_DIR", str(blocker))
    rc, _, err = run_cli(["pretrain", DEMO, *set_args(*TINY_SETS, f"run_dir={tmp_path / 'run'}")], capsys)
    assert_user_error(rc, err, "SPDF_CACHE_DIR", str(blocker), "is a file")
    assert not (tmp_path / "run").exists()
    rc, _, err = run_cli(["evaluate", finished_run["run_dir"], "--task", "docstring", "--limit", "1",
                          "--out", blocker / "sub"], capsys)
    assert_user_error(rc, err, "--out", str(blocker), "is a file")
    bad = tmp_path / "task.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe{"prompt": 1}\n')
    rc, _, err = run_cli(["evaluate", finished_run["run_dir"], "--task", "jsonl", "--task-path", bad, "--limit", "1"],
                         capsys)
    assert_user_error(rc, err, f"{bad}:2", "not UTF-8")


def test_only_a_start_that_made_and_locked_the_directory_removes_it(tmp_path):
    from spdf.recipe import RecipeError
    from spdf.train.run_dir import RefusedStart

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for claim, began, kept in ((None, False, True), (False, False, True), (True, True, True), (True, False, False)):
        run_dir.mkdir(exist_ok=True)
        with pytest.raises(RecipeError):
            with RefusedStart(run_dir) as start:
                if claim is not None:  # None: refused by the lock (another start holds it), never claimed
                    start.claim(claim)
                if began:
                    start.began()
                raise RecipeError("refused")
        assert run_dir.exists() == kept, (claim, began)
