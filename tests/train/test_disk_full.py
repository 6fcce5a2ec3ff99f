"""A full disk is one `spdf: error:` line and exit 2 from every writer spdf uses: safetensors (its own error
type, "os error 28" in the text), torch.save (a RuntimeError with no errno), Python's own files (JSON, metrics);
the partial temporary files are removed, earlier checkpoints survive, and the same command on a roomy disk then
gives the uninterrupted run. Real full disks are small tmpfs mounts (skipped where mounting is not permitted);
the writers' own errors are also raised by stand-ins, so the cases run everywhere."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess

import accelerate
import pytest
from safetensors import SafetensorError

import spdf.fswrite as fswrite
from spdf.fswrite import WriteError, write_failure, write_json_atomic
from tiny_runs import assert_user_error, loss_trace, read_metrics, run_cli, truncate_to_kill, tree_digest

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # torch.save on a full tmpfs
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture
def small_disk(tmp_path):
    """mount(kib) -> a fresh tmpfs of that size under tmp_path, unmounted afterwards; skips the test where this
    process may not mount (not root, no mount command, a container without the capability)."""
    mounted = []

    def mount(kib: int):
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_every_writers_disk_full_error_is_recognised(tmp_path, monkeypatch):
    full = write_failure(OSError(errno.ENOSPC, "No space left on device"), "x", tmp_path, 10**6)
    assert isinstance(full, WriteError) and "no space left" in str(full) and "1.0 MB" in str(full)
    assert "no space left" in str(write_failure(SafetensorError(SAFETENSORS_FULL), "x", tmp_path))
    monkeypatch.setattr(fswrite, "_free_bytes", lambda directory: 4096)  # torch says nothing: the device does
    assert "no space left" in str(write_failure(RuntimeError(TORCH_FULL), "x", tmp_path))
    monkeypatch.setattr(fswrite, "_free_bytes", lambda directory: 10**12)
    other = write_failure(RuntimeError(TORCH_FULL), "the checkpoint", tmp_path)
    assert "could not write the checkpoint" in str(other) and "unexpected pos" in str(other)
    assert write_failure(RuntimeError("a bug"), "x", tmp_path) is None
    assert write_failure(KeyboardInterrupt(), "x", tmp_path) is None


@pytest.mark.parametrize("error", [SafetensorError(SAFETENSORS_FULL), RuntimeError(TORCH_FULL)],
                         ids=["safetensors", "torch.save"])
def test_checkpoint_writers_own_errors(finished_copy, capsys, monkeypatch, error):
    run_dir, recipe = finished_copy
    truncate_to_kill(run_dir, "pretrain", last_step=6, keep_checkpoints_upto=6)
    ckpts = run_dir / "phases/pretrain/checkpoints"
    before = tree_digest(ckpts)

    def full_disk(self, output_dir, **kwargs):
        (ckpts / f".tmp-step-00000008" / "model.safetensors").write_bytes(b"\0" * 1000)
        raise error

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    monkeypatch.setattr(fswrite, "_free_bytes", lambda directory: 0)
    rc, _, err = run_cli(["pretrain", recipe], capsys)
    assert_user_error(rc, err, "no space left", "a checkpoint", str(ckpts))
    assert not list(ckpts.glob(".tmp*")) and tree_digest(ckpts) == before


def test_json_on_a_full_disk_names_the_file_and_leaves_nothing(small_disk):
    disk = small_disk(64)
    with pytest.raises(OSError):
        (disk / "filler").write_bytes(b"\0" * (128 << 10))
    with pytest.raises(WriteError, match=f"no space left .* done.json into {disk}"):
        write_json_atomic(disk / "done.json", {"text": "x" * (64 << 10)})
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_run_on_a_full_disk_stops_cleanly_and_resumes_identically(finished_copy, finished_run, small_disk,
                                                                      capsys):
    """Room for two pre-training checkpoints (~530 KB each) but not a third: the third fails with one line and exit
    2, no temporary directory is left, steps 2 and 4 verify; moved to a roomy disk the run ends as the
    uninterrupted one did."""
    _, recipe = finished_copy
    disk = small_disk(1300)
    run_dir = disk / "run"
    rc, _, err = run_cli(["pretrain", recipe, "--set", f"run_dir={run_dir}"], capsys)
    assert_user_error(rc, err, "no space left on the device writing a checkpoint",
                      str(run_dir / "phases/pretrain/checkpoints"))
    phase = run_dir / "phases/pretrain"
    assert not list(run_dir.rglob(".tmp*")) and not list(run_dir.rglob("*.tmp"))
    kept = sorted(p.name for p in (phase / "checkpoints").iterdir())
    assert kept and all(name.startswith("step-") for name in kept), kept
    rc, out, _ = run_cli(["inspect", "--verify", phase], capsys)
    assert rc == 0 and "DAMAGED" not in out
    roomy = finished_copy[0].parent / "roomy"
    shutil.copytree(run_dir, roomy)
    rc, _, err = run_cli(["pretrain", recipe, "--set", f"run_dir={roomy}"], capsys)
    assert rc == 0, err
    assert loss_trace(roomy, "pretrain") == loss_trace(finished_run["run_dir"], "pretrain")
    assert [r["step"] for r in read_metrics(roomy) if "loss" in r] == list(range(1, 9))


def test_hf_export_on_a_full_disk(finished_run, small_disk, capsys):
    disk = small_disk(96)
    rc, _, err = run_cli(["export", finished_run["run_dir"], disk / "hf", "--format", "hf"], capsys)
    last = err.strip().splitlines()[-1]  # (transformers draws a progress bar of its own before it)
    assert rc == 2 and "Traceback" not in err and last.startswith("spdf: error: no space left"), err
    assert "Hugging Face export" in last and str(disk) in last
    assert list(disk.iterdir()) == []


def test_sync_tree_tolerates_a_file_system_that_cannot_fsync_directories_but_not_a_failed_file(tmp_path,
                                                                                              monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    real = os.fsync

    def fsync(fd, fail_on):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) == (fail_on == "dir"):
            raise OSError(errno.EINVAL if fail_on == "dir" else errno.EIO, "no")
        return real(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names the fsync'ed files through /proc")
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, "dir"))
    fswrite.sync_tree(tmp_path)  # some FUSE and network file systems: EINVAL for a directory
    fswrite.sync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: fsync(fd, "file"))
    with pytest.raises(OSError):  # a file's data did not reach the disk: never ignored
        fswrite.sync_tree(tmp_path)
