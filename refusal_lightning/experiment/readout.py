"""``readout``: does an attack suppress the refusal feature in activation space, and from which step?

On a finished sweep (``make sweep``), this reads the activation-space refusal direction of the refusal model
(``activation_direction.py``) and follows it along every attack's trajectory:

1. **Prompts.** The direction comes from the defender's prompts only: the defender's half of the training-side
   HarmfulQA(-proxy) questions (``defender_attacker_ids``) against training-side harmless requests (the
   retain prompts, outside every evaluated and validation file). Suppression is measured on the held-out
   HarmfulQA questions, the sweep's ``harmfulqa_heldout`` set.
2. **Reference.** On the refusal model: the difference of means at every layer, and the layer of the highest
   harmful/harmless separation among those the LoRAs touch (``pick_layer``); its unit direction is ``r``.
3. **Every trajectory point** (arm, seed, step): ``suppression`` = (m_h(model) - m_b(ref)) / (m_h(ref) -
   m_b(ref)), with m the mean projection on ``r`` at the chosen layer, h the held-out harmful prompts and b the
   harmless ones; ``rotation_cos`` = cos(the model's own difference of means there, ``r``).
4. **Causal checks** (greedy answers of ``max_new_tokens``, the keyword judge; step 0 and the last step):
   - ablation: ``r`` projected out of every residual write of the refusal model; does refusal fall?
   - restoration: ``alpha r`` added at the chosen layer of each attacked model, alpha = m_h(ref) - m_h(model)
     (never below 0); does refusal return? Beside it, the same addition along a random direction (the
     control), and the contrast twins' refusal under the addition (a model that refuses everything is not
     restored).

Writes ``<sweep run>/readout/readout.json`` and its picture, adds ``suppression`` and ``rotation_cos`` to the
sweep's ``results.json`` cells, and resumes: points already read with the same reference are not redone.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from refusal_lightning.checksums import file_sha256
from refusal_lightning.defences.activation_direction import (
    chat_prompt_ids,
    direction_ablated,
    direction_added,
    last_token_residuals,
    left_padded,
    mean_difference,
    pick_layer,
    projections,
    rotation_cos,
    separation,
    spread,
    suppression,
    unit,
)
from refusal_lightning.defences.activation_guard import harmless_prompts
from refusal_lightning.evaluation.metrics import wilson_interval
from refusal_lightning.experiment.sweep_plan import BENIGN_LORA, STEP0, point_name, unit_dir
from refusal_lightning.experiment.sweep_unit import CELLS_FILE
from refusal_lightning.files import atomic_write_text
from refusal_lightning.models.stacking import COMBINED_DIR, WEIGHTS_FILE
from refusal_lightning.train.module import STEPS_DIR

READOUT_DIR = "readout"
CONTROL = BENIGN_LORA  # the sweep's benign LoRA (the attack's recipe on benign replies): what any fine-tune does
DIRECTION_FILE = "direction.pt"  # {layer, direction (unit), directions (every layer's difference of means)}
CAUSAL_SETS = ("sorry_bench", "harmfulqa_heldout")


class ReadoutError(ValueError):
    """The readout cannot run as asked (an unknown arm, a missing prompt file, no prompts)."""


def readout(
    sweep: str = "configs/tiny/sweep.yaml",
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    max_prompts: int = 64,
    harmless_prompts: str | None = None,
    causal_arms: list[str] | None = None,
    causal_seed: int | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    layer: int | None = None,
) -> dict[str, Any]:
    """Read the refusal direction along a finished sweep's trajectories (see the module docstring).

    Args:
        sweep: the sweep's config (its run folder must hold the units' snapshots: run the sweep first).
        arms: the arms to read (default: every arm of the sweep, and ``benign_lora``, the control, where the
            sweep has one).
        seeds: the seeds to read (default: the sweep's).
        max_prompts: at most this many prompts per set (defender harmful, harmless, held-out harmful).
        harmless_prompts: training-side harmless requests, a JSONL file of ``{"prompt": ...}`` rows (default:
            the bundled retain prompts, ``data/proxy/retain_proxy.jsonl``).
        causal_arms: attacked arms given the restoration check at their last step (default: vanilla,
            orthogonal and subspace where the sweep has them); [] skips every causal check.
        causal_seed: the seed of those checks (default: the first read).
        max_new_tokens: answer length of the causal checks (the sweep's metric: its own ``max_tokens``).
        batch_size: prompts per forward pass.
        layer: read the direction at this decoder layer instead of the rule's (one the refusal LoRA touches);
            its output goes to ``readout/layer<L>/`` and leaves the sweep's cells (the rule's layer) alone.
    """
    from refusal_lightning.experiment.sweep import sweep_context

    ctx, declared, _units, sweep_seeds = sweep_context(sweep)
    names = [a.name for a in declared]
    chosen_arms = list(arms or [*names, CONTROL])
    unknown = sorted(set(chosen_arms) - {*names, CONTROL})
    if unknown:
        raise ReadoutError(f"readout: arms {unknown} are not in {sweep} (its arms: {', '.join(names)}, "
                           f"and {CONTROL})")
    chosen_seeds = list(seeds if seeds is not None else sweep_seeds)
    allowed = touched_layers(ctx.refusal_dir)
    if layer is not None and layer not in allowed:  # before any folder is made or model loaded
        raise ReadoutError(f"readout: --layer {layer} is not a layer the refusal LoRA touches (those are "
                           f"{', '.join(map(str, allowed))}); below them nothing changes by construction")
    out_dir = ctx.run / READOUT_DIR if layer is None else ctx.run / READOUT_DIR / f"layer{layer}"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prompts = readout_prompts(ctx.attack_data, harmless_prompts, max_prompts)
    model, tokenizer = load_refusal_model(ctx.base_model, ctx.refusal_dir)
    template = template_kwargs(ctx.last_eval)
    ids = {k: chat_prompt_ids(tokenizer, v, template) for k, v in prompts.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref = reference_direction(model, ids, pad, allowed, batch_size, layer)
    fingerprint = {"format": 2, "refusal_adapter": file_sha256(ctx.refusal_dir / WEIGHTS_FILE)[:16],
                   "layer": ref["layer"], "max_prompts": max_prompts, "harmless": str(harmless_prompts)}
    cache_path = out_dir / "points.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if cache.get("fingerprint") != fingerprint:
        cache = {"fingerprint": fingerprint, "points": {}}
    points = trajectory_points(ctx, declared, chosen_arms, chosen_seeds, sweep_seeds[0])
    print(f"[readout] layer {ref['layer']} (separation {ref['separation'][ref['layer']]:.2f}); "
          f"{len(points)} points", flush=True)
    for i, (name, (arm, seed, step, adapter)) in enumerate(points.items(), start=1):
        if name in cache["points"]:
            continue
        mark = time.time()
        with active_adapter(model, name, adapter):
            cache["points"][name] = {"arm": arm, "seed": seed, "step": step,
                                     **point_readout(model, ids, pad, ref, batch_size)}
        atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        p = cache["points"][name]
        print(f"[readout] {i}/{len(points)} {name}: suppression {p['suppression']:.2f}, rotation "
              f"{p['rotation_cos']:.2f} ({time.time() - mark:.0f}s)", flush=True)
    causal = causal_checks(ctx, declared, model, tokenizer, pad, ref, cache["points"], points,
                           _causal_arms(causal_arms, names), causal_seed if causal_seed is not None
                           else chosen_seeds[0], max_new_tokens, batch_size)
    read = {n: p for n, p in cache["points"].items() if n in points}
    rule = ("highest harmful/harmless separation (pooled SDs) among the layers the refusal LoRA touches"
            if layer is None else "given (--layer)")
    result = {"layer": ref["layer"], "layer_rule": rule, "allowed_layers": ref["allowed"],
              "separation": [round(float(x), 4) for x in ref["separation"]],
              "reference": {k: ref[k] for k in ("harmful_ref", "harmless_ref")},
              "summary": suppression_summary(read, ref),
              "prompts": {k: len(v) for k, v in prompts.items()},
              "points": [{**{k: v for k, v in p.items() if k != "harmful_projections"}, "point": n}
                         for n, p in read.items()],
              "causal": causal, "wall_s": round(time.time() - started, 1)}
    atomic_write_text(out_dir / "readout.json", json.dumps(result, indent=1) + "\n")
    torch.save({"layer": ref["layer"], "direction": ref["direction"], "directions": ref["directions"]},
               out_dir / DIRECTION_FILE)
    if layer is None:  # the sweep's cells hold the rule's layer
        annotate_sweep_results(ctx.run / "results.json", cache["points"])
    from refusal_lightning.experiment.readout_plot import plot_readout

    plot_readout(result, out_dir / "readout_suppression_vs_step.png")
    print(f"[readout] wrote {out_dir / 'readout.json'} in {time.time() - started:.0f}s", flush=True)
    return result


def template_kwargs(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The chat template's arguments the sweep's evaluation sends (Qwen3's non-thinking switch), so that the
    readout's prompts are the evaluated ones token for token."""
    generation = evaluation.get("generation")
    return {"enable_thinking": False} if getattr(generation, "disable_thinking", True) else {}


def readout_prompts(attack_data: Mapping[str, Any], harmless_path: str | None, most: int) -> dict[str, list[str]]:
    """The three prompt sets: the defender's harmful questions, training-side harmless requests and the held-out
    harmful questions, at most ``most`` each (``spread`` over the file: the retain file lists its twins
    before its facts, and both kinds belong in the harmless side). The activation guard reads the same two
    training-side sets. ``attack_data``: the attack's data section (its source, split fraction and seed)."""
    from refusal_lightning.train.harmfulqa import defender_questions, heldout_questions

    data = attack_data
    source, fraction, seed = data.get("source", "sample"), data.get("val_fraction", 0.1), data.get("seed", 0)
    heldout = [q["question"] for q in heldout_questions(source, fraction, seed)]
    sets = {"harmful_defender": spread(defender_questions(source, fraction, seed), most),
            "harmless": spread(harmless_prompts(harmless_path), most), "harmful_heldout": spread(heldout, most)}
    empty = [k for k, v in sets.items() if not v]
    if empty:
        raise ReadoutError(f"readout: no prompts in {empty}")
    return sets


def touched_layers(adapter_dir: Path) -> list[int]:
    """The decoder layers an adapter touches (``layers_to_transform``, else read from its weights' names)."""
    import re

    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("layers_to_transform"):
        layers = config["layers_to_transform"]
        return sorted([layers] if isinstance(layers, int) else layers)
    with safe_open(str(adapter_dir / WEIGHTS_FILE), "pt") as f:
        return sorted({int(m.group(1)) for k in f.keys() if (m := re.search(r"\.layers\.(\d+)\.", k))})


def reference_direction(model: Any, ids: Mapping[str, list], pad: int, allowed: list[int], batch_size: int,
                        layer: int | None = None) -> dict[str, Any]:
    """The refusal model's direction at the chosen layer (``layer``, one of ``allowed``; else the rule's),
    every layer's separation, and the reference projections (held-out harmful, harmless)."""
    acts = {k: last_token_residuals(model, v, pad, batch_size) for k, v in ids.items()}
    directions = mean_difference(acts["harmful_defender"], acts["harmless"])
    scores = separation(acts["harmful_defender"], acts["harmless"], directions)
    layer = pick_layer(scores, allowed) if layer is None else layer
    direction = unit(directions[layer])
    harmful, harmless = _projections(acts["harmful_heldout"][layer], direction), _projections(
        acts["harmless"][layer], direction)
    return {"layer": layer, "allowed": allowed, "separation": scores.tolist(), "direction": direction,
            "directions": directions, "harmful_ref": sum(harmful) / len(harmful),
            "harmless_ref": sum(harmless) / len(harmless), "harmful_ref_projections": harmful,
            "harmless_ref_projections": harmless}


def _projections(acts: torch.Tensor, direction: torch.Tensor) -> list[float]:
    return projections(acts.unsqueeze(0), direction.unsqueeze(0))[0].tolist()


def point_readout(model: Any, ids: Mapping[str, list], pad: int, ref: Mapping[str, Any], batch_size: int
                  ) -> dict[str, float]:
    """Suppression and rotation of the model as it is now (its adapter active), with each held-out harmful
    prompt's projection (for the intervals)."""
    layer, r = ref["layer"], ref["direction"]
    acts = {k: last_token_residuals(model, v, pad, batch_size)[layer] for k, v in ids.items()}
    each = _projections(acts["harmful_heldout"], r)
    harmful = sum(each) / len(each)
    own = acts["harmful_defender"].mean(0) - acts["harmless"].mean(0)
    return {"suppression": suppression(harmful, ref["harmful_ref"], ref["harmless_ref"]),
            "rotation_cos": rotation_cos(own, r), "harmful_projection": harmful, "harmful_projections": each}


def suppression_summary(points: Mapping[str, Mapping[str, Any]], ref: Mapping[str, Any], replicates: int = 2000,
                        seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm and step: the suppression's mean over seeds, the seeds' range and a 95% bootstrap interval.

    Each replicate resamples the held-out harmful prompts (one draw shared by the model and the reference at
    every seed: paired) and the harmless ones, then the seeds, as the sweep's gains do."""
    import numpy as np

    rng = np.random.default_rng(seed)
    h_ref, b_ref = np.array(ref["harmful_ref_projections"]), np.array(ref["harmless_ref_projections"])
    groups: dict[tuple[str, int], list[np.ndarray]] = {}
    for p in points.values():
        groups.setdefault((p["arm"], p["step"]), []).append(np.array(p["harmful_projections"]))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (arm, step), seeds in sorted(groups.items()):
        model = np.stack(seeds)  # [seeds, prompts]
        draws = []
        for _ in range(replicates):
            hi = rng.integers(0, h_ref.size, h_ref.size)
            bi = rng.integers(0, b_ref.size, b_ref.size)
            si = rng.integers(0, model.shape[0], model.shape[0])
            m_b = b_ref[bi].mean()
            draws.append(float(((model[si][:, hi].mean(axis=1) - m_b) / (h_ref[hi].mean() - m_b)).mean()))
        values = (model.mean(axis=1) - b_ref.mean()) / (h_ref.mean() - b_ref.mean())
        out.setdefault(arm, {})[str(step)] = {
            "mean": float(values.mean()), "ci_low": float(np.percentile(draws, 2.5)),
            "ci_high": float(np.percentile(draws, 97.5)), "seed_min": float(values.min()),
            "seed_max": float(values.max()), "n_seeds": int(model.shape[0])}
    return out


def trajectory_points(ctx: Any, declared: list, arms: Sequence[str], seeds: Sequence[int], benign_seed: int = 0
                      ) -> dict[str, tuple[str, int, int, Path | None]]:
    """``point -> (arm, seed, step, adapter folder)``: step 0 (the refusal model, adapter None; an arm's own
    step 0 where its fit exported one) and every finished snapshot of the chosen arms and seeds (a missing one
    is said and skipped). The benign LoRA, the control, was trained once, at the sweep's first seed."""
    points: dict[str, tuple[str, int, int, Path | None]] = {point_name("refusal", 0): ("refusal", -1, 0, None)}
    by_name = {a.name: a for a in declared}
    wanted = [(arm, seed) for seed in seeds for arm in arms if arm != CONTROL]
    if CONTROL in arms:
        wanted.append((CONTROL, benign_seed))
    missing = []
    for arm, seed in wanted:
        spec = by_name.get(arm)
        if spec is None:  # the benign LoRA
            base_of = unit_dir(ctx.run, CONTROL) / "fit" / STEPS_DIR
        else:
            folder = unit_dir(ctx.run, f"{spec.name if spec.is_fit else spec.of}-s{seed}")
            base_of = folder / "fit" / STEPS_DIR if spec.is_fit else folder / arm
        for step in ctx.steps:  # step 0 only where the fit starts from its own model (LoX)
            adapter = base_of / str(step) / COMBINED_DIR
            if (adapter / WEIGHTS_FILE).exists():
                points[f"{point_name(arm, step)}-s{seed}"] = (arm, seed, step, adapter)
            elif step > 0:
                missing.append(f"{arm}@{step}-s{seed}")
    if missing:
        print(f"[readout] not run yet, skipped: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
              flush=True)
    return points


def _causal_arms(given: list[str] | None, names: list[str]) -> list[str]:
    if given is not None:
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ReadoutError(f"readout: causal arms {unknown} are not arms of the sweep")
        return list(given)
    return [a for a in ("vanilla", "orthogonal", "subspace") if a in names]


def causal_checks(ctx: Any, declared: list, model: Any, tokenizer: Any, pad: int, ref: Mapping[str, Any],
                  readouts: Mapping[str, Mapping[str, Any]], points: Mapping[str, tuple], arms: Sequence[str],
                  seed: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Refusal (keyword judge on greedy answers) of the refusal model with and without the direction, and of
    each attacked arm's last point with and without the restoring addition (and its random control)."""
    if not arms:
        return {}
    ev = ctx.last_eval
    sets, twins = causal_prompts(ev)
    markers = getattr(ev.get("judge"), "refusal_markers", None)  # the sweep's own judge
    template = template_kwargs(ev)
    temperature = getattr(ev.get("generation"), "temperature", 0.0)

    def rates(prompt_sets: Mapping[str, list]) -> dict[str, dict]:
        return {s: refusal_rate(model, tokenizer, pad, ps, max_new_tokens, batch_size, markers, template)
                for s, ps in prompt_sets.items() if ps}

    by_name = {a.name: a for a in declared}
    layer, r = ref["layer"], ref["direction"]
    control = unit(torch.randn(r.shape, generator=torch.Generator().manual_seed(0)))
    out: dict[str, Any] = {"max_new_tokens": max_new_tokens, "judge": "keyword", "seed": seed, "decoding": "greedy",
                           "sweep_temperature": temperature}  # agreement with the sweep means little unless 0
    started = time.time()
    out["refusal"] = {"plain": rates(sets)}
    out["refusal"]["agreement_with_sweep"] = agreement(out["refusal"]["plain"],
                                                       sweep_outcomes(ctx, STEP0, "refusal", 0))
    with direction_ablated(model, r):
        out["refusal"]["ablated"] = rates(sets)
    last = max(ctx.steps)
    for arm in arms:
        name = f"{point_name(arm, last)}-s{seed}"
        if name not in points or name not in readouts:
            print(f"[readout] causal check of {arm}: its last point {name} was not read, skipped", flush=True)
            continue
        alpha = max(0.0, ref["harmful_ref"] - readouts[name]["harmful_projection"])
        entry: dict[str, Any] = {"alpha": alpha, "suppression": readouts[name]["suppression"]}
        with active_adapter(model, name, points[name][3]):
            entry["plain"] = rates({**sets, "benign_contrast": twins})
            entry["agreement_with_sweep"] = agreement(entry["plain"], sweep_outcomes(
                ctx, f"{arm if by_name[arm].is_fit else by_name[arm].of}-s{seed}", arm, last))
            with direction_added(model, r, layer, alpha):
                entry["restored"] = rates({**sets, "benign_contrast": twins})
            with direction_added(model, control, layer, alpha):
                entry["random_direction"] = rates(sets)
        out[arm] = entry
        print(f"[readout] causal check of {arm}: {time.time() - started:.0f}s so far", flush=True)
    return out


def causal_prompts(evaluation: Mapping[str, Any]) -> tuple[dict[str, list], list]:
    """The evaluated harmful sets (``CAUSAL_SETS``) and the contrast twins (benign items without a reference)
    that the evaluation arguments name."""
    from refusal_lightning.evaluation.prompts import load_prompts

    ev = evaluation
    found = load_prompts(prompts=ev.get("prompts"), harmfulqa_source=ev.get("harmfulqa_source"),
                         harmfulqa_val_fraction=ev.get("harmfulqa_val_fraction", 0.1),
                         harmfulqa_seed=ev.get("harmfulqa_seed", 0), benign_prompts=ev.get("benign_prompts"),
                         limit=ev.get("limit"))
    sets = {s: [p for p in found.prompts if p.prompt_set == s] for s in CAUSAL_SETS}
    return sets, [p for p in found.prompts if p.prompt_set == "benign" and not p.reference]


def sweep_outcomes(ctx: Any, unit: str, arm: str, step: int) -> dict[str, dict[str, int]]:
    """The sweep's own outcomes (prompt set -> key -> 0/1) of a point, from its unit's ``cells.json``."""
    path = unit_dir(ctx.run, unit) / CELLS_FILE  # read whatever code made it: the readout runs on newer code
    if not path.exists():
        return {}
    cells = json.loads(path.read_text()).get("cells", [])
    return next((c["outcomes"] for c in cells if c["arm"] == arm and c["step"] == step), {})


def agreement(rates: Mapping[str, Mapping[str, Any]], sweep: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Per prompt set, the share of items on which the in-process answers and the sweep's served answers got
    the same verdict (the same metric, two code paths), with the number compared."""
    out = {}
    for prompt_set, stats in rates.items():
        theirs = sweep.get(prompt_set, {})
        shared = [k for k in stats["outcomes"] if k in theirs]
        if shared:
            out[prompt_set] = {"share": sum(stats["outcomes"][k] == theirs[k] for k in shared) / len(shared),
                               "n": len(shared)}
    return out


def refusal_rate(model: Any, tokenizer: Any, pad: int, prompts: Sequence[Any], max_new_tokens: int,
                 batch_size: int, markers: str | None = None, template: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Greedy answers to ``prompts`` judged by the keyword judge (``markers``: its marker file, None: the
    default list; ``template``: the chat template's arguments): ``{rate, ci_low, ci_high, k, n, outcomes}``."""
    from refusal_lightning.evaluation.judges import REFUSAL, KeywordJudge, load_markers

    judge = KeywordJudge(load_markers(markers))
    ids = chat_prompt_ids(tokenizer, [p.text for p in prompts], template)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outcomes: dict[str, int] = {}
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = left_padded([ids[i] for i in rows], pad)
        with torch.inference_mode():
            new = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)[:, input_ids.shape[1]:]
        for i, tokens in zip(rows, new.tolist(), strict=True):
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            key = f"{prompts[i].question_id}|{prompts[i].style}|0"
            outcomes[key] = int(judge.judge(prompts[i].text, answer).label == REFUSAL)
    k, n = sum(outcomes.values()), len(outcomes)
    low, high = wilson_interval(k, n) or (None, None)
    return {"rate": k / n, "ci_low": low, "ci_high": high, "k": k, "n": n, "outcomes": outcomes}


def annotate_sweep_results(path: Path, readouts: Mapping[str, Mapping[str, Any]]) -> None:
    """Add ``suppression`` and ``rotation_cos`` to the sweep's ``results.json`` cells that were read."""
    if not path.exists():
        return
    results = json.loads(path.read_text())
    by_point = {(p["arm"], p["seed"], p["step"]): p for p in readouts.values()}
    for cell in (results.get("sweep") or {}).get("cells", []):
        found = by_point.get((cell["arm"], cell["seed"], cell["step"]))
        if found is None and cell["step"] == 0:
            found = by_point.get(("refusal", -1, 0))
        if found is not None:
            cell["suppression"], cell["rotation_cos"] = found["suppression"], found["rotation_cos"]
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def load_refusal_model(base_model: str, refusal_dir: Path) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from refusal_lightning.models.loading import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = PeftModel.from_pretrained(load_causal_lm(base_model).eval(), str(refusal_dir),
                                      adapter_name=STEP0).eval()
    return model, tokenizer


@contextlib.contextmanager
def active_adapter(model: Any, name: str, adapter: Path | None) -> Iterator[None]:
    """Inside the block, ``adapter`` (a combined adapter for the plain base; None: the refusal model) is the
    active one; it is unloaded after."""
    if adapter is not None:
        model.load_adapter(str(adapter), adapter_name=name)
        model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(STEP0)
        if adapter is not None:
            model.delete_adapter(name)
