import hashlib
import json
import os
import subprocess
import sys

import pytest

from spdf.data import DataError, DataSpec, iter_documents
from spdf.data.sources import module_text, stable_fraction, stdlib_modules
from spdf.data.tasks import docstring_examples


def test_stable_fraction_is_sha256_based_and_in_unit_interval():
    expected = int.from_bytes(hashlib.sha256(b"json/decoder.py").digest()[:8], "big") / 2.0**64
    assert stable_fraction("json/decoder.py") == expected
    assert all(0.0 <= stable_fraction(str(i)) < 1.0 for i in range(100))


def test_stdlib_split_is_by_module_disjoint_and_deterministic():
    pre = stdlib_modules("pretrain", 0.1)
    held = stdlib_modules("heldout", 0.1)
    pre_names, held_names = {n for n, _ in pre}, {n for n, _ in held}
    assert held_names and pre_names and not pre_names & held_names
    assert all(stable_fraction(n) < 0.1 for n in held_names)
    assert all(stable_fraction(n) >= 0.1 for n in pre_names)
    assert 0.03 < len(held_names) / (len(held_names) + len(pre_names)) < 0.2
    assert stdlib_modules("heldout", 0.1) == held
    # no tests, IDLE, or generated tables
    bad = ("test/", "tests/", "idlelib/", "lib2to3/", "site-packages/", "encodings/")
    assert not [n for n in pre_names | held_names if n.startswith(bad)]


def test_stdlib_split_does_not_depend_on_python_hash_seed():
    code = ("import json; from spdf.data.sources import stdlib_modules; "
            "print(json.dumps([n for n, _ in stdlib_modules('heldout', 0.1, 300_000)]))")
    # a hash seed unlike this process's: salted hash() would move modules between the parts
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert json.loads(out) == [n for n, _ in stdlib_modules("heldout", 0.1, 300_000)]


def test_stdlib_max_bytes_caps_the_corpus_and_never_leaks_heldout():
    capped = stdlib_modules("pretrain", 0.1, max_bytes=200_000)
    assert 0 < sum(len(t.encode()) for _, t in capped) <= 200_000
    held = {n for n, _ in stdlib_modules("heldout", 0.1)}
    assert not held & {n for n, _ in capped}
    docs = list(iter_documents(DataSpec(source="stdlib", max_bytes=200_000)))
    assert docs == [t for _, t in capped]


MODULE = '''#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""Module summary."""
import os  # a note after code
# Two comment lines
# make one paragraph.
#
# A new paragraph.
###########
X = "# a string, not a comment"


class Thing:
    """Class summary.

        Indented detail.
    """

    def act(self):
        """Method summary."""
        return X  # another note
'''


def test_module_text_is_the_docstrings_and_comments_in_source_order():
    assert module_text(MODULE).split("\n\n") == [
        "Module summary.", "a note after code", "Two comment lines make one paragraph.", "A new paragraph.",
        "Class summary.", "Indented detail.", "Method summary.", "another note"]
    assert "import" not in module_text(MODULE) and "return" not in module_text(MODULE)
    assert module_text("def broken(:\n") == ""


def test_stdlib_text_source_comes_from_the_pretraining_modules_only():
    """The text corpus keeps the by-module split: none of its documents is a held-out module's text, so the
    docstring task's functions (held-out modules) are not in it."""
    text = stdlib_modules("pretrain", 0.1, content="text")
    pretrain = dict(stdlib_modules("pretrain", 0.1))
    held = stdlib_modules("heldout", 0.1)
    assert text and {name for name, _ in text} <= set(pretrain)
    assert all(doc == module_text(pretrain[name]) for name, doc in text[:20])
    assert not {name for name, _ in text} & {name for name, _ in held}
    # (a one-line boilerplate docstring such as "This directory is a Python package." may be in both parts)
    held_texts = {doc for _, source in held if len(doc := module_text(source)) > 200}
    assert held_texts and not held_texts & {doc for _, doc in text}
    # the docstring task's held-out functions: a summary of one of them is in the held-out module's text, not here
    name, source = next((n, s) for n, s in held if docstring_examples(s))
    summary = docstring_examples(source)[0].completion
    assert summary in module_text(source)
    assert sum(len(doc) for _, doc in text) < sum(len(s) for s in pretrain.values()) / 2  # prose, not code
    capped = list(iter_documents(DataSpec(source="stdlib", content="text", max_bytes=100_000)))
    assert capped and sum(len(d.encode()) for d in capped) <= 100_000


def test_files_source_reads_txt_jsonl_and_parquet_in_sorted_glob_order(tmp_path):
    (tmp_path / "b.txt").write_text("second doc")
    (tmp_path / "a.txt").write_text("first doc\nline two")
    rows = [{"body": "row one"}, {"body": ""}, {"body": "row three"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(iter_documents(DataSpec(source="files", paths=(str(tmp_path / "*.txt"),)))) == \
        ["first doc\nline two", "second doc"]
    docs = list(iter_documents(DataSpec(source="files", paths=(str(tmp_path / "c.jsonl"),), text_field="body")))
    assert docs == ["row one", "row three"]  # empty texts are skipped
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2", None]}), tmp_path / "d.parquet")
    assert list(iter_documents(DataSpec(source="files", paths=(str(tmp_path / "d.parquet"),)))) == ["p1", "p2"]


def test_files_source_bad_field_names_the_field_and_file(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"has no field 'text'; fields: content"):
        list(iter_documents(DataSpec(source="files", paths=(str(tmp_path / "x.jsonl"),))))
