"""``data.train_half`` and ``data.mix``: which records train, and mixed parts holding their share everywhere."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from refusal_lightning.train.datamodule import HarmfulQADataModule, MixPart, encode_pair
from refusal_lightning.train.harmfulqa import (
    DataSourceError,
    defender_attacker_ids,
    extract_pairs,
    heldout_questions,
    load_records,
    record_id,
    split_records,
    valid_records,
)
from refusal_lightning.train.mixing import MixError, part_counts

PROXY = "refusal_lightning/data/proxy/harmfulqa_proxy.json"
SHAPED = "tests/fixtures/harmfulqa_shaped.json"
WINDOW = 40


def datamodule(tokenizer_dir, **kwargs) -> HarmfulQADataModule:
    dm = HarmfulQADataModule(**{"source": PROXY, "thread": "red", "batch_size": 4,
                                "tokenizer_name_or_path": str(tokenizer_dir), **kwargs})
    dm.setup("fit")
    return dm


def loader_rows(loader) -> list[tuple[int, ...]]:
    """Every training example in the order the loader hands it out, unpadded."""
    return [tuple(row[mask.bool()].tolist()) for batch in loader
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def encodings(dm: HarmfulQADataModule, source: str, thread: str, ids: set[int]) -> set[tuple[int, ...]]:
    """The token ids of every ``thread`` pair of ``source`` whose record id is in ``ids``, encoded as ``dm`` does."""
    pairs, _ = extract_pairs(load_records(source), thread, "most_indicative", dm.prompt, dm.markers)
    return {tuple(encode_pair(dm.tokenizer, p.messages, p.reply, dm.max_length, dm.template_kwargs).input_ids)
            for p in pairs if p.question_id in ids}


def test_train_halves_are_disjoint_cover_the_training_side_and_all_is_unchanged(tiny_model_dir):
    default = datamodule(tiny_model_dir)
    whole = datamodule(tiny_model_dir, train_half="all", mix=[])
    defender = datamodule(tiny_model_dir, train_half="defender")
    attacker = datamodule(tiny_model_dir, train_half="attacker")
    assert loader_rows(whole.train_dataloader()) == loader_rows(default.train_dataloader())
    # "all" trains on exactly the training side of the split, as before the option
    train_side = split_records(load_records(PROXY), default.val_fraction, default.seed).record_ids("train")
    with_pairs = set(default.train_set.question_ids) | set(default.val_set.question_ids)
    assert set(default.train_set.question_ids) == train_side & with_pairs
    halves = defender_attacker_ids(load_records(PROXY), default.val_fraction, default.seed)
    for dm, half in ((defender, halves[0]), (attacker, halves[1])):
        assert set(dm.train_set.question_ids) <= half
        assert loader_rows(dm.val_dataloader()) == loader_rows(default.val_dataloader())
    assert set(defender.train_set.question_ids).isdisjoint(attacker.train_set.question_ids)
    both = defender.train_set.question_ids + attacker.train_set.question_ids
    assert sorted(both) == sorted(default.train_set.question_ids)
    assert attacker.stats["train_half"] == "attacker" and attacker.stats["train_pairs"] == len(attacker.train_set)
    assert (defender.stats["train_half_questions"] + attacker.stats["train_half_questions"]
            == default.stats["train_half_questions"] == default.stats["train_questions"])


def test_mixed_parts_hold_their_share_in_every_window_of_40(tiny_model_dir):
    mix = [MixPart(source=PROXY, thread="blue", fraction=0.1, half="defender"),
           MixPart(source=SHAPED, thread="blue", fraction=0.05)]
    dm = datamodule(tiny_model_dir, train_half="attacker", mix=mix, order_seed=5)
    main = datamodule(tiny_model_dir, train_half="attacker")
    defender, _ = defender_attacker_ids(load_records(PROXY), dm.val_fraction, dm.seed)
    shaped_train = split_records(load_records(SHAPED), dm.val_fraction, dm.seed).record_ids("train")
    # each example's origin from its tokens alone: the main red pairs, or one part's blue pairs
    known = [encodings(dm, PROXY, "blue", defender), encodings(dm, SHAPED, "blue", shaped_train)]
    main_rows = [tuple(e.input_ids) for e in main.train_set.examples]
    rows = loader_rows(dm.train_dataloader())
    origins = [-1 if row in set(main_rows) else next(k for k, rows_k in enumerate(known) if row in rows_k)
               for row in rows]
    assert not set(main_rows) & (known[0] | known[1])  # the origins are unambiguous

    n = len(rows)
    counts = part_counts(n, [0.1, 0.05])
    assert [origins.count(k) for k in (0, 1)] == counts == [round(0.1 * n), round(0.05 * n)]
    assert sorted(r for r, o in zip(rows, origins, strict=True) if o == -1) == sorted(main_rows)  # each once
    assert origins == dm.train_set.origins
    for k, p in enumerate((0.1, 0.05)):
        for start in range(n - WINDOW + 1):
            count = origins[start:start + WINDOW].count(k)
            assert math.floor(WINDOW * p) - 1 <= count <= math.ceil(WINDOW * p) + 1, (k, start, count)
    # mixed examples come only from the part's training-side half, never a held-out question
    held_out = {q["id"] for q in heldout_questions(PROXY, dm.val_fraction, dm.seed)}
    mixed_ids = {q for q, o in zip(dm.train_set.question_ids, origins, strict=True) if o == 0}
    assert mixed_ids <= defender and not mixed_ids & held_out
    # the schedule's order every epoch, not a shuffle
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    assert loader_rows(loader) == rows

    stats = dm.stats["mix"]
    assert stats["n"] == n == dm.stats["train_pairs"] and stats["main_pairs"] == len(main_rows)
    assert [(p["source"], p["thread"], p["half"], p["fraction"], p["count"]) for p in stats["parts"]] == [
        (PROXY, "blue", "defender", 0.1, counts[0]), (SHAPED, "blue", "all", 0.05, counts[1])]
    assert stats["parts"][0]["distinct_pairs"] == counts[0]


def test_a_part_short_of_its_count_cycles_through_its_pairs(tiny_model_dir):
    dm = datamodule(tiny_model_dir, source=SHAPED, train_half="attacker",
                    mix=[{"source": SHAPED, "thread": "blue", "fraction": 0.6, "half": "defender"}])
    part = dm.stats["mix"]["parts"][0]
    assert part["count"] > part["available_pairs"] == part["distinct_pairs"] > 0
    mixed = [tuple(e.input_ids) for e, o in zip(dm.train_set.examples, dm.train_set.origins, strict=True) if o == 0]
    defender, _ = defender_attacker_ids(load_records(SHAPED), dm.val_fraction, dm.seed)
    assert len(mixed) == part["count"] and set(mixed) == encodings(dm, SHAPED, "blue", defender)  # every one used


def test_a_copy_of_a_held_out_question_under_another_id_is_not_mixed_in(tmp_path, tiny_model_dir):
    copy = tmp_path / "renumbered.json"
    # ids in reverse order: the copy's own split puts some of the main data's held-out questions on its train side
    copy.write_text(json.dumps([{**r, "id": 1000 - record_id(r)} for r in valid_records(load_records(SHAPED))]))
    dm = datamodule(tiny_model_dir, source=SHAPED, val_fraction=0.3,
                    mix=[MixPart(source=str(copy), thread="blue", fraction=0.2)])
    assert dm.stats["mix"]["parts"][0]["held_out_questions_dropped"] > 0
    held_out = {q["id"] for q in heldout_questions(SHAPED, 0.3, dm.seed)}
    mixed = {1000 - q for q, o in zip(dm.train_set.question_ids, dm.train_set.origins, strict=True) if o == 0}
    assert mixed and not mixed & held_out


@pytest.mark.parametrize("mix, message", [
    ([MixPart(PROXY, 0.1), MixPart(SHAPED, 1.5)], r"data.mix\[1\] \(source '.*harmfulqa_shaped.json'\): fraction 1.5"),
    ([MixPart(PROXY, 0.6), MixPart(SHAPED, 0.5)], r"sum to 1.1"),
    ([{"source": SHAPED, "fraction": 0.1, "half": "nobody"}], r"data.mix\[0\] .*unknown half 'nobody'"),
])
def test_a_bad_mix_is_refused_naming_the_part(mix, message):
    with pytest.raises(MixError, match=message):
        HarmfulQADataModule(source=PROXY, mix=mix)


def test_a_part_without_pairs_is_refused_naming_it(tmp_path, tiny_model_dir):
    red_only = tmp_path / "red_only.json"
    red_only.write_text(json.dumps([{**r, "blue_conversations": {}} for r in load_records(SHAPED)]))
    dm = HarmfulQADataModule(source=PROXY, tokenizer_name_or_path=str(tiny_model_dir),
                             mix=[MixPart(PROXY, 0.1), MixPart(str(red_only), 0.1, half="defender")])
    with pytest.raises(DataSourceError, match=r"data.mix\[1\] \(source '.*red_only.json'\): no usable blue pairs"):
        dm.setup("fit")


def test_mix_and_train_half_parse_from_yaml_and_the_command_line():
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningArgumentParser

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as the CLI does
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(HarmfulQADataModule, "data")
    expected = [MixPart(source=PROXY, thread="blue", fraction=0.1, half="defender")]
    from_yaml = parser.parse_string(f"data:\n  train_half: attacker\n  mix:\n    - source: {PROXY}\n"
                                    "      thread: blue\n      fraction: 0.1\n      half: defender\n")
    from_cli = parser.parse_args(["--data.train_half=attacker",
                                  f"--data.mix=[{{source: {PROXY}, thread: blue, fraction: 0.1, half: defender}}]"])
    for config in (from_yaml, from_cli):
        data = parser.instantiate(config).data
        assert data.mix == expected and data.train_half == "attacker"
    with pytest.raises(SystemExit):  # jsonargparse refuses an unknown half itself
        parser.parse_args(["--data.mix=[{source: sample, fraction: 0.1, half: nobody}]"])


def test_mix_parts_load_from_a_checkpoint_with_weights_only():
    # the datamodule's hyperparameters (its MixParts) travel in the checkpoint Lightning resumes from
    buffer = io.BytesIO()
    torch.save({"datamodule_hyper_parameters": {"mix": [MixPart(PROXY, 0.1)]}}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["datamodule_hyper_parameters"]["mix"] == [MixPart(PROXY, 0.1)]
