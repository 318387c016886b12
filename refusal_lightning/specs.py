"""``NAME=VALUE`` command-line specs (``--adapter NAME=PATH``, ``--endpoint NAME=URL``, ``--model_name
NAME=MODEL``): split in one place, so every command reads them alike."""

from __future__ import annotations


def split_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> ``(NAME, VALUE)``, both stripped (either may be empty); a spec without ``=``
    -> ``(None, spec)``, stripped: the caller decides whether a bare value is allowed."""
    name, sep, value = spec.partition("=")
    return (name.strip(), value.strip()) if sep else (None, spec.strip())
