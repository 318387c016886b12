"""The pipeline's ``activation`` stage: the readout of the pipeline's own models, into ``results.json``'s
``models.<name>.activation``.

The same direction, layer rule and prompts as ``readout`` (which follows a sweep's trajectories): on the
refusal model, the difference of means between the defender's harmful questions and training-side harmless
requests. Per model:
- the refusal model: ``suppression`` 1 and ``rotation_cos`` 1 by definition, and ``ablated_refusal``: its
  refusal with the direction projected out of every residual write;
- each arm (its combined adapter): ``suppression``, ``rotation_cos``, and ``restored_refusal`` with
  ``restored_twin_refusal``: refusal and the contrast twins' over-refusal with ``alpha r`` added at the chosen
  layer, alpha = the refusal model's harmful projection minus the arm's (never below 0).
Refusal here is the keyword judge on greedy answers of ``max_new_tokens`` tokens, in process, with Wilson
intervals.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_lightning.defences.activation_direction import chat_prompt_ids, direction_ablated, direction_added
from refusal_lightning.experiment.readout import (
    CAUSAL_SETS,
    active_adapter,
    causal_prompts,
    load_refusal_model,
    point_readout,
    readout_prompts,
    reference_direction,
    refusal_rate,
    template_kwargs,
    touched_layers,
)


@dataclass
class ActivationSettings:
    """The pipeline's ``activation:`` section (absent: no activation stage)."""

    max_prompts: int = 32
    """At most this many prompts per set (defender harmful, harmless, held-out harmful) for the direction."""
    causal: bool = True
    """Also answer with the direction ablated (refusal model) and restored (each arm): generations."""
    max_new_tokens: int = 8
    """Answer length of those checks (a refusal opener fits in 8 tokens)."""
    batch_size: int = 16
    """Prompts per forward pass."""


def brief(stats: Mapping[str, Any]) -> dict[str, Any]:
    """A refusal rate without its per-item outcomes."""
    return {k: stats[k] for k in ("rate", "ci_low", "ci_high", "n")}


def model_activation(base_model: str, refusal_dir: Path, arms: Mapping[str, Path], attack_data: Mapping[str, Any],
                     evaluation: Mapping[str, Any], settings: ActivationSettings) -> dict[str, dict[str, Any]]:
    """``{model name: activation keys}`` for the refusal model and every arm's combined adapter (see the module
    docstring); ``evaluation``: the pipeline's typed evaluation arguments (prompt files, judge markers)."""
    started = time.time()
    prompts = readout_prompts(attack_data, None, settings.max_prompts)
    model, tokenizer = load_refusal_model(base_model, refusal_dir)
    template = template_kwargs(evaluation)
    ids = {k: chat_prompt_ids(tokenizer, v, template) for k, v in prompts.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref = reference_direction(model, ids, pad, touched_layers(refusal_dir), settings.batch_size)
    layer, r = ref["layer"], ref["direction"]
    sets, twins = causal_prompts(evaluation)
    markers = getattr(evaluation.get("judge"), "refusal_markers", None)

    def rates(prompt_sets: Mapping[str, list]) -> dict[str, dict]:
        return {s: brief(refusal_rate(model, tokenizer, pad, ps, settings.max_new_tokens, settings.batch_size,
                                      markers, template)) for s, ps in prompt_sets.items() if ps}

    common = {"layer": layer, "separation": ref["separation"][layer], "metric": f"keyword@{settings.max_new_tokens}"}
    out: dict[str, dict[str, Any]] = {"refusal": {**common, "suppression": 1.0, "rotation_cos": 1.0}}
    if settings.causal:
        with direction_ablated(model, r):
            out["refusal"]["ablated_refusal"] = rates(sets)
    for name, adapter in arms.items():
        with active_adapter(model, name, adapter):
            point = point_readout(model, ids, pad, ref, settings.batch_size)
            entry: dict[str, Any] = {**common, "suppression": point["suppression"],
                                     "rotation_cos": point["rotation_cos"]}
            if settings.causal:
                alpha = max(0.0, ref["harmful_ref"] - point["harmful_projection"])
                with direction_added(model, r, layer, alpha):
                    restored = rates({**sets, "benign_contrast": twins})
                entry["restored_alpha"] = alpha
                entry["restored_refusal"] = {s: restored[s] for s in CAUSAL_SETS if s in restored}
                entry["restored_twin_refusal"] = restored.get("benign_contrast")
        out[name] = entry
        print(f"[activation] {name}: suppression {entry['suppression']:.2f} ({time.time() - started:.0f}s so far)",
              flush=True)
    return out
