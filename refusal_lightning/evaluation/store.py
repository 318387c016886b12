"""Crash-safe files: append-only JSONL logs and atomic whole-file writes.

A log line is written with one ``write`` call, flushed and fsynced before the next, so a crash
(SIGKILL, power loss) leaves at worst one torn last line. Reading tolerates that line, and opening
for append cuts it off first, so the next record starts on a fresh line instead of being glued to
garbage. Summaries are written to a temporary file in the same folder and moved into place with
``os.replace``: a reader sees the old file or the new one, never half of one; the file is fsynced
before the rename and its folder after it, so the new name survives a power cut too.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the final file; a unique name is enough here.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable: the new name lives in the folder's entry table, which a
    power cut can lose unless the folder itself is fsynced (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder this way
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync folders (EINVAL): the file itself already is on disk
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
