"""sha256 of a file: how an adapter or a GGUF file is recognised across runs (directions provenance,
the cached GGUF conversion, the pipeline's stage fingerprints); of a source tree: which code made a stage."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (a GGUF is ~100 MB; this takes well under a second)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(root: Path, pattern: str = "*.py") -> str:
    """Hex sha256 over the files matching ``pattern`` under ``root``: each one's path relative to ``root``
    and its content, in sorted order (caches such as ``__pycache__`` do not match ``*.py``)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
