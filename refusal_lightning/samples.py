"""Where the bundled synthetic samples live, and how to tell a hub id from a local path.

No torch here: the data and evaluation code import it without pulling in the model stack.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def sample_path(name: str) -> Path:
    """Path of a bundled sample file (``harmfulqa_sample.json``, ``sorry_bench_sample.jsonl``)."""
    return Path(str(resources.files("refusal_lightning") / "data" / name))


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` that does not read as a local path (``./x``, ``/x``, ``~/x``)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))
