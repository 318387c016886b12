"""LoX (Perin et al., COLM 2025, arXiv 2506.15606): the refusal update extrapolated along its top singular
directions before the attack, a training-free defence: plain torch, no Lightning.

The authors' script (VITA-Group/LoX ``safety/LoX.py``) takes every 2-D weight of the aligned model, its
alignment update ``dW = W_aligned - W_base``, and writes

    W_aligned + coef * U_k S_k V_k^T        (the rank-k truncated SVD of dW, per weight matrix)

with ``--k 0`` (their default) meaning the whole ``dW`` and ``--coef 1`` by default. Here the aligned model
is base + the refusal LoRA, so ``dW_r = s B A`` on the refusal adapter's modules (``s = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA) and ``dW = 0`` everywhere else: the extrapolation is itself a LoRA of rank
``k <= r`` on the same modules,

    B' = alpha * U_k sqrt(S_k),    A' = sqrt(S_k) V_k^T,    scale 1,

computed from the factors (``lowrank_svd``), never from an ``out x in`` matrix. Stacked frozen above the
refusal LoRA the model is ``W + dW_r + alpha * P_k(dW_r)``; with ``k = r`` (the default) that is
``W + (1 + alpha) dW_r``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lightning.defences.lowrank import lowrank_svd
from refusal_lightning.files import atomic_write
from refusal_lightning.models.stacking import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    StackingError,
    adapter_rank,
    adapter_scale,
    read_adapter,
)

LOX_DIR = "lox_extrapolation"  # <output_dir>/lox_extrapolation/: the extrapolation adapter an attack trains on
STATS_FILE = "lox_stats.json"
DEFAULT_ALPHA = 1.0  # VITA-Group/LoX safety/LoX.py: --coef 1.0


@dataclass
class LoxConfig:
    """LoX: ``W + dW_r + alpha * P_k(dW_r)``, the refusal LoRA's update extrapolated before the attack."""

    enabled: bool = False
    """Write the extrapolation (``output_dir/lox_extrapolation``) and train the attack above it, frozen."""
    alpha: float = DEFAULT_ALPHA
    """Extrapolation coefficient (the authors' ``--coef``, default 1): ``k = r`` and ``alpha = 1`` double
    the refusal update. Negative values shrink it instead (a control)."""
    k: int | None = None
    """Top singular directions of each module's ``dW_r`` to extrapolate, ``1 <= k <= r`` (null: ``r``, the
    whole update, as the authors' default ``--k 0``; a LoRA update has rank at most ``r``)."""


class LoxError(ValueError):
    """A LoX setting or refusal adapter that cannot be extrapolated."""


def write_lox_adapter(refusal_adapter: str | Path, output_dir: str | Path, alpha: float, k: int | None) -> Path:
    """Write the LoX extrapolation of ``refusal_adapter`` as a PEFT LoRA adapter folder.

    Args:
        refusal_adapter: the refusal LoRA's folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        output_dir: folder for the extrapolation: the same modules and tensor names as the refusal adapter,
            rank ``k``, scale 1, and ``lox_stats.json`` (the share of each ``||dW_r||_F^2`` the top ``k`` keep).
        alpha: extrapolation coefficient.
        k: singular directions per module (None: the refusal adapter's rank ``r``).

    Returns:
        ``output_dir``. Files whose bytes would not change are left alone, so a second call (or every DDP
        rank building the module at once) writes nothing new; each changed file is replaced atomically.
    """
    problems, factors, config, rank = [], {}, {}, None
    if k is not None and k < 1:
        problems.append(f"lox.k = {k} must be at least 1")
    if not math.isfinite(alpha):
        problems.append(f"lox.alpha = {alpha} must be a finite number")
    try:
        config, factors = read_adapter(refusal_adapter)
        rank = adapter_rank(refusal_adapter)
    except (StackingError, OSError) as err:
        problems.append(f"the refusal adapter cannot be read: {err}")
    if rank is not None and k is not None and k > rank:
        problems.append(f"lox.k = {k} is above the refusal adapter's LoRA rank r = {rank} ('{refusal_adapter}'): "
                        f"its update has at most {rank} singular directions")
    if problems:
        raise LoxError("LoX: " + "; ".join(problems))
    k = rank if k is None else k

    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    kept_total = energy_total = 0.0
    for module in sorted(factors):
        a, b = factors[module]
        u, s, v = lowrank_svd(b, a, adapter_scale(config, module))
        top = min(k, s.numel())  # fewer directions where out, in or the module's own rank is below k
        root = s[:top].sqrt()
        # sqrt(S) on both factors keeps them of like size (bf16 serving); alpha on B alone allows alpha < 0.
        b_new, a_new = torch.zeros(b.shape[0], k), torch.zeros(k, a.shape[1])
        b_new[:, :top] = alpha * u[:, :top] * root
        a_new[:top] = root[:, None] * v[:, :top].mT
        tensors[f"{module}.lora_A.weight"] = a_new.contiguous()
        tensors[f"{module}.lora_B.weight"] = b_new.contiguous()
        kept, energy = float((s[:top] ** 2).sum()), float((s ** 2).sum())
        kept_total, energy_total = kept_total + kept, energy_total + energy
        modules[module] = {"energy": kept / energy if energy > 0 else None,  # None: dW_r = 0 (B never trained)
                           "singular_values": s.tolist()}

    # Same targets, layers and tensor names as the refusal adapter; lora_alpha = r = k makes PEFT's scale 1.
    lox_config = {**config, "r": k, "lora_alpha": k, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                  "lora_dropout": 0.0, "inference_mode": True}
    stats = {"alpha": alpha, "k": k, "rank": rank, "refusal_adapter": str(refusal_adapter),
             "energy": kept_total / energy_total if energy_total > 0 else None, "modules": modules}
    from safetensors.torch import save

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Weights before config: each rank writes every file (the same bytes) before it loads any of them.
    _write_if_changed(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    _write_if_changed(out / CONFIG_FILE, (json.dumps(lox_config, indent=2, sort_keys=True) + "\n").encode())
    _write_if_changed(out / STATS_FILE, (json.dumps(stats, indent=2) + "\n").encode())
    return out


def lox_adapter_above(config: LoxConfig, frozen_adapters: Sequence[str], output_dir: str | Path) -> Path:
    """Write the LoX extrapolation of the last of ``frozen_adapters`` (the refusal LoRA) into
    ``output_dir/lox_extrapolation``: the adapter to stack, frozen, above them."""
    if not frozen_adapters:
        raise LoxError("lox.enabled needs model.merge_adapters: LoX extrapolates the refusal LoRA (the last of "
                       "them), so the attack must train on top of it")
    return write_lox_adapter(frozen_adapters[-1], Path(output_dir) / LOX_DIR, config.alpha, config.k)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
