"""sha256 of a file: how an adapter or a GGUF file is recognised across runs (directions provenance,
the cached GGUF conversion, the pipeline's stage fingerprints)."""

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
