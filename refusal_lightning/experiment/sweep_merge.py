"""The sweep's merge: every unit's cells -> ``results.json`` (``sweep``, ``drift_null``), its table and pictures.

Per arm and prompt set (``frontier.py``): the gain at matched red NLL over vanilla's frontier with its paired
bootstrap interval, the last step's refusal with its interval and seed spread, and McNemar against vanilla
at the last step with the discordant pairs summed over seeds. Units are refused when they were made from
another refusal model, other directions, other code or another metric than the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refusal_lightning.evaluation.metrics import mcnemar
from refusal_lightning.experiment.arms import REFERENCE_ARM, Arm
from refusal_lightning.experiment.frontier import BOOTSTRAP_REPLICATES, Cell, arm_statistics, pooled_discordance
from refusal_lightning.experiment.sweep_plan import BENIGN_LORA, STEP0, SweepConfigError, unit_dir
from refusal_lightning.experiment.sweep_unit import CELLS_FILE, SweepContext
from refusal_lightning.files import atomic_write_text

# what each set's refusal means in the table: harmful sets (more is better) and the twins' over-refusal
HARMFUL_SETS = ("sorry_bench", "harmfulqa_heldout")
OVER_REFUSAL_SET = "benign_contrast"
ACCURACY_SET = "benign_facts"


class SweepMergeError(SweepConfigError):
    """Units are missing, or were made from different inputs."""


def load_unit_cells(run: Path, names: Sequence[str]) -> dict[str, dict]:
    """Every named unit's ``cells.json`` record; raises listing the missing ones."""
    missing = [n for n in names if not (unit_dir(run, n) / CELLS_FILE).exists()]
    if missing:
        raise SweepMergeError(f"{len(missing)} unit(s) not finished: {', '.join(missing)}; run their shards "
                              "(or the sweep without --shard) first")
    return {n: json.loads((unit_dir(run, n) / CELLS_FILE).read_text()) for n in names}


def check_fingerprints(records: Mapping[str, dict], current: Mapping[str, str]) -> None:
    """Refuse to merge units made from different refusal models, directions, code, metric or evaluation."""
    problems = []
    for name, record in records.items():
        differing = sorted(k for k in current if record.get("fingerprint", {}).get(k) != current[k])
        if differing:
            problems.append(f"{name}: {', '.join(differing)}")
    if problems:
        raise SweepMergeError("units made from other inputs than this sweep's (rerun them, or merge with the code "
                              "and refusal model they were made from):\n  - " + "\n  - ".join(problems))


def expand_step0(cells: list[dict], step0: dict, arms: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """The refusal model's point as step 0 of every arm and seed that has no step 0 of its own (LoX starts from
    its extrapolated model), then every other cell."""
    own = {(c["arm"], c["seed"]) for c in cells if c["step"] == 0}
    copies = [{**step0, "arm": arm, "seed": seed} for arm in arms for seed in seeds if (arm, seed) not in own]
    return copies + cells


def frontier_cells(cells: Sequence[dict], prompt_set: str) -> list[Cell]:
    """The cells that measured ``prompt_set``, as ``frontier.Cell`` (red NLL and outcomes)."""
    return [Cell(c["arm"], c["seed"], c["step"], c["nll"]["red_heldout"], c["outcomes"][prompt_set])
            for c in cells if c["outcomes"].get(prompt_set)]


def arm_summary(cells: Sequence[dict], arm: str, prompt_sets: Sequence[str],
                replicates: int = BOOTSTRAP_REPLICATES) -> dict[str, Any]:
    """``gain_at_matched_nll``, ``final`` and ``p_vs_vanilla`` per prompt set for one arm."""
    out: dict[str, Any] = {"gain_at_matched_nll": {}, "final": {}, "p_vs_vanilla": {}, "accuracy_final": {}}
    for prompt_set in prompt_sets:
        chosen = frontier_cells(cells, prompt_set)
        if not any(c.arm == arm for c in chosen) or not any(c.arm == REFERENCE_ARM for c in chosen):
            continue
        stats = arm_statistics(chosen, arm, replicates=replicates)
        out["final"][prompt_set] = stats["final"]
        if arm != REFERENCE_ARM:
            out["gain_at_matched_nll"][prompt_set] = stats["gain_at_matched_nll"]
            b, c = pooled_discordance(chosen, arm)
            out["p_vs_vanilla"][prompt_set] = mcnemar(b, c)["p_value"]
    last = max((c["step"] for c in cells if c["arm"] == arm), default=None)
    for prompt_set in {s for c in cells for s in c.get("accuracy", {})}:
        values = [c["accuracy"][prompt_set] for c in cells
                  if c["arm"] == arm and c["step"] == last and prompt_set in c.get("accuracy", {})]
        if values:
            out["accuracy_final"][prompt_set] = sum(values) / len(values)
    return out


def benign_drift_null(run: Path) -> dict[str, float] | None:
    """``drift_null.drift_null`` of the sweep's benign LoRA, or None when the sweep declares none."""
    from refusal_lightning.experiment.drift_null import drift_null

    folder = unit_dir(run, BENIGN_LORA) / "fit"
    return drift_null(folder) if folder.is_dir() else None


def agreement(step0: dict, pipeline_results: Mapping[str, Any]) -> dict[str, dict]:
    """Step 0 under the sweep's metric beside the pipeline's evaluation of the same refusal model."""
    rows = ((pipeline_results.get("models") or {}).get("refusal") or {}).get("prompt_sets") or {}
    return {s: {"sweep": rate, "pipeline": (rows.get(s) or {}).get("refusal_rate")}
            for s, rate in step0["refusal"].items() if s in rows}


def merge_units(ctx: SweepContext, arms: list[Arm], units: list, seeds: list[int], config: dict[str, Any],
                replicates: int = BOOTSTRAP_REPLICATES) -> dict:
    """Combine every unit's cells into ``<run>/results.json`` (the pipeline's keys, ``sweep``, ``drift_null``),
    ``results.md`` and the two pictures; returns the record."""
    from refusal_lightning.experiment.sweep_report import sweep_table, write_sweep_pictures

    names = [STEP0, *(u.name for u in units)]
    records = load_unit_cells(ctx.run, names)
    check_fingerprints(records, ctx.fingerprint)
    step0 = records[STEP0]["cells"][0]
    cells = expand_step0([c for n in names[1:] for c in records[n]["cells"]], step0, [a.name for a in arms], seeds)
    prompt_sets = sorted({s for c in cells for s in c["outcomes"]})
    summaries = {a.name: arm_summary(cells, a.name, prompt_sets, replicates) for a in arms}
    timing: dict[str, float] = {}
    for record in records.values():
        for stage, seconds in record.get("timing_s", {}).items():
            timing[stage] = round(timing.get(stage, 0.0) + seconds, 1)
    pipeline_results_path = ctx.pipeline_run / "results.json"
    pipeline_results = json.loads(pipeline_results_path.read_text()) if pipeline_results_path.exists() else {}
    record = {**pipeline_results, "sweep": {
        "metric": ctx.metric, "seeds": seeds, "trajectory_steps": ctx.steps, "arms_order": [a.name for a in arms],
        "prompt_sets": prompt_sets, "replicates": replicates, "arms": summaries, "cells": cells,
        "agreement_step0": agreement(step0, pipeline_results), "timing_s": timing,
        "units": {n: r.get("timing_s", {}) for n, r in records.items()}},
        "drift_null": benign_drift_null(ctx.run) if config["benign_lora"] else None}
    ctx.run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.run / "results.json", json.dumps(record, indent=1) + "\n")
    table = sweep_table(record)
    pictures = write_sweep_pictures(record, ctx.run)
    atomic_write_text(ctx.run / "results.md", "# The sweep: gain at matched red NLL\n\n" + table + "\n\n"
                      + "".join(f"![{p.stem}]({p.name})\n" for p in pictures))
    ctx.log("\n" + table + f"\n\nresults: {ctx.run / 'results.json'}\ntable:   {ctx.run / 'results.md'}")
    return record
