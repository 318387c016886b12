"""The sweep's table and its two pictures, from the merged ``results.json`` record.

- ``sweep_refusal_vs_red_nll.png``: per harmful set, refusal against held-out red NLL: each arm's mean
  trajectory over seeds (bars: the seeds' range in both axes) over vanilla's points, seed by seed, which
  are the frontier;
- ``sweep_refusal_vs_step.png``: per harmful set, refusal against attack step: each arm's mean over seeds
  with the seeds' range as a band.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refusal_lightning.formatting import percent

SCHEDULE_CONTROL = "vanilla_lowlr"  # vanilla at a third of the LR: it must lie on the frontier
SET_TITLES = {"sorry_bench": "SORRY-Bench(-proxy)", "harmfulqa_heldout": "HarmfulQA held-out"}


def _signed_points(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-" if not stats else f"none inside ({stats.get('n_outside', 0)} outside)"
    lo, hi = stats.get("ci_low"), stats.get("ci_high")
    ci = f" [{100 * lo:+.0f}, {100 * hi:+.0f}]" if lo is not None and hi is not None else ""
    return f"{100 * stats['mean']:+.1f}{ci} ({stats['n_points']} in, {stats['n_outside']} out)"


def _final(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    sd = stats.get("seed_sd")
    ci = (f" [{100 * stats['ci_low']:.0f}, {100 * stats['ci_high']:.0f}]"
          if stats.get("ci_low") is not None else "")
    return f"{percent(stats['mean'], missing='-')}{ci}" + (f" sd {100 * sd:.0f}" if sd is not None else "")


def sweep_table(record: Mapping[str, Any]) -> str:
    """One row per arm: gain at matched NLL per harmful set (points in / outside vanilla's range), the last
    step's refusal (interval, seed sd), the twins' over-refusal gain and rate, facts accuracy, McNemar p."""
    sweep = record["sweep"]
    harmful = [s for s in ("sorry_bench", "harmfulqa_heldout") if s in sweep["prompt_sets"]]
    twins = "benign_contrast" if "benign_contrast" in sweep["prompt_sets"] else None
    head = ["arm", *(f"gain {SET_TITLES.get(s, s)} (pts)" for s in harmful),
            *(f"last-step {SET_TITLES.get(s, s)}" for s in harmful)]
    if twins:
        head += ["gain twins' over-refusal", "last-step twin refusal"]
    head += ["facts accuracy", *(f"McNemar p {SET_TITLES.get(s, s)}" for s in harmful)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm in sweep["arms_order"]:
        s = sweep["arms"][arm]
        cells = [arm, *(_signed_points(s["gain_at_matched_nll"].get(x)) if arm != "vanilla" else "(frontier)"
                        for x in harmful), *(_final(s["final"].get(x)) for x in harmful)]
        if twins:
            cells += [_signed_points(s["gain_at_matched_nll"].get(twins)) if arm != "vanilla" else "(frontier)",
                      _final(s["final"].get(twins))]
        accuracy = s.get("accuracy_final", {})
        cells.append(percent(accuracy.get("benign_facts", accuracy.get("benign")), missing="-"))
        cells += [("-" if s["p_vs_vanilla"].get(x) is None else f"{s['p_vs_vanilla'][x]:.3g}") for x in harmful]
        lines.append("| " + " | ".join(cells) + " |")
    notes_schedule = schedule_note(sweep["arms"].get(SCHEDULE_CONTROL, {}), harmful)
    null = record.get("drift_null")
    notes = [f"Metric: {sweep['metric']} (judge@max_tokens), {len(sweep['seeds'])} seeds, steps "
             f"{sweep['trajectory_steps']}; gains in refusal points over vanilla's frontier at the same red NLL, "
             f"95% paired bootstrap ({sweep['replicates']} replicates: prompts, then seeds)."]
    if len(sweep["seeds"]) < 5:
        notes.append("With fewer than 5 seeds the seed part of each interval is rough.")
    if null:
        notes.append(f"Drift null: |cos(dW_r, dW_benign)| = {null['cos_benign_lora']:.2e} for a LoRA trained with "
                     f"the attack's recipe on benign replies, beside the Gaussian chance level "
                     f"{null['cos_gaussian']:.2e}." if null.get("cos_benign_lora") is not None
                     and null.get("cos_gaussian") is not None else "")
    notes.append(notes_schedule)
    return "\n".join(lines) + "\n\n" + " ".join(n for n in notes if n)


def schedule_note(control: Mapping[str, Any], prompt_sets: Sequence[str]) -> str:
    """What the slower-LR control says about the frontier: a gain whose interval excludes 0 means vanilla's
    frontier depends on the learning-rate schedule, so gains against it are partly the schedule's."""
    if not control:
        return ""
    gains = [(s, g) for s in prompt_sets
             if (g := control["gain_at_matched_nll"].get(s)) and g.get("ci_low") is not None]
    off = [s for s, g in gains if g["ci_low"] > 0 or g["ci_high"] < 0]
    if not gains:
        return ""
    if off:
        return (f"{SCHEDULE_CONTROL}'s gain interval excludes 0 on {', '.join(SET_TITLES.get(s, s) for s in off)}: "
                "the frontier depends on the schedule, and gains against it are partly the schedule's.")
    return f"{SCHEDULE_CONTROL} lies on the frontier (each of its gain intervals holds 0)."


def trajectories(cells: Sequence[Mapping[str, Any]], arm: str, prompt_set: str) -> dict[int, list[tuple]]:
    """``{seed: [(step, red NLL, refusal), ...]}`` of one arm on one set, sorted by step."""
    out: dict[int, list[tuple]] = {}
    for c in cells:
        if c["arm"] == arm and prompt_set in c["refusal"]:
            out.setdefault(c["seed"], []).append((c["step"], c["nll"]["red_heldout"], c["refusal"][prompt_set]))
    return {seed: sorted(points) for seed, points in out.items()}


def _by_step(runs: Mapping[int, list[tuple]]) -> list[tuple[int, list[float], list[float]]]:
    steps = sorted({p[0] for points in runs.values() for p in points})
    return [(step, [p[1] for points in runs.values() for p in points if p[0] == step],
             [p[2] for points in runs.values() for p in points if p[0] == step]) for step in steps]


def write_sweep_pictures(record: Mapping[str, Any], run: Path) -> list[Path]:
    """Both pictures into ``run``; returns their paths (none when no harmful set was measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = record["sweep"]
    sets = [s for s in ("sorry_bench", "harmfulqa_heldout") if s in sweep["prompt_sets"]]
    if not sets:
        return []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []
    for kind in ("refusal_vs_red_nll", "refusal_vs_step"):
        fig, axes = plt.subplots(1, len(sets), figsize=(6.0 * len(sets), 4.4), squeeze=False)
        for ax, prompt_set in zip(axes[0], sets, strict=True):
            for i, arm in enumerate(sweep["arms_order"]):
                color = colors[i % len(colors)]
                runs = trajectories(sweep["cells"], arm, prompt_set)
                rows = _by_step(runs)
                if not rows:
                    continue
                mean_nll = [sum(n) / len(n) for _, n, _ in rows]
                mean_ref = [100 * sum(r) / len(r) for _, _, r in rows]
                if kind == "refusal_vs_step":
                    steps = [s for s, _, _ in rows]
                    ax.plot(steps, mean_ref, "-o", color=color, label=arm, ms=3)
                    ax.fill_between(steps, [100 * min(r) for _, _, r in rows], [100 * max(r) for _, _, r in rows],
                                    color=color, alpha=0.15)
                    continue
                if arm == "vanilla":  # the frontier: every seed's own points
                    for points in runs.values():
                        ax.plot([p[1] for p in points], [100 * p[2] for p in points], "-", color=color, alpha=0.35,
                                lw=1)
                # max(0, .): a mean of equal values can sit a rounding error outside their range
                xerr = [[max(0.0, m - min(n)) for m, (_, n, _) in zip(mean_nll, rows, strict=True)],
                        [max(0.0, max(n) - m) for m, (_, n, _) in zip(mean_nll, rows, strict=True)]]
                yerr = [[max(0.0, m - 100 * min(r)) for m, (_, _, r) in zip(mean_ref, rows, strict=True)],
                        [max(0.0, 100 * max(r) - m) for m, (_, _, r) in zip(mean_ref, rows, strict=True)]]
                ax.errorbar(mean_nll, mean_ref, xerr=xerr, yerr=yerr, fmt="-o", ms=3, color=color, capsize=2,
                            label=arm, lw=1.2)
            ax.set_title(SET_TITLES.get(prompt_set, prompt_set))
            ax.set_ylabel("refusal (%)")
            ax.set_ylim(-3, 103)
            if kind == "refusal_vs_step":
                ax.set_xlabel("attack step")
            else:
                ax.set_xlabel("held-out red NLL (lower: the attack learned more)")
                ax.invert_xaxis()
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{len(sweep['seeds'])} seeds; bars/bands: range over seeds; metric {sweep['metric']}",
                     fontsize=9)
        fig.tight_layout()
        path = run / f"sweep_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
