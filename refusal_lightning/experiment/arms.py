"""The pipeline's rows, declared in its YAML as arms.

An arm is one of two kinds:

- a **fit** on top of the frozen refusal LoRA: the shared attack config (``attack_config``), or the arm's
  own ``config``, plus the ``overrides`` that make this arm (``--model.projection.enabled=true``);
- a **post-hoc transform** of another arm's adapter (``transform: safe_lora, of: vanilla, args: {...}``).

Adding a defence is one entry in the YAML plus its own code (a fit option, or a transform in
:data:`TRANSFORMS`); the pipeline names no row. A shared config names its output folders with ``{arm}``
(``output_dir: artifacts/demo/attack_{arm}``), which the pipeline fills in per arm, writing the arm's
resolved config to ``<run_dir>/arms/<arm>.yaml`` (``fit --config`` that file reruns the arm by hand).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# rows and stages the pipeline has already: an arm cannot take their names
RESERVED = ("base", "refusal", "tiny_model", "prepare_model", "directions", "nll", "evaluate")
FIT_KEYS = ("config", "overrides")
TRANSFORM_KEYS = ("transform", "of", "args")
# the arm every other is compared with (its drift gives the chance level; later, its curve the frontier)
REFERENCE_ARM = "vanilla"
DEFAULT_ARMS = {"vanilla": {}, "orthogonal": {"overrides": ["--model.projection.enabled=true"]}}
LEGACY_KEYS = ("vanilla_config", "orthogonal_config", "subspace_config", "asft_config", "safe_lora")


@dataclass(frozen=True)
class Transform:
    """A post-hoc defence: ``function(attack_adapter_path, directions_path, output_dir, base_adapters, **args)``
    writes a PEFT adapter with ``combined/`` (refusal + transformed attack) and ``report`` beside it."""

    function: str
    """``module:function`` (imported only when the arm runs)."""
    report: str
    """JSON file the function writes in its output folder."""
    report_keys: tuple[str, ...]
    """What of that report goes into the arm's row of ``results.json``."""


TRANSFORMS: dict[str, Transform] = {
    "safe_lora": Transform("refusal_lightning.defences.safe_lora:safe_lora", "safe_lora.json",
                           ("share_projected", "delta_norm_kept", "threshold", "projector", "gate",
                            "score_summary", "refusal_span_share", "refusal_span_share_before",
                            "delta_norm_vs_refusal", "delta_norm_vs_refusal_before", "calibration")),
}


@dataclass(frozen=True)
class Arm:
    """One row of the experiment: a fit (``config``) or a transform of the arm ``of``."""

    name: str
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    transform: str | None = None
    of: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_fit(self) -> bool:
        return self.transform is None


class ArmsError(ValueError):
    """The pipeline config's arms are malformed (every problem listed)."""


def parse_arms(arms: Mapping[str, Any] | None, attack_config: str | None) -> list[Arm]:
    """The declared arms, in order, checked all at once (an :class:`ArmsError` lists every problem)."""
    problems: list[str] = []
    parsed: list[Arm] = []
    if not arms:
        raise ArmsError("the pipeline config declares no arms (arms: {vanilla: {}, orthogonal: {overrides: ...}})")
    for name, spec in arms.items():
        spec = {} if spec is None else spec
        where = f"arms.{name}"
        if not isinstance(name, str) or not ARM_NAME.match(name) or name in RESERVED:
            problems.append(f"{where}: an arm's name is lower-case letters, digits and '_', not one of "
                            f"{', '.join(RESERVED)}")
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: expected a mapping (config/overrides, or transform/of/args), got {spec!r}")
            continue
        if "transform" in spec:
            unknown = sorted(set(spec) - set(TRANSFORM_KEYS))
            if spec["transform"] not in TRANSFORMS:
                problems.append(f"{where}.transform: unknown transform {spec['transform']!r} "
                                f"(known: {', '.join(TRANSFORMS)})")
            if not spec.get("of"):
                problems.append(f"{where}.of: name the fit arm whose adapter it transforms")
            if not isinstance(spec.get("args") or {}, Mapping):
                problems.append(f"{where}.args: expected a mapping of the transform's arguments")
            parsed.append(Arm(name, transform=spec["transform"], of=spec.get("of"), args=dict(spec.get("args") or {})))
        else:
            unknown = sorted(set(spec) - set(FIT_KEYS))
            config = spec.get("config") or attack_config
            overrides = spec.get("overrides") or []
            if config is None:
                problems.append(f"{where}: no config (set the pipeline's attack_config, or the arm's config)")
            if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
                problems.append(f"{where}.overrides: expected a list of --key=value strings")
                overrides = []
            parsed.append(Arm(name, config=Path(config) if config else None, overrides=tuple(overrides)))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}")
    fits = {a.name for a in parsed if a.is_fit}
    for arm in parsed:
        if not arm.is_fit and arm.of and arm.of not in fits:
            problems.append(f"arms.{arm.name}.of: {arm.of!r} is not a fit arm of this config "
                            f"(fit arms: {', '.join(sorted(fits)) or 'none'})")
    if REFERENCE_ARM not in fits:
        problems.append(f"the arms need a fit arm named '{REFERENCE_ARM}' (no defence): every other arm is read "
                        "against it")
    if problems:
        raise ArmsError(f"{len(problems)} problem(s) in the pipeline's arms:\n  - " + "\n  - ".join(problems))
    return parsed


def legacy_arms(vanilla_config: str | None, orthogonal_config: str | None, subspace_config: str | None,
                asft_config: str | None, safe_lora: Mapping[str, Any] | None) -> dict[str, Any]:
    """The arms that the pipeline's per-row keys of before (``vanilla_config``, ``orthogonal_config``,
    ``subspace_config``, ``asft_config``, ``safe_lora``) declared, in the table order they had."""
    arms: dict[str, Any] = {}
    for name, config in (("vanilla", vanilla_config), ("orthogonal", orthogonal_config),
                         ("subspace", subspace_config)):
        if config:
            arms[name] = {"config": config}
    if safe_lora is not None:
        arms["safe_lora"] = {"transform": "safe_lora", "of": "vanilla", "args": dict(safe_lora)}
    if asft_config:
        arms["asft"] = {"config": asft_config}
    return arms


def arms_of(config: Mapping[str, Any]) -> tuple[list[Arm], bool]:
    """The arms a pipeline config (its keys as a mapping) declares, and whether it used the per-row keys of
    before (which become arms; together with ``arms`` they are refused). No arms at all: :data:`DEFAULT_ARMS`."""
    old = legacy_arms(*(config.get(key) for key in LEGACY_KEYS))
    if old and config.get("arms"):
        raise ArmsError("the config declares both arms and the per-row keys of before (vanilla_config, "
                        "orthogonal_config, subspace_config, asft_config, safe_lora): keep arms only")
    if old:
        return parse_arms(old, None), True
    return parse_arms(config.get("arms") or DEFAULT_ARMS, config.get("attack_config")), False


def arm_folders(arms: list[Arm], run_dir: Path, fit_output_dirs: Mapping[str, Path]) -> dict[str, Path]:
    """Each arm's output folder, in table order: a fit arm's ``model.output_dir``, a post-hoc arm's
    ``<run_dir>/<arm>``."""
    return {arm.name: fit_output_dirs[arm.name] if arm.is_fit else run_dir / arm.name for arm in arms}


def resolved_config(arm: Arm) -> str:
    """The arm's fit config as text, with ``{arm}`` filled in."""
    assert arm.config is not None
    return arm.config.read_text().replace("{arm}", arm.name)
