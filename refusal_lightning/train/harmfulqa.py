"""HarmfulQA records -> (prompt, reply) pairs: loading, validation, reply selection, split by question.

Plain Python (no torch): the schema is the one of ``declare-lab/HarmfulQA``'s ``data_for_hub.json``.
A record has ``id``, ``question``, ``topic``, ``subtopic``, ``blue_conversations`` and
``red_conversations``; each conversation dict maps "0", "1", ... to a list of turns
``{"from": "human"|"gpt", "value": str}`` (``None`` for a missing one in the parquet form).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from refusal_lightning.samples import looks_like_hub_id, sample_path
from refusal_lightning.train.refusal_markers import DEFAULT_REFUSAL_MARKERS, refusal_score

Thread = Literal["blue", "red"]
Selection = Literal["most_indicative", "last", "all"]
PromptMode = Literal["question", "turn", "history"]

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


def record_problem(record: object) -> str | None:
    """Why a record is unusable (a short reason key), or None when it is well-formed."""
    if not isinstance(record, dict):
        return "not_a_dict"
    for key in REQUIRED_KEYS:
        if key not in record:
            return f"missing_key:{key}"
    if isinstance(record["id"], bool) or not isinstance(record["id"], int):
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
        convs = record[f"{thread}_conversations"] or {}
        used = False
        for _, conv in sorted(convs.items(), key=lambda kv: str(kv[0])):
            problem = conversation_problem(conv)
            if problem:
                stats.skipped_conversations[problem] += 1
                continue
            for i in _pick_replies(conv, thread, selection, markers):
                messages = _prompt_messages(record, conv, i, prompt)
                if messages is None:
                    stats.skipped_conversations["no_preceding_human_turn"] += 1
                    continue
                reply = conv[i]["value"]
                pairs.append(Pair(record["id"], str(record.get("topic") or ""), messages, reply,
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


def heldout_questions(source: str, val_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """The validation questions (``id``, ``question``, ``topic``) of a source, split exactly as training does."""
    records = [r for r in load_records(source) if record_problem(r) is None]
    _, val_ids = split_question_ids((r["id"] for r in records), val_fraction, seed)
    return [{"id": r["id"], "question": r["question"], "topic": str(r.get("topic") or "")}
            for r in records if r["id"] in val_ids]
