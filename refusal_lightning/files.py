"""Crash-safe file and folder writes, for every stage that leaves results on disk.

A file is written to a temporary name in the same folder and moved into place with ``os.replace``: a
reader sees the old file or the new one, never half of one; the file is fsynced before the rename and
its folder after it, so the new name survives a power cut too. A folder is put in place the same way,
one rename at a time (``replace_dir``, ``move_files_into``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


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


def replace_dir(src: Path, dst: Path) -> None:
    """Put folder ``src`` at ``dst``: the old ``dst`` is moved aside first, so ``dst`` is never half written;
    if ``src`` cannot be moved in, or an earlier call stopped between the two renames, the old one is put back."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists() and not dst.exists():  # an earlier swap stopped half way: its old folder is the only copy
        os.replace(old, dst)
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def move_files_into(src: Path, dst: Path) -> None:
    """Replace the files of ``dst`` with those of ``src`` one ``os.replace`` at a time (no torn files);
    a subfolder of ``src`` replaces its namesake whole (``replace_dir``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_dir():
            replace_dir(f, dst / f.name)
        else:
            os.replace(f, dst / f.name)
