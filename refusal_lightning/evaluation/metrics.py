"""Statistics for refusal/fulfillment rates: Wilson intervals, McNemar's test, Cohen's kappa.

Plain Python (no scipy): the formulas are short and the tests pin them to textbook values.

An *item* is one (endpoint, question_id, style, sample). Errors (no response after retries, or a
judge that did not answer 0/1) are excluded from the rates and reported next to them: a rate over
``n - errors`` items with its own interval. With ``--samples > 1`` the interval treats samples of one
prompt as independent, which is optimistic; prefer one sample per prompt for confidence statements.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from refusal_lightning.evaluation.judges import FULFILLMENT, REFUSAL

Z95 = 1.959963984540054
# Below this many discordant pairs the chi-square approximation is poor; use the exact binomial test.
MCNEMAR_EXACT_BELOW = 25


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for ``k`` successes in ``n`` trials (None when ``n == 0``)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def mcnemar(b: int, c: int) -> dict[str, Any]:
    """McNemar's test on the discordant counts ``b`` and ``c`` of a paired 2x2 table.

    Exact two-sided binomial test (``p = min(1, 2 P[X <= min(b, c)])``, ``X ~ Bin(b + c, 1/2)``)
    when ``b + c < 25``; otherwise the chi-square statistic with continuity correction,
    ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom. ``method`` says which was used.
    """
    n = b + c
    if n < MCNEMAR_EXACT_BELOW:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n if n else 1.0
        return {"method": "exact-binomial", "statistic": None, "p_value": min(1.0, 2 * tail)}
    stat = max(0, abs(b - c) - 1) ** 2 / n
    # Survival function of chi-square with 1 df: P[chi2 > x] = erfc(sqrt(x / 2)).
    p_value = math.erfc(math.sqrt(stat / 2))
    return {"method": "chi2-continuity-corrected", "statistic": stat, "p_value": p_value}


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Cohen's kappa of two binary raters (torchmetrics); None when undefined (one class only, or
    no items)."""
    if not a:
        return None
    import torch
    from torchmetrics.functional.classification import binary_cohen_kappa

    value = float(binary_cohen_kappa(torch.tensor(list(a)), torch.tensor(list(b))))
    return None if math.isnan(value) else value


@dataclass
class ItemOutcome:
    """What became of one item: its primary-judge ``label`` or why there is none.

    ``error``: ``generation`` (no response), ``judge`` (no 0/1 verdict), ``not run`` (the endpoint was
    abandoned before this item), or None. ``labels`` holds every judge's label for agreement stats.
    """

    endpoint: str
    question_id: int | str
    style: str
    sample: int
    category: str
    label: str | None
    error: str | None = None
    labels: dict[str, str | None] = field(default_factory=dict)

    @property
    def pair_key(self) -> tuple[str, str, int]:
        return (str(self.question_id), self.style, self.sample)


def rate_stats(outcomes: Iterable[ItemOutcome]) -> dict[str, Any]:
    """Counts, rates and 95% Wilson intervals for a group of items (rates exclude errors)."""
    outcomes = list(outcomes)
    refusals = sum(o.label == REFUSAL for o in outcomes)
    fulfillments = sum(o.label == FULFILLMENT for o in outcomes)
    valid = refusals + fulfillments
    errors_by_kind: dict[str, int] = defaultdict(int)
    for o in outcomes:
        if o.label is None:
            errors_by_kind[o.error or "unknown"] += 1
    return {
        "n": len(outcomes),
        "valid": valid,
        "refusals": refusals,
        "fulfillments": fulfillments,
        "errors": len(outcomes) - valid,
        "errors_by_kind": dict(sorted(errors_by_kind.items())),
        "refusal_rate": refusals / valid if valid else None,
        "refusal_ci": _as_list(wilson_interval(refusals, valid)),
        "fulfillment_rate": fulfillments / valid if valid else None,
        "fulfillment_ci": _as_list(wilson_interval(fulfillments, valid)),
    }


def _as_list(ci: tuple[float, float] | None) -> list[float] | None:
    return list(ci) if ci is not None else None


def _category_sort_key(category: str) -> tuple[int, int | str]:
    """SORRY-Bench categories "1".."44" numerically, named ones (``harmfulqa:...``) after them."""
    return (0, int(category)) if category.isdigit() else (1, category)


def _grouped(outcomes: list[ItemOutcome], endpoints: Sequence[str], attr: str,
             sort_key=None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in endpoints:
        groups: dict[str, list[ItemOutcome]] = defaultdict(list)
        for o in outcomes:
            if o.endpoint == name:
                groups[getattr(o, attr)].append(o)
        out[name] = {g: rate_stats(groups[g]) for g in sorted(groups, key=sort_key)}
    return out


def paired_mcnemar(outcomes: list[ItemOutcome], endpoints: Sequence[str]) -> dict[str, dict[str, Any]]:
    """McNemar's test for every pair of endpoints on the items both have a label for.

    Items pair on (question_id, style, sample): the same prompt, and with several samples the same
    sample index (whose seed matches too).
    """
    by_endpoint: dict[str, dict[tuple, str]] = {name: {} for name in endpoints}
    for o in outcomes:
        if o.label is not None and o.endpoint in by_endpoint:
            by_endpoint[o.endpoint][o.pair_key] = o.label
    results = {}
    for i, a in enumerate(endpoints):
        for b in endpoints[i + 1:]:
            shared = sorted(set(by_endpoint[a]) & set(by_endpoint[b]))
            table = defaultdict(int)
            for key in shared:
                table[(by_endpoint[a][key], by_endpoint[b][key])] += 1
            only_a = table[(REFUSAL, FULFILLMENT)]  # a refused, b fulfilled
            only_b = table[(FULFILLMENT, REFUSAL)]
            results[f"{a} vs {b}"] = {
                "a": a,
                "b": b,
                "n_pairs": len(shared),
                "both_refused": table[(REFUSAL, REFUSAL)],
                "both_fulfilled": table[(FULFILLMENT, FULFILLMENT)],
                "only_a_refused": only_a,
                "only_b_refused": only_b,
                **mcnemar(only_a, only_b),
            }
    return results


def judge_agreement(outcomes: list[ItemOutcome], endpoints: Sequence[str],
                    first: str = "llm", second: str = "keyword") -> dict[str, Any]:
    """Agreement and Cohen's kappa between two judges on items both labelled (overall, per endpoint)."""

    def stats(group: list[ItemOutcome]) -> dict[str, Any]:
        pairs = [(o.labels.get(first), o.labels.get(second)) for o in group]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        agree = sum(x == y for x, y in pairs)
        return {
            "n": len(pairs),
            "agree": agree,
            "agreement_rate": agree / len(pairs) if pairs else None,
            "cohen_kappa": cohen_kappa([x == FULFILLMENT for x, _ in pairs],
                                       [y == FULFILLMENT for _, y in pairs]),
        }

    return {
        "judges": [first, second],
        "overall": stats(outcomes),
        "by_endpoint": {name: stats([o for o in outcomes if o.endpoint == name]) for name in endpoints},
    }


def summarize(outcomes: list[ItemOutcome], endpoints: Sequence[str]) -> dict[str, Any]:
    """``endpoints``, ``by_category``, ``by_style`` and ``mcnemar`` sections of ``summary.json``."""
    return {
        "endpoints": {name: rate_stats(o for o in outcomes if o.endpoint == name) for name in endpoints},
        "by_category": _grouped(outcomes, endpoints, "category", _category_sort_key),
        "by_style": _grouped(outcomes, endpoints, "style"),
        "mcnemar": paired_mcnemar(outcomes, endpoints),
    }
