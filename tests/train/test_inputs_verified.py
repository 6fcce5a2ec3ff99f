"""A run verifies everything it reads before training on it: the data cache (content checksums), the run
directory's tokenizer (its recorded sha256, so a damaged copy never reaches a fine-tuning export), manifests that
must list the files a checkpoint or export has, and a `--from` checkpoint treated as a resume treats it."""
from __future__ import annotations

import json
import shutil

from spdf.manifest import MANIFEST_FILE
from tiny_runs import assert_user_error, run_cli, truncate_to_kill, tree_digest


def _zero_a_stretch(file, n: int = 1 << 20) -> None:
    data = bytearray(file.read_bytes())
    start = len(data) // 4
    data[start:start + n] = bytes(len(data[start:start + n]))
    file.write_bytes(bytes(data))


def test_zeroed_data_cache_is_refused_at_start(finished_copy, cache_dir, tmp_path, capsys, monkeypatch):
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=6, keep_checkpoints_upto=6)
    private = tmp_path / "cache"
    shutil.copytree(cache_dir, private)
    monkeypatch.setenv("SPDF_CACHE_DIR", str(private))
    shards = sorted(private.rglob("train.bin"))  # the session's cache may hold other tests' corpora too: all zeroed
    for train_bin in shards:
        _zero_a_stretch(train_bin)
    before = tree_digest(run_dir / "phases")
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    named = [train_bin for train_bin in shards if str(train_bin) in err]
    assert len(named) == 1, err
    assert_user_error(rc, err, str(named[0]), "do not match the checksum", f"delete {named[0].parent}")
    assert tree_digest(run_dir / "phases") == before


def _flip_a_letter(path) -> None:
    text = path.read_text()
    at = text.index('"vocab"') + 40
    while not text[at].isalpha():
        at += 1
    path.write_text(text[:at] + ("a" if text[at] != "a" else "b") + text[at + 1:])


def test_damaged_run_tokenizer_is_refused_and_never_exported(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "finetune", last_step=0, keep_checkpoints_upto=None)
    _flip_a_letter(run_dir / "tokenizer.json")
    rc, _, err = run_cli(["run", recipe], capsys)
    assert_user_error(rc, err, str(run_dir / "tokenizer.json"), "checksum recorded")
    assert not (run_dir / "phases/finetune/export").exists()
    step = run_dir / "phases/pretrain/checkpoints/step-00000008"  # its tokenizer is the run directory's
    rc, _, err = run_cli(["finetune", recipe, "--from", step, "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, str(run_dir / "tokenizer.json"), "checksum recorded")
    assert not (tmp_path / "ft" / "phases").exists()


def test_empty_manifest_does_not_verify(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    export = run_dir / "phases/pretrain/export"
    (export / MANIFEST_FILE).write_text(json.dumps({"version": 1, "hash": "crc32", "files": {}}))
    rc, out, err = run_cli(["inspect", "--verify", export], capsys)
    assert_user_error(rc, err, "1 of 1 damaged")
    assert "lists no files" in out
    rc, _, err = run_cli(["finetune", recipe, "--from", export, "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, str(export), "lists no files")


def test_manifest_that_omits_a_required_file_does_not_verify(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    export = run_dir / "phases/pretrain/export"
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    del manifest["files"]["model.safetensors"]
    (export / MANIFEST_FILE).write_text(json.dumps(manifest))
    rc, _, err = run_cli(["finetune", recipe, "--from", export, "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, "does not list model.safetensors")


def test_from_a_checkpoint_that_lost_its_manifest_is_refused_like_a_resume(finished_copy, tmp_path, capsys):
    run_dir, recipe = finished_copy
    step = run_dir / "phases/pretrain/checkpoints/step-00000008"
    (step / MANIFEST_FILE).unlink()
    rc, _, err = run_cli(["finetune", recipe, "--from", step, "--set", f"run_dir={tmp_path / 'ft'}"], capsys)
    assert_user_error(rc, err, str(step), "has lost its manifest.json")
    assert not (tmp_path / "ft").exists()


def test_a_checkpoint_deleted_while_being_verified_is_reported_removed_not_damaged(finished_copy, capsys,
                                                                                    monkeypatch):
    """A live run's rotation deletes its older checkpoints while `spdf inspect --verify` walks them: such a directory
    is gone, not damaged (exit 0); the others are verified as usual."""
    import spdf.inspect

    run_dir, _ = finished_copy
    doomed = run_dir / "phases/pretrain/checkpoints/step-00000006"
    real = spdf.inspect.verify_manifest

    def rotated_meanwhile(directory, **kwargs):
        if directory == doomed:
            shutil.rmtree(directory)  # the writer's rotation, between the listing and the reading
        return real(directory, **kwargs)

    monkeypatch.setattr(spdf.inspect, "verify_manifest", rotated_meanwhile)
    rc, out, _ = run_cli(["inspect", "--verify", run_dir, "--json"], capsys)
    statuses = {item["path"]: item["status"] for item in json.loads(out)}
    assert rc == 0 and statuses.pop(str(doomed)) == "removed"
    assert statuses and set(statuses.values()) == {"ok"}
