import json
import textwrap

import pytest
import torch

from spdf.data import TASKS, DataError, Example, TaskSpec, FinetuneDataset, load_finetune_task, pad_collate
from spdf.data import tasks
from spdf.data.finetune import IGNORE_INDEX, join_target, truncate_pair
from spdf.data.tasks import DOC_PROMPT_END, docstring_examples

MODULE = textwrap.dedent('''
    """Module docstring: not a function."""

    def add(a,
            b=1):
        """Add two numbers.

        Longer explanation that is not the summary.
        """

        total = a + b
        return total

    def undocumented(x):
        return x

    def oneliner(): "Same line docstring."

    class Box:
        def open(self, force=False):
            """
            Open the box, by force if needed.
            """
            if force:
                self.state = "open"

        async def fetch(self):
            \'\'\'Fetch contents asynchronously.\'\'\'
            return await self.get()
''')


def test_docstring_examples_remove_the_docstring_and_keep_its_first_line():
    examples = docstring_examples(MODULE)
    assert [e.completion for e in examples] == [
        "Add two numbers.", "Open the box, by force if needed.", "Fetch contents asynchronously."]
    add, open_, fetch = examples
    assert add.prompt == "def add(a,\n        b=1):\n    total = a + b\n    return total" + DOC_PROMPT_END
    assert open_.prompt.startswith("def open(self, force=False):\n    if force:")  # dedented method
    assert fetch.prompt == "async def fetch(self):\n    return await self.get()" + DOC_PROMPT_END
    for e in examples:
        assert e.references == [e.completion]
        assert e.completion not in e.prompt and '"""' not in e.prompt and "Longer explanation" not in e.prompt
    assert docstring_examples("def broken(:\n") == []
    assert len(docstring_examples(MODULE, max_prompt_lines=1)[0].prompt.splitlines()) == 2


def test_docstring_task_uses_heldout_modules_and_splits_deterministically(monkeypatch):
    parts = []
    real = tasks.stdlib_modules

    def spy(part, *args, **kwargs):
        parts.append(part)
        return real(part, *args, **kwargs)[:15]

    monkeypatch.setattr(tasks, "stdlib_modules", spy)
    train = load_finetune_task(TaskSpec(task="docstring"), "train")
    val = load_finetune_task(TaskSpec(task="docstring"), "validation")
    assert set(parts) == {"heldout"}
    assert len(train) > len(val) > 0
    assert not {(e.prompt, e.completion) for e in train} & {(e.prompt, e.completion) for e in val}
    assert load_finetune_task(TaskSpec(task="docstring"), "train").examples == train.examples
    shorter = load_finetune_task(TaskSpec(task="docstring", max_prompt_lines=3), "validation")
    assert [e.completion for e in shorter] == [e.completion for e in val]  # the split ignores the prompt cap
    assert max(len(e.prompt.splitlines()) for e in shorter) == 4 < max(len(e.prompt.splitlines()) for e in val)
    assert len(load_finetune_task(TaskSpec(task="docstring", max_examples=5), "train")) == 5


def test_rows_mask_the_prompt_and_end_with_eos(small_tokenizer):
    ex = Example("def f(x):\n    return x\n# Summary:", "Return x.", ["Return x.", "Identity."])
    ds = FinetuneDataset([ex], small_tokenizer, max_len=64)
    assert len(ds) == 2  # one row per reference
    n_prompt = len(small_tokenizer.encode(ex.prompt))
    for item, ref in zip(ds, ex.references):
        ids, labels = item["input_ids"], item["labels"]
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert torch.equal(labels[n_prompt:], ids[n_prompt:])
        assert labels[-1].item() == small_tokenizer.eos_id
        assert small_tokenizer.decode(labels[n_prompt:-1].tolist()) == " " + ref
        assert small_tokenizer.decode(ids[:n_prompt].tolist()) == ex.prompt


def test_truncation_cuts_the_prompt_in_the_middle_never_the_whole_completion(small_tokenizer):
    assert truncate_pair([1, 2, 3, 4, 5], [6, 7, 0], 6) == ([3, 4, 5, 6, 7, 0], 3)  # budget 3: head 0, tail 3
    assert truncate_pair(list(range(1, 11)), [20, 0], 10) == ([1, 2, 5, 6, 7, 8, 9, 10, 20, 0], 8)  # head 2, tail 6
    assert truncate_pair([1, 2, 3], [4, 5, 6, 7, 8], 4) == ([3, 4, 5, 6], 1)
    assert truncate_pair([1], [2, 0], 10) == ([1, 2, 0], 1)
    ex = Example("def f(x):" + " word" * 300 + " # Summary:", "Short.", ["Short."])
    item = FinetuneDataset([ex], small_tokenizer, max_len=48)[0]
    assert len(item["input_ids"]) == 48
    text = small_tokenizer.decode(item["input_ids"].tolist())
    assert text.startswith("def f(x):") and text.endswith("word # Summary: Short.")
    assert (item["labels"] != IGNORE_INDEX).sum() == len(small_tokenizer.encode(" Short.")) + 1


def test_pad_collate_pads_to_the_longest_with_ignored_labels(small_tokenizer):
    exs = [Example("a:", "b"), Example("a longer prompt here:", "and a longer completion too")]
    ds = FinetuneDataset(exs, small_tokenizer, max_len=64)
    batch = pad_collate([ds[0], ds[1]], pad_id=small_tokenizer.eos_id)
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(n0, n1))
    assert batch["attention_mask"][0].sum() == n0 and batch["attention_mask"][1].sum() == n1
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n0:] == 0).all()
    assert torch.equal(batch["labels"][1], ds[1]["labels"])


def test_join_target_adds_one_space_only_when_needed():
    assert join_target("Text:", "Hi") == " Hi"
    assert join_target("Text: ", "Hi") == "Hi" and join_target("Text:", " Hi") == " Hi"


def test_jsonl_task_with_split_files_and_references(tmp_path):
    for split, n in (("train", 3), ("validation", 2)):
        rows = [{"prompt": f"{split} {i}:", "completion": f"c{i}", "references": [f"c{i}", f"alt{i}"]}
                for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TaskSpec(task="jsonl", path=str(tmp_path / "{split}.jsonl"))
    train = load_finetune_task(spec, "train")
    assert len(train) == 3 and train[1] == Example("train 1:", "c1", ["c1", "alt1"])
    assert len(load_finetune_task(spec, "validation")) == 2


def test_rows_of_one_input_are_grouped_and_train_one_row_per_reference(tmp_path, small_tokenizer):
    rows = [{"prompt": "p1:", "completion": "a"}, {"prompt": "p2:", "completion": "x"},
            {"prompt": "p1:", "completion": "b", "references": ["b", "a", " c "]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = load_finetune_task(TaskSpec(task="jsonl", path=str(tmp_path / "{split}.jsonl")), "train")
    assert [(e.prompt, e.references) for e in split] == [("p1:", ["a", "b", "c"]), ("p2:", ["x"])]
    assert len(FinetuneDataset(split, small_tokenizer, max_len=16)) == 4  # (input, reference) pairs


def test_single_jsonl_file_is_split_by_hash(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(100)))
    spec = TaskSpec(task="jsonl", path=str(path), prompt_field="q", completion_field="a", validation_fraction=0.2)
    train, val = load_finetune_task(spec, "train"), load_finetune_task(spec, "validation")
    assert len(train) + len(val) == 100 and 5 < len(val) < 40
    assert train[0].references == [train[0].completion]


def test_curation_csv(tmp_path):
    path = tmp_path / "curation.csv"
    path.write_text("url,summary,article_content\n" + "".join(f"u{i},Sum {i}.,Body of article {i}.\n"
                                                              for i in range(40)))
    spec = TaskSpec(task="curation", path=str(path), validation_fraction=0.25)
    train, val = load_finetune_task(spec, "train"), load_finetune_task(spec, "validation")
    assert len(train) + len(val) == 40 and len(val) > 0
    assert train[0].prompt.startswith("Article: Body of article") and train[0].prompt.endswith("\nSummary:")


def _grouped(task, rows, where):
    return tasks.group_references(TASKS[task].pairs.pairs_of(rows, where), task, "train")


def test_data_to_text_mappings_keep_all_references():
    e2e = _grouped("e2e", [
        {"meaning_representation": "name[A], food[Thai]", "human_reference": "A serves Thai."},
        {"meaning_representation": "name[A], food[Thai]", "human_reference": "Thai food at A."},
        {"meaning_representation": "name[B]", "human_reference": "B."}], "e2e")
    assert [(e.prompt, e.references) for e in e2e] == [
        ("Data: name[A], food[Thai]\nText:", ["A serves Thai.", "Thai food at A."]), ("Data: name[B]\nText:", ["B."])]
    web = _grouped("webnlg", [{
        "modified_triple_sets": {"mtriple_set": [["Ab | country | Fr", "Ab | leader | X"]]},
        "lex": {"comment": ["good", "good"], "lid": ["Id1", "Id2"], "text": ["Ab is in Fr.", "X leads Ab, Fr."]}}],
        "webnlg")
    assert web[0].prompt == "Data: Ab | country | Fr ; Ab | leader | X\nText:"
    assert web[0].references == ["Ab is in Fr.", "X leads Ab, Fr."] and web[0].completion == "Ab is in Fr."
    dart = _grouped("dart", [{"tripleset": [["S", "p", "O"], ["S", "q", "P"]],
                                         "annotations": {"source": ["e2e", "e2e"], "text": ["One.", "Two."]}}], "d")
    assert dart[0].prompt == "Data: S | p | O ; S | q | P\nText:" and dart[0].references == ["One.", "Two."]
