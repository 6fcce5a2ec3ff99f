"""Progress output: off with logging.progress=false (the tokenize/pack bar too), and when stderr is not a terminal
one plain line per logging interval instead of a redrawn bar. And `spdf finetune` says it finished, not `run`."""
from __future__ import annotations

from tiny_runs import copy_run, spdf_subprocess


def test_progress_in_a_log_file_and_off(finished_run, cache_dir, tmp_path):
    """Pre-training re-run from scratch in a subprocess (stderr a file: not a terminal), with a fresh data cache so
    the tokenize/pack step runs too."""
    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml",
                               "logging.progress=true", "logging.every_steps=4")
    import shutil
    shutil.rmtree(run_dir / "phases")
    proc = spdf_subprocess(["pretrain", recipe], tmp_path / "fresh-cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[pretrain] step ")]
    assert [line.split()[2] for line in lines] == ["4/8", "8/8"]
    assert "\r" not in proc.stderr and "tokenize+pack" not in proc.stderr and "it/s" not in proc.stderr
    assert "spdf pretrain finished" in proc.stdout


def test_finetune_prints_finetune_finished(finished_run, cache_dir, tmp_path, capsys):
    from tiny_runs import run_cli, truncate_to_kill

    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    truncate_to_kill(run_dir, "finetune", last_step=4, keep_checkpoints_upto=4)
    rc, out, err = run_cli(["finetune", recipe], capsys)
    assert rc == 0, err
    assert "spdf finetune finished" in out and "spdf run finished" not in out


def test_progress_false_silences_the_pack_bar_on_a_terminal(finished_run, tmp_path, capsys, monkeypatch):
    import shutil
    import sys

    from tiny_runs import run_cli

    run_dir, recipe = copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")
    shutil.rmtree(run_dir / "phases")
    monkeypatch.setenv("SPDF_CACHE_DIR", str(tmp_path / "fresh-cache"))  # so the corpus is tokenized again
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = run_cli(["pretrain", recipe, "--set", "logging.progress=false"], capsys)
    assert rc == 0, err
    assert "tokenize+pack" not in err and "[pretrain] step" not in err
