"""`spdf prepare`: the tokenizer and the pre-training cache made ahead of a run, which then tokenizes nothing."""
from spdf.data import packing

from tiny_runs import assert_user_error, run_cli, set_args, write_recipe


def test_prepare_fills_the_cache_that_run_then_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPDF_CACHE_DIR", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run")
    rc, out, err = run_cli(["prepare", recipe], capsys)
    assert rc == 0, err
    (entry,) = (tmp_path / "cache").iterdir()
    assert f"phase pretrain: prepared in {entry}" in out
    assert (entry / "meta.json").is_file() and (tmp_path / "run" / "tokenizer.json").is_file()
    rc, out, err = run_cli(["prepare", recipe], capsys)
    assert rc == 0 and "already prepared" in out, err

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("spdf run tokenized the corpus again")

    monkeypatch.setattr(packing, "tokenize_splits", no_tokenizing)
    rc, out, err = run_cli(["run", recipe], capsys)
    assert rc == 0, err
    assert list((tmp_path / "cache").iterdir()) == [entry]


def test_prepare_user_error_is_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run")
    rc, _, err = run_cli(["prepare", recipe, *set_args("phases.pretrain.data.workers=0")], capsys)
    assert_user_error(rc, err, "workers")
