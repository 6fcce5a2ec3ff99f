"""Every user-caused problem is a DataError with one line naming the culprit and what is allowed."""
import json
import os
import subprocess
import sys

import pytest

from spdf.data import DataError, DataSpec, TaskSpec, iter_documents, load_finetune_task
from spdf.recipe import RecipeError
from spdf.typed_spec import build


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize("cls, data, pattern", [
    (DataSpec, {"source": "web"}, r"source must be one of 'stdlib', 'files', 'hf', got 'web'"),
    (DataSpec, {"source": "stdlib", "max_byte": 10}, r"unknown key 'max_byte' \(did you mean 'max_bytes'\?\)"),
    (DataSpec, {"source": "stdlib", "part": "train"}, r"part must be one of 'pretrain', 'heldout', got 'train'"),
    (DataSpec, {"source": "stdlib", "heldout_fraction": 1.0}, r"heldout_fraction must be in \[0.0, 1.0\), got 1.0"),
    (DataSpec, {"source": "stdlib", "max_bytes": -5}, r"max_bytes must be >= 1, got -5"),
    (DataSpec, {"source": "files"}, r"paths is required when source is 'files'"),
    (DataSpec, {"source": "files", "paths": ["a"], "heldout_fraction": 0.2},
     r"heldout_fraction is only used when source is 'stdlib' \(source is 'files'\)"),
    (DataSpec, {"source": "hf"}, r"name is required when source is 'hf'"),
    (DataSpec, {"source": "files", "paths": ["a"], "content": "text"},
     r"content is only used when source is 'stdlib' \(source is 'files'\)"),
    (DataSpec, {"source": "stdlib", "content": "prose"}, r"content must be one of 'source', 'text', got 'prose'"),
    (DataSpec, {"val_fraction": 1.5}, r"val_fraction must be in \(0.0, 0.5\), got 1.5"),
    (TaskSpec, {"task": "summarize"}, r"task must be one of 'docstring', 'e2e', .*got 'summarize'"),
    (TaskSpec, {"task": "docstring", "max_examples": 0}, r"max_examples must be >= 1, got 0"),
    (TaskSpec, {"task": "jsonl"}, r"path is required when task is 'jsonl'"),
    (TaskSpec, {"task": "curation", "paths": "x"}, r"unknown key 'paths' \(did you mean 'path'\?\)"),
    (TaskSpec, {"task": "e2e", "prompt_field": "q"},
     r"prompt_field is only used when task is 'jsonl' \(task is 'e2e'\)"),
    (TaskSpec, {"task": "docstring", "name": "x"}, r"name is only used when task is 'e2e' or 'webnlg' or 'dart'"),
])
def test_spec_errors_name_the_key_and_what_is_allowed(cls, data, pattern):
    with pytest.raises(RecipeError, match=pattern) as e:
        build(cls, data)
    _one_line(e)


@pytest.mark.parametrize("source, pattern", [
    (DataSpec(source="files", paths=("/nonexistent/a.txt",)), r"file not found: '/nonexistent/a.txt'"),
    (DataSpec(source="files", paths=("/nonexistent/*.txt",)), r"no file matches '/nonexistent/\*.txt'"),
])
def test_source_errors(source, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        list(iter_documents(source))
    _one_line(e)


def test_file_errors(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.*a.csv'; allowed: .txt .*.jsonl, .parquet"):
        iter_documents(DataSpec(source="files", paths=(str(tmp_path / "a.csv"),)))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: expected a JSON object per line") as e:
        list(iter_documents(DataSpec(source="files", paths=(str(tmp_path / "b.jsonl"),))))
    _one_line(e)
    (tmp_path / "c.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: not valid JSON"):
        list(iter_documents(DataSpec(source="files", paths=(str(tmp_path / "c.jsonl"),))))


@pytest.mark.parametrize("task, split, pattern", [
    (TaskSpec(task="docstring"), "test", r"unknown split 'test' for task 'docstring'; allowed: train, validation"),
    (TaskSpec(task="e2e"), "dev", r"unknown split 'dev' for task 'e2e'; allowed: train, validation, test"),
    (TaskSpec(task="jsonl", path="/nonexistent/{split}.jsonl"), "train", r"task file not found: '.*/train.jsonl'"),
    (TaskSpec(task="curation"), "train", r"this task needs 'path'"),
])
def test_task_errors(task, split, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        load_finetune_task(task, split)
    _one_line(e)


def test_task_bad_field_and_empty_split(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl has no field 'completion'; fields: answer, prompt"):
        load_finetune_task(TaskSpec(task="jsonl", path=str(path)), "train")
    path.write_text("")
    with pytest.raises(DataError, match=r"task 'jsonl' has no examples in split 'train'"):
        load_finetune_task(TaskSpec(task="jsonl", path=str(path)), "train")
    rows = [{"prompt": "p:", "completion": "ok"}, {"prompt": "q:", "completion": " "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"task 'jsonl', split 'train': the input 'q:' has no references") as e:
        load_finetune_task(TaskSpec(task="jsonl", path=str(path), validation_fraction=0.01), "train")
    _one_line(e)


OFFLINE_SCRIPT = r"""
import json, sys
from spdf.data import (DataError, DataSpec, TaskSpec, TokenizerSpec, iter_documents, load_finetune_task,
                       load_or_train_tokenizer, build_packed_splits)
calls = {
    "hf_source": lambda: iter_documents(DataSpec(source="hf", name="monology/pile-uncopyrighted")),
    "hf_pack": lambda: build_packed_splits(DataSpec(source="hf", name="monology/pile-uncopyrighted",
                                                    max_tokens=1000), TOK, sys.argv[1], 16),
    "hub_tokenizer": lambda: load_or_train_tokenizer(TokenizerSpec(kind="hub", name="gpt2"), None, sys.argv[1]),
    "e2e": lambda: load_finetune_task(TaskSpec(task="e2e"), "train"),
    "webnlg": lambda: load_finetune_task(TaskSpec(task="webnlg"), "validation"),
    "dart": lambda: load_finetune_task(TaskSpec(task="dart"), "test"),
}
TOK = load_or_train_tokenizer(TokenizerSpec(vocab_size=300), ["some text " * 50], sys.argv[1] + "/tok")
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = "no error"
    except DataError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


def test_hub_sources_fail_offline_with_a_clear_data_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("hf_source", "hf_pack"):
        assert out[name].startswith("could not load Hugging Face dataset 'monology/pile-uncopyrighted'"), out[name]
        assert "offline? use a local source" in out[name]
    assert out["hub_tokenizer"].startswith("could not fetch tokenizer 'gpt2' from the Hugging Face Hub")
    assert "kind 'train'" in out["hub_tokenizer"]
    assert "'tuetschek/e2e_nlg'" in out["e2e"] and "split 'train'" in out["e2e"]
    assert "'webnlg-challenge/web_nlg' (config 'release_v3.0_en', split 'dev')" in out["webnlg"]
    assert "'Yale-LILY/dart'" in out["dart"] and "split 'test'" in out["dart"]
    for name in ("e2e", "webnlg", "dart"):  # a task's local copy is task.path, not a pre-training source
        assert "give a local copy in the dataset's own schema: task.path" in out[name], out[name]
        assert "--task-path" in out[name] and "'source': 'files'" not in out[name]
    assert all("\n" not in msg for msg in out.values())
    assert {p.name for p in tmp_path.iterdir()} - {"hf"} == {"tok"}  # nothing written for what failed
