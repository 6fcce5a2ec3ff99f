"""Trainer + SparsityCallback: exact sparsity through gradient accumulation, weight decay and clipping, masks in
every checkpoint, and a resumed run bit-identical to an uninterrupted one."""
import json

import pytest
import torch

import spdf

transformers = pytest.importorskip("transformers")
from spdf.integrations.transformers import add_sparsity  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, 96, (32, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model(backend="masked", algorithm=None, arch="gpt2"):
    torch.manual_seed(0)
    if arch == "llama":  # a Llama-style decoder: grouped-query attention, SwiGLU, untied head
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                          max_position_embeddings=16, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    return model, spdf.sparsify(model, sparsity=0.75, seed=1, backend=backend, tile=(8, 8), algorithm=algorithm)


def _trainer(model, sp, out, resume_from=None):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=3, save_strategy="steps", per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    add_sparsity(trainer, sp, resume_from)
    return trainer


def _check_exact(sp):
    for row in sp.stats()[:-1]:
        # regrown weights (SET) start at zero, so a weight can hold more zeros than its mask, never fewer
        assert row["mask_sparsity"] == 0.75 and row["actual"] >= 0.75, row
    for name, layer in sp.layers.items():
        assert not (layer.dense_weight()[~layer.mask] != 0).any(), name


@pytest.mark.parametrize("backend, dynamic, arch", [("masked", False, "gpt2"), ("compressed", False, "gpt2"),
                                                    ("masked", True, "gpt2"), ("masked", False, "llama")])
def test_trainer_keeps_zeros_saves_masks_and_resumes_bit_identically(backend, dynamic, arch, tmp_path, offline):
    algorithm = (lambda: spdf.sparsity.SET(drop_fraction=0.3, every=2)) if dynamic else (lambda: None)
    model, sp = _model(backend, algorithm(), arch)
    masks = sp.masks()
    if arch == "llama":  # the paper's filter on this family: the seven projections of each block, nothing else
        assert sorted({n.split(".")[-2] if n.endswith(".weight") else n.split(".")[-1] for n in masks}) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) and len(masks) == 14
    trainer = _trainer(model, sp, tmp_path)
    trainer.train()
    _check_exact(sp)
    assert sp.step == 6  # optimizer steps, not micro-batches
    moved = [n for n, m in masks.items() if not torch.equal(sp.masks()[n], m)]
    assert (sp.mask_version, bool(moved)) == ((3, True) if dynamic else (0, False))  # SET updates at steps 2, 4, 6
    assert trainer.state.log_history[0]["sparsity"] == 0.75
    final = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = tmp_path / "checkpoint-3"
    assert json.loads((checkpoint / "sparsity.json").read_text())["step"] == 3
    # the checkpoint's weights are dense and right for plain transformers as well
    dense = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    if not dynamic:
        for name, mask in masks.items():
            assert not (dense.get_parameter(name)[~mask] != 0).any(), name
        assert all(row["actual"] == 0.75 for row in sp.stats())

    resumed_model, resumed_sp = _model(backend, algorithm(), arch)
    resumed = _trainer(resumed_model, resumed_sp, tmp_path)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    _check_exact(resumed_sp)
    assert resumed_sp.step == 6
    state = resumed_model.state_dict()
    assert state.keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(state[key], value), key
    assert all(torch.equal(resumed_sp.masks()[n], m) for n, m in sp.masks().items())


def test_resume_from_a_checkpoint_without_masks_is_refused(tmp_path, offline):
    model, sp = _model()
    _trainer(model, sp, tmp_path).train()
    (tmp_path / "checkpoint-3" / "sparsity.json").unlink()
    (tmp_path / "checkpoint-3" / "masks.safetensors").unlink()
    model, sp = _model()
    with pytest.raises(spdf.export.CheckpointError, match="masks are unknown"):
        _trainer(model, sp, tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_resume_from_a_checkpoint_outside_output_dir_needs_resume_from(tmp_path, offline):
    model, sp = _model()
    _trainer(model, sp, tmp_path / "a").train()
    final = {k: v.clone() for k, v in model.state_dict().items()}
    model, sp = _model()
    trainer = _trainer(model, sp, tmp_path / "b")
    with pytest.raises(spdf.export.CheckpointError, match="resume_from"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    model, sp = _model()
    trainer = _trainer(model, sp, tmp_path / "b", resume_from=tmp_path / "a" / "checkpoint-3")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())


@pytest.mark.parametrize("backend, dynamic", [("compressed", False), ("masked", True)])
def test_load_best_model_at_end_gives_the_best_checkpoint_whole(backend, dynamic, tmp_path, offline):
    """The Trainer loads the best checkpoint's dense weights with strict=False: without the callback a compressed
    layer kept its last-step values (and a dynamic mask its last-step mask), a model mixed of two checkpoints."""
    from safetensors.torch import load_file

    model, sp = _model(backend, spdf.sparsity.SET(drop_fraction=0.3, every=2) if dynamic else None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, save_steps=2, eval_steps=2, eval_strategy="steps",
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)  # best: the first
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens())
    add_sparsity(trainer, sp)
    trainer.train()
    best = tmp_path / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    saved = load_file(str(best / "model.safetensors"))
    state = spdf.sparsity.to_dense_state_dict(model.state_dict())
    assert [k for k, v in saved.items() if not torch.equal(state[k], v)] == []
    saved_sp = spdf.from_pretrained(transformers.AutoModelForCausalLM, best)[1]
    assert all(torch.equal(sp.masks()[n], m) for n, m in saved_sp.masks().items())
    assert sp.step == 2
    _check_exact(sp)
