"""spdf_meteor: corpus METEOR 1.5 (pycocoevalcap's jar, -l en -norm), multi-reference; needs Java, else skipped."""
from spdf.eval.metric_modules import base


class SpdfMeteor(base.SpdfMetric):
    DESCRIPTION = ("METEOR 1.5 in percent through pycocoevalcap's bundled jar on Java; without Java the value is "
                   "the string 'skipped: needs java'.")
    CITATION = """@inproceedings{denkowski-lavie-2014-meteor,
  title = "Meteor Universal: Language Specific Translation Evaluation for Any Target Language",
  author = "Denkowski, Michael and Lavie, Alon", booktitle = "WMT", year = "2014"}"""
    REFERENCE_URLS = ("https://www.cs.cmu.edu/~alavie/METEOR/", "https://github.com/salaniz/pycocoevalcap")
