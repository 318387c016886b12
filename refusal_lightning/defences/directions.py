"""Refusal adapter folder -> parameter-space directions file; loading it and checking it against an attack.

A directions file is a ``torch.save`` of plain containers (dicts, lists, str, int, float, tensors), so it
loads with ``torch.load(weights_only=True)``; nothing is unpickled. Layout::

    {"format": "refusal_lightning.param_directions", "version": 1,
     "metadata": {base_model, adapter_path, adapter_sha256, rank, alpha, use_rslora, target_modules,
                  created_utc, package_version, n_modules, global_norm, k_max},
     "modules": {"model.layers.0.self_attn.q_proj": {A, B, scale, rank, norm, A_norm, B_norm,
                                                       A_dir, B_dir, U, S, V}, ...}}

Module keys are PEFT module paths without the ``base_model.model.`` prefix; see
``projection.module_directions`` for the per-module entries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from refusal_lightning import __version__
from refusal_lightning.checksums import file_sha256
from refusal_lightning.defences.projection import LoraTarget, ProjectionConfig, module_directions
from refusal_lightning.defences.projector import Projector
from refusal_lightning.files import atomic_write
from refusal_lightning.models.stacking import pattern_value

FORMAT = "refusal_lightning.param_directions"
VERSION = 1
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # the PEFT name of the adapter a fit trains (made in train/module.py, found by the projector)
MODULE_KEYS = ("A", "B", "scale", "rank", "norm", "A_norm", "B_norm", "A_dir", "B_dir", "U", "S", "V")
_PEFT_PREFIX = "base_model.model."
# base_model.model.<module>.lora_A.weight (saved files drop the adapter name; live state dicts keep it)
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = ("lora_embedding_", "lora_magnitude_vector")
_MAX_LISTED = 6

log = logging.getLogger(__name__)


class DirectionsError(ValueError):
    """A directions file or refusal adapter that cannot be used, with every problem in the message."""


# ------------------------------------------------------------------------------------- computing
def compute_directions(adapter_dir: str | os.PathLike, base_model_name: str | None = None,
                       k_max: int | None = None) -> dict[str, Any]:
    """Read a PEFT LoRA adapter folder and compute the per-module refusal directions.

    Args:
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model_name: base model the adapter belongs to (default: the config's
            ``base_model_name_or_path``).
        k_max: keep at most this many singular triplets per module (default: all r).

    Returns:
        The directions object (see the module docstring); write it with ``save_directions``.
    """
    from safetensors.torch import load_file

    folder = Path(adapter_dir).expanduser()
    config_path, weights_path = folder / "adapter_config.json", folder / WEIGHTS_FILE
    problems = []
    if folder.is_file():
        raise DirectionsError(f"refusal adapter path '{adapter_dir}' is a file ({folder.name}), not an adapter "
                              f"folder; pass the folder that holds it: '{folder.parent}'")
    if not folder.is_dir():
        raise DirectionsError(f"refusal adapter dir '{adapter_dir}' does not exist")
    if not config_path.exists():
        problems.append(f"'{adapter_dir}' has no adapter_config.json (not a PEFT adapter folder)")
    if not weights_path.exists():
        problems.append(f"'{adapter_dir}' has no {WEIGHTS_FILE}")
    if k_max is not None and k_max < 1:
        problems.append(f"k_max must be >= 1, got {k_max}")
    if problems:
        raise DirectionsError("; ".join(problems))
    config = json.loads(config_path.read_text())
    base = base_model_name or config.get("base_model_name_or_path")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"adapter type is {config.get('peft_type')}, only LoRA adapters are supported")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported (the magnitude vector changes dW = s B A)")
    if not base:
        problems.append("adapter_config.json has no base_model_name_or_path; pass --base_model_name")

    tensors = load_file(str(weights_path))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, value in tensors.items():
        if any(u in key for u in _UNSUPPORTED):
            problems.append(f"unsupported LoRA tensor '{key}' (only Linear LoRA layers are supported)")
            continue
        match = _LORA_KEY.match(key)
        if match is None:
            ignored.append(key)  # e.g. lora_B.bias, modules_to_save copies: not part of dW = s B A
            continue
        factors.setdefault(match["module"], {})[match["factor"]] = value
    incomplete = sorted(m for m, f in factors.items() if set(f) != {"A", "B"})
    if incomplete:
        problems.append(f"modules without both lora_A and lora_B: {incomplete[:_MAX_LISTED]}")
    if not factors:
        problems.append(f"no LoRA weights (*.lora_A.weight / *.lora_B.weight) in {weights_path}")
    if problems:
        raise DirectionsError(f"cannot compute directions from '{adapter_dir}': " + "; ".join(problems))

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = {}
    for name in sorted(factors):
        a, b = factors[name]["A"], factors[name]["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a pair")
            continue
        r = a.shape[0]
        expected_r = pattern_value(rank_pattern, name, config.get("r", r))
        if expected_r != r:
            problems.append(f"{name}: weights have rank {r}, adapter_config.json says {expected_r}")
        alpha = float(pattern_value(alpha_pattern, name, config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[name] = module_directions(a, b, scale, k_max)
        modules[name]["alpha"] = alpha
    if problems:
        raise DirectionsError(f"cannot compute directions from '{adapter_dir}': " + "; ".join(problems))
    global_norm = math.sqrt(sum(m["norm"] ** 2 for m in modules.values()))
    if global_norm == 0:
        raise DirectionsError(f"refusal adapter '{adapter_dir}' has dW = s B A = 0 in every module "
                              "(lora_B is all zero: was it trained?)")
    targets = config.get("target_modules")
    return {
        "format": FORMAT,
        "version": VERSION,
        "metadata": {
            "base_model": str(base),
            "adapter_path": str(folder.resolve()),
            "adapter_sha256": file_sha256(weights_path),
            "rank": int(config.get("r", 0)),
            "alpha": float(config.get("lora_alpha", 0)),
            "use_rslora": bool(config.get("use_rslora", False)),
            "rank_pattern": {str(k): int(v) for k, v in rank_pattern.items()},
            "alpha_pattern": {str(k): float(v) for k, v in alpha_pattern.items()},
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__,
            "n_modules": len(modules),
            "global_norm": global_norm,
            "k_max": k_max,
            "ignored_keys": sorted(ignored),
        },
        "modules": modules,
    }


# ----------------------------------------------------------------------------------- file format
def _check_format(obj: Any, where: str) -> None:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DirectionsError(f"{where} is not a refusal directions file (no '{FORMAT}' format marker); "
                              "write one with `refusal_lightning directions`")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise DirectionsError(f"{where} has directions format version {obj.get('version')!r}; this "
                              f"refusal_lightning ({__version__}) reads versions <= {VERSION}")
    modules = obj.get("modules")
    if not isinstance(modules, dict) or not modules or not isinstance(obj.get("metadata"), dict):
        raise DirectionsError(f"{where} is a directions file without modules or metadata (truncated?)")
    broken = sorted(name for name, m in modules.items()
                    if not isinstance(m, dict) or set(MODULE_KEYS) - set(m))
    if broken:
        raise DirectionsError(f"{where}: entries missing fields {list(MODULE_KEYS)}: {broken[:_MAX_LISTED]}")


def same_content(a: Any, b: Any) -> bool:
    """Whether two directions objects hold the same values, their ``created_utc`` aside."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = set(a) - {"created_utc"}
        return keys == set(b) - {"created_utc"} and all(same_content(a[k], b[k]) for k in keys)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_content(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def save_directions(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a directions object atomically (``torch.save``; loadable with ``weights_only=True``).

    A file already there with the same values (``same_content``) is kept byte for byte, so recomputing the
    directions of an unchanged refusal adapter does not change the file's checksum, which the sweep's units
    are fingerprinted with (a new ``created_utc`` alone would otherwise make every unit stale)."""
    _check_format(obj, "the object to save")
    out = Path(path)
    if out.is_file():
        try:
            if same_content(load_directions(out), obj):
                return out
        except DirectionsError:
            pass  # not a directions file (or a torn one): overwrite it
    atomic_write(out, lambda tmp: torch.save(dict(obj), tmp))
    return out


def load_directions(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a directions file on the CPU, without unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise DirectionsError(f"directions file '{path}' does not exist" + (" (it is a folder)" if p.is_dir()
                                                                              else ""))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "not ours"
        raise DirectionsError(f"'{path}' is not a refusal directions file (cannot be loaded with "
                              f"weights_only=True: {type(exc).__name__})") from exc
    _check_format(obj, f"'{path}'")
    return obj


def directions(refusal_adapter_path: str, output_path: str = "artifacts/refusal_param_directions.pt",
               base_model_name: str | None = None, k_max: int | None = None) -> str:
    """Turn a refusal LoRA adapter into parameter-space refusal directions (for ``model.projection``).

    Args:
        refusal_adapter_path: PEFT adapter folder of the refusal fit (``adapter_config.json`` +
            ``adapter_model.safetensors``).
        output_path: directions file to write (``torch.save``, loads with ``weights_only=True``).
        base_model_name: base model of the adapter; checked against the attack's base model
            (default: the adapter config's ``base_model_name_or_path``).
        k_max: keep at most this many singular directions per module (default: all r; ``subspace`` mode
            needs ``k <= k_max``).
    """
    obj = compute_directions(refusal_adapter_path, base_model_name=base_model_name, k_max=k_max)
    out = save_directions(obj, output_path)
    meta = obj["metadata"]
    print(f"directions for {meta['n_modules']} modules (rank {meta['rank']}, "
          f"||dW_r|| = {meta['global_norm']:.4g}, base {meta['base_model']}) written to {out}")
    return str(out)


# ---------------------------------------------------------------------------------- validation
def same_base_model(a: str, b: str) -> bool:
    """Whether two model names mean the same model: equal strings, or local paths to the same folder."""
    if a == b or a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def direction_key(module_name: str, keys: Mapping[str, Any]) -> str | None:
    """The directions key for an attack module path: strip wrappers (LightningModule attribute,
    ``torch.compile``'s ``_orig_mod``, PEFT's ``base_model.model``), then match the longest suffix."""
    name = module_name.split(_PEFT_PREFIX, 1)[1] if _PEFT_PREFIX in module_name else module_name
    parts = name.split(".")
    for i in range(len(parts)):
        if (candidate := ".".join(parts[i:])) in keys:
            return candidate
    return None


def lora_targets(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME
                 ) -> tuple[list[tuple[str, LoraTarget]], list[str]]:
    """The attack's LoRA modules ``(module path, LoraTarget)`` for ``adapter_name`` and problems found."""
    from peft.tuners.lora import LoraLayer

    found, problems = [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            problems.append(f"{name}: embedding LoRA layers are not supported")
            continue
        if adapter_name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            problems.append(f"{name}: DoRA is not supported")
            continue
        a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        if a.ndim != 2:
            problems.append(f"{name}: only Linear LoRA layers are supported (got {type(module).__name__})")
            continue
        found.append((name, LoraTarget(name, a, b, float(module.scaling[adapter_name]))))
    return found, problems


def listed_names(names: list[str]) -> str:
    """The first few names of a problem list, then how many more: ``a, b, c and 4 more``."""
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def check_attack(path: str | os.PathLike | None, model: torch.nn.Module, base_model_name: str,
                 base_adapters: Sequence[str], mismatch: Callable[[Mapping[str, Any]], str]
                 ) -> tuple[dict[str, Any] | None, list[tuple[str, LoraTarget]], list[str]]:
    """The checks the projection and AsFT share: the directions file at ``path`` loads (None: not loaded,
    the caller reports the missing setting), the attack has supported LoRA layers, both are for the same
    base model, and the adapter the directions came from is among ``base_adapters`` (same sha256; else the
    problem ``mismatch(metadata)``, in the caller's words). Returns the directions (None when not loaded), the
    attack's ``(module path, LoraTarget)`` list and every problem found."""
    problems: list[str] = []
    obj = None
    if path is not None:
        try:
            obj = load_directions(path)
        except DirectionsError as exc:
            problems.append(str(exc))
    found, layer_problems = lora_targets(model)
    problems += layer_problems
    if not found and not layer_problems:
        problems.append(f"the attack model has no LoRA layers for adapter '{ADAPTER_NAME}'")
    if obj is not None and found:
        problems += provenance_problems(obj["metadata"], base_model_name, base_adapters, mismatch)
    return obj, found, problems


def provenance_problems(meta: Mapping[str, Any], attack_base: str | None, base_adapters: Sequence[str],
                        mismatch: Callable[[Mapping[str, Any]], str]) -> list[str]:
    """Whether directions with metadata ``meta`` belong to the attack: computed for its base model (when
    known) and from an adapter among ``base_adapters``, the ones it trained on top of (same sha256; else the
    problem ``mismatch(meta)``, in the caller's words)."""
    problems = []
    if attack_base and not same_base_model(str(meta.get("base_model")), attack_base):
        problems.append(f"directions were computed for base model '{meta.get('base_model')}', but the "
                        f"attack model is '{attack_base}'")
    want = meta.get("adapter_sha256")
    if base_adapters and want:
        files = [Path(a).expanduser() / WEIGHTS_FILE for a in base_adapters]
        if want not in {file_sha256(f) for f in files if f.is_file()}:
            problems.append(mismatch(meta))
    return problems


def build_projector(cfg: ProjectionConfig, model: torch.nn.Module, base_model_name: str,
                    base_adapters: Sequence[str] = ()) -> Projector | None:
    """Load ``cfg.directions_path``, check it against the attack model, and build the projector.

    Every problem is collected and raised at once as a ``DirectionsError`` before any training step.
    Returns None when no directions file is configured.

    Args:
        cfg: projection settings.
        model: the attack model carrying a PEFT LoRA adapter named ``default`` (any wrapper around it).
        base_model_name: the attack's base model (hub id or folder), compared with the directions'.
        base_adapters: the frozen adapters the attack trains on (``model.merge_adapters``); when given,
            one of them must be the very adapter (same sha256) the directions were computed from.
    """
    problems: list[str] = []
    if cfg.directions_path is None:
        if cfg.enabled:
            raise DirectionsError("projection.enabled is true but projection.directions_path is not set; run "
                                  "`refusal_lightning directions` and point directions_path at its output")
        return None
    problems += cfg.problems()
    obj, found, attack_problems = check_attack(
        cfg.directions_path, model, base_model_name, base_adapters,
        mismatch=lambda meta: (
            f"model.merge_adapters ({', '.join(map(str, base_adapters))}) does not hold the adapter the "
            f"directions were computed from ({meta.get('adapter_path')}, "
            f"sha256 {meta['adapter_sha256'][:12]}...): the attack would train on a different refusal model "
            "than the one it is projected against; recompute the directions from the adapter in merge_adapters"))
    problems += attack_problems

    covered: list[LoraTarget] = []
    uncovered: list[LoraTarget] = []
    used: set[str] = set()
    if obj is not None and found:
        modules = obj["modules"]
        shape_bad, rank_bad, k_bad = [], [], []
        for name, target in found:
            key = direction_key(name, modules)
            if key is None:
                uncovered.append(target)
                continue
            entry = modules[key]
            used.add(key)
            out_f, in_f = target.B.shape[0], target.A.shape[1]
            if (entry["B"].shape[0], entry["A"].shape[1]) != (out_f, in_f):
                shape_bad.append(f"{key} (directions {entry['B'].shape[0]}x{entry['A'].shape[1]}, "
                                 f"attack {out_f}x{in_f})")
                continue
            if cfg.mode == "lora_param" and entry["A"].shape[0] != target.A.shape[0]:
                rank_bad.append(f"{key} (refusal r={entry['A'].shape[0]}, attack r={target.A.shape[0]})")
            available = min(entry["rank"], entry["S"].numel())
            if cfg.mode == "subspace" and cfg.k is not None and cfg.k > available:
                k_bad.append(f"{key} (r={entry['rank']}, {entry['S'].numel()} stored)")
            covered.append(LoraTarget(key, target.A, target.B, target.scale))
        if shape_bad:
            problems.append(f"directions do not fit the attack model's layer shapes: {listed_names(shape_bad)}")
        if rank_bad:
            problems.append("mode 'lora_param' needs the attack LoRA rank to equal the refusal rank: "
                            f"{listed_names(rank_bad)} (set model.lora.r to match, or use mode 'delta_weight')")
        if k_bad:
            problems.append(f"subspace k={cfg.k} exceeds the refusal rank of {listed_names(k_bad)}")
        unused = sorted(set(modules) - used)
        if cfg.mode == "lora_param" and (uncovered or unused):
            problems.append(
                "mode 'lora_param' needs identical LoRA targets in the refusal and attack adapters: "
                + "; ".join(part for part in (
                    f"attack-only modules: {listed_names([t.name for t in uncovered])}" if uncovered else "",
                    f"refusal-only modules: {listed_names(unused)}" if unused else "") if part))
        elif uncovered and not cfg.allow_partial:
            problems.append(f"{len(uncovered)} of {len(found)} attack LoRA modules have no refusal direction "
                            f"({listed_names([t.name for t in uncovered])}); set projection.allow_partial=true to "
                            "train them unconstrained, or match the refusal adapter's target_modules")
        if not covered and not shape_bad:
            problems.append("no attack LoRA module has a refusal direction")
    if problems:
        where = f" ({cfg.directions_path})" if cfg.directions_path else ""
        raise DirectionsError(f"projection setup failed{where}, {len(problems)} problem(s):\n  - "
                              + "\n  - ".join(problems))
    assert obj is not None
    if uncovered:
        log.warning("projection: %d of %d attack LoRA modules have no refusal direction and train "
                    "unconstrained (allow_partial)", len(uncovered), len(found))
    meta = dict(obj["metadata"])
    meta["path"] = str(cfg.directions_path)
    return Projector(cfg, covered, obj["modules"], uncovered=uncovered, metadata=meta,
                     n_unused_directions=len(set(obj["modules"]) - used))
