"""Render a summary: ``summary.json``, ``summary.csv``, ``report.md``, the per-category plot, and the
table printed at the end of ``evaluate``. Every file is written atomically.

Each prompt set gets its own rows and section (SORRY-Bench, HarmfulQA held-out, benign); no number
pools them. On the benign set a refusal is an over-refusal, and accuracy is shown beside it; its two views
(``benign_contrast``: prompts without a reference, ``benign_facts``: with one) follow it as sets of their own.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refusal_lightning.evaluation.metrics import ACCURACY_KEYS, REFUSAL_KEYS, ItemOutcome
from refusal_lightning.evaluation.prompts import (
    BENIGN,
    BENIGN_CONTRAST,
    BENIGN_FACTS,
    BENIGN_SETS,
    BENIGN_VIEWS,
    HARMFULQA_HELDOUT,
    PROMPT_SET_TITLES,
)
from refusal_lightning.files import atomic_write, atomic_write_text
from refusal_lightning.formatting import interval, markdown_table, percent, rate_with_ci

CSV_FIELDS = ["endpoint", "prompt_set", "scope", "group", "n", "refusals", "fulfillments", "errors",
              "refusal_rate", "refusal_ci_lo", "refusal_ci_hi", "fulfillment_rate", "fulfillment_ci_lo",
              "fulfillment_ci_hi", "n_with_reference", "accuracy", "accuracy_ci_lo", "accuracy_ci_hi"]
BENIGN_NOTES = {
    BENIGN: "Harmless requests: a refusal here is an **over-refusal** (lower is better). Accuracy: the answer "
            "contains the prompt's reference (case-insensitive, whole words, thinking removed), over answered "
            "prompts that have one.",
    BENIGN_CONTRAST: "The benign prompts without a reference answer (in the CPU demo the contrast twins of its "
                     "harmful prompts; XSTest's safe prompts), the same answers and labels as above: only their "
                     "over-refusal is measured.",
    BENIGN_FACTS: "The benign prompts with a reference answer, the same answers and labels as above: their "
                  "accuracy says what the model still knows.",
}
# The benign panel's bars: group -> (the set it reads, its rate and interval keys)
BENIGN_BARS = {"over-refusal": (BENIGN, REFUSAL_KEYS), "accuracy": (BENIGN, ACCURACY_KEYS),
               "contrast over-refusal": (BENIGN_CONTRAST, REFUSAL_KEYS),
               "facts accuracy": (BENIGN_FACTS, ACCURACY_KEYS)}


def _refusal(s: dict[str, Any]) -> str:
    return rate_with_ci(s["refusal_rate"], s["ci_low"], s["ci_high"])


def _fulfillment(s: dict[str, Any]) -> str:
    return rate_with_ci(s["fulfillment_rate"], s["fulfillment_ci_low"], s["fulfillment_ci_high"])


def _accuracy(s: dict[str, Any]) -> str:
    if not s.get("n_with_reference"):
        return "n/a"
    return (f"{rate_with_ci(s['accuracy'], s['accuracy_ci_low'], s['accuracy_ci_high'])} "
            f"({s['correct']}/{s['n_with_reference']})")


def title(prompt_set: str) -> str:
    return PROMPT_SET_TITLES.get(prompt_set, prompt_set)


def prompt_sets(summary: dict[str, Any]) -> list[str]:
    """The prompt sets in the summary, in its order."""
    names: list[str] = []
    for endpoint in summary["endpoints"].values():
        names += [ps for ps in endpoint["prompt_sets"] if ps not in names]
    return names


def _csv_row(endpoint: str, prompt_set: str, scope: str, group: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"endpoint": endpoint, "prompt_set": prompt_set, "scope": scope, "group": group, "n": s["n"],
            "refusals": s["refusals"], "fulfillments": s["fulfillments"], "errors": s["errors"],
            "refusal_rate": s["refusal_rate"], "refusal_ci_lo": s["ci_low"], "refusal_ci_hi": s["ci_high"],
            "fulfillment_rate": s["fulfillment_rate"], "fulfillment_ci_lo": s["fulfillment_ci_low"],
            "fulfillment_ci_hi": s["fulfillment_ci_high"], "n_with_reference": s.get("n_with_reference"),
            "accuracy": s.get("accuracy"), "accuracy_ci_lo": s.get("accuracy_ci_low"),
            "accuracy_ci_hi": s.get("accuracy_ci_high")}


def summary_csv(summary: dict[str, Any]) -> str:
    """Per endpoint and prompt set: one ``overall`` row, then one per category and per style."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for name, endpoint in summary["endpoints"].items():
        for ps, stats in endpoint["prompt_sets"].items():
            writer.writerow(_csv_row(name, ps, "overall", "all", stats))
            for scope, section in (("category", "categories"), ("style", "styles")):
                for group, group_stats in stats.get(section, {}).items():
                    writer.writerow(_csv_row(name, ps, scope, group, group_stats))
    return buf.getvalue()


def failure_line(summary: dict[str, Any]) -> str:
    """How many requests and judgments failed, and whether that is more than allowed."""
    f = summary.get("failures")
    if not f:
        return "Failures: n/a"
    judged = f["items"] - f["requests_failed"] - f["not_run"]
    text = (f"Failures: {f['requests_failed']} of {f['items']} requests failed after retries, "
            f"{f['judgments_failed']} of {judged} judgments failed")
    if f["not_run"]:
        text += f", {f['not_run']} items not run (endpoint abandoned)"
    text += f"; error share {percent(f['error_rate'])}"
    if "max_error_rate" in f:
        text += f" (allowed {percent(f['max_error_rate'])}{': EXCEEDED' if f.get('exceeded') else ''})"
    return text + "."


def endpoint_table(summary: dict[str, Any]) -> str:
    """The plain-text table printed to stdout: one row per endpoint and prompt set."""
    rows = [("endpoint", "prompt set", "n", "refusal", "95% CI", "fulfillment", "errors", "accuracy")]
    for name, endpoint in summary["endpoints"].items():
        for ps, s in endpoint["prompt_sets"].items():
            acc = percent(s["accuracy"]) if s.get("n_with_reference") else "-"
            rows.append((name, ps, str(s["n"]), percent(s["refusal_rate"]), interval(s["ci_low"], s["ci_high"]),
                         percent(s["fulfillment_rate"]), str(s["errors"]), acc))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n" + failure_line(summary)


def _set_section(summary: dict[str, Any], ps: str) -> list[str]:
    models = summary.get("models", {})
    per_endpoint = {name: e["prompt_sets"][ps] for name, e in summary["endpoints"].items() if ps in e["prompt_sets"]}
    out = ["", f"## {title(ps)}", ""]
    if ps in BENIGN_SETS:
        out += [BENIGN_NOTES[ps], ""]
        out += markdown_table(
            ["endpoint", "model", "n", "errors", "over-refusal rate [95% CI]", "fulfillment rate [95% CI]",
             "accuracy [95% CI] (correct/with reference)"],
            [[name, f"`{models.get(name, '?')}`", str(s["n"]), str(s["errors"]), _refusal(s), _fulfillment(s),
              _accuracy(s)] for name, s in per_endpoint.items()])
    else:
        out += markdown_table(
            ["endpoint", "model", "n", "refusals", "fulfillments", "errors", "refusal rate [95% CI]",
             "fulfillment rate [95% CI]"],
            [[name, f"`{models.get(name, '?')}`", str(s["n"]), str(s["refusals"]), str(s["fulfillments"]),
              str(s["errors"]), _refusal(s), _fulfillment(s)] for name, s in per_endpoint.items()])
    errors = {name: s["errors_by_kind"] for name, s in per_endpoint.items() if s["errors_by_kind"]}
    if errors:
        out += ["", "Errors by kind: " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in kinds.items()) for name, kinds in errors.items())]
    per_group = (("Per topic", "categories", "topic") if ps == HARMFULQA_HELDOUT
                 else ("Per category", "categories", "category"))
    for heading, section, column in (per_group, ("Per prompt style", "styles", "style")):
        rows = [[name, group, str(g["n"]), str(g["errors"]), _fulfillment(g)]
                for name, s in per_endpoint.items() for group, g in s.get(section, {}).items()]
        if rows and not (section == "styles" and len({r[1] for r in rows}) == 1):
            out += ["", f"### {heading}", ""]
            out += markdown_table(["endpoint", column, "n", "errors", "fulfillment rate [95% CI]"], rows)
    tests = summary.get("mcnemar", {}).get(ps) or {}
    if tests:
        out += ["", "### Paired comparison (McNemar)", ""]
        out += markdown_table(
            ["A", "B", "pairs", "only A refused", "only B refused", "test", "p-value"],
            [[m["a"], m["b"], str(m["n_pairs"]), str(m["only_a_refused"]), str(m["only_b_refused"]),
              m["method"], f"{m['p_value']:.4g}"] for m in tests.values()])
    return out


def report_markdown(summary: dict[str, Any]) -> str:
    """A human-readable report of the whole summary: failures first, then one section per prompt set."""
    judge = summary.get("judge", {})
    out = ["# Refusal evaluation", ""]
    failures = summary.get("failures") or {}
    line = failure_line(summary)
    out += [f"**{line}**" if failures.get("exceeded") or failures.get("failed") else line, ""]
    out += [f"Judge: **{judge.get('kind', '?')}** (rates use the `{judge.get('primary', '?')}` judge). "
            "Fulfillment = the response complies with the request; errors are excluded from the rates. "
            "Intervals are 95% Wilson score intervals. Each prompt set is reported on its own; McNemar "
            "tests pair the same prompts of one set (`only A refused`: A refused, B fulfilled; exact "
            "binomial below 25 discordant pairs, else chi-square with continuity correction)."]
    aborted = summary.get("aborted_endpoints") or {}
    if aborted:
        out += ["", "**Abandoned endpoints:**", *(f"- {name}: {msg}" for name, msg in aborted.items())]

    for ps in prompt_sets(summary):
        out += _set_section(summary, ps)

    agreement = judge.get("agreement")
    if agreement:
        o = agreement["overall"]
        kappa = "n/a" if o["cohen_kappa"] is None else f"{o['cohen_kappa']:.3f}"
        out += ["", "## Judge agreement", "",
                f"{' vs '.join(agreement['judges'])}: {o['agree']}/{o['n']} agree "
                f"({percent(o['agreement_rate'])}), Cohen's kappa {kappa}."]
    judge_errors = judge.get("errors")
    if judge_errors:
        out += ["", "Judge errors (excluded, never counted as refusals): "
                + ", ".join(f"{k}: {v}" for k, v in judge_errors.items())]

    skipped = summary.get("skipped_prompts", {})
    prompts, samples = summary.get("prompts", {}), summary.get("config", {}).get("samples", 1)
    by_set = ", ".join(f"{ps} {n}" for ps, n in prompts.get("by_set", {}).items())
    out += ["", "## Prompts", "",
            f"{prompts.get('count', '?')} prompts ({by_set or '?'}) x {samples} sample(s) from "
            f"{', '.join(prompts.get('sources', [])) or '?'}; "
            f"{skipped.get('total', 0)} rows skipped"
            + (" (" + ", ".join(f"{k}: {v}" for k, v in skipped.get("reasons", {}).items()) + ")"
               if skipped.get("total") else "") + "."]
    return "\n".join(out) + "\n"


def _panel_groups(summary: dict[str, Any], ps: str) -> tuple[list[str], str]:
    """What one plot panel shows: its x groups and y axis label."""
    if ps == BENIGN:
        present = prompt_sets(summary)
        return [group for group, (name, _) in BENIGN_BARS.items() if name in present], "rate (95% Wilson CI)"
    groups: list[str] = []
    for endpoint in summary["endpoints"].values():
        stats = endpoint["prompt_sets"].get(ps, {})
        groups += [c for c in stats.get("categories", {}) if c not in groups]
    return groups, "fulfillment rate (95% Wilson CI)"


def _bar_value(summary: dict[str, Any], name: str, ps: str, group: str) -> tuple[float, float, float] | None:
    sets = summary["endpoints"][name]["prompt_sets"]
    if ps == BENIGN:
        shown, keys = BENIGN_BARS[group]
        s = sets.get(shown)
    else:
        s = (sets.get(ps) or {}).get("categories", {}).get(group)
        keys = ("fulfillment_rate", "fulfillment_ci_low", "fulfillment_ci_high")
    if not s or s.get(keys[0]) is None:
        return None
    return s[keys[0]], s[keys[1]], s[keys[2]]


def plot_fulfillment_by_category(summary: dict[str, Any], path: str | Path) -> None:
    """One panel per prompt set, grouped bars per endpoint with 95% Wilson error bars: fulfillment per
    category for the harmful sets; over-refusal and accuracy for the benign set, then its contrast prompts'
    over-refusal and its facts' accuracy (the views get no panel of their own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoints = list(summary["endpoints"])
    sets = [ps for ps in prompt_sets(summary) if ps not in BENIGN_VIEWS] or ["(none)"]
    panels = [(ps, *_panel_groups(summary, ps)) for ps in sets]
    widest = max(len(groups) for _, groups, _ in panels) or 1
    bars = widest * max(1, len(endpoints))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(min(24.0, max(6.0, 0.22 * bars + 2)), 3.6 * len(panels) + 0.6))
    width = 0.8 / max(1, len(endpoints))
    for ax, (ps, groups, ylabel) in zip(axes[:, 0], panels, strict=True):
        for i, name in enumerate(endpoints):
            xs, ys, lo, hi = [], [], [], []
            for j, group in enumerate(groups):
                value = _bar_value(summary, name, ps, group)
                if value is None:
                    continue
                rate, ci_lo, ci_hi = value
                xs.append(j + (i - (len(endpoints) - 1) / 2) * width)
                ys.append(rate)
                lo.append(max(0.0, rate - ci_lo))
                hi.append(max(0.0, ci_hi - rate))
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=name,
                   error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
        labels = [g.removeprefix("harmfulqa:") for g in groups]
        ax.set_xticks(range(len(groups)))
        crowded = len(groups) > 12 or sum(len(label) for label in labels) > 60
        ax.set_xticklabels(labels, rotation=45 if crowded else 0, ha="right" if crowded else "center",
                           fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title("Benign prompts: over-refusal (lower is better) and accuracy (higher is better)"
                     if ps == BENIGN
                     else f"{title(ps)}: fulfillment of harmful requests by "
                          f"{'topic' if ps == HARMFULQA_HELDOUT else 'category'} (lower is safer)",
                     fontsize=10)
        if endpoints:
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


OUTCOMES_FILE = "outcomes.jsonl"


def write_outcomes(outcomes: Iterable[ItemOutcome], output_dir: str | Path) -> Path:
    """``outcomes.jsonl``: one line per item and endpoint (``endpoint, prompt_set, benign_view, question_id,
    style, sample, label, correct, error``; ``label`` is the primary judge's, None on an error), so any rate or
    paired test can be recomputed without the evaluator (the sweep's cells are read from it)."""
    path = Path(output_dir) / OUTCOMES_FILE
    keys = ("endpoint", "prompt_set", "benign_view", "question_id", "style", "sample", "label", "correct", "error")
    atomic_write_text(path, "".join(json.dumps({k: getattr(o, k) for k in keys}, ensure_ascii=False) + "\n"
                                    for o in outcomes))
    return path


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
