"""spdf.GPT <-> Hugging Face GPT-2: `spdf export --format hf` loads in transformers offline, and a GPT-2 directory
reads as an spdf export (what `spdf finetune --from` uses)."""
import pytest
import torch

import spdf
from spdf.cli import main
from spdf.export import CheckpointError, read_export, sparse_model, write_export

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


@pytest.fixture
def tokenizer_file(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _greedy(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_export_hf_loads_offline_with_same_logits_generation_and_masks(make_gpt, tokenizer_file, tmp_path, offline):
    model = make_gpt().eval()
    sp = spdf.sparsify(model, sparsity=0.5, seed=2)
    export = write_export(model, tmp_path / "export", tokenizer_file)
    assert main(["export", str(export), str(tmp_path / "hf"), "--format", "hf"]) == 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>" and hf.config.eos_token_id == 0
    # batches pad (with GPT-2's end-of-text token) and truncation stops at the model's positions
    assert tok.pad_token == tok.eos_token and tok.model_max_length == model.config.n_ctx == hf.config.n_positions
    ids = torch.tensor([tok("the cat sat on a mat")["input_ids"]])
    assert ids.tolist() == [[2, 3, 4, 5, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=1e-5, atol=1e-5)
    generated = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(generated, _greedy(model, ids, 6))

    loaded, sp2 = spdf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "hf")
    assert sp2.masks().keys() == sp.masks().keys()
    for name, mask in sp.masks().items():  # spdf's (out, in) masks; GPT-2's Conv1D stores (in, out)
        assert torch.equal(sp2.masks()[name], mask.t()), name


def test_export_hf_refuses_what_gpt2_cannot_hold(make_gpt, tmp_path, capsys):
    write_export(make_gpt(bias=False), tmp_path / "export")
    assert main(["export", str(tmp_path / "export"), str(tmp_path / "hf")]) == 2
    assert "does not map onto Hugging Face GPT-2" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def _hf_gpt2(**overrides):
    torch.manual_seed(0)
    config = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, **overrides})).eval()


def test_a_hf_gpt2_directory_reads_as_an_spdf_model(tmp_path, tokenizer_file, offline):
    hf = _hf_gpt2()
    hf.save_pretrained(tmp_path / "hf")
    exported = read_export(tmp_path / "hf")
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(exported.model.eval()(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert exported.masks == {} and exported.tokenizer_path is None

    # a sparse GPT-2 saved by spdf: spdf's loader (as `spdf finetune --from` runs it) gets its masks back
    sp = spdf.sparsify(hf, sparsity=0.75, seed=5)
    spdf.save_pretrained(hf, tmp_path / "sparse", sparsifier=sp)
    model, sparsifier = sparse_model(tmp_path / "sparse", spdf.GPT(exported.model.config))
    for name, mask in sp.masks().items():  # HF's (in, out) Conv1D masks; spdf's layers are (out, in)
        assert torch.equal(sparsifier.masks()[name], mask.t()), name
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(activation_function="relu"), "activation_function"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(resid_pdrop=0.1), "one dropout rate"),
])
def test_gpt2_variants_spdf_cannot_compute_are_refused(tmp_path, overrides, message):
    _hf_gpt2(**overrides).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        read_export(tmp_path)
