"""benchmarks/replicate.py on a very small budget: it runs, a SIGTERM-interrupted replication continues (finished
runs skipped, the interrupted one resumed from its checkpoint), and its records, table and plots are well formed.
Not the science: the model is the tests' 2-layer width-32 GPT, trained for seconds."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# appended, not prepended: benchmarks/kernels.py must not shadow Hugging Face's `kernels` (which transformers imports)
sys.path += [str(REPO / "benchmarks"), str(REPO / "tests" / "train")]

import replicate  # noqa: E402  (benchmarks/replicate.py; imports no spdf module at import time)
import replication_report  # noqa: E402

pytest.importorskip("matplotlib")


def model_sets() -> list[str]:
    """The tests' tiny model and data (tests/train/tiny_runs.py); the step budget is the driver's own (its flags),
    so those keys are left out. Imported when a test runs, not at collection: tiny_runs imports spdf, which imports
    triton, and tests/kernels must be the first to import triton (with TRITON_INTERPRET set by its conftest)."""
    from tiny_runs import TINY_SETS

    return [s for s in TINY_SETS if not re.search(r"steps|checkpoint|logging", s)] + [
        "phases.finetune.eval.generate.limit=6", "phases.finetune.eval.generate.max_new_tokens=6"]
PRETRAIN_STEPS = 800  # long enough (a few seconds) that a signal arrives mid-run, not after it
METHODS = ["static75", "dense-flops75"]
RUNS = ["static75-seed0-pretrain", "dense-flops75-seed0-pretrain", "static75-seed0-spdf", "static75-seed0-spsf",
        "dense-flops75-seed0-spdf"]


def driver_args(work: Path, out: Path) -> list[str]:
    return ["--seeds", "0", "--methods", *METHODS, "--pretrain-steps", str(PRETRAIN_STEPS), "--finetune-steps", "4",
            "--jobs", "1", "--work", str(work), "--out", str(out), *[a for s in model_sets() for a in ("--set", s)]]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def replication(tmp_path_factory) -> dict:
    """Start the replication, SIGTERM it while the second pre-training runs, then run the same command again."""
    root = tmp_path_factory.mktemp("replication")
    work, out = root / "work", root / "results"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "replicate.py"), *driver_args(work, out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_done = work / "static75-seed0" / "phases" / "pretrain" / "done.json"
    second_ckpts = work / "dense-flops75-seed0" / "phases" / "pretrain" / "checkpoints"
    wait_for(lambda: first_done.is_file() and any(second_ckpts.glob("step-*")), proc,
             "the first run finished and the second checkpointed")
    first_mtime = first_done.stat().st_mtime_ns
    proc.send_signal(signal.SIGTERM)
    interrupted_output = proc.communicate(timeout=600)[0]
    partial = sorted(p.stem for p in (out / "replication").glob("*-seed0-*.json"))
    partial_report = replication_report.write_report(out / "replication", out).read_text()
    rc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "replicate.py"), *driver_args(work, out)],
                        cwd=REPO, env=env, capture_output=True, text=True)
    return {"work": work, "out": out, "interrupted_rc": proc.returncode, "interrupted_output": interrupted_output,
            "partial": partial, "partial_report": partial_report, "first_mtime": first_mtime,
            "first_done": first_done, "rerun": rc}


def test_interrupted_replication_stops_cleanly_and_reports_what_finished(replication):
    assert replication["interrupted_rc"] == 130, replication["interrupted_output"]
    assert "stopping" in replication["interrupted_output"]
    assert replication["partial"] == ["static75-seed0-pretrain"]
    assert "1 of 5 planned runs finished" in replication["partial_report"]


def test_rerun_skips_finished_runs_and_resumes_the_interrupted_one(replication):
    rerun = replication["rerun"]
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "5 runs (1 already finished)" in rerun.stdout
    assert replication["first_done"].stat().st_mtime_ns == replication["first_mtime"]
    logs = replication["work"] / "logs"
    assert (logs / "static75-seed0-pretrain.log").read_text().count("$ spdf") == 1  # never started again
    resumed = (logs / "dense-flops75-seed0-pretrain.log").read_text()
    assert resumed.count("$ spdf") == 2 and re.search(r"\[pretrain\] resumed from .*step-\d+", resumed)
    for run in RUNS[2:]:
        assert (logs / f"{run}.log").read_text().count("$ spdf") == 1


def test_records_are_complete_and_flop_matched(replication):
    raw = replication["out"] / "replication"
    plan = json.loads((raw / "plan.json").read_text())
    assert plan["runs"] == RUNS
    runs = {rid: json.loads((raw / f"{rid}.json").read_text()) for rid in RUNS}
    for rid, r in runs.items():
        assert r["id"] == rid and r["seed"] == 0 and r["command"].startswith("spdf ")
        for key in ("val_loss_before", "val_loss_after", "flops_spent", "flops_dense_equivalent", "train_seconds"):
            assert math.isfinite(r[key]) and r[key] > 0, (rid, key)
        steps = [p["step"] for p in r["val_curve"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == r["steps"]
        flops = [p["flops_spent"] for p in r["val_curve"]]
        assert flops[0] == 0 and all(a < b for a, b in zip(flops, flops[1:])) and flops[-1] == r["flops_spent"]
    for rid in RUNS[2:]:
        r = runs[rid]
        assert r["kind"] == "finetune" and r["steps"] == 4 and r["pretrain_run"].startswith(r["method"])
        assert set(r["downstream_after"]["metrics"]) == {"bleu", "rouge_l", "chrf"}
    assert runs["static75-seed0-spsf"]["init"] == "keep_masks" and runs["static75-seed0-spdf"]["init"] == "densify"
    # SPSF trains 75%-sparse (fewer FLOPs than its dense equivalent), SPDF dense
    sp, dn = runs["static75-seed0-spsf"], runs["static75-seed0-spdf"]
    assert sp["flops_spent"] < sp["flops_dense_equivalent"] and dn["flops_spent"] == dn["flops_dense_equivalent"]
    # the dense baseline spends no more than the 75% run, and less than one more dense step would take it over
    static, matched = runs["static75-seed0-pretrain"], runs["dense-flops75-seed0-pretrain"]
    dense_step = matched["flops_spent"] / matched["steps"]
    assert matched["steps"] == plan["budget"]["flop_matched_steps"] < PRETRAIN_STEPS
    assert static["flops_spent"] - dense_step < matched["flops_spent"] <= static["flops_spent"]


def test_report_and_plots(replication):
    out = replication["out"]
    table = (out / "replication.md").read_text()
    assert "5 of 5 planned runs finished" in table
    for label in ("| static 75% | 75% |", "| dense, FLOP-matched to static 75% | 0% |", "dense (SPDF)",
                  "sparse (SPSF)"):
        assert label in table
    for png in ("replication_loss_curves.png", "replication_downstream_vs_flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_replication_runs_nothing(replication, capsys):
    assert replicate.main(driver_args(replication["work"], replication["out"])) == 0
    assert "5 runs (5 already finished)" in capsys.readouterr().out
    assert (replication["work"] / "logs" / "static75-seed0-spdf.log").read_text().count("$ spdf") == 1


def test_dense_flops75_needs_static75():
    with pytest.raises(SystemExit) as e:
        replicate.main(["--methods", "dense-flops75"])
    assert e.value.code == 2


def test_generations_behind_every_downstream_score_are_saved_and_rescore(replication):
    """Every fine-tuning run's inputs, references and generations are saved beside its record, and scoring the saved
    generations alone gives the record's downstream metrics."""
    from spdf.eval.metrics import compute_metrics

    raw = replication["out"] / "replication"
    for rid in RUNS[2:]:
        record = json.loads((raw / f"{rid}.json").read_text())
        saved = json.loads((raw / f"{rid}-generations.json").read_text())["finetune"]
        assert set(saved) == {"before", "after"}
        for scope, generations in saved.items():
            logged = record[f"downstream_{scope}"]
            examples = generations["examples"]
            assert len(examples) == logged["examples"] and all(e["input"] and e["references"] for e in examples)
            rescored = compute_metrics(list(logged["metrics"]), [e["output"] for e in examples],
                                       [e["references"] for e in examples])
            assert rescored == pytest.approx(logged["metrics"], rel=1e-9, abs=1e-9), (rid, scope)
