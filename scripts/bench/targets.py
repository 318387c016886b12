"""The issues' targets for the benchmark's figures: one declared table, checked against every run.

The measured values, and whether they met these thresholds, are tabulated in docs/benchmarks.md; this
table only says which figure is compared with what, so the JSON's ``targets`` block (``metric``,
``value``, ``target``, ``met``) can be read by tools without the docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Target:
    """``result[source[0]][source[1]...] op threshold``, for the presets ``vocab`` selects."""

    metric: str
    source: tuple[str, ...]  # where the value is in the result JSON
    op: Literal[">=", "<="]
    threshold: float
    vocab: bool | None = None  # True: only presets at Qwen3's vocabulary; False: only the others; None: all


def _ratio(key: str, op: Literal[">=", "<="], threshold: float, vocab: bool | None = None) -> Target:
    return Target(key, ("ratios", key), op, threshold, vocab)


TARGETS: tuple[Target, ...] = (
    _ratio("vanilla_vs_plain", ">=", 0.95, vocab=False),
    # At the real vocabulary (issue 12): vanilla no slower than the plain loop, and at most 0.6x its peak RSS.
    _ratio("vanilla_vs_plain", ">=", 1.0, vocab=True),
    _ratio("vanilla_vs_trl", ">=", 1.2),
    Target("peak_rss_vanilla_vs_plain", ("mem_ratios", "vanilla_vs_plain"), "<=", 0.6, vocab=True),
    # Each projection against vanilla: target grad, then target update.
    _ratio("lora_param_grad_vs_vanilla", ">=", 0.95),
    _ratio("lora_param_update_vs_vanilla", ">=", 0.90),
    _ratio("delta_weight_grad_vs_vanilla", ">=", 0.95),
    _ratio("delta_weight_update_vs_vanilla", ">=", 0.90),
    _ratio("subspace_grad_vs_vanilla", ">=", 0.95),
    _ratio("subspace_update_vs_vanilla", ">=", 0.90),
    Target("padding_efficiency", ("padding_efficiency",), ">=", 0.90),
    Target("directions_mem_ratio", ("directions_mem_ratio",), "<=", 2.0),
)


def _lookup(result: dict[str, Any], source: tuple[str, ...]) -> Any:
    value: Any = result
    for key in source:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def targets_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets for the figures this run measured, in table order (absent figures: see ``missing``)."""
    vocab = result["settings"].get("vocab_size") is not None
    out = []
    for t in TARGETS:
        value = _lookup(result, t.source)
        if value is None or (t.vocab is not None and t.vocab != vocab):
            continue
        met = value >= t.threshold if t.op == ">=" else value <= t.threshold
        out.append({"metric": t.metric, "value": value, "target": f"{t.op} {t.threshold}", "met": met})
    return out
