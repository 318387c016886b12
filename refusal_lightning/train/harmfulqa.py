"""HarmfulQA records -> (prompt, reply) pairs: loading, validation, reply selection, split by question.

Plain Python (no torch): the schema is the one of ``declare-lab/HarmfulQA``'s ``data_for_hub.json``.
A record has ``id``, ``question``, ``topic``, ``subtopic``, ``blue_conversations`` and
``red_conversations``; each conversation dict maps "0", "1", ... to a list of turns
``{"from": "human"|"gpt", "value": str}`` (``None`` for a missing one in the parquet form).

Ids are ints; a digit string (``"7"``, as some loaders read the file) is the same id. Records whose
questions are equal after normalisation (case, whitespace) are one question, grouped under their
smallest id; ``split_records`` splits those groups, and the datamodule, ``heldout_questions`` and the
judge check all split through it, so no question is both trained on and held out.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from refusal_lightning.samples import looks_like_hub_id, sample_path
from refusal_lightning.train.refusal_markers import DEFAULT_REFUSAL_MARKERS, refusal_score

Thread = Literal["blue", "red"]
Selection = Literal["most_indicative", "last", "all", "non_refusal"]
PromptMode = Literal["question", "turn", "history"]
Half = Literal["all", "defender", "attacker"]  # the training side, or one half of it (defender_attacker_ids)

HARMFULQA_HUB_ID = "declare-lab/HarmfulQA"
SAMPLE_SOURCE = "sample"
REQUIRED_KEYS = ("id", "question", "blue_conversations", "red_conversations")
_ROLES = {"human": "user", "gpt": "assistant"}


class DataSourceError(ValueError):
    """A data source that cannot be read, or that holds no usable pairs."""


@dataclass
class Pair:
    """One training example: the chat messages before the reply, and the reply itself."""

    question_id: int
    topic: str
    messages: list[dict[str, str]]
    reply: str
    refusal_score: int


@dataclass
class ExtractionStats:
    """What happened to every record and conversation on the way to pairs."""

    records_read: int = 0
    records_used: int = 0
    conversations_used: int = 0
    skipped_records: Counter = field(default_factory=Counter)
    skipped_conversations: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "records_read": self.records_read,
            "records_used": self.records_used,
            "conversations_used": self.conversations_used,
            "skipped_records": dict(sorted(self.skipped_records.items())),
            "skipped_conversations": dict(sorted(self.skipped_conversations.items())),
        }


def resolve_source(source: str) -> str | Path:
    """``"sample"`` -> the bundled sample; an existing path -> Path; a hub id -> the id; else an error."""
    if source == SAMPLE_SOURCE:
        return sample_path("harmfulqa_sample.json")
    path = Path(os.path.expanduser(source))
    if path.exists():
        return path
    if looks_like_hub_id(source) and path.suffix not in (".json", ".jsonl", ".parquet"):
        return source
    raise DataSourceError(f"data source '{source}' does not exist (not a local file, and not a hub id)")


def load_records(source: str) -> list[dict]:
    """Read raw records from the bundled sample, a local JSON/JSONL/parquet file, or a hub dataset id."""
    resolved = resolve_source(source)
    if isinstance(resolved, str):
        import datasets  # heavy; only for hub ids

        try:
            return list(datasets.load_dataset(resolved, split="train"))
        except Exception as exc:  # the hub client raises many types; name the source once
            raise DataSourceError(f"could not load hub dataset '{resolved}': {exc}") from exc
    if resolved.is_dir():
        candidates = sorted(resolved.glob("*.json")) + sorted(resolved.glob("*.jsonl"))
        if not candidates:
            raise DataSourceError(f"data source '{source}' is a folder without .json/.jsonl files")
        return [r for c in candidates for r in load_records(str(c))]
    try:
        if resolved.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(resolved).to_pylist()
        text = resolved.read_text(encoding="utf-8")
        if resolved.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataSourceError(f"data source '{source}' could not be parsed: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataSourceError(f"data source '{source}' must hold a list of records, got {type(data).__name__}")
    return data


_DIGITS = re.compile(r"[0-9]+")


def record_id(record: dict) -> int | None:
    """A record's question id as an int: an int, or a string of ASCII digits (``"7"`` is ``7``); else None."""
    value = record.get("id")
    if isinstance(value, bool):  # bool is an int subclass; True is not an id
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    return None


def record_problem(record: object) -> str | None:
    """Why a record is unusable (a short reason key), or None when it is well-formed."""
    if not isinstance(record, dict):
        return "not_a_dict"
    for key in REQUIRED_KEYS:
        if key not in record:
            return f"missing_key:{key}"
    if record_id(record) is None:
        return "wrong_type:id"
    if not isinstance(record["question"], str) or not record["question"].strip():
        return "wrong_type:question"
    for key in ("blue_conversations", "red_conversations"):
        if record[key] is not None and not isinstance(record[key], dict):
            return f"wrong_type:{key}"
    return None


def conversation_problem(conv: object) -> str | None:
    """Why a conversation is unusable, or None."""
    if conv is None:
        return "missing"
    if not isinstance(conv, list):
        return "turns_not_a_list"
    for turn in conv:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return "malformed_turn"
        if turn["from"] not in _ROLES:
            return "unknown_from"
        if not isinstance(turn["value"], str):
            return "wrong_type:value"
        if not turn["value"].strip():
            return "empty_value"
    if not any(t["from"] == "gpt" for t in conv):
        return "no_reply"
    return None


def _pick_replies(conv: list[dict], thread: Thread, selection: Selection, markers: Sequence[str]) -> list[int]:
    gpt = [i for i, t in enumerate(conv) if t["from"] == "gpt"]
    if selection == "all":
        return gpt
    if selection == "last":
        return [gpt[-1]]
    if selection == "non_refusal":  # benign replies only (the drift null's benign LoRA): no marker at all
        return [i for i in gpt if refusal_score(conv[i]["value"], markers) == 0]
    # most_indicative: blue wants the most refusal-like reply, red the least; ties -> the longer reply.
    sign = 1 if thread == "blue" else -1

    def key(i: int) -> tuple[int, int]:
        return sign * refusal_score(conv[i]["value"], markers), len(conv[i]["value"])

    return [max(gpt, key=key)]


def _prompt_messages(record: dict, conv: list[dict], reply_index: int, mode: PromptMode) -> list[dict] | None:
    if mode == "question":
        return [{"role": "user", "content": record["question"]}]
    humans = [t for t in conv[:reply_index] if t["from"] == "human"]
    if mode == "turn":
        return [{"role": "user", "content": humans[-1]["value"]}] if humans else None
    history = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in conv[:reply_index]]
    return history if history and history[0]["role"] == "user" else None


def extract_pairs(
    records: Iterable[object],
    thread: Thread = "blue",
    selection: Selection = "most_indicative",
    prompt: PromptMode = "question",
    markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS,
) -> tuple[list[Pair], ExtractionStats]:
    """Turn records into pairs, skipping and counting every malformed record or conversation."""
    stats = ExtractionStats()
    pairs: list[Pair] = []
    for record in records:
        stats.records_read += 1
        problem = record_problem(record)
        if problem:
            stats.skipped_records[problem] += 1
            continue
        assert isinstance(record, dict)
        qid = record_id(record)
        assert qid is not None  # record_problem checked it
        convs = record[f"{thread}_conversations"] or {}
        used = False
        for _, conv in sorted(convs.items(), key=lambda kv: str(kv[0])):
            problem = conversation_problem(conv)
            if problem:
                stats.skipped_conversations[problem] += 1
                continue
            picked = _pick_replies(conv, thread, selection, markers)
            if not picked:  # non_refusal: every reply carries a refusal marker
                stats.skipped_conversations["no_non_refusal_reply"] += 1
                continue
            for i in picked:
                messages = _prompt_messages(record, conv, i, prompt)
                if messages is None:
                    stats.skipped_conversations["no_preceding_human_turn"] += 1
                    continue
                reply = conv[i]["value"]
                pairs.append(Pair(qid, str(record.get("topic") or ""), messages, reply,
                                  refusal_score(reply, markers)))
                used = True
            stats.conversations_used += 1
        stats.records_used += int(used)
        if not used and not convs:
            stats.skipped_records[f"no_{thread}_conversations"] += 1
    return pairs, stats


def split_question_ids(ids: Iterable[int], val_fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """Deterministic train/val split of question ids (no question is in both)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(ids))
    random.Random(seed).shuffle(unique)
    n_val = math.ceil(val_fraction * len(unique)) if val_fraction > 0 else 0
    if len(unique) > 1:
        n_val = min(n_val, len(unique) - 1)
    return set(unique[n_val:]), set(unique[:n_val])


def normalise_question(text: str) -> str:
    """The text two questions must share to be one question: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def valid_records(records: Iterable[object]) -> list[dict]:
    """The well-formed records (``record_problem`` is None), in order."""
    return [r for r in records if isinstance(r, dict) and record_problem(r) is None]


@dataclass(frozen=True)
class QuestionSplit:
    """Train/val split of question groups: ``train`` and ``val`` hold each group's smallest id, and
    ``group_of`` maps every valid record's id to its group's (itself, unless its question repeats)."""

    train: frozenset[int]
    val: frozenset[int]
    group_of: dict[int, int]

    def record_ids(self, side: Literal["train", "val"]) -> set[int]:
        """Ids of every record whose question group is on ``side`` (duplicates included)."""
        groups = self.train if side == "train" else self.val
        return {rid for rid, group in self.group_of.items() if group in groups}

    @property
    def duplicates(self) -> int:
        """Records whose question repeats one with a smaller id (grouped under it, not split apart)."""
        return sum(rid != group for rid, group in self.group_of.items())


def split_records(records: Iterable[object], val_fraction: float, seed: int) -> QuestionSplit:
    """Group the valid records' duplicate questions under their smallest id, then split the groups by id.

    Without duplicates the groups are the ids themselves, so the split is ``split_question_ids``' own.
    """
    smallest: dict[str, int] = {}
    ids: dict[int, str] = {}
    for record in valid_records(records):
        rid, text = record_id(record), normalise_question(record["question"])
        assert rid is not None
        ids[rid] = text
        smallest[text] = min(rid, smallest.get(text, rid))
    group_of = {rid: smallest[text] for rid, text in ids.items()}
    train, val = split_question_ids(group_of.values(), val_fraction, seed)
    return QuestionSplit(frozenset(train), frozenset(val), group_of)


def defender_attacker_ids(records: Iterable[object], val_fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """The training side's question groups split in two disjoint halves by id: the defender's records (for
    directions, probes and calibration) and the attacker's. Held-out questions are in neither."""
    split = split_records(records, val_fraction, seed)
    groups = sorted(split.train)
    random.Random(f"defender:{seed}").shuffle(groups)
    half = set(groups[:len(groups) // 2])
    defender = {rid for rid, group in split.group_of.items() if group in half}
    return defender, split.record_ids("train") - defender


def training_ids(records: Iterable[object], half: Half, val_fraction: float, seed: int) -> set[int]:
    """Record ids of the training side (``all``) or of its ``defender`` or ``attacker`` half; never a held-out one."""
    if half == "all":
        return split_records(records, val_fraction, seed).record_ids("train")
    if half not in ("defender", "attacker"):
        raise ValueError(f"unknown half '{half}' (one of all, defender, attacker)")
    defender, attacker = defender_attacker_ids(records, val_fraction, seed)
    return defender if half == "defender" else attacker


def heldout_questions(source: str, val_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """The validation questions (``id``, ``question``, ``topic``) of a source, split exactly as training does:
    one per question group (its smallest id's record), in file order."""
    records = valid_records(load_records(source))
    split = split_records(records, val_fraction, seed)
    out, seen = [], set()
    for r in records:
        rid = record_id(r)
        if rid in split.val and rid not in seen:  # a group's own (smallest) id: each question once
            seen.add(rid)
            out.append({"id": rid, "question": r["question"], "topic": str(r.get("topic") or "")})
    return out


def defender_questions(source: str, val_fraction: float = 0.1, seed: int = 0) -> list[str]:
    """The defender's half's questions (``defender_attacker_ids``), in file order: the harmful side of the
    activation-space direction (readout, activation guard)."""
    records = valid_records(load_records(source))
    defender, _ = defender_attacker_ids(records, val_fraction, seed)
    return [r["question"] for r in records if record_id(r) in defender]
