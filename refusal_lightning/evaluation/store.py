"""Crash-safe, append-only JSONL logs: the evaluator's responses and judgments.

A log line is written with one ``write`` call, flushed and fsynced before the next, so a crash
(SIGKILL, power loss) leaves at worst one torn last line. Reading tolerates that line, and opening
for append cuts it off first, so the next record starts on a fresh line instead of being glued to
garbage. Whole-file writes (summaries, reports) are ``refusal_lightning.files.atomic_write``.

``EvalStore`` reads an output folder's two logs back into the latest response per item and the final
judgment per item and judge: what a rerun skips, and what the summary is rebuilt from.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from refusal_lightning.evaluation.prompts import BENIGN, HARMFULQA_HELDOUT, SORRY_BENCH, Prompt


class JsonlLog:
    """An append-only JSON-lines file.

    Args:
        path: the ``.jsonl`` file (created with its folder on first append).
        durable: ``fsync`` after every line (the default); off only where speed matters more than
            surviving a power cut.
    """

    def __init__(self, path: str | Path, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
        self.corrupt_lines = 0
        self._fh: IO[str] | None = None
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a torn last line is ignored, other unreadable lines are counted in
        ``corrupt_lines`` and skipped."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        torn_tail = not raw.endswith(b"\n")
        records = []
        self.corrupt_lines = 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not (torn_tail and i == len(lines) - 1):
                    self.corrupt_lines += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                self.corrupt_lines += 1
        return records

    def _repair_tail(self) -> None:
        """Cut a torn last line (no trailing newline) so appends start on a clean line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            cut = fh.read().rfind(b"\n") + 1  # 0 when the only line is torn
            fh.truncate(cut)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line; durable before this returns (when ``durable``)."""
        self.append_many([record])

    def append_many(self, records: list[dict[str, Any]]) -> None:
        """Write records one line each, then flush and fsync once (group commit): all of them are on
        disk before this returns. Each line goes to the OS whole, so a SIGKILL mid-batch can only
        tear the last one."""
        if not records:
            return
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._repair_tail()
                self._fh = self.path.open("a", encoding="utf-8")
            for record in records:
                self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                self._fh.flush()
            if self.durable:
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# Resume bookkeeping: what an output folder already holds, per item


RESPONSES = "responses.jsonl"
JUDGMENTS = "judgments.jsonl"

ResponseKey = tuple[str, str, str, str, int]  # endpoint, prompt_set, question_id, style, sample
JudgmentKey = tuple[str, str, str, str, int, str]  # ... + judge_id


@dataclass(frozen=True)
class WorkItem:
    """One request to make: a prompt and which of its samples."""

    prompt: Prompt
    sample: int

    def key(self, endpoint: str) -> ResponseKey:
        p = self.prompt
        return (endpoint, p.prompt_set, str(p.question_id), p.style, self.sample)


def row_prompt_set(row: dict[str, Any]) -> str:
    """A log row's prompt set. Rows written before prompt sets existed have none; theirs follows from
    the id (``hq-`` HarmfulQA, ``benign-`` benign, else SORRY-Bench), and a row placed in the wrong set
    would still not be reused, because an answer counts only for the exact prompt text it answered."""
    found = row.get("prompt_set")
    if isinstance(found, str) and found:
        return found
    qid = str(row["question_id"])
    return HARMFULQA_HELDOUT if qid.startswith("hq-") else BENIGN if qid.startswith("benign-") else SORRY_BENCH


def _response_key(row: dict[str, Any]) -> ResponseKey:
    return (row["endpoint"], row_prompt_set(row), str(row["question_id"]), row["style"], int(row["sample"]))


def _judgment_key(row: dict[str, Any]) -> JudgmentKey:
    return (*_response_key(row), row["judge_id"])


def _keyed_rows(log: JsonlLog, key_of: Callable[[dict[str, Any]], Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(key, row) for every row of ``log`` that has the fields of a key; other rows are skipped."""
    for row in log.read():
        try:
            key = key_of(row)
        except (KeyError, TypeError, ValueError):
            continue
        yield key, row


def load_responses(log: JsonlLog) -> dict[ResponseKey, dict[str, Any]]:
    """Latest row per item, where a successful response is never displaced by a later error row."""
    best: dict[ResponseKey, dict[str, Any]] = {}
    for key, row in _keyed_rows(log, _response_key):
        if row.get("error") is None or key not in best or best[key].get("error") is not None:
            best[key] = row
    return best


def load_judgments(log: JsonlLog) -> dict[JudgmentKey, dict[str, Any]]:
    """The latest final judgment per item and judge: a label, or an unparseable judge answer
    (temperature 0 would repeat it). Transport failures are left out so the next run asks again."""
    final: dict[JudgmentKey, dict[str, Any]] = {}
    for key, row in _keyed_rows(log, _judgment_key):
        if row.get("label") is not None or row.get("error_type") == "unparseable":
            final[key] = row
    return final


def response_digest(row: dict[str, Any]) -> str:
    """Fingerprint of (prompt, response): a judgment counts only for the exchange it judged."""
    text = f"{row.get('prompt') or ''}\0{row.get('response') or ''}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def is_current(row: dict[str, Any] | None, item: WorkItem, model: str | None) -> bool:
    """A finished response for this item as planned now: same prompt text and, when known, same model.
    (An output folder reused with another prompt file or another model behind the same name must
    not pass old answers off as new ones.)"""
    return (row is not None and row.get("error") is None and row.get("prompt") == item.prompt.text
            and (model is None or row.get("model") == model))


def judgment_for(judgments: dict[JudgmentKey, dict[str, Any]], key: ResponseKey, judge_id: str,
                 response: dict[str, Any]) -> dict[str, Any] | None:
    """The final judgment of ``response`` by ``judge_id``, if it judged this very exchange."""
    j = judgments.get((*key, judge_id))
    return j if j is not None and j.get("response_sha") == response_digest(response) else None


class EvalStore:
    """An output folder's two logs and what they already hold, which is what a rerun resumes from.

    Args:
        folder: the ``evaluate`` output folder (created if missing).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.responses_log, self.judgments_log = JsonlLog(self.folder / RESPONSES), JsonlLog(self.folder / JUDGMENTS)
        self.responses = load_responses(self.responses_log)
        self.judgments = load_judgments(self.judgments_log)
        self.corrupt_lines = self.responses_log.corrupt_lines + self.judgments_log.corrupt_lines

    def current(self, item: WorkItem, endpoint: str, model: str | None) -> dict[str, Any] | None:
        """The finished response of ``item`` at ``endpoint`` that this run can reuse, or None."""
        row = self.responses.get(item.key(endpoint))
        return row if is_current(row, item, model) else None

    def close(self) -> None:
        self.responses_log.close()
        self.judgments_log.close()
