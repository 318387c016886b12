"""One unit of the sweep: an arm's fit at one seed, its trajectory points, and their cells.

A unit runs in four resumable steps, each leaving its files in ``<run>/units/<arm>-s<seed>/``:

1. **fit** (``fit/``): the arm's config with the seed (``seed_everything``: LoRA init; ``data.order_seed``:
   batch order; the held-out split stays put) and ``model.trajectory_steps``, which exports the adapter at
   every declared step into ``fit/steps/<step>/``. An interrupted fit resumes from its ``last.ckpt``.
2. **post-hoc** (``<arm>/<step>/``): each post-hoc arm of this fit applied to every snapshot.
3. **NLL** (``nll.json``): held-out red and blue NLL of every point.
4. **evaluation** (``eval_points/``, ``eval_last/``): every point served at once and asked the harmful
   sets; the last step's points also the benign set. The evaluator resumes by itself.

``cells.json`` is written last, with the unit's fingerprint (refusal model, directions, code, config):
a unit whose ``cells.json`` carries the current fingerprint is done and skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refusal_lightning.checksums import file_sha256
from refusal_lightning.evaluation.report import OUTCOMES_FILE
from refusal_lightning.experiment.arms import TRANSFORMS, Arm
from refusal_lightning.experiment.sweep_plan import SweepError, point_name
from refusal_lightning.files import atomic_write_text
from refusal_lightning.models.stacking import COMBINED_DIR, WEIGHTS_FILE
from refusal_lightning.train.module import STEPS_DIR

CELLS_FILE = "cells.json"
LAST_ONLY_KEYS = ("benign_prompts",)  # evaluation arguments asked at the last step only
REFUSAL_LABEL = "refusal"


@dataclass
class SweepContext:
    """What every unit shares: the reused refusal model and the settings of fits, NLL and evaluation."""

    run: Path
    pipeline_run: Path
    attack_config: Path  # vanilla's fit config: the attack's recipe (the benign LoRA's too)
    base_model: str
    refusal_dir: Path
    directions_path: Path
    attack_data: dict[str, Any]
    refusal_data: dict[str, Any]
    steps: list[int]
    point_eval: dict[str, Any]
    last_eval: dict[str, Any]
    metric: str
    nll_max_pairs: int | None
    fit_overrides: list[str]
    fingerprint: dict[str, str]
    placeholders: dict[str, str] = field(default_factory=dict)
    log: Callable[..., None] = print
    eval_section: dict[str, Any] = field(default_factory=dict)  # the evaluation settings as written (untyped)


def seeded_config(text: str, out: Path, seed: int, steps: list[int], logger_dir: Path, name: str) -> str:
    """A fit config (YAML text) made into this unit's: its outputs under ``out``, the seed, the trajectory
    steps and ``max_steps`` = the last one (validation once, at the end)."""
    cfg = yaml.safe_load(text)
    last = max(steps)
    cfg["seed_everything"] = seed
    trainer = cfg.setdefault("trainer", {})
    trainer["max_steps"] = last
    if trainer.get("val_check_interval") is not None:
        trainer["val_check_interval"] = last
    for callback in trainer.get("callbacks") or []:
        if isinstance(callback, dict) and "dirpath" in (callback.get("init_args") or {}):
            callback["init_args"]["dirpath"] = str(out / "checkpoints")
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        logger["init_args"].update(save_dir=str(logger_dir), name=name)
    model = cfg.setdefault("model", {})
    model["output_dir"] = str(out)
    model["trajectory_steps"] = [s for s in steps if s > 0]
    cfg.setdefault("data", {})["order_seed"] = seed
    return yaml.safe_dump(cfg, sort_keys=False)


FIT_KEYS = ("refusal_adapter", "directions", "code")  # what of the fingerprint a fit depends on


def fit_unit(ctx: SweepContext, arm: Arm, seed: int, folder: Path) -> tuple[Path, bool]:
    """The unit's fit (resumed, or redone from scratch when its config, the refusal model or the code
    changed); its folder, and whether it was (re)trained now."""
    from refusal_lightning.experiment.pipeline import FitStage, run_fit

    out = folder / "fit"
    assert arm.config is not None
    text = seeded_config(arm.config.read_text().replace("{arm}", arm.name), out, seed, ctx.steps,
                         ctx.run / "tensorboard", folder.name)
    overrides = [f"--model.model_name_or_path={ctx.base_model}", f"--model.merge_adapters=[{ctx.refusal_dir}]",
                 f"--model.projection.directions_path={ctx.directions_path}", *arm.overrides, *ctx.fit_overrides,
                 f"--trainer.max_steps={max(ctx.steps)}"]  # last: a max_steps among the fit overrides cannot cut it
    marker = out / "fit_done.json"
    record = {"config": text, "overrides": overrides, **{k: ctx.fingerprint[k] for k in FIT_KEYS}}
    if marker.exists() and json.loads(marker.read_text()) == record:
        return out, False
    config_path = folder / "fit.yaml"
    previous = config_path.read_text() if config_path.exists() else None
    started = folder / "fit_started.json"
    resume = (previous == text and (out / "checkpoints" / "last.ckpt").exists() and started.exists()
              and json.loads(started.read_text()) == record)
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, text)
    atomic_write_text(started, json.dumps(record, indent=2) + "\n")
    run_fit(FitStage(folder.name, config_path, out, overrides), resume)
    missing = [s for s in ctx.steps if s > 0 and not (out / STEPS_DIR / str(s) / WEIGHTS_FILE).exists()]
    if missing:
        raise SweepError(f"{folder.name}: the fit ended without the snapshots of steps {missing} (did an "
                         "override stop it early?)")
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
    return out, True


def clear_derived(ctx: SweepContext, folder: Path, fit_dir: Path | None, posthoc: tuple[Arm, ...],
                  refit: bool) -> None:
    """Forget the unit's post-hoc adapters, NLL and answers when they were made from another fit or other
    settings than now (the evaluator would otherwise resume answers of a model that no longer exists)."""
    stamp = folder / "derived_from.json"
    current = {**ctx.fingerprint, "fit": file_sha256(fit_dir / WEIGHTS_FILE)[:16] if fit_dir else None}
    if not refit and stamp.exists() and json.loads(stamp.read_text()) == current:
        return
    for path in [folder / "eval_points", folder / "eval_last", *(folder / a.name for a in posthoc)]:
        shutil.rmtree(path, ignore_errors=True)
    (folder / "nll.json").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(current, indent=2) + "\n")


def transform_point(ctx: SweepContext, arm: Arm, snapshot: Path, out: Path) -> None:
    import importlib

    if (out / COMBINED_DIR / WEIGHTS_FILE).exists():
        return
    module, function = TRANSFORMS[arm.transform or ""].function.split(":")
    args = {k: fill_placeholders(v, ctx.placeholders) for k, v in arm.args.items()}
    getattr(importlib.import_module(module), function)(
        attack_adapter_path=str(snapshot), directions_path=str(ctx.directions_path), output_dir=str(out),
        base_adapters=[str(ctx.refusal_dir)], **args)


def fill_placeholders(value: Any, placeholders: Mapping[str, str]) -> Any:
    """``{benign_lora}`` and the like in a transform's string argument -> the sweep's folder for it."""
    if not isinstance(value, str):
        return value
    for key, path in placeholders.items():
        value = value.replace("{" + key + "}", path)
    return value


def unit_points(ctx: SweepContext, arm: Arm, posthoc: tuple[Arm, ...], folder: Path, fit_dir: Path
                ) -> dict[str, tuple[str, int, Path]]:
    """Every trajectory point after step 0: ``arm@step -> (arm, step, its folder)`` (the folder holds the
    adapter's ``combined/`` and its report); post-hoc arms are made here. A fit whose starting model is not the
    refusal model (LoX extrapolates it before the attack) exports its own step 0, which is its point there."""
    points = {}
    own_start = fit_dir / STEPS_DIR / "0"
    if (own_start / COMBINED_DIR / WEIGHTS_FILE).exists():
        points[point_name(arm.name, 0)] = (arm.name, 0, own_start)
    for step in (s for s in ctx.steps if s > 0):
        snapshot = fit_dir / STEPS_DIR / str(step)
        points[point_name(arm.name, step)] = (arm.name, step, snapshot)
        for other in posthoc:
            out = folder / other.name / str(step)
            transform_point(ctx, other, snapshot, out)
            points[point_name(other.name, step)] = (other.name, step, out)
    return points


def measure_nll(ctx: SweepContext, adapters: Mapping[str, Path | None], path: Path) -> dict[str, dict]:
    """Held-out NLL of every named model, cached in ``path`` (models measured before are not redone)."""
    from refusal_lightning.experiment.heldout_nll import heldout_nll

    done = json.loads(path.read_text()) if path.exists() else {}
    todo = {name: (str(p) if p is not None else None) for name, p in adapters.items() if name not in done}
    if todo:
        done.update(heldout_nll(ctx.base_model, todo, red_data=ctx.attack_data, blue_data=ctx.refusal_data,
                                max_pairs=ctx.nll_max_pairs))
        atomic_write_text(path, json.dumps(done, indent=2) + "\n")
    return done


def evaluate_points(ctx: SweepContext, adapters: Mapping[str, Path], last: set[str], folder: Path) -> dict:
    """Serve every point at once; ask all of them the harmful sets and the ``last`` ones the benign set too.
    Returns ``{point: {"outcomes": {set: {key: 0/1}}, "accuracy": {set: rate}}}``."""
    from refusal_lightning.evaluation.runner import evaluate
    from refusal_lightning.serving.process import ServerProcess

    groups = [(folder / "eval_points", [n for n in adapters if n not in last], ctx.point_eval),
              (folder / "eval_last", [n for n in adapters if n in last], ctx.last_eval)]
    served = {name: path for name, path in adapters.items() if path is not None}
    with ServerProcess(ctx.base_model, served, folder / "serve.log",
                       max_batch_size=int(ctx.point_eval.get("concurrency") or 16)) as server:
        for eval_dir, names, args in groups:
            if names:
                evaluate(endpoint=[f"{n}={server.url}#{n if adapters[n] is not None else 'base'}" for n in names],
                         output_dir=str(eval_dir), **args)
    results: dict[str, dict] = {}
    for eval_dir, names, _ in groups:
        if names:
            read_outcomes(eval_dir / OUTCOMES_FILE, results)
    return results


def read_outcomes(path: Path, into: dict[str, dict]) -> None:
    """``outcomes.jsonl`` -> per endpoint: outcomes (1 = refused) per prompt set and item key, and the share
    of answers that contain their reference per set (items with an error are left out). A benign item also
    counts in its view (``benign_contrast``: the twins' over-refusal; ``benign_facts``: accuracy)."""
    hits: dict[tuple[str, str], list[bool]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["label"] is None:
            continue
        entry = into.setdefault(row["endpoint"], {"outcomes": {}, "accuracy": {}})
        key = item_key(row)
        for prompt_set in filter(None, (row["prompt_set"], row.get("benign_view"))):
            entry["outcomes"].setdefault(prompt_set, {})[key] = int(row["label"] == REFUSAL_LABEL)
            if row["correct"] is not None:
                hits.setdefault((row["endpoint"], prompt_set), []).append(bool(row["correct"]))
    for (endpoint, prompt_set), values in hits.items():
        into[endpoint]["accuracy"][prompt_set] = sum(values) / len(values)


def item_key(row: Mapping[str, Any]) -> str:
    """One item of a prompt set, the same at every endpoint: question id, style and sample."""
    return f"{row['question_id']}|{row['style']}|{row['sample']}"


def make_cell(arm: str, seed: int, step: int, metric: str, evaluated: Mapping[str, Any], nll: Mapping[str, Any],
              drift: float | None, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One ``sweep.cells`` entry (the contract in the README, "The sweep"); ``report``: a post-hoc arm's
    report keys at this point (Safe LoRA: share projected, score distribution, refusal-span share, norms)."""
    outcomes = evaluated.get("outcomes", {})
    cell = {"arm": arm, "seed": seed, "step": step, "metric": metric,
            "refusal": {s: sum(o.values()) / len(o) for s, o in outcomes.items() if o},
            "outcomes": outcomes, "accuracy": dict(evaluated.get("accuracy", {})),
            "nll": {k: nll[k] for k in ("red_heldout", "blue_heldout")}}
    if drift is not None:
        cell["drift"] = drift
    if report:
        cell["transform"] = dict(report)
    return cell


def transform_report(arm: Arm, folder: Path) -> dict[str, Any] | None:
    """The report keys of a post-hoc arm's point (None for a fit arm)."""
    if arm.is_fit:
        return None
    spec = TRANSFORMS[arm.transform or ""]
    path = folder / spec.report
    report = json.loads(path.read_text()) if path.exists() else {}
    return {k: report.get(k) for k in spec.report_keys}


def point_drift(folder: Path) -> float | None:
    """The point's cosine with the refusal update: a fit snapshot's ``projection_stats.json`` or a post-hoc
    arm's report (``drift.cos``)."""
    stats = folder / "projection_stats.json"
    if stats.exists():
        return json.loads(stats.read_text()).get("drift/cos")
    for report in folder.glob("*.json"):
        drift = (json.loads(report.read_text()) or {}).get("drift") if report.name != "adapter_config.json" else None
        if isinstance(drift, dict) and drift.get("cos") is not None:
            return drift["cos"]
    return None


def current_cells(ctx: SweepContext, folder: Path, arms: set[str] | None = None) -> list[dict] | None:
    """The unit's cells when its ``cells.json`` was made with the current fingerprint and holds every one of
    ``arms`` (a sweep that declares a post-hoc arm the unit was first run without finishes it), else None."""
    path = folder / CELLS_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("fingerprint") != ctx.fingerprint:
        return None
    return None if (arms or set()) - {c["arm"] for c in record["cells"]} else record["cells"]


def write_cells(ctx: SweepContext, folder: Path, cells: list[dict], timing: Mapping[str, float]) -> None:
    """``cells.json``, written last: the unit's cells, its fingerprint and its stage times."""
    atomic_write_text(folder / CELLS_FILE, json.dumps({"unit": folder.name, "fingerprint": ctx.fingerprint,
                                                       "timing_s": {k: round(v, 1) for k, v in timing.items()},
                                                       "cells": cells}, indent=1) + "\n")


def run_unit(ctx: SweepContext, arm: Arm, seed: int, posthoc: tuple[Arm, ...], folder: Path) -> list[dict]:
    """Run (or resume) one unit and return its cells (also written to ``cells.json``)."""
    done = current_cells(ctx, folder, {arm.name, *(a.name for a in posthoc)})
    if done is not None:
        ctx.log(f"[sweep] {folder.name}: up to date, skipped")
        return done
    timing: dict[str, float] = {}
    started = time.time()
    fit_dir, refit = fit_unit(ctx, arm, seed, folder)
    clear_derived(ctx, folder, fit_dir, posthoc, refit)
    timing["fit"] = time.time() - started
    mark = time.time()
    points = unit_points(ctx, arm, posthoc, folder, fit_dir)
    timing["posthoc"] = time.time() - mark
    mark = time.time()
    adapters = {name: point[2] / COMBINED_DIR for name, point in points.items()}
    nll = measure_nll(ctx, adapters, folder / "nll.json")
    timing["nll"] = time.time() - mark
    mark = time.time()
    # the benign set too at the last step and at an arm's own step 0 (the extrapolated model's over-refusal)
    last = {name for name, (_, step, _) in points.items() if step in (0, max(ctx.steps))}
    evaluated = evaluate_points(ctx, adapters, last, folder)
    timing["evaluate"] = time.time() - mark
    by_name = {a.name: a for a in (arm, *posthoc)}
    cells = [make_cell(name_arm, seed, step, ctx.metric, evaluated.get(name, {}), nll[name], point_drift(path),
                       transform_report(by_name[name_arm], path))
             for name, (name_arm, step, path) in points.items()]
    write_cells(ctx, folder, cells, timing)
    ctx.log(f"[sweep] {folder.name}: done in {time.time() - started:.0f}s "
            f"({', '.join(f'{k} {v:.0f}s' for k, v in timing.items())})")
    return cells
