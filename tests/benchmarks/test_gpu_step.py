"""benchmarks/gpu_step.py's CPU smoke mode: the script a GPU session will run works end to end before it gets a GPU,
and its CPU output cannot be mistaken for GPU figures."""
from __future__ import annotations

import json


def test_tiny_run_writes_both_files_checks_the_zeros_and_says_it_is_not_a_gpu_run(tmp_path, import_benchmark):
    gpu_step = import_benchmark("gpu_step")  # imports spdf: imported here, not at collection (test_replicate.py)

    res = gpu_step.main(["--tiny", "--device", "cpu", "--profile", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_step.json").read_text())
    md = (tmp_path / "gpu_step.md").read_text()
    assert saved["gpu_figures"] is False and res["gpu_figures"] is False
    assert "NOT GPU FIGURES" in md.splitlines()[0]
    assert set(saved["backends"]) == {"dense", "masked", "compressed", "block", "semi_structured"}
    semi = saved["backends"].pop("semi_structured")  # no 2:4 kernel on a CPU: refused, nothing measured
    assert semi["batches"] == {} and "computes on cuda only" in semi["refused"]
    assert "| semi_structured | refused on this device" in md
    for r in saved["backends"].values():
        assert set(r["batches"]) == {"1", "2"}
        for b in r["batches"].values():
            assert b["ms"] > 0 and b["tokens_per_s"] > 0 and b["after_step"] > 0 and b["peak"] is None
    assert "exactly zero" in saved["backends"]["masked"]["checked"]
    assert "exactly their kept entries" in saved["backends"]["compressed"]["checked"]
    assert "block layers store exactly their kept entries" in saved["backends"]["block"]["checked"]
    dense, comp = (saved["backends"][k]["batches"]["1"]["after_step"] for k in ("dense", "compressed"))
    assert comp < dense  # live memory of the compressed model after a step is below the dense model's
    assert md.count("| masked |") == 2 and md.count("| compressed |") == 2 and md.count("| block |") == 2
    profiles = (tmp_path / "gpu_step_profile.md").read_text()
    assert "NOT GPU FIGURES" in profiles.splitlines()[0]
    assert all(f"## {b}" in profiles for b in ("dense", "masked", "compressed")) and "aten::" in profiles


def test_the_zero_check_catches_a_non_zero_masked_weight(import_benchmark):
    import pytest
    import torch

    import spdf

    gpu_step = import_benchmark("gpu_step")

    model = spdf.GPT.from_name("tiny-test")
    sp = spdf.sparsify(model, gpu_step.SPARSITY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    sp.attach(opt)
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    opt.step()
    layer = next(iter(sp.layers.values()))
    with torch.no_grad():
        layer.weight[~layer.weight_mask] = 1.0
    with pytest.raises(AssertionError, match="masked weight is non-zero"):
        gpu_step.check_zeros(model, opt, "masked")
