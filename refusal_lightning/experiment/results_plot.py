"""The question asked, in one picture: did each model keep refusing, and did the attack learn?

x: held-out red (harmful-reply) NLL, lower = the model has learned the attack's replies;
y: refusal rate on held-out harmful prompts with its 95% Wilson interval, one marker per prompt set.
A defence that works sits low on x (the attack learned) and high on y (refusal kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HARMFUL_SETS = {"harmfulqa_heldout": ("o", "held-out HarmfulQA(-proxy) questions"),
                "sorry_bench": ("s", "SORRY-Bench(-proxy) prompts")}


def plot_refusal_vs_red_nll(results: dict[str, Any], path: str | Path) -> Path | None:
    """Write the scatter to ``path`` (PNG); returns None when no model has both an NLL and a rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, row) in enumerate(results["models"].items()):
        nll = (row.get("nll") or {}).get("red_heldout")
        if nll is None:
            continue
        for prompt_set, (marker, _) in HARMFUL_SETS.items():
            stats = (row.get("prompt_sets") or {}).get(prompt_set)
            if not stats or stats.get("refusal_rate") is None:
                continue
            rate = stats["refusal_rate"]
            # max(0, .): a Wilson bound can sit a rounding error past the rate at 0% or 100%
            err = [[max(0.0, rate - stats["ci_low"])], [max(0.0, stats["ci_high"] - rate)]]
            ax.errorbar([nll], [100 * rate], yerr=[[100 * e for e in err[0]], [100 * e for e in err[1]]],
                        fmt=marker, color=colors[i % len(colors)], capsize=3,
                        label=name if prompt_set == "harmfulqa_heldout" else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("held-out red reply NLL (lower: the attack's replies were learned)")
    ax.set_ylabel("refusal rate on harmful prompts, % (95% CI)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    ax.set_title("Refusal kept vs. attack learned", fontsize=10)
    models = ax.legend(title="model", fontsize=8, loc="upper left")
    ax.add_artist(models)
    shapes = [Line2D([], [], marker=m, color="gray", linestyle="none", label=label)
              for m, label in HARMFUL_SETS.values()]
    ax.legend(handles=shapes, fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
