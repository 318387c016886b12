"""The utility grid's table (``results.md``) and picture (``utility_harmful_vs_accuracy.png``): harmful
score against fine-tune accuracy per arm and harmful ratio p, with intervals, beside the base and refusal
models."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refusal_lightning.files import atomic_write_text
from refusal_lightning.formatting import markdown_table

PICTURE = "utility_harmful_vs_accuracy.png"


def _rate(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{100 * stats['mean']:.1f}% [{100 * stats['ci_low']:.0f}, {100 * stats['ci_high']:.0f}]"


def _points(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{100 * stats['mean']:+.1f} [{100 * stats['ci_low']:+.0f}, {100 * stats['ci_high']:+.0f}]"


def _single(cell: Mapping[str, Any], key: str) -> str:
    value = cell.get(key)
    return "-" if value is None else f"{100 * value:.1f}% (n {cell['n'][key]})"


def utility_table(record: Mapping[str, Any]) -> str:
    """The references, then one row per (arm, p): the three measures and the differences from vanilla."""
    utility = record["utility"]
    head = ["model / arm", "p", "harmful score", "fine-tune accuracy", "twins' over-refusal",
            "harmful score - vanilla (pts)", "accuracy - vanilla (pts)", "seeds"]
    rows = [[f"{name} (no fine-tune)", "-", _single(cell, "harmful_score"), _single(cell, "finetune_accuracy"),
             _single(cell, "twin_refusal"), "-", "-", "-"] for name, cell in utility["reference"].items()]
    for row in utility["rows"]:
        rows.append([row["arm"], f"{row['p']:g}", _rate(row["harmful_score"]), _rate(row["finetune_accuracy"]),
                     _rate(row["twin_refusal"]), _points(row.get("harmful_score_vs_vanilla")),
                     _points(row.get("finetune_accuracy_vs_vanilla")), str(row["harmful_score"]["n_seeds"])])
    return "\n".join(markdown_table(head, rows)) + "\n"


def write_utility_report(record: Mapping[str, Any], run: Path) -> list[Path]:
    """``results.md`` and the picture into ``run``; their paths."""
    utility = record["utility"]
    text = (f"# Utility grid: harmful score and fine-tune accuracy\n\nSweep {utility['sweep']}; last step "
            f"{utility['last_step']}; task {utility['settings']['task']['source']}; 95% intervals over items, then "
            f"seeds; differences paired with vanilla at the same p and seed.\n\n" + utility_table(record))
    atomic_write_text(run / "results.md", text)
    return [run / "results.md", plot_utility(record, run / PICTURE)]


def plot_utility(record: Mapping[str, Any], path: Path) -> Path:
    """Harmful score against fine-tune accuracy: one marker per (arm, p) with both intervals, each arm's
    points joined in order of p, the base and refusal models as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    utility = record["utility"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    arms = list(dict.fromkeys(r["arm"] for r in utility["rows"]))
    for i, arm in enumerate(arms):
        rows = sorted((r for r in utility["rows"] if r["arm"] == arm), key=lambda r: r["p"])
        rows = [r for r in rows if None not in (r["harmful_score"]["mean"], r["finetune_accuracy"]["mean"])]
        if not rows:
            continue
        x = [100 * r["finetune_accuracy"]["mean"] for r in rows]
        y = [100 * r["harmful_score"]["mean"] for r in rows]
        xerr = [[max(0.0, v - 100 * r["finetune_accuracy"]["ci_low"]) for v, r in zip(x, rows, strict=True)],
                [max(0.0, 100 * r["finetune_accuracy"]["ci_high"] - v) for v, r in zip(x, rows, strict=True)]]
        yerr = [[max(0.0, v - 100 * r["harmful_score"]["ci_low"]) for v, r in zip(y, rows, strict=True)],
                [max(0.0, 100 * r["harmful_score"]["ci_high"] - v) for v, r in zip(y, rows, strict=True)]]
        color = colors[i % len(colors)]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="-o", ms=4, capsize=2, color=color, label=arm, lw=1)
        for xv, yv, r in zip(x, y, rows, strict=True):
            ax.annotate(f"p={r['p']:g}", (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points", color=color)
    for marker, (name, cell) in zip("sD", utility["reference"].items(), strict=False):
        if cell.get("harmful_score") is not None and cell.get("finetune_accuracy") is not None:
            ax.plot(100 * cell["finetune_accuracy"], 100 * cell["harmful_score"], marker, color="black", ms=6,
                    label=f"{name} (no fine-tune)", mfc="none")
    ax.set_xlabel("fine-tune accuracy on the held-out task (%)")
    ax.set_ylabel("harmful score = 1 - refusal on the harmful set (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    seeds = max((r["harmful_score"]["n_seeds"] for r in utility["rows"]), default=0)
    ax.set_title(f"harmful ratio p in the user's task; {seeds} seeds; bars: 95% intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
