"""From timings to the JSON record and its markdown table: ratios, memory ratios, ``missing``, machine.

``ratios`` (and ``vs_vanilla``) are the median over rounds of the paired ratio
``time(reference) / time(runner)``: both ran seconds apart, so load from other processes on a shared
machine largely cancels within a round. ``ratios_of_medians`` and ``ratios_cpu_time`` (process CPU seconds
per step, all threads) are reported as cross-checks. A runner that could not run is listed in ``skipped``
and, with every ratio and memory figure it leaves out, in ``missing`` (key -> why); absent figures are
never written as null. ``mem_ratios.vanilla_vs_plain`` is vanilla's peak RSS / the plain loop's.
``directions_mem_ratio``: elements of every tensor a projector holds (views counted once, the model's own
parameters excluded) / the attack LoRA's trainable parameter count (target <= 2).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from bench.harness import paired_ratio
from bench.presets import CLIP, LORA_ALPHA, LORA_DROPOUT, LORA_R, LR
from bench.runners import PROJECTION_MODES, PROJECTION_TARGETS, trl_version


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU, thread count, library versions and the device the run used."""
    import lightning
    import peft
    import transformers

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    info = {
        "nproc": os.cpu_count(), "cpu_model": cpu, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------ ratios
def ratio_keys() -> list[str]:
    """Every throughput ratio the benchmark reports: ``a_vs_b`` = time(b) / time(a)."""
    keys = ["vanilla_vs_plain", "vanilla_vs_trl", "vanilla_vs_vanilla_full"]
    return keys + [f"{m}_{t}_vs_vanilla" for m in PROJECTION_MODES for t in PROJECTION_TARGETS]


def ratios_of(per_round: dict[str, list[list[float]]]) -> dict[str, float]:
    """The ratios whose two runners both ran (``missing_ratios`` says why the others are absent)."""
    out = {}
    for key in ratio_keys():
        a, b = key.split("_vs_")
        if a in per_round and b in per_round:
            out[key] = paired_ratio(per_round, a, b)
    return out


def missing_ratios(present: dict[str, Any], wanted: list[str], skipped: dict[str, str]) -> dict[str, str]:
    """For each ratio whose runners were both asked for but which is absent: why (the skip reasons)."""
    out = {}
    for key in ratio_keys():
        if key in present:
            continue
        a, b = key.split("_vs_")
        if a in wanted and b in wanted:  # asked for, yet absent
            out[key] = "; ".join(f"{n}: {skipped[n]}" for n in (a, b) if n in skipped) or "not measured"
    return out


def memory_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Peak RSS of vanilla / plain, whole process and above the imports (the libraries every probe loads)."""
    out = {}
    a, b = runs.get("vanilla", {}), runs.get("plain", {})
    if a.get("peak_rss_mb") and b.get("peak_rss_mb"):
        out["vanilla_vs_plain"] = a["peak_rss_mb"] / b["peak_rss_mb"]
    if a.get("peak_rss_above_imports_mb") and b.get("peak_rss_above_imports_mb"):
        out["vanilla_vs_plain_above_imports"] = a["peak_rss_above_imports_mb"] / b["peak_rss_above_imports_mb"]
    return out


def quotient(runs: dict[str, dict[str, Any]], key: str) -> float | None:
    """``key`` (``a_vs_b``) as the quotient of the two runs' median-based tokens/s."""
    a, b = key.split("_vs_")
    if a in runs and b in runs:
        return runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"]
    return None


def missing_figures(wanted: list[str], skipped: dict[str, str], runs: dict[str, dict[str, Any]],
                    ratios: dict[str, float], mem_mode: str) -> tuple[dict[str, str], dict[str, float]]:
    """``missing`` (figure key -> why it is absent) and ``peak_rss_mb`` (runner -> MB, the measured ones)."""
    missing = {name: f"runner skipped: {why}" for name, why in skipped.items()}
    missing |= {f"ratios.{k}": why for k, why in missing_ratios(ratios, wanted, skipped).items()}
    peak_rss = {}
    for name in wanted:
        if runs.get(name, {}).get("peak_rss_mb"):
            peak_rss[name] = runs[name]["peak_rss_mb"]
        elif name in skipped:
            missing[f"peak_rss_mb.{name}"] = f"runner skipped: {skipped[name]}"
        elif mem_mode == "off":
            missing[f"peak_rss_mb.{name}"] = "not measured (--mem off)"
        else:
            missing[f"peak_rss_mb.{name}"] = "memory probe failed: " + runs.get(name, {}).get("peak_mem_error", "?")
    return missing, peak_rss


# ---------------------------------------------------------------------------------- markdown
def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    """The run as markdown: settings, machine, the per-runner table, targets, padding and directions."""
    p, m = result["settings"], result["machine"]
    lines = [
        f"### Preset `{result['preset']}`",
        "",
        f"Model: Qwen3 architecture, {p['num_layers']} layers x {p['hidden_size']}"
        + (f", vocabulary {p['vocab_size']:,}" if p.get("vocab_size") else "")
        + f", random weights; LoRA r={LORA_R} "
        f"alpha={LORA_ALPHA:g} dropout={LORA_DROPOUT} on all linear layers; batch {p['batch']} x {p['seq']} tokens "
        f"(no padding), {p['precision']}, AdamW lr {LR:g}, clip {CLIP:g}; {p['warmup']} warmup + {p['steps']} timed "
        f"steps per runner, interleaved {p['steps_per_round']} step(s) per runner per round; "
        f"torch.compile {'on' if p.get('compile') else 'off'} in every runner.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), device `{m['device']}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"trl {m['trl'] or 'not installed'}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Ratios (`vs vanilla` and the targets) are medians over rounds of paired per-round step-time ratios;",
        f"{result['rounds']} rounds{' (stopped by the time budget)' if result['stopped_by_budget'] else ''}, "
        f"1-min load average {result['loadavg_1min_before_after'][0]:.1f} before / "
        f"{result['loadavg_1min_before_after'][1]:.1f} after the timed rounds.",
        "",
        "| runner | tokens/s | median step (ms) | p10-p90 step (ms) | peak RSS (MB) | vs vanilla |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["runs"].items():
        rel = r.get("vs_vanilla")
        lines.append(f"| {name} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['step_s_median'] * 1e3, '.1f')} | "
                     f"{_fmt(r['step_s_p10'] * 1e3, '.0f')}-{_fmt(r['step_s_p90'] * 1e3, '.0f')} | "
                     f"{_fmt(r.get('peak_rss_mb'), ',.0f')} | {_fmt(rel, '.3f')} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    mem = result.get("mem_ratios", {})
    lines += ["", f"Peak memory: {result.get('peak_mem_source', 'n/a')}."
              + (f" vanilla / plain: {mem['vanilla_vs_plain']:.3f}" if "vanilla_vs_plain" in mem else "")
              + (f" ({mem['vanilla_vs_plain_above_imports']:.3f} above the imports)."
                 if "vanilla_vs_plain_above_imports" in mem else ""),
              "", "| target | value | wanted | met |", "|---|---:|---:|:---:|"]
    for t in result["targets"]:
        lines.append(f"| {t['metric']} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    for key, why in result.get("missing", {}).items():
        lines.append(f"| {key} | missing: {why} | | |")
    pad = result["padding"]
    lines += ["", f"Padding efficiency of the bundled sample at batch {pad['batch_size']} (non-pad / padded tokens): "
              f"red {pad['red']['grouped']:.3f} with length grouping ({pad['red']['ungrouped']:.3f} without), "
              f"blue {pad['blue']['grouped']:.3f} ({pad['blue']['ungrouped']:.3f}). "
              f"Directions held in memory / LoRA parameters: "
              + ", ".join(f"{k} {v:.2f}" for k, v in result.get("directions_mem_ratio_by_run", {}).items()) + ".",
              ""]
    return "\n".join(lines)
