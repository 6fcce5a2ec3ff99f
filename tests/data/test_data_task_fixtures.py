"""Every task loader on a few hand-written rows in the datasets' real schema (tests/fixtures), network blocked.

The Hub path is exercised too: `datasets` itself reads the same fixture files (its JSON loader keeps the nesting
the Hub's features give, e.g. `lex` as a dict of lists), and the loader gets those rows as it would get the Hub's.
"""
from pathlib import Path

import pytest

from spdf.data import TASKS, FinetuneDataset, TaskSpec, load_finetune_task
from spdf.data import tasks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCAL = {"e2e": "e2e_nlg", "webnlg": "web_nlg", "dart": "dart"}
# (task, split) -> references per input, in file order
EXPECTED_GROUPS = {
    ("e2e", "train"): [2, 2], ("e2e", "validation"): [2, 1], ("e2e", "test"): [3, 2, 1],
    ("webnlg", "train"): [2, 1], ("webnlg", "validation"): [2], ("webnlg", "test"): [3, 2],
    ("dart", "train"): [1, 2], ("dart", "validation"): [1], ("dart", "test"): [3, 2],
}


@pytest.mark.parametrize("task, split", sorted(EXPECTED_GROUPS))
def test_data_to_text_fixture_groups_every_reference_of_an_input(task, split, offline, small_tokenizer):
    spec = TaskSpec(task=task, path=str(FIXTURES / LOCAL[task] / "{split}.jsonl"))
    examples = load_finetune_task(spec, split)
    assert [len(e.references) for e in examples] == EXPECTED_GROUPS[(task, split)]
    assert len({e.prompt for e in examples}) == len(examples)  # one entry per input
    for e in examples:
        assert e.prompt.startswith("Data: ") and e.prompt.endswith("\nText:") and e.completion == e.references[0]
    # training: one row per (input, reference)
    assert len(FinetuneDataset(examples, small_tokenizer, max_len=64)) == sum(EXPECTED_GROUPS[(task, split)])


def test_fixture_prompts_follow_each_schema(offline):
    e2e = load_finetune_task(TaskSpec(task="e2e", path=str(FIXTURES / "e2e_nlg/{split}.jsonl")), "test")
    assert e2e[0].prompt == "Data: name[Blue Spice], eatType[coffee shop], area[city centre]\nText:"
    web = load_finetune_task(TaskSpec(task="webnlg", path=str(FIXTURES / "web_nlg/{split}.jsonl")), "test")
    assert web[1].prompt == ("Data: Akron,_Ohio | country | United_States ; Akron,_Ohio | isPartOf | "
                             "Summit_County,_Ohio\nText:")
    dart = load_finetune_task(TaskSpec(task="dart", path=str(FIXTURES / "dart/{split}.jsonl")), "test")
    assert dart[0].prompt == "Data: The Mill | eatType | pub ; The Mill | area | riverside\nText:"
    assert dart[0].references[2] == "The Mill pub is in the riverside area."


@pytest.mark.parametrize("task", sorted(LOCAL))
def test_hub_rows_as_datasets_gives_them_load_like_the_local_file(task, offline, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    asked = []

    def load_from_fixture(name, config, split, streaming, offline_hint=None):
        asked.append((name, config, split))
        ours = {"dev": "validation"}.get(split, split)
        return datasets.load_dataset("json", data_files=str(FIXTURES / LOCAL[task] / f"{ours}.jsonl"),
                                     split="train", cache_dir=str(tmp_path))

    monkeypatch.setattr(tasks, "load_hf", load_from_fixture)
    for split in ("train", "validation", "test"):
        hub = load_finetune_task(TaskSpec(task=task), split)
        local = load_finetune_task(TaskSpec(task=task, path=str(FIXTURES / LOCAL[task] / "{split}.jsonl")), split)
        assert hub.examples == local.examples
    hub = TASKS[task].pairs  # the task's registered loader: its Hub dataset, config and split names
    assert asked == [(hub.dataset, hub.config, hub.hub_split(s)) for s in ("train", "validation", "test")]
    assert {s: hub.hub_split(s) for s in ("validation", "test")} == ({"validation": "dev", "test": "test"}
                                                                    if task == "webnlg" else
                                                                    {"validation": "validation", "test": "test"})


def test_curation_csv_as_its_scraper_writes_it(offline):
    spec = TaskSpec(task="curation", path=str(FIXTURES / "curation/curation-corpus-base-with-articles.csv"),
                    validation_fraction=0.4)
    train, val = load_finetune_task(spec, "train"), load_finetune_task(spec, "validation")
    assert len(train) + len(val) == 5 and len(val) >= 1  # the row whose article could not be fetched is skipped
    for e in [*train, *val]:
        assert e.prompt.startswith("Article: ") and e.prompt.endswith("\nSummary:") and len(e.references) == 1
    assert "Page gone" not in str([e.references for e in [*train, *val]])


def test_a_local_copy_without_split_placeholder_serves_the_split_asked(offline):
    spec = TaskSpec(task="e2e", path=str(FIXTURES / "e2e_nlg/test.jsonl"))
    assert [len(e.references) for e in load_finetune_task(spec, "test")] == [3, 2, 1]
