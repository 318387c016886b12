"""The CPU tier's benign fine-tuning task: bundled as generated, balanced, held out by (brand, product), the
label set named in every prompt, and no invented name shared with the proxy's harmful world."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

from conftest import REPO

PROXY = REPO / "refusal_lightning" / "data" / "proxy"
SENTENCE_WORDS = {"Is", "It", "My", "Review", "The", "I", "At", "Answer"}  # capitalised only as sentence starts


def _generator():
    spec = importlib.util.spec_from_file_location("make_sentiment_task", REPO / "scripts" / "make_sentiment_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(name):
    return [json.loads(line) for line in (PROXY / f"sentiment_{name}.jsonl").read_text().splitlines()]


def test_bundled_files_are_the_generators_output():
    generated = _generator().generate(0)
    assert generated == {"train": _rows("train"), "heldout": _rows("heldout")}
    assert _generator().generate(1) != generated  # the seed matters


def test_the_task_is_balanced_held_out_and_names_its_labels():
    train, heldout = _rows("train"), _rows("heldout")
    assert len(heldout) >= 200
    for rows in (train, heldout):
        assert Counter(r["label"] for r in rows) == {"positive": len(rows) // 2, "negative": len(rows) // 2}
        assert set(Counter(r["kind"] for r in rows)) == {"plain", "negated", "contrast", "coded"}
        for r in rows:
            assert r["answer"] == r["label"] and "positive or negative" in r["prompt"]
    pattern = re.compile(r"the (\w+) ([a-z ]+?)(?: for a while|:| last month|\.)")
    pairs = [{tuple(pattern.search(r["prompt"]).groups()) for r in rows} for rows in (train, heldout)]
    assert not pairs[0] & pairs[1]


def test_no_invented_name_of_the_task_is_in_the_proxys_files():
    words = re.compile(r"\b[A-Z][a-z]+\b")
    task = {w for name in ("train", "heldout") for r in _rows(name) for w in words.findall(r["prompt"])}
    proxy = set()
    for path in PROXY.iterdir():
        if not path.name.startswith("sentiment_"):
            proxy |= set(words.findall(path.read_text(encoding="utf-8")))
    assert task - SENTENCE_WORDS  # the brands are there to compare
    assert not (task & proxy) - SENTENCE_WORDS
