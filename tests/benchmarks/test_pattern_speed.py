"""benchmarks/kernel_speed.py's fast-pattern section (pattern_speed.py) end to end on CPU, as the GPU session will run
it: block kernels through the Triton interpreter, every GPU-only implementation recorded as n/a with its reason."""
from __future__ import annotations

import json

import pytest


def test_patterns_only_dry_run_writes_all_three_files_and_never_a_guessed_number(tmp_path, import_benchmark):
    from spdf.kernels.ops import triton_interpreted

    kernel_speed = import_benchmark("kernel_speed")
    kernel_speed.main(["--patterns-only", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "kernels_cpu_patterns.json").read_text())
    md = (tmp_path / "kernels_cpu_patterns.md").read_text()
    assert (tmp_path / "kernels_cpu_patterns.png").stat().st_size > 0
    assert saved["records"] == [] and {r["pattern"] for r in saved["patterns"]} == {"block64", "2:4"}
    assert "CPU dry run" in md and all("not evaluated (no GPU" in g for g in saved["pattern_goals"])
    for r in saved["patterns"]:
        if r["pattern"] == "2:4":  # no 2:4 kernel on CPU: n/a, and why
            assert r["semi_fwd_ratio"] is None and "CUDA" in r["errors"]["semi_fwd"]
            assert "use backend 'masked'" in r["errors"]["semi_layer_step"]
        elif triton_interpreted():
            assert all(r[f"block_{p}_ratio"] > 0 for p in ("fwd", "dx", "dw")) and not r["errors"]
    if not triton_interpreted():
        pytest.skip("the block kernels need TRITON_INTERPRET=1 on CPU: only the 2:4 rows were checked")
