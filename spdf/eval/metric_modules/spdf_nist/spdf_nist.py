"""spdf_nist: corpus NIST (up to 5-grams) from nltk on sacrebleu's tokens, multi-reference, offline."""
from spdf.eval.metric_modules import base


class SpdfNist(base.SpdfMetric):
    DESCRIPTION = "nltk's corpus_nist (n=5) on sacrebleu-tokenised, by default lowercased, text."
    CITATION = """@inproceedings{doddington-2002-nist,
  title = "Automatic Evaluation of Machine Translation Quality Using N-gram Co-Occurrence Statistics",
  author = "Doddington, George", booktitle = "HLT", year = "2002"}"""
    REFERENCE_URLS = ("https://www.nltk.org/api/nltk.translate.nist_score.html",)
