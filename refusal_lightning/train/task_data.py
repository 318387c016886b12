"""A benign fine-tuning task's ``{prompt, answer}`` rows: the main training data of the harmful fine-tuning
threat model (a user's benign task with a fraction p of harmful samples mixed in through ``data.mix``).

The harmful fine-tuning literature (Lisa, Vaccine, Booster: code in git-disl/*) fine-tunes on SST2 or GSM8K;
the CPU tier's stand-in is the bundled sentiment task (``data/proxy/sentiment_*.jsonl``, made by
``scripts/make_sentiment_task.py``), whose rows already hold a prompt and an answer. Hub datasets in SST2's
or GSM8K's own schema are turned into the same rows here, with the prompt wording of ``SENTIMENT_PROMPT`` and
``GSM8K_PROMPT`` (the task evaluation asks its questions in the same words).

Plain Python (no torch): the evaluation reads the same rows without the model stack.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from refusal_lightning.samples import looks_like_hub_id
from refusal_lightning.train.harmfulqa import DataSourceError, split_question_ids

TaskFormat = Literal["prompt_answer", "sst2", "gsm8k"]

# The bundled task's wording (scripts/make_sentiment_task.py's PROMPT; a test checks every bundled row).
SENTIMENT_PROMPT = ("Review: {review}\n\nIs the sentiment of this review positive or negative? "
                    "Answer with one word: positive or negative.")
GSM8K_PROMPT = "{question}\n\nReason step by step, then end your answer with a final line '#### <number>'."
SST2_LABELS = {0: "negative", 1: "positive"}
# Hub datasets that need a config name (GSM8K's ``main``; its other config, ``socratic``, adds sub-questions).
HUB_CONFIGS = {"openai/gsm8k": "main"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
GSM8K_FINAL = re.compile(r"####\s*-?[\d,]*\d(?:\.\d+)?\s*$")
MAX_LISTED = 10  # bad rows named in an error; the rest are counted


@dataclass
class TaskData:
    """A benign fine-tuning task as the main training data (``data.task``)."""

    source: str
    """A local ``.jsonl``/``.json``/``.parquet`` file, or a Hub dataset id (``stanfordnlp/sst2``, ``openai/gsm8k``)."""
    format: TaskFormat = "prompt_answer"
    """Row schema: ``prompt_answer`` (``{id?, prompt, answer, label?}``, the bundled sentiment task), ``sst2``
    (``{idx, sentence, label}``, label 0 negative / 1 positive) or ``gsm8k`` (``{question, answer}``, the answer
    ending in ``#### <number>``)."""
    split: str = "train"
    """Split of a Hub dataset to read (SST2's ``test`` split is unlabelled: hold out ``validation``). A local
    file is one split, the file itself: this is ignored for it."""


def check_task(task: TaskData | dict | None) -> TaskData | None:
    """``data.task`` as a TaskData (a dict accepted from Python), or a DataSourceError naming every problem."""
    if task is None:
        return None
    try:
        task = task if isinstance(task, TaskData) else TaskData(**task)
    except TypeError as exc:
        raise DataSourceError(f"data.task: {exc}") from exc
    problems = []
    if not isinstance(task.source, str) or not task.source.strip():
        problems.append(f"source must be a file path or a hub id, got {task.source!r}")
    if task.format not in get_args(TaskFormat):
        problems.append(f"unknown format '{task.format}' (one of {', '.join(get_args(TaskFormat))})")
    if problems:
        raise DataSourceError("data.task: " + "; ".join(problems))
    return task


def _read_local(path: Path, name: str) -> list[tuple[str, object]]:
    """``(where, row)`` of every row of a local file: ``where`` names the file and the line (JSONL) or row."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(f"{name} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataSourceError(f"task source '{name}' could not be read: {exc}") from exc
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{name} line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataSourceError(f"{name} line {n}: not JSON ({exc})") from exc
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"task source '{name}' could not be parsed: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataSourceError(f"task source '{name}' must hold a list of rows, got {type(data).__name__}")
    return [(f"{name} row {i}", r) for i, r in enumerate(data)]


def _read_hub(hub_id: str, split: str) -> list[tuple[str, object]]:
    import datasets  # heavy; only for hub ids

    config = HUB_CONFIGS.get(hub_id)
    try:
        rows = list(datasets.load_dataset(hub_id, config, split=split))
    except Exception as exc:  # the hub client raises many types; name the source once
        raise DataSourceError(f"could not load hub dataset '{hub_id}' (config {config}, split '{split}'): "
                              f"{exc}") from exc
    return [(f"hub dataset '{hub_id}' split '{split}' row {i}", r) for i, r in enumerate(rows)]


def read_task_source(task: TaskData) -> list[tuple[str, object]]:
    """``(where, raw row)`` of every row of the task's source, ``where`` naming the file and line, or the hub
    id and row, for error messages."""
    path = Path(os.path.expanduser(task.source))
    if path.is_file():
        return _read_local(path, task.source)
    if looks_like_hub_id(task.source) and path.suffix not in LOCAL_SUFFIXES:
        return _read_hub(task.source, task.split)
    raise DataSourceError(f"task source '{task.source}' does not exist (not a local file, and not a hub id)")


def _text(row: dict, key: str) -> str:
    """The row's non-empty string ``key``; raises KeyError or ValueError (turned into the row's problem)."""
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _row_id(row: dict, key: str, index: int) -> str:
    """The row's own id (``key``) as a string, or its position in the source when it has none."""
    value = row.get(key)
    return str(index) if value is None or str(value).strip() == "" else str(value)


def _prompt_answer_row(row: dict, index: int) -> dict:
    out = {"id": _row_id(row, "id", index), "prompt": _text(row, "prompt"), "answer": _text(row, "answer")}
    if "label" in row:
        out["label"] = _text(row, "label")
    return out


def _sst2_row(row: dict, index: int) -> dict:
    sentence, label = _text(row, "sentence"), row["label"]
    if label == -1:
        raise ValueError("label -1: SST2's unlabelled test split (read split 'validation' for held-out rows)")
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"label must be 0 (negative) or 1 (positive), got {label!r}")
    word = SST2_LABELS[label]
    return {"id": _row_id(row, "idx", index), "prompt": SENTIMENT_PROMPT.format(review=sentence.strip()),
            "answer": word, "label": word}


def _gsm8k_row(row: dict, index: int) -> dict:
    question, answer = _text(row, "question"), _text(row, "answer")
    if not GSM8K_FINAL.search(answer):
        raise ValueError(f"answer does not end with '#### <number>': ...{answer[-40:]!r}")
    return {"id": _row_id(row, "id", index), "prompt": GSM8K_PROMPT.format(question=question.strip()),
            "answer": answer}


ROW_MAPPINGS: dict[TaskFormat, Callable[[dict, int], dict]] = {
    "prompt_answer": _prompt_answer_row, "sst2": _sst2_row, "gsm8k": _gsm8k_row}
REQUIRED_KEYS: dict[TaskFormat, tuple[str, ...]] = {
    "prompt_answer": ("prompt", "answer"), "sst2": ("sentence", "label"), "gsm8k": ("question", "answer")}


def load_task_rows(task: TaskData) -> list[dict]:
    """The task's rows ``{"id", "prompt", "answer"}`` (plus ``"label"`` for sentiment rows), in source order.

    A row's id is its own (``id``; SST2's ``idx``) or its position in the source. Every bad row (missing key,
    empty prompt or answer, bad label, GSM8K answer without ``####``) and every repeated id is reported in one
    DataSourceError naming the file and line (or the hub id and row)."""
    task = check_task(task)
    assert task is not None
    mapping = ROW_MAPPINGS[task.format]
    rows, problems = [], []
    for index, (where, raw) in enumerate(read_task_source(task)):
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"not an object, got {type(raw).__name__}")
            rows.append(mapping(raw, index))
        except KeyError as exc:
            problems.append(f"{where}: missing key {exc} ({task.format} rows need "
                            f"{', '.join(REQUIRED_KEYS[task.format])})")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    repeated = sorted(i for i, n in Counter(r["id"] for r in rows).items() if n > 1)
    if repeated:  # the split goes by id: a repeated one would be trained on and held out at once
        problems.append(f"task source '{task.source}': repeated ids {repeated[:MAX_LISTED]}")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise DataSourceError(f"bad task rows ({task.format}): " + "; ".join(problems[:MAX_LISTED]) + more)
    if not rows:
        raise DataSourceError(f"task source '{task.source}' holds no rows")
    return rows


def split_task_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and validation rows: a seeded ``val_fraction`` of the ids held out, whatever the rows' order.

    The ids, sorted, are split as ``split_question_ids`` splits question ids (the same shuffle and count)."""
    ids = sorted(r["id"] for r in rows)
    _, val = split_question_ids(range(len(ids)), val_fraction, seed)
    val_ids = {ids[i] for i in val}
    return [r for r in rows if r["id"] not in val_ids], [r for r in rows if r["id"] in val_ids]

