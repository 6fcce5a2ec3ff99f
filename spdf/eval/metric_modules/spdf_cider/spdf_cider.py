"""spdf_cider: corpus CIDEr from pycocoevalcap on sacrebleu's tokens, multi-reference, offline."""
from spdf.eval.metric_modules import base


class SpdfCider(base.SpdfMetric):
    DESCRIPTION = ("pycocoevalcap's CIDEr (1-4-grams, idf over the corpus' references); one input alone scores 0 "
                   "since its idf is then 0.")
    CITATION = """@inproceedings{vedantam-2015-cider,
  title = "{CIDEr}: Consensus-based Image Description Evaluation",
  author = "Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi", booktitle = "CVPR", year = "2015"}"""
    REFERENCE_URLS = ("https://github.com/salaniz/pycocoevalcap",)
