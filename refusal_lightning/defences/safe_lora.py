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

Not in the reference code: ``calibrate_on`` (issue 22, "Controls"). With ``dW_r`` as ``V`` every module of
every attack scores far below 0.5 (0.02-0.09 on the CPU model), so the reference gate projects nearly
all of them and measures "attack deleted". The calibrated gate takes a LoRA trained with the attack's recipe
on benign replies only, scores its modules with the same ``C``, and sets the threshold just below the lowest
of them (``math.nextafter(min, -inf)``): a module is projected exactly when its score is strictly below
every benign module's, so the benign LoRA itself keeps every module.

Everything is computed from the factors (``r x r`` Grams, ``out x r`` products), never an ``out x out``
matrix. The output folder is a PEFT adapter loadable like the attack, plus ``safe_lora.json`` (score
and decision per module, share projected, the scores' quartiles, the update's share inside the refusal
span and its size against ``dW_r``, the calibration) and, when the attack trained on frozen adapters (the
refusal LoRA), ``combined/``: base + refusal + projected attack as one adapter, which is what gets evaluated.
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
from refusal_lightning.models.loading import ModelPathError, check_adapter_dir
from refusal_lightning.models.stacking import (
    COMBINED_DIR,
    CONFIG_FILE,
    SOURCES_FILE,
    WEIGHTS_FILE,
    StackingError,
    adapter_scale,
    combine_adapters,
    read_adapter,
)

DEFAULT_THRESHOLD = 0.5  # IBM/SafeLoRA config.py and PEFT SafeLoraConfig: `threshold: float = 0.5`
REPORT_FILE = "safe_lora.json"
_PEFT_PREFIX = "base_model.model."
_DECIMALS = 5  # both reference implementations round the score before comparing it
CALIBRATION_RULE = ("threshold = the largest float below the benign LoRA's lowest module score (same C, scores "
                    "rounded to 5 decimals): a module is projected iff its score is below every benign module's")


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


def _score(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A module's score ``cos(C B A, B A)`` (rounded as the reference code rounds it) and ``C B`` (float64)."""
    a, b = a.double(), b.double()
    cb = apply_alignment(u, w, b)
    return round(float(projected_cosine(b, a, cb)), _DECIMALS), cb


def module_scores(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  alignment: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Safe LoRA's score ``cos(C dW, dW)`` of every module of ``factors`` (``{module: (A, B)}``) that
    ``alignment`` (``{module: (U, w)}``) covers."""
    return {name: _score(*factors[name], u, w)[0] for name, (u, w) in alignment.items()}


def calibrated_threshold(benign_scores: Mapping[str, float]) -> float:
    """The threshold that projects none of the benign LoRA's modules: the largest float below their lowest
    score, so ``score <= threshold`` holds exactly when a score is strictly below every benign score."""
    if not benign_scores:
        raise SafeLoraError("calibrate_on: the benign LoRA has no module with an alignment matrix")
    return math.nextafter(min(benign_scores.values()), -math.inf)


def score_summary(scores: Mapping[str, float]) -> dict[str, Any]:
    """``n``, ``min``, quartiles ``q1``/``median``/``q3`` (linear between order statistics, numpy's default)
    and ``max`` of the per-module scores."""
    keys = ("min", "q1", "median", "q3", "max")
    if not scores:
        return {"n": 0, **dict.fromkeys(keys)}
    values = torch.tensor(sorted(scores.values()), dtype=torch.float64)
    quantiles = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return {"n": len(scores), **{k: float(q) for k, q in zip(keys, quantiles, strict=True)}}


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
        scores[name], cb = _score(a, b, u, w)
        norm = float(lowrank_norm(b, a))
        kept[name] = float(lowrank_norm(cb, a)) / norm if norm > 0 else 0.0
        projected_b[name] = cb
    chosen, used = select(scores, threshold, num_projected)
    decisions = {name: ModuleDecision(cos=scores[name], projected=name in chosen,
                                      norm_kept=kept[name] if name in chosen else 1.0) for name in scores}
    return {name: projected_b[name] for name in chosen}, decisions, used


def update_sq(config: Mapping[str, Any], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              new_b: Mapping[str, torch.Tensor], alignment: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[float, float]:
    """``||dW||_F^2`` over all the adapter's modules (``dW = s B A``, ``B`` from ``new_b`` where given) and
    ``sum_m ||P_m dW_m||_F^2``, ``P_m = U U^T`` the orthogonal projector onto the column space of the
    module's ``dW_r`` (``U`` of ``alignment``; 0 for a module without one: there ``dW_r = 0``)."""
    total = inside = 0.0
    for name, (a, b) in factors.items():
        a, b = a.double(), new_b.get(name, b).double()
        s_sq = adapter_scale(config, name.removeprefix(_PEFT_PREFIX)) ** 2
        total += s_sq * float(lowrank_inner(b, a, b, a))
        if name in alignment:
            ub = alignment[name][0].mT @ b  # ||U U^T B A|| = ||U^T B A||: U has orthonormal columns
            inside += s_sq * float(lowrank_inner(ub, a, ub, a))
    return total, inside


def match_modules(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], modules: Mapping[str, Any]
                  ) -> tuple[dict[str, str], list[str], list[str]]:
    """An adapter's modules against a directions file: ``{module: directions key}`` where the shapes fit,
    the modules without an entry, and the keys whose ``dW_r`` has another shape."""
    matched: dict[str, str] = {}
    uncovered, bad_shape = [], []
    for name, (a, b) in factors.items():
        key = direction_key(name, modules)
        if key is None:
            uncovered.append(name)
        elif (modules[key]["B"].shape[0], modules[key]["A"].shape[1]) != (b.shape[0], a.shape[1]):
            bad_shape.append(key)
        else:
            matched[name] = key
    return matched, uncovered, bad_shape


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


def _setting_problems(attack: Path, out: Path, output_dir: str, threshold: float | None,
                      num_projected: int | None, projector: str, calibrate_on: str | None) -> list[str]:
    """What is wrong with the arguments themselves, before any file is read."""
    problems = []
    if out.resolve() == attack.resolve():
        problems.append(f"output_dir '{output_dir}' is the attack adapter itself; write the projection elsewhere")
    if projector not in PROJECTORS:
        problems.append(f"unknown projector '{projector}' (choose from {', '.join(PROJECTORS)})")
    if num_projected is not None and num_projected < 0:
        problems.append(f"num_projected must be >= 0, got {num_projected}")
    if calibrate_on is not None and (threshold is not None or num_projected is not None):
        given = ", ".join(f"{k}={v}" for k, v in (("threshold", threshold), ("num_projected", num_projected))
                          if v is not None)
        problems.append(f"calibrate_on sets the threshold from the benign LoRA; drop {given}")
    return problems


def _attack_modules(obj: Mapping[str, Any], config: Mapping[str, Any],
                    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], frozen: list[str]
                    ) -> tuple[dict[str, str], list[str], list[str]]:
    """The attack's modules against the directions: matched ``{module: key}``, uncovered, problems."""
    attack_base = config.get("base_model_name_or_path")
    problems = provenance_problems(
        obj["metadata"], str(attack_base) if attack_base else None, frozen,
        mismatch=lambda meta: (f"the directions were computed from {meta.get('adapter_path')} (sha256 "
                               f"{meta['adapter_sha256'][:12]}...), which is not among the adapters the attack "
                               f"trained on ({', '.join(frozen)}): the alignment matrix must be the refusal "
                               "update the attack was trained on top of"))
    matched, uncovered, bad_shape = match_modules(factors, obj["modules"])
    if bad_shape:
        problems.append(f"directions do not fit the attack's layer shapes: {', '.join(sorted(bad_shape)[:6])}")
    if not matched and not bad_shape:
        problems.append("no attack LoRA module has an entry in the directions file")
    return matched, uncovered, problems


def _benign_factors(calibrate_on: str, obj: Mapping[str, Any], attack_modules: Mapping[str, str]
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """The benign LoRA's factors of the attack's covered modules, and every problem with it."""
    where = f"calibrate_on '{calibrate_on}'"
    try:
        folder = check_adapter_dir(calibrate_on)
        config, factors = read_adapter(folder)
    except (ModelPathError, StackingError) as exc:
        return {}, [f"calibrate_on: {exc}"]
    matched, _, bad_shape = match_modules(factors, obj["modules"])
    problems = []
    if bad_shape:
        problems.append(f"{where}: the benign LoRA's layer shapes do not fit the directions: "
                        f"{', '.join(sorted(bad_shape)[:6])}")
    missing = sorted(k for n, k in attack_modules.items() if n not in matched and k not in bad_shape)
    extra = sorted(k for n, k in matched.items() if n not in attack_modules)
    if missing or extra:
        problems.append(f"{where}: the benign LoRA does not train the attack's modules (missing: "
                        f"{', '.join(missing[:6]) or 'none'}; extra: {', '.join(extra[:6]) or 'none'}); train it "
                        "with the attack's recipe")
    base = config.get("base_model_name_or_path")
    problems += [f"{where}: {p}" for p in provenance_problems(
        obj["metadata"], str(base) if base else None, _frozen_beneath(folder),
        mismatch=lambda meta: (f"the benign LoRA was not trained on top of the refusal adapter the directions "
                               f"come from ({meta.get('adapter_path')})"))]
    kept = {name: factors[name] for name in attack_modules if name in matched}
    if kept and all(float(lowrank_norm(b.double(), a.double())) == 0 for a, b in kept.values()):
        problems.append(f"{where}: the benign LoRA's update is 0 in every module (lora_B all zero: was it trained?)")
    return kept, problems


def update_measures(config: Mapping[str, Any], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    new_b: Mapping[str, torch.Tensor], alignment: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    refusal_norm: float) -> dict[str, float]:
    """The update before and after the transform, against the refusal update ``dW_r`` (all modules):

    - ``delta_norm_kept``: ``||dW'|| / ||dW||``;
    - ``refusal_span_share`` (``_before``): ``sum_m ||P_m dW_m||^2 / sum_m ||dW_m||^2`` (see ``update_sq``);
    - ``delta_norm_vs_refusal`` (``_before``): ``||dW'|| / ||dW_r||`` (``||dW||`` before).
    """
    before, inside_before = update_sq(config, factors, {}, alignment)
    after, inside_after = update_sq(config, factors, new_b, alignment)

    def share(inside: float, total: float) -> float:  # an update wholly in the span gives 1 + rounding: clip it
        return min(1.0, inside / total) if total > 0 else 0.0

    return {
        "delta_norm_kept": math.sqrt(after / before) if before > 0 else 1.0,
        "refusal_span_share": share(inside_after, after),
        "refusal_span_share_before": share(inside_before, before),
        "delta_norm_vs_refusal": math.sqrt(after) / refusal_norm,
        "delta_norm_vs_refusal_before": math.sqrt(before) / refusal_norm,
    }


def safe_lora(attack_adapter_path: str, directions_path: str, output_dir: str,
              threshold: float | None = None, num_projected: int | None = None,
              projector: AlignmentProjector = "paper", base_adapters: list[str] | None = None,
              calibrate_on: str | None = None) -> str:
    """Safe LoRA: project an attack adapter's modules onto the refusal adapter's subspace (post hoc).

    Args:
        attack_adapter_path: the trained attack's PEFT adapter folder (e.g. ``artifacts/attack_vanilla``).
        directions_path: directions file of the refusal adapter (``refusal_lightning directions``); its
            per-module ``dW_r`` is the alignment matrix ``V``.
        output_dir: folder for the projected adapter (never the attack's own folder).
        threshold: project a module when ``cos(C dW_a, dW_a) <= threshold``; unset: 0.5, the reference
            default (with ``calibrate_on``: the calibrated threshold).
        num_projected: project this many lowest-scoring modules instead (reference ``number`` mode).
        projector: ``paper``: ``C = V V^T / ||V||_F`` as in the paper and both reference implementations
            (not a projector: it also rescales); ``exact``: the orthogonal projector onto ``col(V)``.
        base_adapters: the frozen adapters the attack trained on, for ``output_dir/combined`` (default:
            those of the attack's own ``combined/``; none: no combined adapter is written).
        calibrate_on: a LoRA trained with the attack's recipe on benign replies only (the attack config with
            ``--data.thread=blue --data.selection=non_refusal``): the threshold becomes the largest number
            below its lowest module score, so it is not projected (not with ``threshold``/``num_projected``).

    Returns:
        The output folder.
    """
    attack = check_adapter_dir(attack_adapter_path)
    out = Path(output_dir).expanduser()
    problems = _setting_problems(attack, out, output_dir, threshold, num_projected, projector, calibrate_on)
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
    benign: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if obj is not None:
        matched, uncovered, attack_problems = _attack_modules(obj, config, factors, frozen)
        problems += attack_problems
        if calibrate_on is not None:
            benign, benign_problems = _benign_factors(calibrate_on, obj, matched)
            problems += benign_problems
    if problems:
        raise SafeLoraError(f"safe-lora cannot run, {len(problems)} problem(s): " + "; ".join(problems))
    assert obj is not None

    modules = obj["modules"]
    alignment = {name: alignment_factors(modules[key]["A"], modules[key]["B"], modules[key]["scale"], projector)
                 for name, key in matched.items()}
    calibration = None
    if calibrate_on is not None:
        benign_scores = module_scores(benign, alignment)
        threshold = calibrated_threshold(benign_scores)
        calibration = {"benign_adapter": str(Path(calibrate_on).expanduser()), "rule": CALIBRATION_RULE,
                       "threshold": threshold, "benign_scores": score_summary(benign_scores)}
    elif threshold is None:
        threshold = DEFAULT_THRESHOLD
    new_b, decisions, used = project_factors(factors, alignment, threshold, num_projected)

    from safetensors.torch import load_file

    tensors = load_file(str(attack / WEIGHTS_FILE))  # keep every key and dtype as the attack saved them
    for name, b in new_b.items():
        key = f"{name}.lora_B.weight"
        tensors[key] = b.to(tensors[key].dtype).contiguous()
    refusal_norm = math.sqrt(sum(float(e["norm"]) ** 2 for e in modules.values()))
    n_proj = sum(d.projected for d in decisions.values())
    drift = {"cos": _drift_cos(config, factors, new_b, matched, modules),
             "cos_before": _drift_cos(config, factors, {}, matched, modules)}
    gate = "calibrated" if calibration else "number" if num_projected is not None else "threshold"
    report = {
        "method": "safe_lora",
        "paper": "arXiv:2405.16833",
        "attack_adapter": str(attack),
        "directions_path": str(directions_path),
        "refusal_adapter": obj["metadata"].get("adapter_path"),
        "projector": projector,
        "gate": gate,
        "threshold": threshold,
        "num_projected": num_projected,
        "threshold_used": used,
        "calibration": calibration,
        "n_modules": len(decisions),
        "n_projected": n_proj,
        "share_projected": n_proj / len(decisions),
        "n_uncovered": len(uncovered),
        "uncovered": sorted(uncovered),
        "score_summary": score_summary({name: d.cos for name, d in decisions.items()}),
        **update_measures(config, factors, new_b, alignment, refusal_norm),
        "drift": drift,
        "base_adapters": [str(a) for a in frozen],
        "combined": COMBINED_DIR if frozen else None,
        "modules": {matched[name]: asdict(d) for name, d in sorted(decisions.items())},
    }
    _write(out, config, tensors, report, frozen)
    rule = (f"the {num_projected} lowest scores" if gate == "number" else f"cos <= {threshold:g}" if not calibration
            else f"cos < {calibration['benign_scores']['min']:g}, the benign LoRA's lowest score")
    print(f"safe-lora: projected {n_proj} of {len(decisions)} modules ({100 * report['share_projected']:.1f}%, "
          f"{rule}, projector {projector}); ||dW|| kept {100 * report['delta_norm_kept']:.1f}%, "
          f"{100 * report['refusal_span_share']:.1f}% of it in the refusal span; wrote {out}"
          + (f" and {out / COMBINED_DIR}" if frozen else ""))
    return str(out)
