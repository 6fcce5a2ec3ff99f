"""spdf_bleu: corpus BLEU, chrF and TER from sacrebleu, multi-reference, offline (config_name picks one of them)."""
from spdf.eval.metric_modules import base


class SpdfBleu(base.SpdfMetric):
    DESCRIPTION = ("sacrebleu's corpus BLEU, chrF and TER in percent (TER: lower is better), with one list of "
                   "references per input; case-insensitive and 13a-tokenised by default.")
    CITATION = """@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores", author = "Post, Matt", booktitle = "WMT", year = "2018"}"""
    REFERENCE_URLS = ("https://github.com/mjpost/sacrebleu",)
