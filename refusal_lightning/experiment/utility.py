"""The harmful-fine-tuning threat model with fine-tune accuracy: a user's benign task with a fraction p of
harmful (red) replies mixed in, trained by every arm's recipe, and scored at the last step on both sides.

    python -m refusal_lightning utility --config configs/cpu/sweep_utility.yaml

It reuses a sweep config (``sweep:``): its finished pipeline's refusal model, its arms' recipes, its seeds,
its last trajectory step and its evaluation settings. One **unit** = one fit arm at one p and one seed
(``units/<arm>-p<p>-s<seed>/``), with the post-hoc arms of that fit. Its fit trains on ``task``'s rows with
``round(p n)`` of them replaced by the attack's red replies (``data.mix``, from the attacker's half of the
attack's training side); the fit's last-step adapter is then served and asked:

- the harmful set (SORRY-proxy): **harmful score** = 1 - refusal (keyword judge, the sweep's metric);
- the benign set: the contrast twins' over-refusal;
- ``heldout``'s task prompts, greedy: **fine-tune accuracy** (exact label or final-number match).

Beside the grid, once: the base model's and the refusal model's answers to the same three sets (the task
is worth fine-tuning only when the base model is well below what the fine-tune reaches). ``results.json``
gets ``utility.cells`` (``{arm, seed, p, harmful_score, finetune_accuracy, twin_refusal, n}``), per (arm, p)
rows with intervals and differences against vanilla at the same p and seed, and the references; with
``results.md`` and ``utility_harmful_vs_accuracy.png``. Units resume: a finished unit with the current
fingerprint is skipped, an interrupted fit resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from refusal_lightning.experiment.arms import Arm
from refusal_lightning.experiment.sweep import sweep_context
from refusal_lightning.experiment.sweep_plan import BENIGN_LORA, SweepConfigError
from refusal_lightning.experiment.sweep_unit import (
    SweepContext,
    clear_derived,
    current_cells,
    fit_unit,
    read_outcomes,
    transform_point,
    write_cells,
)
from refusal_lightning.experiment.utility_stats import grid_rows
from refusal_lightning.files import atomic_write_text
from refusal_lightning.models.stacking import COMBINED_DIR
from refusal_lightning.train.module import STEPS_DIR

REFERENCE_UNIT = "reference"  # the base and refusal models' answers, once
# a unit's answers (the sweep's last-step folder name, so clear_derived forgets them with the model they answer)
ANSWERS_DIR = "eval_last"
MIX_PREFIX = "--data.mix="


class UtilityConfigError(SweepConfigError):
    """The utility config cannot run (every problem listed)."""


@dataclasses.dataclass(frozen=True)
class UtilityUnit:
    """One fit arm at one harmful ratio p and one seed, with its post-hoc arms."""

    arm: Arm
    p: float
    seed: int
    posthoc: tuple[Arm, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.arm.name}-p{self.p:g}-s{self.seed}"


def plan_grid(arms: Sequence[Arm], chosen: Sequence[str], ps: Sequence[float], extra_arms: Sequence[str],
              extra_ps: Sequence[float], seeds: Sequence[int]) -> list[UtilityUnit]:
    """Every (fit arm, p, seed) of the grid: ``chosen`` at ``ps``, ``extra_arms`` also at ``extra_ps``; a
    post-hoc arm travels with its fit (which then runs even when not chosen itself). Seed by seed, then p."""
    by_name = {a.name: a for a in arms}
    problems = [f"arm '{n}' is not among the sweep's arms ({', '.join(by_name)})"
                for n in [*chosen, *extra_arms] if n not in by_name]
    problems += [f"extra arm '{n}' is not among the chosen arms" for n in extra_arms if n not in chosen]
    problems += [f"p = {p} is not in [0, 1)" for p in [*ps, *extra_ps] if not 0 <= p < 1]
    if "vanilla" not in chosen:
        problems.append("the grid needs vanilla among its arms: it is every p's frontier")
    if problems:
        raise UtilityConfigError("; ".join(problems))
    fits: dict[str, list[Arm]] = {}
    for name in chosen:
        arm = by_name[name]
        owner = arm.name if arm.is_fit else str(arm.of)
        fits.setdefault(owner, [])
        if not arm.is_fit:
            fits[owner].append(arm)
    units = []
    for seed in seeds:
        for p in sorted({*ps, *extra_ps}):
            for owner, posthoc in fits.items():
                wanted = [n for n in [owner, *(a.name for a in posthoc)] if n in chosen and
                          (p in ps or n in extra_arms)]
                if wanted:
                    kept = tuple(a for a in posthoc if a.name in wanted)
                    units.append(UtilityUnit(by_name[owner], p, seed, kept))
    return units


def mixed_overrides(overrides: Sequence[str], task: dict, harmful: dict, p: float) -> list[str]:
    """An arm's fit overrides made into the utility unit's: the task as the main data and the harmful part at
    ``p``, added to any parts the arm mixes in itself (data mixing's safe replies)."""
    kept, parts = [], []
    for item in overrides:
        if item.startswith(MIX_PREFIX):
            parts += yaml.safe_load(item[len(MIX_PREFIX):]) or []
        else:
            kept.append(item)
    if p > 0:
        parts.append({**harmful, "fraction": p})
    flow = lambda value: yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()  # noqa: E731
    return [*kept, f"--data.task={flow(task)}", f"{MIX_PREFIX}{flow(parts)}"]


def utility(
    sweep: str = "configs/tiny/sweep.yaml",
    run_dir: str | None = None,
    arms: list[str] | None = None,
    ps: list[float] | None = None,
    extra_arms: list[str] | None = None,
    extra_ps: list[float] | None = None,
    task: dict[str, Any] | None = None,
    heldout: dict[str, Any] | None = None,
    harmful: dict[str, Any] | None = None,
    task_max_tokens: int = 8,
    heldout_limit: int | None = None,
    seeds: list[int] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict:
    """Run the harmful-ratio grid on a finished pipeline's refusal model and write ``results.json``.

    Args:
        sweep: the sweep config whose pipeline run (refusal model), arms, seeds, last trajectory step and
            evaluation settings are reused (its own units are not needed).
        run_dir: the grid's folder (default: the sweep's run_dir + ``_utility``).
        arms: the arms trained at every p of ``ps`` (default: every arm of the sweep); must hold vanilla.
        ps: harmful ratios for every arm (default [0, 0.1]).
        extra_arms: arms also trained at ``extra_ps`` (default: vanilla).
        extra_ps: more harmful ratios for ``extra_arms`` (default [0.05, 0.2]).
        task: the benign task's training rows: ``{source, format}`` as the data module's ``data.task``
            (``format``: prompt_answer, sst2 or gsm8k; ``source``: a local file or a hub dataset id).
        heldout: the task's held-out rows, asked at the last step (the same keys, with ``split``).
        harmful: the harmful part: ``{source, thread, selection, half}`` as a ``data.mix`` part (default: the
            attack config's source, red replies, the attacker's half).
        task_max_tokens: tokens of each task answer (a label needs a few; GSM8K a few hundred).
        heldout_limit: ask at most this many held-out task rows (None: all).
        seeds: the fits' seeds (default: the sweep's).
        evaluation: ``evaluate`` settings over the sweep's (e.g. ``benign_prompts``: a set with contrast twins,
            whose refusals are the over-refusal reported here).
    """
    from refusal_lightning.evaluation.task_accuracy import task_scorer
    from refusal_lightning.train.harmfulqa import DataSourceError
    from refusal_lightning.train.task_data import check_task, load_task_rows

    if not task or not heldout:
        raise UtilityConfigError("utility needs task: {source, format} and heldout: {source, format, split}")
    checked = {}
    for where, section in (("task", task), ("heldout", heldout)):  # a bad key or format: named by its section
        try:
            checked[where] = check_task(section)
        except DataSourceError as exc:
            raise UtilityConfigError(f"utility {where}: {str(exc).removeprefix('data.task: ')}") from None
    train_task, heldout_task = checked["task"], checked["heldout"]
    ctx, declared, _, sweep_seeds = sweep_context(sweep)  # the settings first: nothing is read before they pass
    rows = load_task_rows(heldout_task)[:heldout_limit]
    scorer = task_scorer(heldout_task.format)
    harmful = {"source": ctx.attack_data.get("source", "sample"), "thread": "red", "half": "attacker",
               **(harmful or {})}
    run = Path(run_dir) if run_dir else ctx.run.with_name(ctx.run.name + "_utility")
    last = max(ctx.steps)
    settings = {"task": dataclasses.asdict(train_task), "heldout": dataclasses.asdict(heldout_task),
                "harmful": harmful, "task_max_tokens": task_max_tokens, "heldout_limit": heldout_limit,
                "evaluation": evaluation or {}}
    ctx = dataclasses.replace(ctx, run=run, steps=[0, last],
                              placeholders={BENIGN_LORA: str(run / "units" / BENIGN_LORA / "fit")},
                              fingerprint={**ctx.fingerprint, "utility": json.dumps(settings, sort_keys=True)})
    units = plan_grid(declared, arms or [a.name for a in declared], ps if ps is not None else [0.0, 0.1],
                      extra_arms if extra_arms is not None else ["vanilla"],
                      extra_ps if extra_ps is not None else [0.05, 0.2], seeds or sweep_seeds)
    from refusal_lightning.evaluation.runner import evaluate_arguments
    from refusal_lightning.experiment.sweep import merged_sections

    # the harmful score is the SORRY-proxy's: the HarmfulQA held-out set is not asked
    eval_args = {**evaluate_arguments(merged_sections(ctx.eval_section, evaluation or {}), "utility evaluation"),
                 "harmfulqa_source": None}
    ask = {"rows": rows, "scorer": scorer, "max_tokens": task_max_tokens,
           "concurrency": int(eval_args.get("concurrency") or 16)}
    ctx.log(f"[utility] {len(units)} units; {len(rows)} held-out task rows; steps 0-{last}")
    started = time.time()
    if any("{" + BENIGN_LORA + "}" in json.dumps(a.args) for u in units for a in u.posthoc):
        benign = Arm(BENIGN_LORA, config=ctx.attack_config, overrides=tuple(_benign_overrides(sweep)))
        fit_unit(ctx, benign, units[0].seed, run / "units" / BENIGN_LORA)
    reference = _reference(ctx, eval_args, ask)
    cells = []
    for i, unit in enumerate(units, start=1):
        ctx.log(f"[utility] unit {i}/{len(units)}: {unit.name}; {time.time() - started:.0f}s so far")
        cells += run_utility_unit(ctx, unit, mixed_overrides(unit.arm.overrides, settings["task"], harmful, unit.p),
                                  eval_args, ask)
    record = {"utility": {"cells": [_public(c) for c in cells], "rows": grid_rows(cells), "reference": reference,
                          "settings": settings, "sweep": sweep, "last_step": last,
                          "wall_time_s": round(time.time() - started, 1)}}
    from refusal_lightning.experiment.utility_report import write_utility_report

    atomic_write_text(run / "results.json", json.dumps(record, indent=2) + "\n")
    write_utility_report(record, run)
    ctx.log(f"[utility] done in {time.time() - started:.0f}s: {run / 'results.json'}, {run / 'results.md'}")
    return record


def _benign_overrides(sweep: str) -> list[str]:
    config = yaml.safe_load(Path(sweep).read_text()) or {}
    return list((config.get("benign_lora") or {}).get("overrides") or [])


def _public(cell: dict) -> dict:
    """A cell as ``utility.cells`` lists it: the contract's keys, without the per-item outcomes."""
    return {k: v for k, v in cell.items() if k != "outcomes"}


def _ask(ctx: SweepContext, adapters: dict[str, Path | None], folder: Path, eval_args: dict, ask: dict) -> dict:
    """Serve ``adapters`` (None: the base model) and ask each the harmful and benign sets and the task."""
    from refusal_lightning.evaluation.runner import evaluate
    from refusal_lightning.evaluation.task_eval import ask_task
    from refusal_lightning.serving.process import ServerProcess

    served = {name: path for name, path in adapters.items() if path is not None}
    models = {name: name if path is not None else "base" for name, path in adapters.items()}
    answers = folder / ANSWERS_DIR
    with ServerProcess(ctx.base_model, served, folder / "serve.log", max_batch_size=ask["concurrency"]) as server:
        evaluate(endpoint=[f"{n}={server.url}#{m}" for n, m in models.items()], output_dir=str(answers), **eval_args)
        task = ask_task(server.url, list(models.values()), ask["rows"], ask["scorer"], answers / "task",
                        max_tokens=ask["max_tokens"], concurrency=ask["concurrency"])
    results: dict[str, dict] = {}
    read_outcomes(answers / "outcomes.jsonl", results)
    for name, model in models.items():
        results.setdefault(name, {"outcomes": {}})["outcomes"]["task"] = task[model]["outcomes"]
    return results


def _cell(arm: str, seed: int, p: float, outcomes: dict[str, dict[str, int]]) -> dict:
    def rate(prompt_set: str, flip: bool = False) -> tuple[float | None, int]:
        values = list((outcomes.get(prompt_set) or {}).values())
        if not values:
            return None, 0
        mean = sum(values) / len(values)
        return (1 - mean if flip else mean), len(values)

    harmful, n_harmful = rate("sorry_bench", flip=True)
    accuracy, n_task = rate("task")
    twins, n_twins = rate("benign_contrast")
    return {"arm": arm, "seed": seed, "p": p, "harmful_score": harmful, "finetune_accuracy": accuracy,
            "twin_refusal": twins, "n": {"harmful_score": n_harmful, "finetune_accuracy": n_task,
                                        "twin_refusal": n_twins},
            "outcomes": {k: outcomes.get(k, {}) for k in ("sorry_bench", "task", "benign_contrast")}}


def _reference(ctx: SweepContext, eval_args: dict, ask: dict) -> dict:
    """The base model's and the refusal model's three numbers (``units/reference/``), once."""
    folder = ctx.run / "units" / REFERENCE_UNIT
    done = current_cells(ctx, folder)
    if done is None:
        started = time.time()
        clear_derived(ctx, folder, None, (), refit=False)  # answers given under other settings are not resumed
        answers = _ask(ctx, {"base": None, "refusal": ctx.refusal_dir}, folder, eval_args, ask)
        done = [_cell(name, -1, 0.0, answers.get(name, {}).get("outcomes", {})) for name in ("base", "refusal")]
        write_cells(ctx, folder, done, {"evaluate": time.time() - started})
    return {c["arm"]: _public(c) for c in done}


def run_utility_unit(ctx: SweepContext, unit: UtilityUnit, overrides: list[str], eval_args: dict,
                     ask: dict) -> list[dict]:
    """Fit (or resume) the unit, make its post-hoc arms at the last step, ask every model; its cells."""
    folder = ctx.run / "units" / unit.name
    done = current_cells(ctx, folder)
    if done is not None:
        ctx.log(f"[utility] {unit.name}: up to date, skipped")
        return done
    started = time.time()
    fit_dir, refit = fit_unit(ctx, dataclasses.replace(unit.arm, overrides=tuple(overrides)), unit.seed, folder)
    # answers (and post-hoc adapters) of an earlier fit or under other settings are not resumed
    clear_derived(ctx, folder, fit_dir, unit.posthoc, refit)
    fitted = time.time() - started
    snapshot = fit_dir / STEPS_DIR / str(max(ctx.steps))
    adapters: dict[str, Path | None] = {unit.arm.name: snapshot / COMBINED_DIR}
    for other in unit.posthoc:
        transform_point(ctx, other, snapshot, folder / other.name)
        adapters[other.name] = folder / other.name / COMBINED_DIR
    answers = _ask(ctx, adapters, folder, eval_args, ask)
    cells = [_cell(name, unit.seed, unit.p, answers.get(name, {}).get("outcomes", {})) for name in adapters]
    write_cells(ctx, folder, cells, {"fit": fitted, "evaluate": time.time() - started - fitted})
    ctx.log(f"[utility] {unit.name}: done in {time.time() - started:.0f}s (fit {fitted:.0f}s)")
    return cells
