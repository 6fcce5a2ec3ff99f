"""`spdf export --format hf` of a finished run, and `spdf finetune --from` that Hugging Face directory."""
import pytest
import torch

from spdf.cli import main
from tiny_runs import loss_trace, write_recipe

transformers = pytest.importorskip("transformers")


def test_export_hf_of_a_run_then_finetune_from_it_like_from_spdf_export(finished_run, tmp_path, untouched):
    run_dir = finished_run["run_dir"]
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out), "--format", "hf"]) == 0  # the run's last finished phase
    assert main(["export", str(run_dir / "phases/pretrain"), str(out), "--force"]) == 0  # replaces the first
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("def main():")["input_ids"]])
    assert hf.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)
    assert (out / "masks.safetensors").is_file()  # the pre-training export is sparse

    # fine-tuning from the Hugging Face directory starts from the same weights, masks and tokens as the
    # reference's own fine-tuning: the same losses, bit for bit
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "new-run")
    assert main(["finetune", str(recipe), "--from", str(out)]) == 0
    assert loss_trace(tmp_path / "new-run") == loss_trace(run_dir, "finetune")
