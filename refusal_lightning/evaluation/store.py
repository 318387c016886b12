"""Crash-safe, append-only JSONL logs: the evaluator's responses and judgments.

A log line is written with one ``write`` call, flushed and fsynced before the next, so a crash
(SIGKILL, power loss) leaves at worst one torn last line. Reading tolerates that line, and opening
for append cuts it off first, so the next record starts on a fresh line instead of being glued to
garbage. Whole-file writes (summaries, reports) are ``refusal_lightning.files.atomic_write``.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import IO, Any


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
