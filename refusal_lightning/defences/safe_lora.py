"""Safe LoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833): a trained attack adapter, projected post hoc.

Per LoRA module with an alignment matrix (here the refusal adapter's ``dW_r``, see ``alignment.py``), the
attack's update ``dW_a = s_a B_a A_a`` is compared with its projection ``C dW_a``; where their cosine is at
most the threshold, the module's update is replaced by ``C dW_a`` (``B' = C B_a``: same rank, same
``A_a``), else kept. Training-free and data-free; what the reference code does, step by step
(IBM/SafeLoRA ``model.py`` ``projected_weighted``, huggingface/peft ``src/peft/utils/safelora.py``
``project_weights``):

- ``C = V V^T / ||V||_F`` per layer (``projector: paper``; ``exact`` is the orthogonal projector);
- the score is ``cos(C B A, B A)`` over the flattened matrices, rounded to 5 decimals;
- a module is projected when ``score <= threshold`` (default 0.5, the ``threshold`` default of both
  reference configs), or, with ``num_projected = k``, the ``k`` modules with the lowest scores (their
  ``select_layers_type: number``; ties at the k-th score are projected too, as there).

Everything is computed from the factors (``r x r`` Grams, ``out x r`` products), never an ``out x out``
matrix. The output folder is a PEFT adapter loadable like the attack, plus ``safe_lora.json`` (score
and decision per module, share projected) and, when the attack trained on frozen adapters (the refusal
LoRA), ``combined/``: base + refusal + projected attack as one adapter, which is what gets evaluated.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lightning.defences.alignment import (
    PROJECTORS,
    AlignmentProjector,
    alignment_factors,
    apply_alignment,
    projected_cosine,
)
from refusal_lightning.defences.directions import DirectionsError, direction_key, load_directions, provenance_problems
from refusal_lightning.defences.lowrank import lowrank_inner, lowrank_norm
from refusal_lightning.files import replace_dir
from refusal_lightning.models.loading import check_adapter_dir
from refusal_lightning.models.stacking import (
    COMBINED_DIR,
    CONFIG_FILE,
    SOURCES_FILE,
    WEIGHTS_FILE,
    adapter_scale,
    combine_adapters,
    read_adapter,
)

DEFAULT_THRESHOLD = 0.5  # IBM/SafeLoRA config.py and PEFT SafeLoraConfig: `threshold: float = 0.5`
REPORT_FILE = "safe_lora.json"
_PEFT_PREFIX = "base_model.model."
_DECIMALS = 5  # both reference implementations round the score before comparing it


class SafeLoraError(ValueError):
    """Inputs Safe LoRA cannot use, with every problem in the message."""


@dataclass
class ModuleDecision:
    """One attack module's Safe LoRA score and decision."""

    cos: float
    """``cos(C dW_a, dW_a)``, rounded to 5 decimals."""
    projected: bool
    """Whether the module's update was replaced by ``C dW_a``."""
    norm_kept: float
    """``||dW_a'|| / ||dW_a||`` after the decision (1 when kept)."""


def select(scores: Mapping[str, float], threshold: float, num_projected: int | None = None
           ) -> tuple[set[str], float]:
    """The modules to project and the effective threshold (``score <= threshold``).

    With ``num_projected = k`` the threshold is the k-th lowest score (reference code's ``number`` mode);
    ``k = 0`` projects nothing.
    """
    if num_projected is not None:
        if num_projected <= 0 or not scores:
            return set(), -math.inf
        threshold = sorted(scores.values())[min(num_projected, len(scores)) - 1]
    return {name for name, cos in scores.items() if cos <= threshold}, threshold


def project_factors(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    alignment: Mapping[str, tuple[torch.Tensor, torch.Tensor]], threshold: float,
                    num_projected: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, ModuleDecision], float]:
    """Safe LoRA on factors: ``{module: new B}`` for the projected modules, every decision, the threshold used.

    Args:
        factors: attack ``{module: (A_a, B_a)}``.
        alignment: ``{module: (U, w)}`` from ``alignment_factors`` for the modules that have one (others
            are skipped: no alignment matrix, nothing to project).
        threshold: project where ``cos(C dW_a, dW_a) <= threshold``.
        num_projected: instead of ``threshold``, project this many lowest-scoring modules.
    """
    projected_b, scores, kept = {}, {}, {}
    for name, (u, w) in alignment.items():
        a, b = (t.double() for t in factors[name])
        cb = apply_alignment(u, w, b)
        scores[name] = round(float(projected_cosine(b, a, cb)), _DECIMALS)
        norm = float(lowrank_norm(b, a))
        kept[name] = float(lowrank_norm(cb, a)) / norm if norm > 0 else 0.0
        projected_b[name] = cb
    chosen, used = select(scores, threshold, num_projected)
    decisions = {name: ModuleDecision(cos=scores[name], projected=name in chosen,
                                      norm_kept=kept[name] if name in chosen else 1.0) for name in scores}
    return {name: projected_b[name] for name in chosen}, decisions, used


def _frozen_beneath(attack: Path) -> list[str]:
    """The adapters the attack trained on, read from its ``combined/`` (all sources but the attack itself)."""
    sources = attack / COMBINED_DIR / SOURCES_FILE
    if not sources.is_file():
        return []
    return [entry["path"] for entry in json.loads(sources.read_text())["combined_from"][:-1]]


def _drift_cos(config: Mapping[str, Any], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               new_b: Mapping[str, torch.Tensor], matched: Mapping[str, str],
               modules: Mapping[str, Mapping[str, Any]]) -> float:
    """``drift/cos`` of the (projected) attack as training logs it (``Projector.drift``, B0 = 0): the cosine
    between the attack's update and ``dW_r`` over the modules that have a direction, from the factors."""
    inner = attack_sq = refusal_sq = 0.0
    for name, key in matched.items():
        a, b = (t.double() for t in factors[name])
        b = new_b.get(name, b).double()
        e = modules[key]
        s_a = adapter_scale(config, name.removeprefix(_PEFT_PREFIX))
        inner += s_a * e["scale"] * float(lowrank_inner(b, a, e["B"].double(), e["A"].double()))
        attack_sq += s_a**2 * float(lowrank_inner(b, a, b, a))
        refusal_sq += float(e["norm"]) ** 2
    norm = math.sqrt(attack_sq * refusal_sq)
    return inner / norm if norm > 0 else 0.0


def _write(out: Path, config: Mapping[str, Any], tensors: dict[str, torch.Tensor], report: dict[str, Any],
           base_adapters: list[str]) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        if base_adapters:  # what is evaluated: base + refusal + projected attack, as one adapter
            combine_adapters([*base_adapters, staging], staging / COMBINED_DIR)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def safe_lora(attack_adapter_path: str, directions_path: str, output_dir: str,
              threshold: float = DEFAULT_THRESHOLD, num_projected: int | None = None,
              projector: AlignmentProjector = "paper", base_adapters: list[str] | None = None) -> str:
    """Safe LoRA: project an attack adapter's modules onto the refusal adapter's subspace (post hoc).

    Args:
        attack_adapter_path: the trained attack's PEFT adapter folder (e.g. ``artifacts/attack_vanilla``).
        directions_path: directions file of the refusal adapter (``refusal_lightning directions``); its
            per-module ``dW_r`` is the alignment matrix ``V``.
        output_dir: folder for the projected adapter (never the attack's own folder).
        threshold: project a module when ``cos(C dW_a, dW_a) <= threshold`` (reference default 0.5).
        num_projected: project this many lowest-scoring modules instead (reference ``number`` mode).
        projector: ``paper``: ``C = V V^T / ||V||_F`` as in the paper and both reference implementations
            (not a projector: it also rescales); ``exact``: the orthogonal projector onto ``col(V)``.
        base_adapters: the frozen adapters the attack trained on, for ``output_dir/combined`` (default:
            those of the attack's own ``combined/``; none: no combined adapter is written).

    Returns:
        The output folder.
    """
    attack = check_adapter_dir(attack_adapter_path)
    out = Path(output_dir).expanduser()
    problems = []
    if out.resolve() == attack.resolve():
        problems.append(f"output_dir '{output_dir}' is the attack adapter itself; write the projection elsewhere")
    if projector not in PROJECTORS:
        problems.append(f"unknown projector '{projector}' (choose from {', '.join(PROJECTORS)})")
    if num_projected is not None and num_projected < 0:
        problems.append(f"num_projected must be >= 0, got {num_projected}")
    obj = None
    try:
        obj = load_directions(directions_path)
    except DirectionsError as exc:
        problems.append(str(exc))
    config, factors = read_adapter(attack)
    frozen = list(base_adapters) if base_adapters is not None else _frozen_beneath(attack)
    for adapter in frozen:
        folder = Path(adapter).expanduser()
        if not (folder / WEIGHTS_FILE).is_file():
            problems.append(f"frozen adapter '{adapter}' (for {COMBINED_DIR}/) is not an adapter folder; pass "
                            "--base_adapters")
    matched: dict[str, str] = {}  # attack module -> directions key
    uncovered: list[str] = []
    if obj is not None:
        modules = obj["modules"]
        attack_base = config.get("base_model_name_or_path")
        problems += provenance_problems(
            obj["metadata"], str(attack_base) if attack_base else None, frozen,
            mismatch=lambda meta: (f"the directions were computed from {meta.get('adapter_path')} (sha256 "
                                   f"{meta['adapter_sha256'][:12]}...), which is not among the adapters the attack "
                                   f"trained on ({', '.join(frozen)}): the alignment matrix must be the refusal "
                                   "update the attack was trained on top of"))
        bad_shape = []
        for name, (a, b) in factors.items():
            key = direction_key(name, modules)
            if key is None:
                uncovered.append(name)
            elif (modules[key]["B"].shape[0], modules[key]["A"].shape[1]) != (b.shape[0], a.shape[1]):
                bad_shape.append(key)
            else:
                matched[name] = key
        if bad_shape:
            problems.append(f"directions do not fit the attack's layer shapes: {', '.join(sorted(bad_shape)[:6])}")
        if not matched and not bad_shape:
            problems.append("no attack LoRA module has an entry in the directions file")
    if problems:
        raise SafeLoraError(f"safe-lora cannot run, {len(problems)} problem(s): " + "; ".join(problems))
    assert obj is not None

    modules = obj["modules"]
    alignment = {name: alignment_factors(modules[key]["A"], modules[key]["B"], modules[key]["scale"], projector)
                 for name, key in matched.items()}
    new_b, decisions, used = project_factors(factors, alignment, threshold, num_projected)

    from safetensors.torch import load_file

    tensors = load_file(str(attack / WEIGHTS_FILE))  # keep every key and dtype as the attack saved them
    for name, b in new_b.items():
        key = f"{name}.lora_B.weight"
        tensors[key] = b.to(tensors[key].dtype).contiguous()
    # ||dW'|| / ||dW|| over all modules (LoRA scales included): how much of the attack survives
    before = after = 0.0
    for name, (a, b) in factors.items():
        s = adapter_scale(config, name.removeprefix(_PEFT_PREFIX))
        sq = (s * float(lowrank_norm(b.double(), a.double()))) ** 2
        before += sq
        after += sq * (decisions[name].norm_kept ** 2 if name in decisions else 1.0)
    n_proj = sum(d.projected for d in decisions.values())
    drift = {"cos": _drift_cos(config, factors, new_b, matched, modules),
             "cos_before": _drift_cos(config, factors, {}, matched, modules)}
    report = {
        "method": "safe_lora",
        "paper": "arXiv:2405.16833",
        "attack_adapter": str(attack),
        "directions_path": str(directions_path),
        "refusal_adapter": obj["metadata"].get("adapter_path"),
        "projector": projector,
        "threshold": threshold,
        "num_projected": num_projected,
        "threshold_used": used,
        "n_modules": len(decisions),
        "n_projected": n_proj,
        "share_projected": n_proj / len(decisions),
        "n_uncovered": len(uncovered),
        "uncovered": sorted(uncovered),
        "delta_norm_kept": math.sqrt(after / before) if before > 0 else 1.0,
        "drift": drift,
        "base_adapters": [str(a) for a in frozen],
        "combined": COMBINED_DIR if frozen else None,
        "modules": {matched[name]: asdict(d) for name, d in sorted(decisions.items())},
    }
    _write(out, config, tensors, report, frozen)
    rule = f"the {num_projected} lowest scores" if num_projected is not None else f"cos <= {threshold:g}"
    print(f"safe-lora: projected {n_proj} of {len(decisions)} modules ({100 * report['share_projected']:.1f}%, "
          f"{rule}, projector {projector}); ||dW|| kept {100 * report['delta_norm_kept']:.1f}%; wrote {out}"
          + (f" and {out / COMBINED_DIR}" if frozen else ""))
    return str(out)
