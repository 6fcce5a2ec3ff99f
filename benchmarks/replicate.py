"""The paper's findings in miniature, with the baseline it leaves out: sparse pre-training vs dense at equal tokens
AND at equal FLOPs, each pre-training fine-tuned densely (SPDF) and, if sparse, sparsely (SPSF).

    python benchmarks/replicate.py                           # the committed results (budget and seeds below)
    python benchmarks/replicate.py --seeds 0 1 2 --jobs 2    # more seeds; finished runs are not redone
    python benchmarks/replicate.py --methods dense static75 --pretrain-steps 100 --finetune-steps 50

Every run is the real `spdf pretrain` / `spdf finetune` of recipes/demo.yaml (tiny GPT, standard-library corpus,
docstring task) in a subprocess, changed only by `--set`: per seed, pre-training dense, 50% and 75% static (random
masks), 75% RigL and SET, 75% in 64x64 blocks and 2:4 (the patterns GPUs run fast), all at the same token budget,
plus a dense run FLOP-matched to the 75% static one (see flop_matched_steps); then each pre-training is fine-tuned
twice from its export (`spdf finetune --from`): densely (init: densify, SPDF) and, when sparse, with its masks kept
(init: keep_masks, SPSF). Pre-training runs once per
method and seed. All runs share one tokenizer and packed-data cache, made first by `spdf prepare`.

Resumable: run dirs live under --work (default runs/replication/<budget hash>/): a run whose phase has finished is
not started again, and a killed run is restarted with the same command, which resumes it from its last checkpoint
(spdf's own resume). Ctrl-C / SIGTERM are passed on to the running spdf processes (they checkpoint and stop); if this
driver is SIGKILLed, its children get SIGTERM from the kernel (PR_SET_PDEATHSIG) and do the same.

Writes benchmarks/results/replication/<run>.json (one raw record per run: budget, command, losses, validation curve,
FLOPs, downstream metrics), replication/<fine-tuning run>-generations.json (every input, its references and the
generations its downstream scores were computed from: downstream_generations.py) and replication/plan.json, then benchmarks/results/replication.md and the PNGs
(replication_report.py, which can also be re-run alone on partial results).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from downstream_generations import write_generations  # beside this script
from spdf.fswrite import write_text_atomic
from machine import cpu_name  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "recipes" / "demo.yaml"

# Pre-training variants: key -> (label, sparsity level, spdf sparsity.method, the method's own settings).
# "dense-flops75" gets its step count from flop_matched_steps; every other variant trains for the full budget.
# block75 and nm24 are the patterns a GPU can run fast (issue 20): what they cost in quality, at the same budget.
PRETRAINS = {
    "dense": ("dense", 0.0, "none", ()),
    "static50": ("static 50%", 0.5, "random", ()),
    "static75": ("static 75%", 0.75, "random", ()),
    "dense-flops75": ("dense, FLOP-matched to static 75%", 0.0, "none", ()),
    "rigl75": ("RigL 75%", 0.75, "rigl", ()),
    "set75": ("SET 75%", 0.75, "set", ()),
    "block75": ("block-64 75%", 0.75, "block", ("sparsity.block_size=64",)),
    "nm24": ("2:4 50%", 0.5, "nm", ("sparsity.n=2", "sparsity.m=4")),
}
FLOP_MATCH_TARGET = 0.75  # the dense-flops75 run spends what a static run at this sparsity spends


@dataclass
class Job:
    id: str
    kind: str                      # "pretrain" or "finetune"
    argv: list[str]                # the spdf command line (after `python -m spdf`)
    run_dir: Path
    steps: int
    info: dict                     # what the raw record says about the run besides spdf's own results
    after: str | None = None       # the pre-training job this fine-tuning starts from
    done_file: Path = field(init=False)

    def __post_init__(self):
        self.done_file = self.run_dir / "phases" / self.kind / "done.json"


def budget_sets(finetune_steps: int) -> list[str]:
    """The demo recipe's fine-tuning at this budget: warm-up 1/10 (the demo's 30 of 300), three validations and
    checkpoints. Pre-training's own settings are pretrain_sets'."""
    f = finetune_steps
    return [f"phases.finetune.steps={f}", f"phases.finetune.schedule.warmup_steps={max(1, f // 10)}",
            f"phases.finetune.eval.every_steps={max(1, f // 3)}",
            f"phases.finetune.checkpoint.every_steps={max(1, f // 3)}"]


def pretrain_sets(steps: int, budget_steps: int) -> list[str]:
    """Pre-training for `steps` steps: warm-up 1/10 (the demo's 80 of 800), then cosine over the rest; validation
    (the loss curves) and checkpoints (what a kill loses) every 1/8 of the full budget, the same steps for all runs."""
    every = max(1, budget_steps // 8)
    return [f"phases.pretrain.steps={steps}", f"phases.pretrain.schedule.warmup_steps={max(1, steps // 10)}",
            f"phases.pretrain.eval.every_steps={every}", f"phases.pretrain.checkpoint.every_steps={every}"]


def load_plan_recipe(sets: list[str]):
    from spdf.recipe import load_recipe

    return load_recipe(DEMO, sets)


def flop_matched_steps(sets: list[str], tokenizer: Path, pretrain_steps: int) -> int:
    """Steps of dense pre-training that spend no more than `pretrain_steps` steps of static 75% sparsity, by spdf's
    analytic FLOPs for the recipe's model and the tokenizer's vocabulary (the logits, which stay dense, count).

    The run gets its own full LR schedule (warm-up, cosine) over these steps rather than being cut out of the long
    dense run: a user with this compute budget would plan the schedule for it, and a cosine cut off mid-way (LR still
    high, no annealing) would handicap the baseline by an amount that has nothing to do with sparsity."""
    from tokenizers import Tokenizer

    from spdf.flops import analytic_flops
    from spdf.recipe import model_config

    recipe = load_plan_recipe(sets)
    seq_len = recipe.phase("pretrain").seq_len
    cfg = model_config(recipe, vocab_size=Tokenizer.from_file(str(tokenizer)).get_vocab_size())
    fb = analytic_flops(cfg, FLOP_MATCH_TARGET, seq_len)
    return math.floor(pretrain_steps * fb.sparse_train / fb.dense_train)


def budget_key(args) -> str:
    """What makes two replications' runs interchangeable (not the seeds or methods: adding one reuses the rest)."""
    payload = json.dumps({"pretrain": args.pretrain_steps, "finetune": args.finetune_steps, "sets": args.sets})
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def plan(args, tokenizer: Path, work: Path) -> list[Job]:
    common = [*budget_sets(args.finetune_steps), *args.sets, "tokenizer.kind=file", f"tokenizer.path={tokenizer}"]
    matched = flop_matched_steps(common, tokenizer, args.pretrain_steps)
    jobs = []
    for seed in args.seeds:
        pretrains, finetunes = [], []
        for key in args.methods:
            label, level, method, own = PRETRAINS[key]
            steps = matched if key == "dense-flops75" else args.pretrain_steps
            sets = [*common, *pretrain_sets(steps, args.pretrain_steps), f"seed={seed}",
                    f"sparsity.method={method}", f"sparsity.level={level}", *own]
            if method in ("rigl", "set"):  # mask updates every 1/8 of the budget until 3/4 of it (50 of 400)
                sets.append(f"sparsity.update_every={max(1, args.pretrain_steps // 8)}")
            info = {"method": key, "label": label, "sparsity": level, "algorithm": method, "seed": seed}
            pre = Job(f"{key}-seed{seed}-pretrain", "pretrain", [], work / f"{key}-seed{seed}", steps, info)
            pre.argv = ["pretrain", str(DEMO), *_set_args([*sets, f"run_dir={pre.run_dir}"])]
            pretrains.append(pre)
            for mode, init in (("spdf", "densify"), ("spsf", "keep_masks")):
                if mode == "spsf" and level == 0.0:
                    continue  # a dense model has no masks to keep
                ft = Job(f"{key}-seed{seed}-{mode}", "finetune", [], work / f"{key}-seed{seed}-{mode}",
                         args.finetune_steps, {**info, "finetune": mode, "init": init}, after=pre.id)
                ft.argv = ["finetune", str(DEMO), "--from", str(pre.run_dir / "phases" / "pretrain"),
                           *_set_args([*sets, f"phases.finetune.init={init}", f"run_dir={ft.run_dir}"])]
                finetunes.append(ft)
        jobs += pretrains + finetunes  # seed by seed: a partial replication has whole seeds to report
    return jobs


def _set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


# ---- running the jobs ---------------------------------------------------------------------------------------------
def _die_with_parent():
    """In the child, before exec: SIGTERM when the driver dies (even by SIGKILL), so no orphan keeps a run's lock."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Pool:
    """Runs jobs as `python -m spdf ...` subprocesses, at most `size` at once, each fine-tuning after its
    pre-training; prints one line per start and finish with an ETA, and every minute the step each run is at."""

    def __init__(self, jobs: list[Job], size: int, env: dict, logs: Path, on_done):
        self.jobs, self.size, self.env, self.logs, self.on_done = jobs, size, env, logs, on_done
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.finished: set[str] = set()
        self.failed: list[str] = []
        self.stopping = False
        self.units_done = 0.0     # steps finished in this session (the ETA's rate)
        self.seconds_done = 0.0   # their wall seconds, summed over parallel runs
        self.start = time.perf_counter()

    def log_path(self, job: Job) -> Path:
        return self.logs / f"{job.id}.log"

    def run(self) -> bool:
        pending = [j for j in self.jobs if j.id not in self.finished]
        total = len(self.jobs)
        last_beat = time.perf_counter()
        while (pending and not self.stopping and not self.failed) or self.running:
            while len(self.running) < self.size and not self.stopping and not self.failed:
                ready = next((j for j in pending if j.after is None or j.after in self.finished), None)
                if ready is None:
                    break
                pending.remove(ready)
                self._launch(ready, total)
            time.sleep(0.5)
            for job_id, (proc, started) in list(self.running.items()):
                if proc.poll() is not None:
                    self._reap(job_id, proc, started, total)
            if time.perf_counter() - last_beat > 60 and self.running:
                last_beat = time.perf_counter()
                print(f"  ... {self._where()}", flush=True)
        return not self.failed and not pending

    def _launch(self, job: Job, total: int) -> None:
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(job), "a")
        log.write(f"$ spdf {' '.join(job.argv)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "spdf", *job.argv], env=self.env, stdout=log, stderr=log,
                                preexec_fn=_die_with_parent)
        log.close()
        self.running[job.id] = (proc, time.perf_counter())
        print(f"[{len(self.finished) + len(self.running)}/{total}] start {job.id} ({job.kind}, {job.steps} steps)",
              flush=True)

    def _reap(self, job_id: str, proc: subprocess.Popen, started: float, total: int) -> None:
        del self.running[job_id]
        job = next(j for j in self.jobs if j.id == job_id)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            if not self.stopping:
                self.failed.append(job_id)
            tail = self.log_path(job).read_text(errors="replace").splitlines()[-15:]
            print(f"  {job_id} exited {proc.returncode} after {seconds:.0f} s; log {self.log_path(job)}:\n    "
                  + "\n    ".join(tail), flush=True)
            return
        self.finished.add(job_id)
        self.on_done(job)
        self.units_done += job.steps
        self.seconds_done += seconds
        print(f"[{len(self.finished)}/{total}] done {job_id} in {seconds / 60:.1f} min; {self._eta()}", flush=True)

    def _eta(self) -> str:
        elapsed = (time.perf_counter() - self.start) / 60
        left = sum(j.steps for j in self.jobs if j.id not in self.finished)
        if not self.units_done or not left:
            return f"{elapsed:.1f} min elapsed"
        per_unit = self.seconds_done / self.units_done / min(self.size, len(self.jobs))
        return f"{elapsed:.1f} min elapsed, about {left * per_unit / 60:.0f} min left"

    def _where(self) -> str:
        parts = []
        for job_id in self.running:
            job = next(j for j in self.jobs if j.id == job_id)
            steps = re.findall(r"step (\d+)/(\d+)", self.log_path(job).read_text(errors="replace")[-2000:])
            parts.append(f"{job_id} at step {steps[-1][0]}/{steps[-1][1]}" if steps else f"{job_id} starting")
        return "; ".join(parts) + f" ({self._eta()})"

    def stop(self, signum, _frame) -> None:
        if self.stopping:  # a second signal: do not wait for checkpoints
            for proc, _ in self.running.values():
                proc.kill()
            sys.exit(128 + signum)
        self.stopping = True
        print(f"stopping: passing signal {signum} to {len(self.running)} run(s); they checkpoint and exit "
              f"(run the same command again to continue)", flush=True)
        for proc, _ in self.running.values():
            proc.send_signal(signal.SIGTERM)


# ---- raw per-run records ------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def raw_record(job: Job, budget: dict) -> dict:
    """One run's record: what it was, the command, and spdf's own results (done.json, metrics.jsonl)."""
    done = json.loads(job.done_file.read_text())
    records = read_jsonl(job.run_dir / "metrics.jsonl")
    phase = [r for r in records if r.get("phase") == job.kind]
    logged = [(0, 0.0)] + [(r["step"], r["flops_spent"]) for r in phase if "flops_spent" in r]
    # cumulative FLOPs at each validation, interpolated between the logged steps around it (exact where a log and a
    # validation share the step, as they do at the default budget; per-step FLOPs only change at mask updates)
    flops_at = lambda step: float(numpy.interp(step, *zip(*logged)))  # noqa: E731
    curve = [{"step": r["step"], "tokens": r["tokens"], "flops_spent": flops_at(r["step"]), "val_loss": r["val_loss"]}
             for r in phase if "val_loss" in r]
    out = {"id": job.id, "kind": job.kind, **job.info, "budget": budget, "pretrain_run": job.after,
           "command": "spdf " + " ".join(os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a
                                          for a in job.argv),
           "steps": done["steps"], "tokens": done["tokens"], "val_loss_before": done["val_loss_before"],
           "val_loss_after": done["val_loss_after"], "flops_spent": done["flops_spent"],
           "flops_dense_equivalent": done["flops_dense_equivalent"], "train_seconds": done["train_seconds"],
           "val_curve": curve}
    if job.kind == "finetune":
        out["downstream_before"] = done.get("downstream_before")
        out["downstream_after"] = done.get("downstream_after")
    return out


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def prepare(work: Path, sets: list[str], env: dict) -> Path:
    """The shared tokenizer and packed pre-training data (`spdf prepare`, itself resumable); returns the tokenizer."""
    run_dir = work / "prepare"
    tokenizer = run_dir / "tokenizer.json"
    if not tokenizer.is_file() or not (run_dir / ".prepared").is_file():
        print(f"preparing the tokenizer and data cache in {run_dir}", flush=True)
        cmd = [sys.executable, "-m", "spdf", "prepare", str(DEMO), *_set_args([*sets, f"run_dir={run_dir}"])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"spdf prepare failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        (run_dir / ".prepared").write_text("")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])  # the committed results' budget
    ap.add_argument("--methods", nargs="+", default=list(PRETRAINS), choices=list(PRETRAINS))
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=120)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each with --threads torch threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="any other recipe override, applied to every run (e.g. a smaller model)")
    ap.add_argument("--work", type=Path, default=None, help="run directories (default runs/replication/<budget>)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if "dense-flops75" in args.methods and "static75" not in args.methods:
        ap.error("--methods: dense-flops75 is matched to static75; include static75 too")

    work = (args.work or REPO / "runs" / "replication" / budget_key(args)).resolve()
    raw_dir = args.out / "replication"
    for d in (work / "logs", raw_dir):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               SPDF_CACHE_DIR=str(work / "cache"), PYTHONUNBUFFERED="1")
    base_sets = [*budget_sets(args.finetune_steps), *pretrain_sets(args.pretrain_steps, args.pretrain_steps),
                 *args.sets]
    resuming = (work / "prepare" / ".prepared").is_file()  # else a fresh start: earlier sessions are not this one's
    tokenizer = prepare(work, base_sets, env)
    jobs = plan(args, tokenizer, work)
    budget = {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
              "flop_matched_steps": next((j.steps for j in jobs if j.info["method"] == "dense-flops75"), None),
              "sets": args.sets, "jobs": args.jobs, "threads": args.threads,
              "work": os.path.relpath(work, REPO) if work.is_relative_to(REPO) else str(work)}
    plan_file = raw_dir / "plan.json"
    sessions = []  # wall time and load of every invocation of this replication (a resumed one has several)
    if resuming and plan_file.is_file():
        earlier = json.loads(plan_file.read_text())
        sessions = earlier.get("sessions", []) if earlier.get("budget", {}).get("work") == budget["work"] else []
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": os.getloadavg()[0],
               "cpu": cpu_name(), "cpus": os.cpu_count()}
    sessions.append(session)
    plan_data = {"budget": budget, "seeds": args.seeds, "methods": args.methods, "runs": [j.id for j in jobs],
                 "command": "python benchmarks/replicate.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "sessions": sessions}
    write_json(plan_file, plan_data)
    started = time.perf_counter()

    by_id = {job.id: job for job in jobs}

    def record(job: Job) -> None:
        write_json(raw_dir / f"{job.id}.json", raw_record(job, budget))
        generations = raw_dir / f"{job.id}-generations.json"
        if job.kind == "finetune" and not generations.is_file():  # what its downstream scores were computed from
            write_generations(job.run_dir, generations, by_id[job.after].run_dir / "phases" / "pretrain" / "export")

    pool = Pool(jobs, args.jobs, env, work / "logs", on_done=record)
    for job in jobs:  # finished in an earlier session: only (re)write the record
        if job.done_file.is_file():
            pool.finished.add(job.id)
            record(job)
    already = len(pool.finished)
    print(f"{len(jobs)} runs ({already} already finished) in {work}; {args.jobs} at once, "
          f"{args.threads} thread(s) each; dense FLOP-matched run: {budget['flop_matched_steps']} steps", flush=True)
    previous = {sig: signal.signal(sig, pool.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ok = pool.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    session.update(wall_seconds=time.perf_counter() - started, load_after=os.getloadavg()[0],
                   runs_run=len(pool.finished) - already)
    write_json(plan_file, plan_data)
    if pool.stopping:
        return 130
    if not ok:
        print(f"failed: {', '.join(pool.failed)}; fix and run the same command again to continue", flush=True)
        return 1
    from replication_report import write_report  # beside this script

    write_report(raw_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
