"""spdf.eval.metrics and its `evaluate` modules against the packages that define each metric, offline.

The references are grouped per input with 2, 1, 3 and 2 references, so every comparison covers multi-reference
scoring with unequal reference counts. METEOR starts a JVM (seconds): the suite starts two, ours (cached by
spdf.eval.metrics) and the one pycocoevalcap's own scorer needs for the comparison.
"""
import math
import os
import shutil
import socket
import stat
import sys
import urllib.request

import pytest
import sacrebleu
from nltk.translate.nist_score import corpus_nist
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from spdf.eval import metrics

PREDICTIONS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Zizzi serves French food in the City centre",
    "the Punter is a family-friendly pub, rated 5 out of 5.",
    "Loch Fyne",
]
REFERENCES = [
    ["The Eagle is a low-priced coffee shop near Burger King.", "Near Burger King is The Eagle, a cheap coffee shop."],
    ["Zizzi is a French restaurant in the city centre."],
    ["The Punter is a family friendly pub with a rating of 5 out of 5.",
     "Rated 5 out of 5, the Punter pub welcomes families.", "The Punter, a pub near the river, is kid friendly."],
    ["Loch Fyne is a seafood restaurant.", "Loch Fyne serves seafood."],
]
# The same references as sacrebleu takes them: one stream per reference position, None where an input has fewer.
STREAMS = [
    [REFERENCES[0][0], REFERENCES[1][0], REFERENCES[2][0], REFERENCES[3][0]],
    [REFERENCES[0][1], None, REFERENCES[2][1], REFERENCES[3][1]],
    [None, None, REFERENCES[2][2], None],
]


def tokens(text: str, lowercase: bool = True) -> list[str]:
    return Tokenizer13a()(text.lower() if lowercase else text).split()


def no_java_path(tmp_path) -> str:
    """A PATH with the usual tools' folders minus every one that holds `java`."""
    folders = [d for d in os.environ["PATH"].split(os.pathsep) if d and not os.path.exists(os.path.join(d, "java"))]
    return os.pathsep.join([str(tmp_path), *folders])


@pytest.fixture(scope="module")
def coco_meteor():
    scorer = Meteor()
    yield scorer
    del scorer


# ------------------------------------------------------------------------------------- against the packages

@pytest.mark.parametrize("lowercase", [True, False])
def test_sacrebleu_metrics_match_sacrebleu(lowercase):
    assert metrics.bleu(PREDICTIONS, REFERENCES, lowercase=lowercase) == pytest.approx(
        sacrebleu.BLEU(lowercase=lowercase, tokenize="13a").corpus_score(PREDICTIONS, STREAMS).score, abs=1e-12)
    assert metrics.chrf(PREDICTIONS, REFERENCES, lowercase=lowercase) == pytest.approx(
        sacrebleu.CHRF(lowercase=lowercase).corpus_score(PREDICTIONS, STREAMS).score, abs=1e-12)
    assert metrics.ter(PREDICTIONS, REFERENCES, lowercase=lowercase) == pytest.approx(
        sacrebleu.TER(normalized=True, case_sensitive=not lowercase).corpus_score(PREDICTIONS, STREAMS).score,
        abs=1e-12)


def test_case_and_tokenisation_are_parameters():
    # The fixture's casing differs from its references ("City centre"), so case-sensitive BLEU must be lower.
    assert metrics.bleu(PREDICTIONS, REFERENCES, lowercase=False) < metrics.bleu(PREDICTIONS, REFERENCES)
    assert metrics.bleu(PREDICTIONS, REFERENCES, tokenize="none") == pytest.approx(
        sacrebleu.BLEU(lowercase=True, tokenize="none").corpus_score(PREDICTIONS, STREAMS).score, abs=1e-12)
    assert metrics.ter(PREDICTIONS, REFERENCES, tokenize="none") == pytest.approx(
        sacrebleu.TER(normalized=False).corpus_score(PREDICTIONS, STREAMS).score, abs=1e-12)


def test_rouge_matches_rouge_score_best_reference_per_input():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    best = [scorer.score_multi(refs, pred) for pred, refs in zip(PREDICTIONS, REFERENCES)]
    ours = metrics.rouge(PREDICTIONS, REFERENCES)
    for name, key in [("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rouge_l", "rougeL")]:
        assert ours[name] == pytest.approx(100 * sum(s[key].fmeasure for s in best) / len(best), abs=1e-12)
    # Max over references: each input scores as it does against its single best reference.
    per_input_best = [[max(refs, key=lambda r: scorer.score(r, p)["rougeL"].fmeasure)]
                      for p, refs in zip(PREDICTIONS, REFERENCES)]
    assert metrics.rouge(PREDICTIONS, per_input_best, types=["rouge_l"])["rouge_l"] == pytest.approx(ours["rouge_l"])
    assert metrics.rouge(PREDICTIONS, [refs[:1] for refs in REFERENCES])["rouge_l"] < ours["rouge_l"]


def test_nist_matches_nltk():
    refs = [[tokens(r) for r in group] for group in REFERENCES]
    hyps = [tokens(p) for p in PREDICTIONS]
    assert metrics.nist(PREDICTIONS, REFERENCES) == pytest.approx(corpus_nist(refs, hyps, n=5), abs=1e-12)


def test_nist_counts_missing_orders_as_zero_where_nltk_divides_by_zero():
    preds, refs = ["Loch Fyne", "a pub"], [["Loch Fyne is a seafood restaurant."], ["The Punter is a pub."]]
    with pytest.raises(ZeroDivisionError):  # why spdf asks nltk only for the orders the predictions have
        corpus_nist([[tokens(r) for r in g] for g in refs], [tokens(p) for p in preds], n=5)
    assert metrics.nist(preds, refs) == pytest.approx(
        corpus_nist([[tokens(r) for r in g] for g in refs], [tokens(p) for p in preds], n=2), abs=1e-12)
    assert metrics.nist(["", ""], refs) == 0.0


def test_cider_matches_pycocoevalcap():
    gts = {i: [" ".join(tokens(r)) for r in group] for i, group in enumerate(REFERENCES)}
    res = {i: [" ".join(tokens(p))] for i, p in enumerate(PREDICTIONS)}
    expected, _ = Cider().compute_score(gts, res)
    assert metrics.cider(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-12)
    assert expected > 0


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's METEOR needs java (spdf's own then says "
                                                          "'skipped: needs java', tested below)")
def test_meteor_matches_pycocoevalcap(coco_meteor):
    expected, _ = coco_meteor.compute_score(dict(enumerate(REFERENCES)), {i: [p] for i, p in enumerate(PREDICTIONS)})
    assert metrics.meteor(PREDICTIONS, REFERENCES) == pytest.approx(100 * expected, abs=1e-9)
    assert 0 < expected < 1
    # Newlines and '|||' would break pycocoevalcap's line protocol with the JVM; they are turned into spaces.
    assert metrics.meteor(["The Eagle is\na cheap ||| coffee shop."], [["The Eagle is a cheap coffee shop."]]) \
        == metrics.meteor(["The Eagle is a cheap coffee shop."], [["The Eagle is a cheap coffee shop."]])


def test_perfect_predictions_score_perfectly():
    refs = [[group[-1], group[0]] for group in REFERENCES]
    scores = metrics.compute_metrics(["bleu", "chrf", "ter", "rouge1", "rouge2", "rouge_l"],
                                     [group[0] for group in REFERENCES], refs)
    assert scores == pytest.approx({"bleu": 100, "chrf": 100, "ter": 0, "rouge1": 100, "rouge2": 100, "rouge_l": 100})


# ------------------------------------------------------------------------------------------- the metric set

def test_every_task_set_is_computed_in_order_from_the_metric_functions():
    for task, names in metrics.TASK_METRICS.items():
        scores = metrics.compute_metrics(names, PREDICTIONS, REFERENCES)
        assert tuple(scores) == names, task
        assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values()), (task, scores)
    e2e = metrics.compute_metrics(metrics.TASK_METRICS["e2e"], PREDICTIONS, REFERENCES)
    assert e2e == {"bleu": metrics.bleu(PREDICTIONS, REFERENCES), "nist": metrics.nist(PREDICTIONS, REFERENCES),
                   "meteor": metrics.meteor(PREDICTIONS, REFERENCES),
                   "rouge_l": metrics.rouge(PREDICTIONS, REFERENCES)["rouge_l"],
                   "cider": metrics.cider(PREDICTIONS, REFERENCES)}


def test_perplexity_from_mean_token_loss():
    assert metrics.perplexity(math.log(7.5)) == pytest.approx(7.5)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mean token loss"):
            metrics.perplexity(bad)


# -------------------------------------------------------------------------------- evaluate modules, offline

def test_offline_fixture_blocks_the_network(offline):
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(OSError):
        urllib.request.urlopen("https://huggingface.co", timeout=1)


@pytest.mark.parametrize("family", sorted(metrics.MODULE_FAMILIES))
def test_evaluate_modules_load_by_path_and_equal_the_functions(family, offline, tmp_path):
    module = metrics.load_metric(family, cache_dir=str(tmp_path))
    assert module.name == family
    got = module.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert got == metrics.compute_metrics(metrics.MODULE_FAMILIES[family], PREDICTIONS, REFERENCES)


def test_evaluate_module_per_metric_config_and_options(offline, tmp_path):
    ter = metrics.load_metric("ter", cache_dir=str(tmp_path))
    got = ter.compute(predictions=PREDICTIONS, references=REFERENCES, lowercase=False, tokenize="none")
    assert got == {"ter": metrics.ter(PREDICTIONS, REFERENCES, lowercase=False, tokenize="none")}
    with pytest.raises(ValueError, match="unknown config_name 'rouge1' for spdf_bleu.*bleu, chrf, ter"):
        import evaluate
        evaluate.load(metrics.module_path("spdf_bleu"), config_name="rouge1", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown metric 'sacrebleu'.*spdf_bleu"):
        metrics.load_metric("sacrebleu")


# ------------------------------------------------------------------------------------------ METEOR and Java

def test_meteor_without_java_is_skipped_not_made_up(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("PATH", no_java_path(tmp_path))
    assert metrics.meteor(PREDICTIONS, REFERENCES) == metrics.NEEDS_JAVA == "skipped: needs java"
    e2e = metrics.compute_metrics(metrics.TASK_METRICS["e2e"], PREDICTIONS, REFERENCES)
    assert e2e["meteor"] == "skipped: needs java"
    assert all(isinstance(e2e[n], float) for n in ("bleu", "nist", "rouge_l", "cider"))
    module = metrics.load_metric("spdf_meteor", cache_dir=str(tmp_path / "cache"))
    assert module.compute(predictions=PREDICTIONS, references=REFERENCES) == {"meteor": "skipped: needs java"}


def test_meteor_with_a_broken_java_is_skipped_not_a_crash(monkeypatch, tmp_path):
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\nexit 1\n")
    fake_java.chmod(fake_java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", no_java_path(tmp_path))
    monkeypatch.setattr(metrics, "_meteor_scorer", None)  # start a fresh (broken) JVM; the real one is restored
    result = metrics.meteor(PREDICTIONS, REFERENCES)
    assert isinstance(result, str) and result.startswith("skipped: METEOR's java process failed")
    assert metrics._meteor_scorer is None


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("names, predictions, references, message", [
    (["bleu"], PREDICTIONS, REFERENCES[:3], "4 predictions but 3 reference groups"),
    (["bleu"], PREDICTIONS, [*REFERENCES[:2], [], REFERENCES[3]], "example 2 has no references"),
    (["bleu", "blue"], PREDICTIONS, REFERENCES, r"unknown metric 'blue'; known metrics: bleu, chrf, ter, rouge1"),
    (["bleu"], [], [], "predictions is empty"),
    (["rouge_l"], PREDICTIONS, [group[0] for group in REFERENCES], r"references\[0\] is a string"),
    (["cider"], PREDICTIONS, [*REFERENCES[:3], ["Loch Fyne", "  "]], r"references\[3\]\[1\] is empty"),
    (["nist"], [*PREDICTIONS[:3], None], REFERENCES, r"predictions\[3\] must be a string"),
    (["bleu"], PREDICTIONS, [*REFERENCES[:3], None], r"references\[3\] must be a list of strings, got NoneType"),
])
def test_bad_input_raises_one_line_value_error(names, predictions, references, message):
    with pytest.raises(ValueError, match=message) as info:
        metrics.compute_metrics(names, predictions, references)
    assert "\n" not in str(info.value)


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match="unknown tokenize 'moses'.*13a"):
        metrics.compute_metrics(["nist"], PREDICTIONS, REFERENCES, tokenize="moses")
    with pytest.raises(ValueError, match="unknown tokenize 'moses'.*13a"):
        metrics.bleu(PREDICTIONS, REFERENCES, tokenize="moses")
    with pytest.raises(ValueError, match="unknown tokenize 'moses'.*13a"):
        metrics.ter(PREDICTIONS, REFERENCES, tokenize="moses")


def test_missing_eval_dependency_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"'sacrebleu'.*pip install 'spdf\[eval\]'"):
        metrics.bleu(PREDICTIONS, REFERENCES)
