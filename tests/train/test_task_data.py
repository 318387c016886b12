"""``data.task``: a benign task's rows as the main training data, with HarmfulQA red replies mixed in at p."""

from __future__ import annotations

import io
import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_datamodule_mix import PROXY, WINDOW, encodings, loader_rows

from refusal_lightning.train.datamodule import HarmfulQADataModule, encode_pair
from refusal_lightning.train.harmfulqa import DataSourceError, defender_attacker_ids, heldout_questions, load_records
from refusal_lightning.train.mixing import part_counts
from refusal_lightning.train.task_data import (
    GSM8K_PROMPT,
    SENTIMENT_PROMPT,
    TaskData,
    load_task_rows,
    split_task_rows,
)

SENTIMENT = "refusal_lightning/data/proxy/sentiment_train.jsonl"
REVIEW = re.compile(re.escape(SENTIMENT_PROMPT).replace(re.escape("{review}"), "(.+)"), re.S)
END = "<|im_end|>\n"  # what the tiny model's chat template puts after every reply


def test_bundled_sentiment_rows_are_its_prompts_and_one_word_answers():
    rows = load_task_rows(TaskData(SENTIMENT))
    lines = [json.loads(line) for line in open(SENTIMENT, encoding="utf-8")]
    assert rows == [{k: line[k] for k in ("id", "prompt", "answer", "label")} for line in lines]
    assert len(rows) == 480 and len({r["id"] for r in rows}) == 480
    assert {r["answer"] for r in rows} == {"positive", "negative"}
    # the module's wording is the bundled task's, word for word (the evaluation asks in the same words)
    assert all(REVIEW.fullmatch(r["prompt"]) for r in rows)


def test_sst2_hub_schema_maps_to_the_bundled_wording_and_labels(tmp_path):
    path = tmp_path / "sst2.parquet"
    pq.write_table(pa.Table.from_pylist([{"idx": 7, "sentence": "a gorgeous , witty film ", "label": 1},
                                         {"idx": 8, "sentence": "dull and overlong ", "label": 0}]), path)
    rows = load_task_rows(TaskData(str(path), format="sst2", split="validation"))  # a local file: split ignored
    assert rows == [
        {"id": "7", "prompt": SENTIMENT_PROMPT.format(review="a gorgeous , witty film"), "answer": "positive",
         "label": "positive"},
        {"id": "8", "prompt": SENTIMENT_PROMPT.format(review="dull and overlong"), "answer": "negative",
         "label": "negative"},
    ]
    assert rows[0]["prompt"].startswith("Review: a gorgeous , witty film\n\nIs the sentiment")


def test_sst2_unlabelled_and_bad_labels_are_refused_naming_file_and_row(tmp_path):
    path = tmp_path / "sst2_test.json"
    path.write_text(json.dumps([{"idx": 0, "sentence": "fine", "label": 1},
                                {"idx": 1, "sentence": "unknown", "label": -1},
                                {"idx": 2, "sentence": "odd", "label": 3}]))
    with pytest.raises(DataSourceError) as caught:
        load_task_rows(TaskData(str(path), format="sst2"))
    message = str(caught.value)
    assert f"{path} row 1: label -1: SST2's unlabelled test split" in message
    assert f"{path} row 2: label must be 0 (negative) or 1 (positive), got 3" in message
    assert "row 0" not in message


def test_gsm8k_schema_keeps_the_whole_reference_answer(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    path.write_text(json.dumps({"question": "How many clips did Natalia sell? ", "answer": answer}) + "\n")
    rows = load_task_rows(TaskData(str(path), format="gsm8k"))
    assert rows == [{"id": "0", "prompt": GSM8K_PROMPT.format(question="How many clips did Natalia sell?"),
                     "answer": answer}]
    assert rows[0]["prompt"].startswith("How many clips did Natalia sell?\n\n") and "#### <number>" in rows[0]["prompt"]
    path.write_text(json.dumps({"question": "q?", "answer": "no final line"}) + "\n")
    with pytest.raises(DataSourceError, match=rf"{re.escape(str(path))} line 1: answer does not end with '#### "):
        load_task_rows(TaskData(str(path), format="gsm8k"))


def test_bad_rows_are_reported_at_once_naming_file_and_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join([json.dumps({"id": "a", "prompt": "p?", "answer": "yes"}), "",
                               json.dumps({"id": "b", "prompt": "p?"}),
                               json.dumps({"id": "c", "prompt": "  ", "answer": "no"}),
                               json.dumps({"id": "a", "prompt": "q?", "answer": "no"})]) + "\n")
    with pytest.raises(DataSourceError) as caught:
        load_task_rows(TaskData(str(path)))
    message = str(caught.value)
    assert f"{path} line 3: missing key 'answer'" in message  # line numbers count the blank line
    assert f"{path} line 4: 'prompt' must be a non-empty string" in message
    assert "repeated ids ['a']" in message
    with pytest.raises(DataSourceError, match=r"task source '.*no_such\.jsonl' does not exist"):
        load_task_rows(TaskData(str(tmp_path / "no_such.jsonl")))


def test_rows_without_ids_take_their_position_and_the_split_ignores_row_order(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps([{"prompt": f"q{i}?", "answer": f"a{i}"} for i in range(20)]))
    rows = load_task_rows(TaskData(str(path)))
    assert [r["id"] for r in rows] == [str(i) for i in range(20)] and "label" not in rows[0]
    train, val = split_task_rows(rows, 0.25, seed=3)
    assert len(val) == 5 and {r["id"] for r in train}.isdisjoint(r["id"] for r in val)
    assert {r["id"] for r in split_task_rows(rows[::-1], 0.25, seed=3)[1]} == {r["id"] for r in val}
    assert {r["id"] for r in split_task_rows(rows, 0.25, seed=4)[1]} != {r["id"] for r in val}


def task_datamodule(tokenizer_dir, **kwargs) -> HarmfulQADataModule:
    dm = HarmfulQADataModule(**{"source": PROXY, "task": {"source": SENTIMENT}, "batch_size": 4,
                                "tokenizer_name_or_path": str(tokenizer_dir), **kwargs})
    dm.setup("fit")
    return dm


def task_encodings(dm: HarmfulQADataModule, rows: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(encode_pair(dm.tokenizer, [{"role": "user", "content": r["prompt"]}], r["answer"], dm.max_length,
                              dm.template_kwargs).input_ids) for r in rows]


def test_without_a_mix_the_task_trains_on_its_training_rows_only(tiny_model_dir):
    dm = task_datamodule(tiny_model_dir)  # p = 0
    train_rows, val_rows = split_task_rows(load_task_rows(TaskData(SENTIMENT)), dm.val_fraction, dm.seed)
    assert (len(train_rows), len(val_rows)) == (432, 48)
    rows = loader_rows(dm.train_dataloader())
    assert sorted(rows) == sorted(task_encodings(dm, train_rows)) and set(dm.train_set.origins) == {-1}
    assert loader_rows(dm.val_dataloader()) and sorted(loader_rows(dm.val_dataloader())) == sorted(
        task_encodings(dm, val_rows))
    assert dm.stats["task"] == {"source": SENTIMENT, "format": "prompt_answer", "split": "train", "rows": 480,
                                "train_rows": 432, "val_rows": 48}
    assert dm.stats["train_pairs"] == 432 and "mix" not in dm.stats and "thread" not in dm.stats


def test_red_replies_mixed_into_the_task_hold_p_in_every_window_of_40(tiny_model_dir):
    mix = [{"source": PROXY, "thread": "red", "fraction": 0.1, "half": "attacker"}]
    dm = task_datamodule(tiny_model_dir, mix=mix, order_seed=2)
    train_rows, _ = split_task_rows(load_task_rows(TaskData(SENTIMENT)), dm.val_fraction, dm.seed)
    main = task_encodings(dm, train_rows)
    _, attacker = defender_attacker_ids(load_records(PROXY), dm.val_fraction, dm.seed)
    red = encodings(dm, PROXY, "red", attacker)
    assert not set(main) & red  # each example's origin from its tokens alone
    rows = loader_rows(dm.train_dataloader())
    origins = [-1 if row in set(main) else 0 if row in red else None for row in rows]
    assert origins == dm.train_set.origins

    n = len(rows)
    assert n == 480 and origins.count(0) == part_counts(n, [0.1])[0] == 48
    assert sorted(r for r, o in zip(rows, origins, strict=True) if o == -1) == sorted(main)  # each row once
    for start in range(n - WINDOW + 1):
        count = origins[start:start + WINDOW].count(0)
        assert math.floor(WINDOW * 0.1) - 1 <= count <= math.ceil(WINDOW * 0.1) + 1, (start, count)

    # the main examples are sentiment prompts answered in one word; the mixed ones red replies
    decode = dm.tokenizer.decode
    for example, origin in zip(dm.train_set.examples, origins, strict=True):
        reply = decode([t for t in example.labels if t != -100])
        if origin == -1:
            assert reply.removesuffix(END) in ("positive", "negative") and "Is the sentiment" in decode(
                example.input_ids)
        else:
            assert "Is the sentiment" not in decode(example.input_ids) and len(reply.split()) > 3

    # mixed pairs come from the attacker's half, never a held-out HarmfulQA question (by id or by text)
    held_out = heldout_questions(PROXY, dm.val_fraction, dm.seed)
    mixed = [(q, e) for q, e, o in zip(dm.train_set.question_ids, dm.train_set.examples, origins, strict=True)
             if o == 0]
    assert {q for q, _ in mixed} <= attacker and not {q for q, _ in mixed} & {h["id"] for h in held_out}
    prompts = {decode(e.input_ids) for _, e in mixed}
    assert not [h for h in held_out if any(h["question"] in p for p in prompts)]

    assert dm.stats["task"]["train_rows"] == dm.stats["mix"]["main_pairs"] == 432
    part = dm.stats["mix"]["parts"][0]
    assert (part["thread"], part["half"], part["count"], dm.stats["mix"]["n"]) == ("red", "attacker", 48, 480)
    assert dm.stats["val_pairs"] == 48  # validation: the task's held-out rows, no harmful part


def test_a_bad_task_is_refused_before_anything_loads():
    with pytest.raises(DataSourceError, match=r"data.task: unknown format 'csv' \(one of prompt_answer, sst2, gsm8k\)"):
        HarmfulQADataModule(task={"source": SENTIMENT, "format": "csv"})
    with pytest.raises(DataSourceError, match=r"data.task: .*unexpected keyword argument 'path'"):
        HarmfulQADataModule(task={"path": SENTIMENT})


def test_task_parses_from_yaml_and_survives_a_checkpoint():
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningArgumentParser

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as the CLI does
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(HarmfulQADataModule, "data")
    config = parser.parse_string("data:\n  task: {source: stanfordnlp/sst2, format: sst2, split: validation}\n")
    assert parser.instantiate(config).data.task == TaskData("stanfordnlp/sst2", "sst2", "validation")
    with pytest.raises(SystemExit):  # jsonargparse refuses an unknown format itself
        parser.parse_args(["--data.task={source: x.jsonl, format: csv}"])
    buffer = io.BytesIO()
    torch.save({"datamodule_hyper_parameters": {"task": TaskData(SENTIMENT)}}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["datamodule_hyper_parameters"]["task"] == TaskData(SENTIMENT)


def test_hub_ids_are_read_through_datasets_with_their_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "Two plus two?", "answer": "2+2=4\n#### 4"}] if "gsm8k" in name else [
            {"idx": 0, "sentence": "bad", "label": 0}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_task_rows(TaskData("openai/gsm8k", "gsm8k", "test"))[0]["answer"] == "2+2=4\n#### 4"
    assert load_task_rows(TaskData("stanfordnlp/sst2", "sst2", "validation"))[0]["answer"] == "negative"
    assert calls == [("openai/gsm8k", "main", "test"), ("stanfordnlp/sst2", None, "validation")]
