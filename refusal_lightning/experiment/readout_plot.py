"""The readout in one picture: where the refusal direction is read (every layer's separation), and how far
each attack suppresses it along its trajectory (suppression against attack step, mean over seeds with the
seeds' range as a band)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def plot_readout(result: dict[str, Any], path: str | Path) -> Path | None:
    """Write the two-panel PNG to ``path``; None when there is no point to draw."""
    if not result.get("points"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (layers, steps) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    scores = result["separation"]
    layers.bar(range(len(scores)), scores, color=["tab:blue" if i in result["allowed_layers"] else "lightgray"
                                                  for i in range(len(scores))])
    layers.axvline(result["layer"], color="black", linestyle="--", linewidth=1, label=f"chosen: {result['layer']}")
    layers.set_xlabel("layer (blue: touched by the LoRAs)")
    layers.set_ylabel("harmful vs harmless separation (pooled SDs)")
    layers.set_title("Refusal model: where the direction is read", fontsize=10)
    layers.legend(fontsize=8)

    step0 = [p["suppression"] for p in result["points"] if p["step"] == 0]
    by_arm: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in result["points"]:
        if p["step"] > 0:
            by_arm[p["arm"]][p["step"]].append(p["suppression"])
    for arm, points in by_arm.items():
        xs = [0, *sorted(points)]
        values = [step0, *(points[x] for x in sorted(points))]
        mean = [sum(v) / len(v) for v in values]
        line, = steps.plot(xs, mean, marker="o", label=arm)
        steps.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                           alpha=0.15)
    steps.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    steps.axhline(0.0, color="gray", linewidth=0.8, linestyle=":")
    steps.set_xlabel("attack step")
    steps.set_ylabel("suppression (1: as the refusal model, 0: as harmless)")
    steps.set_title("Held-out harmful prompts' projection on the direction", fontsize=10)
    steps.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
