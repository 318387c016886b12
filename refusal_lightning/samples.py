"""Where the bundled synthetic samples live, and how to tell a hub id from a local path.

No torch here: the data and evaluation code import it without pulling in the model stack.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def sample_path(name: str) -> Path:
    """Path of a bundled sample file (``harmfulqa_sample.json``, ``sorry_bench_sample.jsonl``)."""
    return Path(str(resources.files("refusal_lightning") / "data" / name))


def looks_like_hub_id(name: str, require_namespace: bool = True) -> bool:
    """A Hub repo id by huggingface_hub's own rules (``validate_repo_id``) that does not read as a local
    path (``./x``, ``/x``, ``~/x``); ``org/name`` unless ``require_namespace`` is False (``gpt2``)."""
    if name.startswith((".", "/", "~")) or (require_namespace and name.count("/") != 1):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
