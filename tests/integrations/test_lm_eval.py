"""lm-evaluation-harness reads `spdf export --format hf` output offline, on a local task file, and scores what spdf
itself computes."""
import json
import math

import pytest
import torch

import spdf
from spdf.cli import main
from spdf.export import write_export

lm_eval = pytest.importorskip("lm_eval")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
DOCS = [{"context": "the cat sat on", "target": " a mat"}, {"context": "the dog", "target": " ran"}]
TASK = """task: spdf_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_lm_eval_scores_an_exported_model_offline(family, make_gpt, tmp_path, offline):
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    if family == "llama":  # exported as a Hugging Face LlamaForCausalLM
        torch.manual_seed(0)
        model = spdf.Llama.from_name("llama-tiny-test").eval()
    else:
        model = make_gpt().eval()
    spdf.sparsify(model, sparsity=0.5)
    write_export(model, tmp_path / "export", tmp_path / "tokenizer.json")
    assert main(["export", str(tmp_path / "export"), str(tmp_path / "hf")]) == 0
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))

    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                      tasks=["spdf_tiny"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      device="cpu", batch_size=1, bootstrap_iters=0)
    # the same perplexity from spdf's own model: exp(-mean over documents of the target's log-likelihood)
    lls = []
    for doc in DOCS:
        context, target = (tok.encode(doc[k]).ids for k in ("context", "target"))
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1])[0].double(), dim=-1)[0]
        lls.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(target)))
    expected = math.exp(-sum(lls) / len(lls))
    assert results["results"]["spdf_tiny"]["perplexity,none"] == pytest.approx(expected, rel=1e-4)
