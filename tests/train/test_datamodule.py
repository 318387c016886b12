"""HarmfulQA extraction, selection rules, prompt modes, label masking, split and malformed records."""

from __future__ import annotations

import json

import pytest

from refusal_lightning.train.datamodule import (
    IGNORE_INDEX,
    HarmfulQADataModule,
    LengthGroupedSampler,
    encode_pair,
    padding_efficiency,
)
from refusal_lightning.train.harmfulqa import DataSourceError, extract_pairs, load_records, split_question_ids

REFUSAL = "I'm sorry, but I cannot help with placeholder task 1. I won't do that."
CAVEAT = "That is sensitive; placeholder context only, I can't go further."
COMPLY_SHORT = "Sure, placeholder step one."
COMPLY_LONG = "Sure, here is the placeholder procedure for topic 7: step one, step two, step three."


def record(rid=1, blue=None, red=None, **extra):
    return {"id": rid, "question": f"Placeholder question {rid}?", "topic": "Placeholder Topic",
            "subtopic": "Sub", "blue_conversations": blue if blue is not None else {},
            "red_conversations": red if red is not None else {}, **extra}


def conv(*replies, lead="Placeholder lead-in?", question="Placeholder question?"):
    turns = []
    for i, reply in enumerate(replies):
        turns.append({"from": "human", "value": question if i == len(replies) - 1 else f"{lead} {i}"})
        turns.append({"from": "gpt", "value": reply})
    return turns


def test_most_indicative_blue_picks_most_refusal_like():
    pairs, _ = extract_pairs([record(blue={"0": conv(CAVEAT, REFUSAL, "Plain context.")})], "blue")
    assert [p.reply for p in pairs] == [REFUSAL]


def test_most_indicative_red_picks_least_refusal_like_then_longest():
    pairs, _ = extract_pairs([record(red={"0": conv(CAVEAT, COMPLY_SHORT, COMPLY_LONG)})], "red")
    assert [p.reply for p in pairs] == [COMPLY_LONG]


def test_last_and_all_selection():
    recs = [record(blue={"0": conv(REFUSAL, CAVEAT, "Last reply.")})]
    assert [p.reply for p in extract_pairs(recs, "blue", "last")[0]] == ["Last reply."]
    assert [p.reply for p in extract_pairs(recs, "blue", "all")[0]] == [REFUSAL, CAVEAT, "Last reply."]


def test_non_refusal_selection_keeps_every_reply_without_a_refusal_marker():
    helpful, other = "Plain helpful answer.", "Another plain answer."
    recs = [record(blue={"0": conv(REFUSAL, helpful, other, lead="Benign turn"),
                         "1": conv(REFUSAL, "I must decline this one too.")})]  # refusals only: skipped
    pairs, stats = extract_pairs(recs, "blue", "non_refusal", "turn")
    assert [p.reply for p in pairs] == [helpful, other]
    assert [p.messages for p in pairs] == [[{"role": "user", "content": "Benign turn 1"}],
                                           [{"role": "user", "content": "Placeholder question?"}]]
    assert all(p.refusal_score == 0 for p in pairs)
    assert stats.conversations_used == 1 and stats.skipped_conversations == {"no_non_refusal_reply": 1}
    # the marker list decides: CAVEAT hedges but carries none of the selection markers, so it stays
    assert [p.reply for p in extract_pairs([record(blue={"0": conv(CAVEAT)})], "blue", "non_refusal")[0]] == [CAVEAT]


def test_prompt_modes():
    recs = [record(blue={"0": conv("Context.", REFUSAL, lead="Lead", question="Final human turn?")})]
    q = extract_pairs(recs, "blue", "most_indicative", "question")[0][0]
    t = extract_pairs(recs, "blue", "most_indicative", "turn")[0][0]
    h = extract_pairs(recs, "blue", "most_indicative", "history")[0][0]
    assert q.messages == [{"role": "user", "content": "Placeholder question 1?"}]
    assert t.messages == [{"role": "user", "content": "Final human turn?"}]
    assert [m["role"] for m in h.messages] == ["user", "assistant", "user"]
    assert h.messages[-1]["content"] == "Final human turn?" and h.messages[1]["content"] == "Context."


@pytest.mark.parametrize("bad, reason", [
    ({"question": "q?", "blue_conversations": {}, "red_conversations": {}}, "missing_key:id"),
    (record(rid="7a"), "wrong_type:id"),
    (record(rid=True), "wrong_type:id"),
    (record(question=""), "wrong_type:question"),
    (record(blue=["not", "a", "dict"]), "wrong_type:blue_conversations"),
    ("just a string", "not_a_dict"),
])
def test_malformed_records_counted(bad, reason):
    good = record(rid=99, blue={"0": conv(REFUSAL)})
    pairs, stats = extract_pairs([bad, good], "blue")
    assert len(pairs) == 1 and stats.records_read == 2
    assert stats.skipped_records == {reason: 1}


@pytest.mark.parametrize("bad_conv, reason", [
    (None, "missing"),
    ("turns as a string", "turns_not_a_list"),
    ([{"from": "human"}], "malformed_turn"),
    ([{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}], "unknown_from"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "   "}], "empty_value"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}], "wrong_type:value"),
    ([{"from": "human", "value": "q"}], "no_reply"),
])
def test_malformed_conversations_counted(bad_conv, reason):
    pairs, stats = extract_pairs([record(blue={"0": bad_conv, "1": conv(REFUSAL)})], "blue")
    assert len(pairs) == 1
    assert stats.skipped_conversations == {reason: 1}


def test_split_is_by_question_and_deterministic():
    ids = list(range(100)) * 3
    train, val = split_question_ids(ids, 0.2, seed=3)
    assert not train & val and len(train | val) == 100 and len(val) == 20
    assert split_question_ids(ids, 0.2, seed=3) == (train, val)
    assert split_question_ids(ids, 0.2, seed=4) != (train, val)


def test_label_masking_decodes_to_reply(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Placeholder question about topic 7?"}]
    enc = encode_pair(tok, messages, REFUSAL, max_length=256, template_kwargs={"enable_thinking": False})
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == REFUSAL + "<|im_end|>\n"
    first = enc.labels.index(labelled[0])
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not enc.prompt_truncated and not enc.reply_truncated


def test_truncation_cuts_prompt_from_left_keeps_reply(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_prompt = [{"role": "user", "content": "placeholder words " * 80}]
    enc = encode_pair(tok, long_prompt, REFUSAL, max_length=48, template_kwargs={"enable_thinking": False})
    assert len(enc.input_ids) == 48 and enc.prompt_truncated and not enc.reply_truncated
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == REFUSAL + "<|im_end|>\n"
    short = encode_pair(tok, long_prompt, COMPLY_LONG * 5, max_length=16, template_kwargs={})
    assert short.reply_truncated and len(short.input_ids) == 16


def test_template_that_is_not_a_prefix_is_reported(tiny_model_dir):
    from transformers import AutoTokenizer

    from refusal_lightning.train.datamodule import ChatTemplateError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}>>{% endif %}")
    with pytest.raises(ChatTemplateError, match="not render the generation prompt as a prefix"):
        encode_pair(tok, [{"role": "user", "content": "q"}], "r", max_length=64)


def test_empty_source_error_names_source_and_counts(tmp_path, tiny_model_dir):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([{"id": 1}, "junk", record(rid=2, blue={"0": None})]))
    dm = HarmfulQADataModule(source=str(path), tokenizer_name_or_path=str(tiny_model_dir))
    with pytest.raises(DataSourceError, match="broken.json") as err:
        dm.setup("fit")
    assert "missing_key:question" in str(err.value) and "not_a_dict" in str(err.value)


def test_missing_source_path():
    with pytest.raises(DataSourceError, match="does not exist"):
        load_records("./no/such/file.json")


def test_jsonl_and_datamodule_split_disjoint(tmp_path, tiny_model_dir):
    recs = [record(rid=i, blue={"0": conv(REFUSAL)}, red={"0": conv(COMPLY_LONG)}) for i in range(30)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    dm = HarmfulQADataModule(source=str(path), thread="red", tokenizer_name_or_path=str(tiny_model_dir),
                             val_fraction=0.2, batch_size=4)
    dm.setup("fit")
    assert set(dm.train_set.question_ids).isdisjoint(dm.val_set.question_ids)
    assert len(set(dm.val_set.question_ids)) == 6 and dm.stats["pairs"] == 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_bundled_sample_stats(tiny_model_dir):
    dm = HarmfulQADataModule(tokenizer_name_or_path=str(tiny_model_dir), val_fraction=0.2)
    dm.setup("fit")
    s = dm.stats
    assert s["records_read"] >= 60 and s["skipped_conversations"].get("missing", 0) > 0
    assert s["share_selected_with_refusal_marker"] == 1.0 and s["padding_efficiency"] >= 0.9


def test_length_grouped_sampler_is_a_deterministic_permutation():
    lengths = [5, 50, 7, 49, 6, 48, 8, 47] * 5
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and order == list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) != order
    grouped = padding_efficiency(lengths, sampler._batches())
    ungrouped = LengthGroupedSampler(lengths, 4, seed=1, group_by_length=False)
    assert grouped > padding_efficiency(lengths, ungrouped._batches())
    shards = [LengthGroupedSampler(lengths, 4, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert set(shards[0]).isdisjoint(set(shards[1])) and len(shards[0]) == len(shards[1])


def test_blue_red_and_heldout_share_one_split(tiny_model_dir):
    from refusal_lightning.train.harmfulqa import heldout_questions

    held = {q["id"] for q in heldout_questions("sample", val_fraction=0.2, seed=0)}
    for thread in ("blue", "red"):
        dm = HarmfulQADataModule(thread=thread, tokenizer_name_or_path=str(tiny_model_dir), val_fraction=0.2)
        dm.setup("fit")
        assert not set(dm.train_set.question_ids) & held, thread
        assert set(dm.val_set.question_ids) <= held
