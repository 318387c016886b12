"""Loading base models and adapters, with one clear error per bad path."""

from __future__ import annotations

import os
from pathlib import Path

from refusal_lightning.samples import looks_like_hub_id

# Model dtypes by torch name; "auto" (the checkpoint's own) is accepted as well. Names, not torch
# objects, so that commands can validate a --dtype before paying for the torch import.
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's own


class ModelPathError(ValueError):
    """A model or adapter path that does not exist or lacks the files it needs."""


def check_model_path(name_or_path: str) -> str:
    """Return ``name_or_path`` when it is an existing folder or a plausible hub id, else raise."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            raise ModelPathError(f"model path '{name_or_path}' is a folder without config.json")
        return str(path)
    if path.exists():
        raise ModelPathError(f"model path '{name_or_path}' is a file, expected a model folder or hub id")
    if looks_like_hub_id(name_or_path):
        return name_or_path
    raise ModelPathError(f"model path '{name_or_path}' does not exist (not a folder, and not a hub id)")


def check_adapter_dir(path: str) -> Path:
    """An existing PEFT adapter folder (``adapter_config.json`` + weights), else raise."""
    folder = Path(os.path.expanduser(path))
    if folder.is_file():
        raise ModelPathError(f"adapter dir '{path}' is a file ({folder.name}), not an adapter folder; "
                             f"pass the folder that holds it: '{folder.parent}'")
    if not folder.is_dir():
        raise ModelPathError(f"adapter dir '{path}' does not exist")
    if not (folder / "adapter_config.json").exists():
        raise ModelPathError(f"adapter dir '{path}' has no adapter_config.json (not a PEFT adapter folder)")
    if not any((folder / f).exists() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ModelPathError(f"adapter dir '{path}' has no adapter_model.safetensors")
    return folder


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    """Load a causal LM (hub id or folder) in ``dtype`` (a name of ``DTYPES``, or ``auto`` for the
    checkpoint's); adapters are applied by the caller, never merged here (a merge into a bf16 base would
    round most of a small LoRA update away)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = check_model_path(name_or_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    except OSError as exc:
        raise ModelPathError(f"could not load model '{name_or_path}': {exc}") from exc
