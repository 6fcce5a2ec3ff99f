"""`spdf export` deletes nothing it did not write: never the run, its phases, the export it reads, or a user's
directory; an earlier export only with --force; and never while the run is being trained (the run lock)."""
import json
import os

import pytest

import spdf
from spdf.cli import main
from spdf.export import write_export
from spdf.train.lock import RunDirLocked, RunLock

pytest.importorskip("transformers")


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run(make_gpt, tmp_path):
    """A finished run directory as the runner lays it out (recipe, one phase with a checkpoint and an export)."""
    run = tmp_path / "run"
    phase = run / "phases" / "pretrain"
    model = make_gpt()
    spdf.sparsify(model, sparsity=0.5, seed=1)
    write_export(model, phase / "export")
    (phase / "checkpoints" / "step-00000002").mkdir(parents=True)
    (phase / "checkpoints" / "step-00000002" / "spdf.json").write_text("{}")
    (phase / "done.json").write_text(json.dumps({"steps": 2}))
    (run / "recipe.yaml").write_text("name: test\n")
    return run


@pytest.mark.parametrize("target", [".", "phases", "phases/pretrain", "phases/pretrain/export",
                                    "phases/pretrain/export/hf", "phases/pretrain/checkpoints", ".."])
def test_export_never_writes_into_onto_or_around_its_run(run, target, capsys):
    before = _snapshot(run.parent)
    assert main(["export", str(run), str(run / target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spdf: error:") and err.count("\n") == 1 and "overlaps" in err, err
    assert _snapshot(run.parent) == before


def test_export_of_an_export_never_writes_onto_it(run, capsys):
    export = run / "phases" / "pretrain" / "export"
    before = _snapshot(run)
    assert main(["export", str(export), str(export), "--force"]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_export_refuses_a_users_non_empty_directory_even_with_force(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        assert main(["export", str(run), str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert "is not an earlier Hugging Face GPT-2 export" in err and err.count("\n") == 1
    assert _snapshot(mine) == {"notes.txt": b"keep me"}
    # a file the user added to an earlier export makes it theirs: it is not replaced either
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "README.md").write_text("my model card")
    assert main(["export", str(run), str(tmp_path / "hf"), "--force"]) == 2
    assert (tmp_path / "hf" / "README.md").read_text() == "my model card"


def test_an_earlier_export_is_replaced_only_with_force(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), str(tmp_path / "empty")]) == 0  # an empty directory is taken as it is
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    first = _snapshot(out)
    assert main(["export", str(run), str(out)]) == 2
    assert "pass --force to replace it" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--force"]) == 0
    assert _snapshot(out) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_export_waits_for_no_writer_and_holds_the_run_as_a_reader(run, tmp_path, capsys, monkeypatch):
    writer = RunLock(run).acquire()  # a training run in this directory (flock is per open file, as per process)
    try:
        assert main(["export", str(run), str(tmp_path / "hf")]) == 2
        assert "is in use" in capsys.readouterr().err
        assert not (tmp_path / "hf").exists()
    finally:
        writer.release()

    from spdf.integrations import hf_gpt2

    seen = []

    def write_while_reading(exported, out_dir):  # a training start while the export reads is refused
        with pytest.raises(RunDirLocked, match="a reader"):
            RunLock(run).acquire()
        second_reader = RunLock(run).acquire(shared=True)  # readers share it
        second_reader.release()
        seen.append(out_dir)
        return out_dir

    monkeypatch.setattr(hf_gpt2, "_write_hf", write_while_reading)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert seen == [tmp_path / "hf"]
    RunLock(run).acquire().release()  # released afterwards


def test_export_removes_what_a_killed_export_into_the_same_directory_left(run, tmp_path):
    """A SIGKILLed `spdf export` leaves its temporary directory (a model's worth of files, hidden) and, killed between
    its two renames, the export it was replacing; the next export into that directory removes them, never a live
    writer's."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "hf"
    left = [tmp_path / f".tmp-hf.{pid}", tmp_path / f".old-hf.{pid}"]
    alive = tmp_path / f".tmp-hf.{os.getppid()}"  # a live process: a writer still at work, as far as one can tell
    for d in (*left, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    assert main(["export", str(run), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert not any(d.exists() for d in left) and alive.exists()


@pytest.mark.parametrize("has_lock_file", [True, False])
def test_export_reads_a_run_directory_it_cannot_write(run, tmp_path, monkeypatch, has_lock_file):
    """A read-only copy or mount of a finished run (EROFS, or another user's files): the reader's lock needs no write
    access, and where the lock file cannot even be made no writer can run either; before, the export failed."""
    import errno

    from spdf.train import lock as lock_module

    lock_file = run / ".lock"
    if has_lock_file:
        lock_file.write_text("pid 1 on host elsewhere\n")
    real_open = os.open

    def read_only_run(path, flags, *args):
        if os.fspath(path) == os.fspath(lock_file) and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock_module.os, "open", read_only_run)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
