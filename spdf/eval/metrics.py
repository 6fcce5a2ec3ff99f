"""Corpus-level, multi-reference text metrics, computed offline by the packages that define them.

Every number comes from a well-kept package, called as its authors intend: sacrebleu (BLEU, chrF, TER), rouge-score
(ROUGE-1/2/L), nltk (NIST), pycocoevalcap (CIDEr, and METEOR 1.5 on Java). This module only checks the input,
applies the stated text conventions, and calls them. `references[i]` holds every reference of input i; inputs may
have different numbers of references.

Conventions (all keyword arguments of `compute_metrics` and of each metric function):
- `lowercase=True`: case-insensitive throughout, as E2E's official script (mteval-v13a's default), METEOR's `-norm`,
  rouge-score's tokenizer and sacrebleu's TER are anyway; `lowercase=False` makes BLEU, chrF, TER, NIST and CIDEr
  case-sensitive (ROUGE and METEOR always fold case, in their own packages).
- `tokenize="13a"`: sacrebleu's tokenizer name (mteval-v13a's tokenization, the one E2E's BLEU/NIST use); BLEU uses it
  directly, NIST and CIDEr score the tokens it produces, TER runs tercom's normalisation unless `tokenize="none"`.
  ROUGE uses rouge-score's own tokenizer (lowercase, alphanumeric runs); METEOR gets the raw text with `-norm`.
- Scale: BLEU, chrF, TER, METEOR and ROUGE in percent (0–100, as papers print them); NIST and CIDEr as their
  packages give them. Lower is better only for TER.
- ROUGE with several references: per input the reference with the highest F-measure counts (rouge-score's
  `score_multi`; E2E's official ROUGE-L also takes the best over references, maximising precision and recall
  separately), and the corpus score is the mean of those per-input F-measures.

Each metric is one `register_metric` entry at the end of this file (spdf.eval.metric_registry: label, `evaluate`
module, scorer); a task's metrics are named in its own entry (spdf.data.task_registry), read here as TASK_METRICS.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Sequence

from ..data.task_registry import TASKS
from .metric_registry import METRICS, Metric, RegistryView, metric_names, module_families, register_metric

# task -> its metrics, in report order (read from each task's registry entry)
TASK_METRICS = RegistryView(lambda: {name: task.metrics for name, task in TASKS.items()})
# `evaluate` module (metric_modules/<family>/<family>.py) -> the metrics it computes (read from the metric registry)
MODULE_FAMILIES = RegistryView(module_families)

# Our ROUGE names → rouge-score's. rougeL is the summary-level LCS without sentence splitting (not rougeLsum).
_ROUGE_TYPES = {"rouge1": "rouge1", "rouge2": "rouge2", "rouge_l": "rougeL"}
MODULES_DIR = Path(__file__).resolve().parent / "metric_modules"

NEEDS_JAVA = "skipped: needs java"
NIST_MAX_ORDER = 5  # mteval-v13a's and E2E's NIST order


def _import(module: str, package: str):
    """Import an optional dependency, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"spdf's metrics need the package {package!r}: pip install 'spdf[eval]'") from exc


# ---------------------------------------------------------------------------------------------------------- input

def check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ValueError (one line) unless there is one non-empty list of non-empty reference strings per prediction."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise ValueError(f"predictions must be a list of strings, got {type(predictions).__name__}")
    if len(predictions) == 0:
        raise ValueError("predictions is empty: there is nothing to score")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(f"references must be a list of lists of strings, got {type(references).__name__}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference groups: "
                         "give one list of references per prediction")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise ValueError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string; give a list of references per input (e.g. [[ref], ...])")
        if not isinstance(refs, Sequence):
            raise ValueError(f"references[{i}] must be a list of strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"example {i} has no references")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] must be a string, got {type(ref).__name__}")
            # An empty reference makes NIST, CIDEr and TER undefined; it is a data bug, not a hard example.
            if not ref.strip():
                raise ValueError(f"references[{i}][{j}] is empty")


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))  # keep order, drop repeats


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; a shorter group is padded with None, which it skips."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def _sacrebleu(tokenize: str):
    """sacrebleu, once it is known to have the tokenizer named `tokenize`."""
    sacrebleu = _import("sacrebleu", "sacrebleu")
    if tokenize not in sacrebleu.BLEU.TOKENIZERS:
        raise ValueError(f"unknown tokenize {tokenize!r}; sacrebleu knows: {', '.join(sacrebleu.BLEU.TOKENIZERS)}")
    return sacrebleu


def _tokenizer(tokenize: str, lowercase: bool) -> Callable[[str], list[str]]:
    """The tokens sacrebleu's BLEU would count, so NIST and CIDEr see the same words as BLEU."""
    sacrebleu = _sacrebleu(tokenize)
    tok = sacrebleu.BLEU(tokenize=tokenize).tokenizer
    return lambda text: tok((text.lower() if lowercase else text).rstrip()).split()


# -------------------------------------------------------------------------------------------------------- metrics

def bleu(predictions, references, *, lowercase: bool = True, tokenize: str = "13a") -> float:
    """Corpus BLEU (sacrebleu: 4-gram, brevity penalty against the closest reference length), in percent."""
    check_inputs(predictions, references)
    metric = _sacrebleu(tokenize).BLEU(lowercase=lowercase, tokenize=tokenize)
    return float(metric.corpus_score(list(predictions), _reference_streams(references)).score)


def chrf(predictions, references, *, lowercase: bool = True) -> float:
    """Corpus chrF (sacrebleu: character 6-grams, beta 2, no word n-grams), in percent."""
    check_inputs(predictions, references)
    sacrebleu = _import("sacrebleu", "sacrebleu")
    metric = sacrebleu.CHRF(lowercase=lowercase)
    return float(metric.corpus_score(list(predictions), _reference_streams(references)).score)


def ter(predictions, references, *, lowercase: bool = True, tokenize: str = "13a") -> float:
    """Corpus TER (sacrebleu's tercom): edits over the mean reference length, in percent; lower is better."""
    check_inputs(predictions, references)
    metric = _sacrebleu(tokenize).TER(normalized=tokenize != "none", case_sensitive=not lowercase)
    return float(metric.corpus_score(list(predictions), _reference_streams(references)).score)


def nist(predictions, references, *, lowercase: bool = True, tokenize: str = "13a") -> float:
    """Corpus NIST up to 5-grams (nltk's corpus_nist) on sacrebleu's tokens."""
    check_inputs(predictions, references)
    nist_score = _import("nltk.translate.nist_score", "nltk")
    tok = _tokenizer(tokenize, lowercase)
    hyps = [tok(p) for p in predictions]
    refs = [[tok(r) for r in group] for group in references]
    # nltk divides by the number of hypothesis n-grams of each order and fails when there are none (every prediction
    # shorter than n). mteval-v13a counts such an order as contributing 0; asking nltk only for the orders that exist
    # gives exactly that, since an order's information weights depend only on that order and the one below.
    order = min(NIST_MAX_ORDER, max(len(h) for h in hyps))
    if order == 0:
        return 0.0  # every prediction is empty: no n-gram matches, and the length penalty is 0
    return float(nist_score.corpus_nist(refs, hyps, n=order))


def cider(predictions, references, *, lowercase: bool = True, tokenize: str = "13a") -> float:
    """Corpus CIDEr (pycocoevalcap's Cider: 1–4-grams, sigma 6, x10) on sacrebleu's tokens.

    CIDEr's idf comes from the references of the whole corpus, so one input alone always scores 0."""
    check_inputs(predictions, references)
    cider_mod = _import("pycocoevalcap.cider.cider", "pycocoevalcap")
    tok = _tokenizer(tokenize, lowercase)
    gts = {i: [" ".join(tok(r)) for r in group] for i, group in enumerate(references)}
    res = {i: [" ".join(tok(p))] for i, p in enumerate(predictions)}
    score, _ = cider_mod.Cider().compute_score(gts, res)
    return float(score)


def rouge(predictions, references, *, types: Sequence[str] = tuple(_ROUGE_TYPES),
          use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE F-measures in percent: per input the best reference (score_multi), averaged over inputs."""
    check_inputs(predictions, references)
    unknown = [t for t in types if t not in _ROUGE_TYPES]
    if unknown:
        raise ValueError(f"unknown ROUGE type {unknown[0]!r}; known: {', '.join(_ROUGE_TYPES)}")
    rouge_scorer = _import("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer([_ROUGE_TYPES[t] for t in types], use_stemmer=use_stemmer)
    per_input = [scorer.score_multi(list(refs), pred) for pred, refs in zip(predictions, references)]
    return {t: 100.0 * math.fsum(s[_ROUGE_TYPES[t]].fmeasure for s in per_input) / len(per_input) for t in types}


# METEOR 1.5 runs as a JVM that takes seconds to start, so one stays up per process and is reused across calls.
_meteor_lock = threading.Lock()
_meteor_scorer = None


def _meteor_line(text: str) -> str:
    """pycocoevalcap talks to the JVM one line per input, fields split by '|||': keep both out of the text."""
    return re.sub(r"\s+", " ", text.replace("|||", " ")).strip()


def _drop_meteor_scorer() -> None:
    global _meteor_scorer
    scorer, _meteor_scorer = _meteor_scorer, None
    if scorer is not None:
        # A failed exchange leaves pycocoevalcap's own lock held; its __del__ would wait on it forever.
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        try:  # closed here, so that __del__ does not raise on bytes it can no longer flush to the dead JVM
            scorer.meteor_p.stdin.close()
        except OSError:
            pass


def meteor(predictions, references) -> float | str:
    """Corpus METEOR 1.5 (`-l en -norm`, pycocoevalcap's jar) in percent, or a 'skipped: …' string without Java."""
    global _meteor_scorer
    check_inputs(predictions, references)
    meteor_mod = _import("pycocoevalcap.meteor.meteor", "pycocoevalcap")
    if shutil.which("java") is None:
        return NEEDS_JAVA
    gts = {i: [_meteor_line(r) for r in group] for i, group in enumerate(references)}
    res = {i: [_meteor_line(p)] for i, p in enumerate(predictions)}
    with _meteor_lock:
        try:
            if _meteor_scorer is not None and _meteor_scorer.meteor_p.poll() is not None:
                _drop_meteor_scorer()  # the JVM exited since the last call: start another
            if _meteor_scorer is None:
                _meteor_scorer = meteor_mod.Meteor()
            score, _ = _meteor_scorer.compute_score(gts, res)
        except (OSError, ValueError) as exc:
            # The JVM could not start or died (memory, a broken install): report it, never a made-up number.
            _drop_meteor_scorer()
            return f"skipped: METEOR's java process failed ({type(exc).__name__})"
    return 100.0 * float(score)


# -------------------------------------------------------------------------------------------------------- the set

def compute_metrics(names: Sequence[str], predictions: list[str], references: list[list[str]], *,
                    lowercase: bool = True, tokenize: str = "13a",
                    rouge_stemmer: bool = False) -> dict[str, float | str]:
    """Score `predictions` against grouped `references` with each named metric (see TASK_METRICS).

    A value is a float, or a string starting with 'skipped:' for a metric that cannot run here (METEOR without
    Java). Bad input raises ValueError with a one-line message."""
    names = check_names(names)
    check_inputs(predictions, references)
    predictions, references = list(predictions), [list(refs) for refs in references]
    options = {"lowercase": lowercase, "tokenize": tokenize, "rouge_stemmer": rouge_stemmer}
    by_scorer: dict[Callable, list[str]] = {}  # metrics sharing a scorer are computed in one call
    for name in names:
        by_scorer.setdefault(METRICS[name].score, []).append(name)
    scores = {}
    for score, group in by_scorer.items():
        scores.update(score(tuple(group), predictions, references, options))
    return {n: scores[n] for n in names}


def perplexity(mean_token_loss: float) -> float:
    """exp of the mean per-token cross-entropy (natural log), i.e. the perplexity the loss stands for."""
    if not math.isfinite(mean_token_loss) or mean_token_loss < 0:
        raise ValueError(f"a mean token loss must be finite and >= 0, got {mean_token_loss}")
    return math.exp(mean_token_loss)


def module_path(family: str) -> str:
    """The script of one of our `evaluate` modules, e.g. module_path('spdf_bleu')."""
    if family not in module_families():
        raise ValueError(f"unknown metric module {family!r}; known: {', '.join(module_families())}")
    return os.fspath(MODULES_DIR / family / f"{family}.py")


def load_metric(name: str, **load_kwargs):
    """`evaluate.load` of our packaged module, by path (no Hub access).

    `name` is a module ('spdf_bleu': BLEU, chrF and TER) or one metric ('chrf': that module, configured for chrF)."""
    evaluate = _import("evaluate", "evaluate")
    families = module_families()
    if name in families:
        return evaluate.load(module_path(name), **load_kwargs)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join((*families, *metric_names()))}")
    return evaluate.load(module_path(METRICS[name].module), config_name=name, **load_kwargs)


# ------------------------------------------------------------------------------------------- the metrics

def _alone(metric: Callable[[list, list, dict], float | str]):
    """The scorer of a metric computed on its own: {its name: metric(predictions, references, options)}."""
    return lambda names, predictions, references, options: {names[0]: metric(predictions, references, options)}


def _rouge_scores(names, predictions, references, options) -> dict[str, float]:
    return rouge(predictions, references, types=names, use_stemmer=options["rouge_stemmer"])


register_metric(Metric("bleu", "BLEU", "spdf_bleu", _alone(
    lambda p, r, o: bleu(p, r, lowercase=o["lowercase"], tokenize=o["tokenize"]))))
register_metric(Metric("chrf", "chrF", "spdf_bleu", _alone(lambda p, r, o: chrf(p, r, lowercase=o["lowercase"]))))
register_metric(Metric("ter", "TER", "spdf_bleu", _alone(
    lambda p, r, o: ter(p, r, lowercase=o["lowercase"], tokenize=o["tokenize"]))))
register_metric(Metric("rouge1", "ROUGE-1", "spdf_rouge", _rouge_scores))
register_metric(Metric("rouge2", "ROUGE-2", "spdf_rouge", _rouge_scores))
register_metric(Metric("rouge_l", "ROUGE-L", "spdf_rouge", _rouge_scores))
register_metric(Metric("nist", "NIST", "spdf_nist", _alone(
    lambda p, r, o: nist(p, r, lowercase=o["lowercase"], tokenize=o["tokenize"]))))
register_metric(Metric("meteor", "METEOR", "spdf_meteor", _alone(lambda p, r, o: meteor(p, r))))
register_metric(Metric("cider", "CIDEr", "spdf_cider", _alone(
    lambda p, r, o: cider(p, r, lowercase=o["lowercase"], tokenize=o["tokenize"]))))
