"""The utility grid's numbers: per arm and harmful ratio p, the mean over seeds of a per-item rate with a
bootstrap interval, and the paired difference against vanilla at the same p and seed. Plain numpy.

Intervals resample items (one draw shared by every seed and by the arm and its baseline: the comparison is
paired), then seeds, as the sweep's frontier does. With fewer than 5 seeds the seed part is rough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REPLICATES = 2000
MEASURES = {"harmful_score": "sorry_bench", "finetune_accuracy": "task", "twin_refusal": "benign_contrast"}


def seed_bootstrap(arm: Mapping[int, Mapping[str, int]], baseline: Mapping[int, Mapping[str, int]] | None = None,
                   flip: bool = False, replicates: int = REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Mean over seeds of the rate of ``arm``'s per-item outcomes (``{seed: {item: 0/1}}``; ``flip``: of 1 -
    outcome), minus ``baseline``'s at the same seed when given (seeds without a baseline are left out), with
    its 95% bootstrap interval over items, then seeds."""
    seeds = sorted(s for s in arm if baseline is None or s in baseline)
    tables = [arm] if baseline is None else [arm, baseline]
    items = sorted(set.intersection(*(set(t[s]) for t in tables for s in seeds))) if seeds else []
    if not items:  # no seed, or a set this evaluation did not ask (no contrast twins among the benign prompts)
        return {"mean": None, "ci_low": None, "ci_high": None, "n_seeds": len(seeds), "n_items": 0}

    def values(table: Mapping[int, Mapping[str, int]]) -> np.ndarray:  # seeds x items
        return np.array([[1 - table[s][i] if flip else table[s][i] for i in items] for s in seeds], dtype=float)

    diff = values(arm) - (values(baseline) if baseline is not None else 0.0)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(items), np.full(len(items), 1 / len(items)), size=replicates)  # replicates x items
    per_seed = diff @ counts.T / len(items)  # seeds x replicates
    seed_draw = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    means = per_seed[seed_draw, np.arange(replicates)[:, None]].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    by_seed = diff.mean(axis=1)
    return {"mean": float(by_seed.mean()), "ci_low": float(lo), "ci_high": float(hi), "n_seeds": len(seeds),
            "n_items": len(items), "seed_sd": float(np.std(by_seed, ddof=1)) if len(seeds) > 1 else None}


def outcomes_by_seed(cells: Sequence[Mapping[str, Any]], arm: str, p: float, key: str) -> dict[int, dict[str, int]]:
    """``{seed: {item: outcome}}`` of one arm at one p for one measure's prompt set."""
    return {c["seed"]: c["outcomes"][MEASURES[key]] for c in cells if c["arm"] == arm and c["p"] == p}


def grid_rows(cells: Sequence[Mapping[str, Any]], baseline: str = "vanilla",
              replicates: int = REPLICATES) -> list[dict[str, Any]]:
    """One row per (arm, p) in the cells' order: each measure's mean with its interval, and for every arm but
    the baseline the difference from the baseline at the same p and seed (at p = 0: the defence's pure
    utility cost; the harmful score's difference at p = 0 is not a gain and is left out)."""
    keys = list(dict.fromkeys((c["arm"], c["p"]) for c in cells))
    rows = []
    for arm, p in keys:
        row: dict[str, Any] = {"arm": arm, "p": p}
        for key in MEASURES:
            flip = key == "harmful_score"  # 1 - refusal
            mine = outcomes_by_seed(cells, arm, p, key)
            row[key] = seed_bootstrap(mine, flip=flip, replicates=replicates)
            base = outcomes_by_seed(cells, baseline, p, key)
            if arm != baseline and base and not (key == "harmful_score" and p == 0):
                row[f"{key}_vs_{baseline}"] = seed_bootstrap(mine, base, flip=flip, replicates=replicates)
        rows.append(row)
    return rows
