"""Several LoRA adapters as one: the model an attack was trained as, loadable on the plain base.

The attacks train a LoRA on top of base + the refusal LoRA (kept frozen and unmerged, see
``model.RefusalLoRAModule``). To evaluate exactly that model with one server (our ``serve`` or
``vllm serve BASE --enable-lora``), each attack is also exported as a *combined* adapter: per module

    A = [A_1; A_2; ...]          (ranks concatenated)
    B = [s_1 B_1, s_2 B_2, ...]  (each adapter's scale folded into its B)

with ``lora_alpha = r = sum(r_i)`` (scale 1), so ``B A = sum_i s_i B_i A_i``: the same weight change
the stacked adapters apply, computed the same way (unmerged), on any base dtype. A module that only
some adapters target gets zero rows/columns for the others.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from refusal_lightning.files import replace_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
COMBINED_DIR = "combined"
SOURCES_FILE = "combined_from.json"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# vLLM's accepted ``--max-lora-rank`` values (``MaxLoRARanks`` in vllm/config/lora.py, v0.11-v0.14): any
# other value is refused at startup, and an adapter of a higher rank than the flag is refused when loaded.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Settings that change what an adapter computes beyond s * B @ A: combining them would be wrong.
_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "fan_in_fan_out": False}


class StackingError(ValueError):
    """Adapters that cannot be combined into one LoRA adapter."""


def pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a suffix of the module path."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_scale(config: Mapping[str, Any], module: str) -> float:
    """PEFT's scale of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), patterns applied."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves an adapter of rank ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise StackingError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def adapter_rank(path: str | os.PathLike) -> int:
    """The largest LoRA rank of an adapter folder (``r`` and any ``rank_pattern`` entry)."""
    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter folder's config and its ``{module: (A, B)}`` factors (float32, CPU)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise StackingError(f"'{path}' is not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads((folder / CONFIG_FILE).read_text())
    problems = [f"{key}={config.get(key)!r}" for key, ok in _UNSUPPORTED.items() if config.get(key, ok) not in (ok, [])]
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r}")
    if problems:
        raise StackingError(f"adapter '{path}' cannot be combined: {', '.join(problems)}")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / WEIGHTS_FILE)).items():
        match = _KEY.match(key)
        if match is None:
            raise StackingError(f"adapter '{path}': unexpected tensor '{key}' (only LoRA A/B weights combine)")
        factors.setdefault(match["module"], {})[match["factor"]] = tensor.float()
    incomplete = [m for m, f in factors.items() if set(f) != {"A", "B"}]
    if incomplete:
        raise StackingError(f"adapter '{path}': modules without both A and B: {incomplete[:4]}")
    return config, {m: (f["A"], f["B"]) for m, f in factors.items()}


def combine_adapters(adapters: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """Write one LoRA adapter equal to the sum of ``adapters`` (see the module docstring).

    Args:
        adapters: PEFT LoRA adapter folders on the same base model, e.g. ``[refusal, attack]``.
        output_dir: folder to write (replaced atomically; loadable by PEFT and vLLM on the plain base,
            with ``--max-lora-rank`` at least the combined rank).

    Returns:
        The output folder.
    """
    if not adapters:
        raise StackingError("combine_adapters needs at least one adapter")
    read = [read_adapter(a) for a in adapters]
    configs = [c for c, _ in read]
    ranks = [max(a.shape[0] for a, _ in f.values()) for _, f in read]
    total = sum(ranks)
    modules = sorted({m for _, f in read for m in f})
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        shapes = {(b.shape[0], a.shape[1]) for _, f in read if module in f for a, b in [f[module]]}
        if len(shapes) != 1:
            raise StackingError(f"module '{module}' has different shapes in the adapters: {sorted(shapes)}")
        (out_f, in_f), = shapes
        a_parts, b_parts = [], []
        for (config, factors), r in zip(read, ranks, strict=True):
            if module in factors:
                a, b = factors[module]
                pad = r - a.shape[0]  # a rank_pattern may give this module a lower rank
                a_parts.append(torch.cat([a, a.new_zeros(pad, in_f)]))
                b_parts.append(torch.cat([adapter_scale(config, module) * b, b.new_zeros(out_f, pad)], 1))
            else:
                a_parts.append(torch.zeros(r, in_f))
                b_parts.append(torch.zeros(out_f, r))
        tensors[f"{module}.lora_A.weight"] = torch.cat(a_parts).contiguous()
        tensors[f"{module}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    # Layer restrictions carry over when all adapters share them; otherwise every layer gets a LoRA and
    # the modules no adapter trained keep B = 0 (PEFT's init), which adds nothing.
    layers = {json.dumps([c.get("layers_to_transform"), c.get("layers_pattern")]) for c in configs}
    layers_to_transform, layers_pattern = json.loads(layers.pop()) if len(layers) == 1 else (None, None)
    config = {**configs[0], "r": total, "lora_alpha": total, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "lora_dropout": 0.0, "target_modules": targets,
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern, "inference_mode": True}
    sources = {"combined_from": [{"path": str(a), "r": r} for a, r in zip(adapters, ranks, strict=True)]}
    _write_adapter(config, tensors, sources, Path(output_dir))
    return Path(output_dir)


def _write_adapter(config: dict[str, Any], tensors: dict[str, torch.Tensor], sources: dict[str, Any],
                   out: Path) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Kept out of adapter_config.json: PEFT and vLLM warn about keys they do not know.
        (staging / SOURCES_FILE).write_text(json.dumps(sources, indent=2) + "\n")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def combine(adapter: list[str], output_dir: str) -> str:
    """Combine LoRA adapters (applied together on one base) into one adapter that any server loads.

    Args:
        adapter: adapter folders in the order they are stacked, e.g. ``--adapter artifacts/refusal_lora
            --adapter artifacts/attack_vanilla``.
        output_dir: folder for the combined adapter.
    """
    out = combine_adapters(adapter, output_dir)
    rank = adapter_rank(out)
    print(f"combined {len(adapter)} adapters into {out} (rank {rank}, scale 1)")
    # vLLM refuses an adapter above --max-lora-rank and accepts only a few values: say which one to use.
    print(f"serve it with vLLM: --max-lora-rank {vllm_max_lora_rank(rank)}")
    return str(out)
