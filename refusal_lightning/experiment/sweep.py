"""``sweep``: every arm at several seeds along its attack trajectory, scored against vanilla's frontier.

It reuses a finished ``pipeline`` run (its base model, refusal LoRA and directions; ``make demo`` first),
runs the grid of units (``sweep_plan.py``; one unit = one fit arm at one seed with its post-hoc arms and
every trajectory point, ``sweep_unit.py``), then merges every unit's cells into ``results.json``
(``sweep_merge.py``): per-point cells, each arm's gain at matched red NLL with its paired bootstrap
interval, the last step's refusal with its seed spread, McNemar against vanilla, and the drift null.
``--shard I/N`` runs every N-th unit only (N machines share one grid); ``--merge true`` then combines the
units' folders. Everything resumes: a finished unit is skipped, an interrupted fit resumes.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import yaml

from refusal_lightning.checksums import file_sha256, tree_sha256
from refusal_lightning.experiment.arms import Arm, ArmsError, parse_arms
from refusal_lightning.experiment.pipeline import PACKAGE_ROOT, data_section, fit_output_dir
from refusal_lightning.experiment.sweep_plan import (
    BENIGN_LORA,
    STEP0,
    SweepConfigError,
    check_grid,
    parse_shard,
    plan_units,
    point_name,
    shard_units,
    unit_dir,
)
from refusal_lightning.experiment.sweep_unit import (
    LAST_ONLY_KEYS,
    SweepContext,
    clear_derived,
    current_cells,
    evaluate_points,
    make_cell,
    measure_nll,
    run_unit,
    write_cells,
)
from refusal_lightning.models.stacking import WEIGHTS_FILE


def sweep(
    pipeline: str = "configs/tiny/pipeline.yaml",
    run_dir: str | None = None,
    arms: dict[str, Any] | None = None,
    attack_config: str | None = None,
    seeds: list[int] | None = None,
    trajectory_steps: list[int] | None = None,
    nll_max_pairs: int | None = 32,
    evaluation: dict[str, Any] | None = None,
    benign_lora: dict[str, Any] | None = None,
    fit_overrides: list[str] | None = None,
    shard: str | None = None,
    merge: bool | None = None,
) -> dict | None:
    """Run the arms x seeds x trajectory grid on a finished pipeline's refusal model, then merge it.

    Args:
        pipeline: the pipeline config whose finished run is reused: its ``run_dir`` (refusal LoRA and
            directions), ``base_model``, ``refusal_config``, ``attack_config``, ``arms``, ``evaluation`` and
            ``fit_overrides``. Run it first (``make demo``; ``make smoke`` for the tiny tier).
        run_dir: the sweep's folder (default ``<pipeline run_dir>/sweep``).
        arms: the rows, as in the pipeline (fits with overrides, post-hoc transforms); default: the
            pipeline's. A transform argument may name ``{benign_lora}`` (the benign LoRA's folder).
        attack_config: the config every fit arm shares (default: the pipeline's).
        seeds: one fit per trained arm and seed; the seed sets LoRA init (``seed_everything``) and batch
            order (``data.order_seed``); the held-out split and the refusal model stay fixed. Default [0].
        trajectory_steps: attack steps with a point, 0 (the refusal model) included; the last is the fits'
            ``max_steps``. Default [0, 5, 10, 20, 30].
        nll_max_pairs: held-out red and blue pairs per point for the NLL (None: all).
        evaluation: ``evaluate`` settings over the pipeline's (e.g. ``generation: {max_tokens: 8}``); every
            point is asked the harmful sets, the last step (and step 0) the benign set too. The metric
            (judge and answer length) is the same for every arm and for the frontier.
        benign_lora: ``{overrides: [...]}``: a fit of the attack config with these overrides on benign
            replies (``--data.thread=blue --data.selection=non_refusal``), at the first seed: the drift
            null and ``{benign_lora}`` for a calibrated Safe LoRA. None: no drift null.
        fit_overrides: extra ``--key=value`` arguments for every fit (e.g. ``--trainer.limit_val_batches=1``).
        shard: ``I/N``: run only every N-th unit from the I-th (units are listed seed by seed, arms in order),
            then stop without merging. None: every unit, then the merge.
        merge: only merge the units' folders into ``results.json`` (after the shards); refuses units made
            from another refusal model or other code, and lists missing ones.
    """
    config = {"pipeline": pipeline, "run_dir": run_dir, "arms": arms, "attack_config": attack_config,
              "seeds": seeds, "trajectory_steps": trajectory_steps, "evaluation": evaluation,
              "nll_max_pairs": nll_max_pairs, "benign_lora": benign_lora}
    try:
        ctx, declared, units, seeds_ = prepare_sweep(config, fit_overrides or [])
    except ArmsError as exc:
        raise SweepConfigError(str(exc)) from None
    if merge:
        return _merge(ctx, declared, units, seeds_, config)
    index, count = parse_shard(shard)
    mine = shard_units(units, (index, count))
    ctx.log(f"[sweep] {len(units)} units ({len(declared)} arms x {len(seeds_)} seeds, steps {ctx.steps}); "
            f"shard {index}/{count}: {len(mine)} of them")
    started = time.time()
    _prerequisites(ctx, config)
    for i, unit in enumerate(mine, start=1):
        ctx.log(f"[sweep] unit {i}/{len(mine)}: {unit.name} (arms {', '.join(unit.arms)}); "
                f"{time.time() - started:.0f}s so far")
        run_unit(ctx, unit.arm, unit.seed, unit.posthoc, unit_dir(ctx.run, unit.name))
    ctx.log(f"[sweep] shard {index}/{count}: {len(mine)} units in {time.time() - started:.0f}s")
    if shard is not None:
        ctx.log("[sweep] merge when every shard is done: python -m refusal_lightning sweep --config ... --merge true")
        return None
    return _merge(ctx, declared, units, seeds_, config)


def prepare_sweep(config: dict[str, Any], fit_overrides: list[str]) -> tuple[SweepContext, list[Arm], list, list[int]]:
    """The sweep's context, arms, units and seeds from its config (``sweep``'s arguments as a dict) and the
    reused pipeline's, checked before anything runs."""
    from refusal_lightning.evaluation.runner import evaluate_arguments

    path = Path(config["pipeline"])
    if not path.is_file():
        raise SweepConfigError(f"pipeline config {path} does not exist")
    pipe = yaml.safe_load(path.read_text()) or {}
    pipe_run = Path(pipe.get("run_dir", "artifacts/tiny"))
    base_model = str(pipe.get("base_model"))
    refusal_cfg = Path(pipe.get("refusal_config"))
    overrides = [*(pipe.get("fit_overrides") or []), *fit_overrides]
    refusal_over = [f"--model.model_name_or_path={base_model}", *overrides]
    refusal_dir = fit_output_dir(refusal_cfg, refusal_over)
    directions = pipe_run / "refusal_param_directions.pt"
    missing = [str(p) for p in (refusal_dir / WEIGHTS_FILE, directions) if not p.exists()]
    if missing:
        raise SweepConfigError(f"the sweep reuses the pipeline run of {path}, which is not finished "
                               f"({', '.join(missing)} missing): run `python -m refusal_lightning pipeline --config "
                               f"{path}` first (make demo / make smoke)")
    attack = config["attack_config"] or pipe.get("attack_config")
    declared = parse_arms(config["arms"] or pipe.get("arms"), attack)
    seeds = list(config["seeds"] if config["seeds"] is not None else [0])
    steps = check_grid(seeds, list(config["trajectory_steps"] or [0, 5, 10, 20, 30]), declared)
    eval_section = merged_sections(pipe.get("evaluation") or {}, config["evaluation"] or {})
    typed = evaluate_arguments(eval_section, "sweep evaluation")
    refusal_data = data_section(refusal_cfg, refusal_over)
    heldout = {"harmfulqa_source": refusal_data.get("source", "sample"),
               "harmfulqa_val_fraction": refusal_data.get("val_fraction", 0.1),
               "harmfulqa_seed": refusal_data.get("seed", 0)}
    last_eval = {**typed, **heldout}
    point_eval = {k: v for k, v in last_eval.items() if k not in LAST_ONLY_KEYS}
    vanilla = next(a for a in declared if a.name == "vanilla")
    assert vanilla.config is not None
    run = Path(config["run_dir"] or pipe_run / "sweep")
    judge = typed.get("judge")
    generation = typed.get("generation")
    metric = f"{getattr(judge, 'kind', 'keyword')}@{getattr(generation, 'max_tokens', None)}"
    fingerprint = {"refusal_adapter": file_sha256(refusal_dir / WEIGHTS_FILE)[:16],
                   "directions": file_sha256(directions)[:16], "code": tree_sha256(PACKAGE_ROOT)[:16],
                   "metric": metric, "nll_max_pairs": str(config["nll_max_pairs"]),
                   "evaluation": json.dumps(eval_section, sort_keys=True, default=str),
                   "benign_lora": json.dumps(config["benign_lora"], sort_keys=True)}
    ctx = SweepContext(run=run, pipeline_run=pipe_run, attack_config=vanilla.config, base_model=base_model,
                       refusal_dir=refusal_dir, directions_path=directions,
                       attack_data=data_section(vanilla.config, list(vanilla.overrides)), refusal_data=refusal_data,
                       steps=steps, point_eval=point_eval, last_eval=last_eval, metric=metric,
                       nll_max_pairs=config["nll_max_pairs"], fit_overrides=overrides, fingerprint=fingerprint,
                       placeholders={BENIGN_LORA: str(unit_dir(run, BENIGN_LORA) / "fit")},
                       log=functools.partial(print, flush=True), eval_section=eval_section)
    return ctx, declared, plan_units(declared, seeds), seeds


def sweep_context(path: str | Path) -> tuple[SweepContext, list[Arm], list, list[int]]:
    """``prepare_sweep`` for a sweep config file (what the readout of a finished sweep reads)."""
    import inspect

    file = Path(path)
    if not file.is_file():
        raise SweepConfigError(f"sweep config {file} does not exist")
    given = yaml.safe_load(file.read_text()) or {}
    known = set(inspect.signature(sweep).parameters) - {"shard", "merge", "fit_overrides"}
    unknown = sorted(set(given) - known - {"fit_overrides"})
    if unknown:
        raise SweepConfigError(f"{file}: unknown keys {unknown}")
    defaults = {k: p.default for k, p in inspect.signature(sweep).parameters.items() if k in known}
    try:
        return prepare_sweep({**defaults, **{k: v for k, v in given.items() if k in known}},
                             list(given.get("fit_overrides") or []))
    except ArmsError as exc:
        raise SweepConfigError(str(exc)) from None


def merged_sections(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, group by group: ``generation: {max_tokens: 8}`` keeps the pipeline's
    other generation settings (temperature 0 among them)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _prerequisites(ctx: SweepContext, config: dict[str, Any]) -> None:
    """Step 0 (the refusal model's point) and the benign LoRA, when missing."""
    step0 = unit_dir(ctx.run, STEP0)
    if current_cells(ctx, step0) is None:
        ctx.log("[sweep] step 0: the refusal model's point")
        started = time.time()
        clear_derived(ctx, step0, None, (), refit=False)
        name = point_name("refusal", 0)
        nll = measure_nll(ctx, {name: ctx.refusal_dir}, step0 / "nll.json")
        evaluated = evaluate_points(ctx, {name: ctx.refusal_dir}, {name}, step0)
        cell = make_cell("refusal", -1, 0, ctx.metric, evaluated.get(name, {}), nll[name], None)
        write_cells(ctx, step0, [cell], {"step0": time.time() - started})
    if config["benign_lora"]:
        from refusal_lightning.experiment.sweep_unit import fit_unit

        overrides = tuple((config["benign_lora"] or {}).get("overrides") or [])
        arm = Arm(BENIGN_LORA, config=ctx.attack_config, overrides=overrides)
        folder = unit_dir(ctx.run, BENIGN_LORA)
        ctx.log("[sweep] benign LoRA (drift null)")
        fit_unit(ctx, arm, (config["seeds"] or [0])[0], folder)  # done and unchanged: returns at once


def _merge(ctx: SweepContext, arms: list[Arm], units: list, seeds: list[int], config: dict[str, Any]) -> dict:
    from refusal_lightning.experiment.sweep_merge import merge_units

    return merge_units(ctx, arms, units, seeds, config)
