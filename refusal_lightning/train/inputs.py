"""A fit's inputs, checked before anything loads, and the command that makes each one.

On a fresh clone the tiny configs run as given: a missing model folder named ``tiny-qwen3`` is built on
first use (the tiny model is deterministic, so building it is as good as shipping it). Any other missing
input stops the run at once with one line naming, in order, the command that writes each piece: the CPU
model before ``prepare-model``, the refusal adapter and directions file before an attack fit, a hub model
that is not cached while ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from refusal_lightning.samples import looks_like_hub_id

TINY_MODEL_NAME = "tiny-qwen3"
CPU_MODEL_NAME = "smollm2-135m-instruct"  # prepare-model's default folder name
COMMAND = "python -m refusal_lightning"


class MissingInputError(ValueError):
    """Inputs of a fit that do not exist yet; the message names the command that writes each."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def model_problem(name_or_path: str) -> str | None:
    """Why the base model cannot be loaded as configured (None when it can, or will be built on first use)."""
    path = Path(os.path.expanduser(name_or_path))
    if path.exists() or path.name == TINY_MODEL_NAME:
        return None
    if looks_like_hub_id(name_or_path):
        if _offline() and not _cached(name_or_path):
            return (f"model '{name_or_path}' is not in the Hugging Face cache, and HF_HUB_OFFLINE is set (run "
                    f"`hf download {name_or_path}` once online, or use configs/tiny or configs/cpu offline)")
        return None
    if path.name == CPU_MODEL_NAME:
        return (f"model folder '{name_or_path}' does not exist yet (run `{COMMAND} prepare-model --output_dir "
                f"{name_or_path}`)")
    return (f"model folder '{name_or_path}' does not exist (write one with `{COMMAND} prepare-model --output_dir "
            f"{name_or_path}` or `{COMMAND} tiny-model --output_dir {name_or_path}`, or give a hub id)")


def _fit_configs(near: Iterable[str]) -> list[Path]:
    """Fit configs that could write a missing input: the given configs' folders first, then ``configs/``."""
    folders = [Path(c).parent for c in near] + [Path("configs")]
    seen: dict[Path, None] = {}
    for folder in folders:
        for path in sorted(folder.glob("**/*.yaml")) if folder.is_dir() else []:
            seen.setdefault(path, None)
    return list(seen)


def producer_of(output_dir: str, near: Sequence[str] = ()) -> str:
    """The ``fit`` command whose config writes ``output_dir`` (searched in the configs next to ``near``)."""
    want = Path(output_dir).expanduser().resolve()
    for config in _fit_configs(near):
        try:
            model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        except (yaml.YAMLError, OSError, AttributeError):
            continue
        out = model.get("output_dir") if isinstance(model, dict) else None
        if out and Path(out).expanduser().resolve() == want:
            return f"`{COMMAND} fit --config {config}`"
    return f"the fit whose model.output_dir is '{output_dir}'"


def check_fit_inputs(model_name_or_path: str, merge_adapters: Sequence[str] | None, directions_path: str | None,
                     configs: Sequence[str] = ()) -> None:
    """Raise one ``MissingInputError`` listing every missing input with the command that writes it, in the
    order to run them; then build the tiny model if that is all that is missing."""
    problems = []
    model = model_problem(model_name_or_path)
    if model:
        problems.append(model)
    adapters = list(merge_adapters or [])
    for adapter in adapters:
        path = Path(adapter).expanduser()
        if not path.exists():
            problems.append(f"adapter '{adapter}' does not exist yet (run {producer_of(adapter, configs)})")
    if directions_path and not Path(directions_path).expanduser().exists():
        source = adapters[0] if adapters else "REFUSAL_ADAPTER_DIR"
        problems.append(f"directions file '{directions_path}' does not exist yet (run `{COMMAND} directions "
                        f"--refusal_adapter_path {source} --base_model_name {model_name_or_path} "
                        f"--output_path {directions_path}`)")
    if problems:
        raise MissingInputError("; then ".join(problems))
    ensure_tiny_model(model_name_or_path)


def ensure_tiny_model(name_or_path: str) -> bool:
    """Build the tiny model into a missing folder named ``tiny-qwen3`` (written beside it, then renamed,
    so a concurrent reader never sees half a model). Returns whether it built one."""
    path = Path(os.path.expanduser(name_or_path))
    if path.exists() or path.name != TINY_MODEL_NAME:
        return False
    from refusal_lightning.models.tiny import save_tiny_model

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the tiny model at {path} (first use; deterministic, seed 0)", flush=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        save_tiny_model(Path(tmp) / "model", seed=0)
        try:
            os.replace(Path(tmp) / "model", path)
        except OSError:  # another process built it first
            if not path.is_dir():
                raise
            shutil.rmtree(Path(tmp) / "model", ignore_errors=True)
    return True
