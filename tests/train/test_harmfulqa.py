"""HarmfulQA as the Hub may hand it over: string ids, duplicate questions, multi-turn pairing (issue 20).

``tests/fixtures/harmfulqa_shaped.json`` is synthetic placeholder text in HarmfulQA's shape: 36 questions,
int and digit-string ids, 3 exact duplicate questions under other ids (one differing in case and spaces),
2-4 exchange conversations, ``None`` conversation entries, a ``None`` thread and one malformed id.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from conftest import REPO

from refusal_lightning.experiment.judge_check import keyword_judge_check
from refusal_lightning.train.data_report import format_report, harmfulqa_report
from refusal_lightning.train.datamodule import HarmfulQADataModule
from refusal_lightning.train.harmfulqa import (
    extract_pairs,
    heldout_questions,
    load_records,
    normalise_question,
    record_id,
    record_problem,
    split_question_ids,
    split_records,
)

FIXTURE = REPO / "tests" / "fixtures" / "harmfulqa_shaped.json"
PROXY = "refusal_lightning/data/proxy/harmfulqa_proxy.json"
REFUSAL = "I'm sorry, but I cannot help with placeholder task 1. I won't do that."


def record(rid, question="Placeholder question?", blue=None):
    return {"id": rid, "question": question, "topic": "T", "subtopic": "S",
            "blue_conversations": blue if blue is not None else {"0": [{"from": "human", "value": "q?"},
                                                                          {"from": "gpt", "value": REFUSAL}]},
            "red_conversations": {}}


def test_fixture_has_the_shapes_the_hub_file_may_have():
    raw = json.loads(FIXTURE.read_text())
    ids = [r["id"] for r in raw]
    assert any(isinstance(i, int) for i in ids) and any(isinstance(i, str) and i.isdigit() for i in ids)
    texts = [normalise_question(r["question"]) for r in raw]
    assert len(texts) - len(set(texts)) == 3
    assert any(None in (r["blue_conversations"] or {}).values() for r in raw)
    assert any(r["red_conversations"] is None for r in raw)
    assert max(len(c) for r in raw for c in r["blue_conversations"].values() if c) >= 8  # 4 exchanges


@pytest.mark.parametrize("value, expected", [(7, 7), ("7", 7), (" 12 ", 12), ("0", 0), ("7a", None), ("", None),
                                             ("-1", None), ("٣", None), (True, None), (1.0, None), (None, None)])
def test_record_id_accepts_ints_and_digit_strings(value, expected):
    assert record_id({"id": value}) == expected
    assert (record_problem(record(value)) is None) == (expected is not None)


def test_string_and_int_ids_are_the_same_record():
    as_int, _ = extract_pairs([record(1)], "blue")
    as_str, stats = extract_pairs([record("1")], "blue")
    assert [p.question_id for p in as_str] == [p.question_id for p in as_int] == [1]
    assert stats.records_used == 1 and not stats.skipped_records
    # the split sees one id, whichever way each record spells it
    split = split_records([record(1), record("1"), record(2, "Other?")], 0.5, 0)
    assert split.group_of == {1: 1, 2: 2}


def test_a_file_with_only_string_ids_trains(tmp_path, tiny_model_dir):
    path = tmp_path / "string_ids.json"
    path.write_text(json.dumps([record(str(i), f"Placeholder question {i}?") for i in range(10)]))
    dm = HarmfulQADataModule(source=str(path), tokenizer_name_or_path=str(tiny_model_dir), val_fraction=0.2)
    dm.setup("fit")
    assert dm.stats["pairs"] == 10 and len(dm.train_set) == 8 and len(dm.val_set) == 2


def test_duplicate_questions_are_grouped_under_their_smallest_id():
    records = load_records(str(FIXTURE))
    for seed in range(20):
        split = split_records(records, 0.3, seed)
        assert split.duplicates == 3
        assert (split.group_of[40], split.group_of[41], split.group_of[42]) == (3, 8, 17)
        train, val = split.record_ids("train"), split.record_ids("val")
        assert not train & val and len(train | val) == 39  # 40 records, one with a malformed id
        for dup, original in ((40, 3), (41, 8), (42, 17)):
            assert (dup in val) == (original in val), seed
        assert not split.val & {40, 41, 42}  # groups are named by their smallest id


def test_datamodule_heldout_and_judge_check_share_one_split_without_leaks(tiny_model_dir):
    # seed 0 holds out a question that has a duplicate (id 8, whose copy is "41" in other case and spacing)
    val_fraction, seed = 0.3, 0
    split = split_records(load_records(str(FIXTURE)), val_fraction, seed)
    assert 8 in split.val
    texts = {record_id(r): normalise_question(r["question"]) for r in load_records(str(FIXTURE))
             if record_id(r) is not None}
    held = heldout_questions(str(FIXTURE), val_fraction, seed)
    assert [q["id"] for q in held] == sorted(split.val)  # the fixture's file order
    assert len({normalise_question(q["question"]) for q in held}) == len(held)  # each question once
    for thread in ("blue", "red"):
        dm = HarmfulQADataModule(source=str(FIXTURE), thread=thread, prompt="turn", val_fraction=val_fraction,
                                 seed=seed, tokenizer_name_or_path=str(tiny_model_dir))
        dm.setup("fit")
        train_q = {texts[i] for i in dm.train_set.question_ids}
        val_q = {texts[i] for i in dm.val_set.question_ids}
        assert not train_q & val_q, thread
        held_q = {normalise_question(q["question"]) for q in held}
        assert val_q == held_q if thread == "blue" else val_q == held_q - {texts[11]}, thread  # 11: no red thread
        assert 41 in dm.val_set.question_ids  # the duplicate's pairs are held out with it
        assert dm.stats["duplicate_questions"] == 3 and dm.stats["val_questions"] == len(held)
    check = keyword_judge_check(str(FIXTURE), val_fraction, seed)
    val_records = [r for r in load_records(str(FIXTURE)) if record_id(r) in split.record_ids("val")]
    blue_val, _ = extract_pairs(val_records, "blue")
    assert check["n_blue"] == sum(p.refusal_score > 0 for p in blue_val) > 0


def test_proxy_split_is_unchanged():
    # The demo's held-out set: pinned to the split before duplicate grouping (the proxy has no duplicates).
    for source, fraction, pinned in ((PROXY, 0.25, "9ec7cf5e2d0df346"), (PROXY, 0.1, "008db28026cb48a1"),
                                     ("sample", 0.2, "acbbbbd86de703e0")):
        records = load_records(source)
        split = split_records(records, fraction, 0)
        assert split.duplicates == 0
        _, val = split_question_ids((r["id"] for r in records if not record_problem(r)), fraction, 0)
        assert split.val == val
        assert hashlib.sha256(repr(sorted(split.val)).encode()).hexdigest()[:16] == pinned, source


def test_each_reply_is_paired_with_the_human_turn_it_answers():
    turns = [{"from": "human", "value": "Opening placeholder turn?"},
             {"from": "gpt", "value": "Plain placeholder context."},
             {"from": "human", "value": "Second placeholder turn?"},
             {"from": "gpt", "value": REFUSAL},
             {"from": "human", "value": "Third placeholder turn?"},
             {"from": "gpt", "value": "More placeholder context."}]
    rec = record(5, "The record's top-level placeholder question?", blue={"0": turns})
    (turn,), _ = extract_pairs([rec], "blue", "most_indicative", "turn")
    (history,), _ = extract_pairs([rec], "blue", "most_indicative", "history")
    (question,), _ = extract_pairs([rec], "blue", "most_indicative", "question")
    assert turn.reply == REFUSAL and turn.messages == [{"role": "user", "content": "Second placeholder turn?"}]
    assert [m["content"] for m in history.messages] == [t["value"] for t in turns[:3]]
    assert question.messages[0]["content"] == "The record's top-level placeholder question?"
    # every reply of every conversation, with selection: all
    pairs, _ = extract_pairs([rec], "blue", "all", "turn")
    assert [p.messages[0]["content"] for p in pairs] == [t["value"] for t in turns[0::2]]


def test_real_configs_pair_replies_with_their_turn():
    for name in ("refusal_lora", "attack"):
        assert yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["data"]["prompt"] == "turn", name


def test_report_counts_pairs_and_the_share_the_pairing_changes():
    report = harmfulqa_report(str(FIXTURE), prompt="turn")
    assert report["string_ids"] == 19 and report["duplicate_questions"] == 3 and report["questions"] == 36
    assert report["skipped_records"] == {"no_red_conversations": 1, "wrong_type:id": 1}
    blue, red = report["threads"]["blue"], report["threads"]["red"]
    assert (blue["pairs"], blue["skipped_conversations"]) == (78, {"missing": 7})
    assert (red["pairs"], red["skipped_conversations"]) == (71, {"missing": 5})
    assert 0 < blue["pairs_changed"] < blue["pairs"] and blue["changed_share"] == blue["pairs_changed"] / 78
    assert harmfulqa_report(str(FIXTURE), prompt="question")["threads"]["blue"]["pairs_changed"] == 0
    assert harmfulqa_report(str(FIXTURE), prompt="history")["threads"]["red"]["changed_share"] == 1.0
    lines = format_report(report)
    assert len(lines) == 3 and lines[1].startswith("blue: 78 pairs") and "82.1%" in lines[1]
    # the README quotes these figures
    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"changes (\d+) of (\d+) blue pairs \(([\d.]+)%\)\s+and (\d+) of (\d+) red pairs \(([\d.]+)%\)",
                       readme)
    assert quoted, "README: the pairing rule's figure on the fixture"
    assert quoted.groups() == (str(blue["pairs_changed"]), "78", f"{100 * blue['changed_share']:.1f}",
                               str(red["pairs_changed"]), "71", f"{100 * red['changed_share']:.1f}")
