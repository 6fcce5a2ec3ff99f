"""The default filter leaves output projections and task heads dense, found by what the model says about itself
(get_output_embeddings, tied weights, Hugging Face's base_model), not only by the name `lm_head`."""
import pytest
import torch

import spdf
from spdf.sparsity import sparse_layers

transformers = pytest.importorskip("transformers")


def _pythia():
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.GPTNeoXForCausalLM(cfg)


def _bert_config():
    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32)


def _name_of(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_pythia_output_projection_stays_dense():
    # transformers 4.x calls it `embed_out`, 5.x `lm_head`: found through get_output_embeddings() either way
    torch.manual_seed(0)
    model = _pythia()
    head = model.get_output_embeddings()
    name = _name_of(model, head)
    spdf.sparsify(model, sparsity=0.75)
    layers = sparse_layers(model)
    assert name not in layers and type(model.get_submodule(name)) is torch.nn.Linear
    # every attention and MLP projection is sparse
    assert {n.split(".")[-1] for n in layers} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert len(layers) == 2 * 4


def test_bert_mlm_untied_decoder_and_its_head_stay_dense():
    torch.manual_seed(0)
    cfg = _bert_config()
    cfg.tie_word_embeddings = False
    model = transformers.BertForMaskedLM(cfg)
    decoder = model.cls.predictions.decoder
    assert model.get_output_embeddings() is decoder
    assert decoder.weight is not model.bert.embeddings.word_embeddings.weight
    spdf.sparsify(model, sparsity=0.75)
    layers = sparse_layers(model)
    assert not any(n.startswith("cls.") for n in layers)  # decoder and the head's transform stay dense
    assert type(decoder) is torch.nn.Linear
    assert layers and all(n.startswith("bert.encoder.layer.") for n in layers)
    assert len(layers) == 2 * 6  # Q, K, V, attention output, intermediate, output


def test_bert_classifier_and_pooler_stay_dense():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config())
    spdf.sparsify(model, sparsity=0.75)
    layers = sparse_layers(model)
    assert not any("pooler" in n or "classifier" in n for n in layers)
    assert len(layers) == 2 * 6
    with torch.no_grad():  # still runs
        out = model(torch.randint(0, 64, (2, 8))).logits
    assert out.shape == (2, 2)


class _VocabModel(torch.nn.Module):
    """Not Hugging Face: a model naming its output projection `vocab_proj` and saying so."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
        self.vocab_proj = torch.nn.Linear(16, 50)

    def get_output_embeddings(self):
        return self.vocab_proj


def test_any_model_naming_its_output_projection_keeps_it_dense():
    model = _VocabModel()
    spdf.sparsify(model, sparsity=0.5)
    assert set(sparse_layers(model)) == {"body.0", "body.1"}


def test_an_explicit_filter_can_still_choose_a_head():
    model = _VocabModel()
    spdf.sparsify(model, sparsity=0.5, param_filter=["vocab_proj.weight"])
    assert set(sparse_layers(model)) == {"vocab_proj"}
