"""The README's headline numbers are the committed results': each is recomputed here from its file under
benchmarks/results/ and looked up, formatted as the README writes it, in the README's text. A result re-measured
without the README being updated (or the reverse) fails here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module")
def readme() -> str:
    # one line per paragraph-wrapped run of text; the README's minus signs as ASCII
    return re.sub(r"\s*\n\s*", " ", (REPO / "README.md").read_text(encoding="utf-8")).replace("−", "-")


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _phase(result: dict, name: str) -> dict:
    return next(p for p in result["phases"] if p["phase"] == name)


def test_demo_time_throughput_losses_and_flops(readme):
    demo = _load("demo.json")
    pre, fine = _phase(demo, "pretrain"), _phase(demo, "finetune")
    assert f"**{demo['wall_seconds'] / 60:.1f} minutes** end to end" in readme
    assert f"{pre['steps']} sparse pre-training steps" in readme and f"{fine['steps']} dense fine-tuning steps" in readme
    assert f"{pre['tokens_per_s'] / 1000:.1f}k tokens/s" in readme
    for p in (pre, fine):
        assert f"validation loss {p['val_loss_before']:.2f} → {p['val_loss_after']:.2f}" in readme
    assert f"pre-training spends {pre['flops_dense_equivalent'] / pre['flops_spent']:.2f}x fewer FLOPs" in readme
    assert f"| {demo['wall_seconds'] / 60:.1f} min (load average {demo['machine']['load_before']:.1f} before and " \
           f"after) | `demo.md` |" in readme
    step_ms = pre["train_seconds"] / pre["steps"] * 1000
    assert f"step takes {step_ms:.0f} ms: {pre['train_seconds']:.0f} s for {pre['steps']} steps in `demo.md`" in readme


@pytest.mark.parametrize("recipe", ["demo", "demo-spsf", "demo-dense"])
def test_demo_downstream_table_rows(readme, recipe):
    result = _load(f"{recipe}.json")
    fine = _phase(result, "finetune")
    m = fine["downstream_after"]["metrics"]
    row = (f"| {fine['val_loss_after']:.3f} | {m['bleu']:.2f} | {m['rouge_l']:.2f} | {m['chrf']:.2f} | "
           f"{result['wall_seconds'] / 60:.1f} min |")
    assert row in readme, row
    if recipe == "demo":
        before = fine["downstream_before"]
        mb = before["metrics"]
        assert (f"| {before['reference_loss']:.3f} | {mb['bleu']:.2f} | {mb['rouge_l']:.2f} | {mb['chrf']:.2f} |"
                in readme)
        assert f"({before['examples']} held-out functions, greedy" in readme


def test_mixture_demo(readme):
    result = _load("demo-mixture.json")
    m = _phase(result, "finetune")["downstream_after"]["metrics"]
    assert (f"BLEU {m['bleu']:.2f}, ROUGE-L {m['rouge_l']:.2f}, chrF {m['chrf']:.2f}, fine-tuning validation loss "
            f"{_phase(result, 'finetune')['val_loss_after']:.3f}") in readme
    assert f"It takes {result['wall_seconds'] / 60:.1f} min" in readme
    assert f"(demo.yaml: {_load('demo.json')['wall_seconds'] / 60:.1f} min)" in readme


def test_adamw_step_overhead(readme):
    fused = (RESULTS / "step_overhead.md").read_text()
    foreach = (RESULTS / "step_overhead_foreach.md").read_text()
    paired = lambda text: float(re.search(r"\| spdf \| [\d.]+ \| [\d.]+ \| [\d.]+x \| ([\d.]+)x \|", text)[1])  # noqa
    assert f"costs about {paired(foreach):.2f}x dense, with the fused kernel {paired(fused):.2f}x" in readme
    assert f"idle machine, separate runs: {paired(foreach):.3f}x vs {paired(fused):.3f}x" in readme


def test_flop_headlines_and_both_conventions(readme):
    rows = {(r["model"], r["sparsity"]): r for r in _load("flops.json")["rows"]}
    xl = rows[("gpt3-xl", 0.75)]
    assert f"**{xl['reduction']:.2f}x** for GPT-3 XL at 75%" in readme
    assert f"which gives **{xl['kaplan_reduction']:.2f}x** for GPT-3 XL at 75%" in readme
    assert f"({rows[('gpt3-xl', 0.5)]['reduction']:.2f}x at 50%; {rows[('gpt3-small', 0.75)]['reduction']:.2f}x for " \
           f"GPT-3 Small at 75%)" in readme
    assert "as Megatron-LM counts it (Narayanan et al. 2021)" in readme and "as in Kaplan" not in readme
    # the demo model's share of weightless matmuls, from its measured saving at 75%: saving = 1 / (f + (1 - f) / 4)
    pre = _phase(_load("demo.json"), "pretrain")
    saving = pre["flops_dense_equivalent"] / pre["flops_spent"]
    assert f"scores are {(1 / saving - 0.25) / 0.75:.0%} of this model's FLOPs, so 75% sparsity saves only " \
           f"{saving:.2f}x" in readme


def test_sparse_methods_and_the_dynamic_mask_reconciliation(readme):
    result = _load("sparse_methods.json")
    losses = {r["method"]: r["val_loss"] for r in result["rows"]}
    order = ["random", "set", "rigl", "gmp"]  # random: static random masks
    assert " / ".join(f"{losses[m]:.3f}" for m in order) in readme
    every = result["budget"]["update_every"]
    assert f"masks updated every {every} steps until step {result['budget']['update_stop']}" in readme
    # the replication's dynamic runs, seed by seed against static
    raw = RESULTS / "replication"
    loss = lambda run: json.loads((raw / f"{run}-pretrain.json").read_text())["val_loss_after"]  # noqa: E731
    rigl = [loss(f"rigl75-seed{s}") - loss(f"static75-seed{s}") for s in range(3)]
    set_ = [loss(f"set75-seed{s}") - loss(f"static75-seed{s}") for s in range(3)]
    assert f"(+{min(rigl):.3f} to +{max(rigl):.3f})" in readme
    assert f"SET level with it ({min(set_):+.3f} to {max(set_):+.3f})" in readme
    plan = json.loads((raw / "rigl75-seed0-pretrain.json").read_text())
    replication_every = int(re.search(r"sparsity\.update_every=(\d+)", plan["command"])[1])
    assert f"with masks updated every {replication_every} steps until step 300" in readme
    # the same run settings in both files: the losses agree to 2e-8 (float summation order across thread counts)
    assert loss("static75-seed0") == pytest.approx(losses["random"], abs=1e-6)
    assert f"same seed-0 static run ({losses['random']:.4f})" in readme
    assert (f"SET goes from {set_[0]:+.3f} (every {replication_every}) to {losses['set'] - losses['random']:+.3f} "
            f"(every {every}), RigL from {rigl[0]:+.3f} to {losses['rigl'] - losses['random']:+.3f}") in readme

def test_replication_gap_table(readme):
    table = (RESULTS / "replication.md").read_text(encoding="utf-8").split("## Gaps to dense pre-training")[1]
    for label in ("static 50%", "static 75%", "RigL 75%", "SET 75%"):
        cells = re.search(rf"\| {re.escape(label)} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", table).groups()
        signed = [c.strip() if c.strip().startswith("-") else "+" + c.strip() for c in cells]
        assert f"| {label} | " in readme and " | ".join(signed) in readme, (label, signed)


def test_mutransfer_and_coord_check(readme):
    rows = _load("mutransfer.json")
    text = (RESULTS / "mutransfer.md").read_text(encoding="utf-8")
    best = re.search(r"SP ([\d.]+) → ([\d.]+) → ([\d.]+); SµPar ([\d.]+) → ([\d.]+) → ([\d.]+)", text).groups()
    assert f"SµPar {best[3]} / {best[4]} / {best[5]} at 0 / 50 / 75%; SP {best[0]} / {best[1]} / {best[2]}" in readme
    assert rows  # the json exists beside the table it was written with
    coord = (RESULTS / "coord_check.md").read_text(encoding="utf-8")
    mup_width = max(float(r[2]) for r in re.findall(r"\| ([\w.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                                                     r"([\d.]+) \|", coord))
    supar = max(float(r[5]) for r in re.findall(r"\| ([\w.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                                                 r"([\d.]+) \|", coord))
    assert f"µP ≤ {mup_width:.2f}" in readme and f"SµPar ≤ {supar:.2f}" in readme


def test_fsdp2_state_per_rank_by_backend(readme):
    ranks = _load("fsdp2_backend_memory.json")["per_rank_bytes"]
    total = {backend: sum(r["total"] for r in rows) for backend, rows in ranks.items()}
    ratio = {backend: f"{total[backend] / total['dense']:.3f}x" for backend in total}
    assert (f"dense {total['dense'] / len(ranks['dense']) / 2 ** 20:.1f} MiB; masked {ratio['masked']}, compressed "
            f"{ratio['compressed']}, block-64 {ratio['block']} |") in readme
    assert f"{ratio['compressed']} dense FSDP2's for compressed, {ratio['block']} for block-64" in readme


def test_live_memory_by_backend_in_both_tables(readme):
    process = {r["backend"]: r["after_step"] for r in _load("memory.json")["process"]}
    ratio = {backend: f"{after / process['dense']:.3f}x" for backend, after in process.items()}
    assert (f"{ratio['compressed']} ({process['compressed'] / 2 ** 20:.1f} vs {process['dense'] / 2 ** 20:.1f} MiB); "
            f"masked {ratio['masked']}; block-64 {ratio['block']} |") in readme
    for pattern, backend in (("unstructured 75%", "masked"), ("unstructured 75%", "compressed"),
                             ("block-64 75%", "block")):
        assert re.search(rf"\| {pattern} \| {backend} \|[^|]*\|[^|]*\| unmeasured / {ratio[backend]} \|", readme), backend


def test_numbers_without_a_committed_source_are_gone(readme):
    for unsourced in ("2.9–3.2", "2.9 min", "14k tokens/s", "1.05–1.08x", "machine load ~9", "9.81 → 6.73",
                      "~1.6x in speed", "2.2 s/step"):
        assert unsourced not in readme, unsourced

