"""spdf_rouge: ROUGE-1, ROUGE-2 and ROUGE-L F-measures from rouge-score, multi-reference, offline."""
from spdf.eval.metric_modules import base


class SpdfRouge(base.SpdfMetric):
    DESCRIPTION = ("rouge-score's ROUGE F-measures in percent: per input the best-matching reference "
                   "(score_multi), averaged over inputs.")
    CITATION = """@inproceedings{lin-2004-rouge,
  title = "{ROUGE}: A Package for Automatic Evaluation of Summaries", author = "Lin, Chin-Yew", year = "2004"}"""
    REFERENCE_URLS = ("https://github.com/google-research/google-research/tree/master/rouge",)
