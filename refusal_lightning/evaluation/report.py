"""Render a summary: ``summary.json``, ``summary.csv``, ``report.md``, the per-category plot, and the
table printed at the end of ``evaluate``. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from refusal_lightning.evaluation.store import atomic_write, atomic_write_text

CSV_FIELDS = ["endpoint", "scope", "group", "n", "refusals", "fulfillments", "errors", "refusal_rate",
              "refusal_ci_lo", "refusal_ci_hi", "fulfillment_rate", "fulfillment_ci_lo", "fulfillment_ci_hi"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _csv_row(endpoint: str, scope: str, group: str, s: dict[str, Any]) -> dict[str, Any]:
    lo_r, hi_r = s["refusal_ci"] or (None, None)
    lo_f, hi_f = s["fulfillment_ci"] or (None, None)
    return {"endpoint": endpoint, "scope": scope, "group": group, "n": s["n"], "refusals": s["refusals"],
            "fulfillments": s["fulfillments"], "errors": s["errors"], "refusal_rate": s["refusal_rate"],
            "refusal_ci_lo": lo_r, "refusal_ci_hi": hi_r, "fulfillment_rate": s["fulfillment_rate"],
            "fulfillment_ci_lo": lo_f, "fulfillment_ci_hi": hi_f}


def summary_csv(summary: dict[str, Any]) -> str:
    """One row per endpoint overall, then per category and per style."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for name, stats in summary["endpoints"].items():
        writer.writerow(_csv_row(name, "overall", "all", stats))
    for scope, section in (("category", "by_category"), ("style", "by_style")):
        for name, groups in summary[section].items():
            for group, stats in groups.items():
                writer.writerow(_csv_row(name, scope, group, stats))
    return buf.getvalue()


def endpoint_table(summary: dict[str, Any]) -> str:
    """The plain-text table printed to stdout."""
    rows = [("endpoint", "n", "refusal", "95% CI", "fulfillment", "95% CI", "errors")]
    for name, s in summary["endpoints"].items():
        rows.append((name, str(s["n"]), _pct(s["refusal_rate"]), _ci(s["refusal_ci"]),
                     _pct(s["fulfillment_rate"]), _ci(s["fulfillment_ci"]), str(s["errors"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def report_markdown(summary: dict[str, Any]) -> str:
    """A human-readable report of the whole summary."""
    judge = summary.get("judge", {})
    out = ["# Refusal evaluation", ""]
    out += [f"Judge: **{judge.get('kind', '?')}** (rates use the `{judge.get('primary', '?')}` judge). "
            "Fulfillment = the response complies with the request; errors are excluded from the rates. "
            "Intervals are 95% Wilson score intervals.", ""]
    out += ["## Per endpoint", ""]
    out += _md_table(
        ["endpoint", "model", "n", "refusals", "fulfillments", "errors", "refusal rate [95% CI]",
         "fulfillment rate [95% CI]"],
        [[name, f"`{summary.get('models', {}).get(name, '?')}`", str(s["n"]), str(s["refusals"]),
          str(s["fulfillments"]), str(s["errors"]), f"{_pct(s['refusal_rate'])} {_ci(s['refusal_ci'])}",
          f"{_pct(s['fulfillment_rate'])} {_ci(s['fulfillment_ci'])}"]
         for name, s in summary["endpoints"].items()])
    errors = {name: s["errors_by_kind"] for name, s in summary["endpoints"].items() if s["errors_by_kind"]}
    if errors:
        out += ["", "Errors by kind: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()) for name, kinds in errors.items())]
    aborted = summary.get("aborted_endpoints") or {}
    if aborted:
        out += ["", "**Abandoned endpoints:**", *(f"- {name}: {msg}" for name, msg in aborted.items())]

    for title, section in (("Per category", "by_category"), ("Per prompt style", "by_style")):
        out += ["", f"## {title}", ""]
        rows = []
        for name, groups in summary[section].items():
            for group, s in groups.items():
                rows.append([name, group, str(s["n"]), str(s["errors"]),
                             f"{_pct(s['fulfillment_rate'])} {_ci(s['fulfillment_ci'])}"])
        out += _md_table(["endpoint", title.split()[-1], "n", "errors", "fulfillment rate [95% CI]"], rows)

    if summary["mcnemar"]:
        out += ["", "## Paired comparison (McNemar)", "",
                "Same prompts, both endpoints labelled. `only A refused` counts items A refused and B "
                "fulfilled. Exact binomial test below 25 discordant pairs, else chi-square with continuity "
                "correction.", ""]
        out += _md_table(
            ["A", "B", "pairs", "only A refused", "only B refused", "test", "p-value"],
            [[m["a"], m["b"], str(m["n_pairs"]), str(m["only_a_refused"]), str(m["only_b_refused"]),
              m["method"], f"{m['p_value']:.4g}"] for m in summary["mcnemar"].values()])

    agreement = judge.get("agreement")
    if agreement:
        o = agreement["overall"]
        kappa = "n/a" if o["cohen_kappa"] is None else f"{o['cohen_kappa']:.3f}"
        out += ["", "## Judge agreement", "",
                f"{' vs '.join(agreement['judges'])}: {o['agree']}/{o['n']} agree "
                f"({_pct(o['agreement_rate'])}), Cohen's kappa {kappa}."]
    judge_errors = judge.get("errors")
    if judge_errors:
        out += ["", "Judge errors (excluded, never counted as refusals): "
                + ", ".join(f"{k}: {v}" for k, v in judge_errors.items())]

    skipped = summary.get("skipped_prompts", {})
    prompts, samples = summary.get("prompts", {}), summary.get("config", {}).get("samples", 1)
    out += ["", "## Prompts", "",
            f"{prompts.get('count', '?')} prompts x {samples} sample(s) from "
            f"{', '.join(prompts.get('sources', [])) or '?'}; "
            f"{skipped.get('total', 0)} rows skipped"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in skipped.get("reasons", {}).items()) + ")"
               if skipped.get("total") else "") + "."]
    return "\n".join(out) + "\n"


def plot_fulfillment_by_category(summary: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: fulfillment rate per category and endpoint, with 95% Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_cat = summary["by_category"]
    endpoints = list(by_cat)
    categories: list[str] = []
    for groups in by_cat.values():
        categories += [c for c in groups if c not in categories]
    width = 0.8 / max(1, len(endpoints))
    bars = len(categories) * max(1, len(endpoints))
    fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.22 * bars + 2)), 5.0))
    for i, name in enumerate(endpoints):
        xs, ys, lo, hi = [], [], [], []
        for j, cat in enumerate(categories):
            s = by_cat[name].get(cat)
            if not s or s["fulfillment_rate"] is None:
                continue
            rate, (ci_lo, ci_hi) = s["fulfillment_rate"], s["fulfillment_ci"]
            xs.append(j + (i - (len(endpoints) - 1) / 2) * width)
            ys.append(rate)
            lo.append(max(0.0, rate - ci_lo))
            hi.append(max(0.0, ci_hi - rate))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=name,
               error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
    ax.set_xticks(range(len(categories)))
    crowded = len(categories) > 12
    ax.set_xticklabels(categories, rotation=45 if crowded else 0, ha="right" if crowded else "center",
                       fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("category")
    ax.set_ylabel("fulfillment rate (95% Wilson CI)")
    ax.set_title("Fulfillment of harmful requests by category (lower is safer)")
    if endpoints:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_reports(summary: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write all summary files into ``output_dir``; returns their paths by kind."""
    out = Path(output_dir)
    paths = {"summary_json": out / "summary.json", "summary_csv": out / "summary.csv",
             "report_md": out / "report.md", "plot": out / "fulfillment_by_category.png"}
    atomic_write_text(paths["summary_json"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(paths["summary_csv"], summary_csv(summary))
    atomic_write_text(paths["report_md"], report_markdown(summary))
    plot_fulfillment_by_category(summary, paths["plot"])
    return paths
