"""The experiment's results: one row per model (``results.json``) and the tables of ``results.md``.

A row holds the refusal rate per prompt set with its Wilson interval (from the evaluation's
``summary.json``, where the benign set is also split into its contrast prompts and its facts), the held-out
red/blue NLL, and for each trained attack the drift of its update along the refusal direction beside its
chance level; the McNemar tests per prompt set come with the summary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refusal_lightning.evaluation.metrics import ACCURACY_KEYS, REFUSAL_KEYS
from refusal_lightning.evaluation.prompts import BENIGN, BENIGN_CONTRAST, BENIGN_FACTS, REPORTED_SETS
from refusal_lightning.formatting import percent, rate_with_ci

# McNemar pairs in the results table (a before b in the table's order)
HEADLINE_PAIRS = (("vanilla", "orthogonal"), ("refusal", "orthogonal"), ("refusal", "vanilla"),
                  ("vanilla", "subspace"), ("vanilla", "safe_lora"), ("vanilla", "asft"))

READING = """How to read it (README, "Reading the report"):
- refusal per prompt set, 95% Wilson interval: SORRY-Bench-schema prompts, the held-out HarmfulQA
  questions (the attacks' own distribution), and benign requests (refusal there is over-refusal;
  accuracy = the reference answer appears in the reply).
- twin refusal / facts accuracy: the benign set split by whether a prompt has a reference answer. Twin
  refusal is the over-refusal of the prompts without one (in the CPU demo the contrast twins of the harmful
  prompts; XSTest's safe prompts), facts accuracy the accuracy of those with one. They are the benign
  set's own answers and labels, nothing evaluated twice; without such prompts the columns fall back to the
  whole benign set's refusal and accuracy.
- red / blue NLL: mean reply-token NLL of the held-out red (harmful) and blue (safe) replies. An attack
  that learned lowers red NLL; an orthogonal attack that keeps refusal but leaves red NLL at the refusal
  model's level learned nothing, and its refusal says nothing about the defence.
- drift/cos: cosine between the attack's update and the refusal update; in parentheses its chance level,
  E|cos| for a random update of the same shape. A value near chance is noise, not alignment.
- McNemar p: paired test on the same prompts, per prompt set.
"""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def collect_results(eval_dir: Path, attack_dirs: Mapping[str, Path], nll: dict[str, dict], models: list[str],
                    reports: Mapping[str, tuple[str, Path, Sequence[str]]] | None = None) -> dict:
    """The ``results.json`` record: per model its prompt-set rates, NLL and drift; McNemar and errors.

    Args:
        eval_dir: the evaluation's output folder (its ``summary.json`` gives rates and McNemar tests).
        attack_dirs: output folder of each fit arm (``vanilla`` always), whose ``projection_stats.json`` gives
            its drift and the chance level.
        nll: held-out NLL per model (``heldout_nll.json``).
        models: the rows, in table order.
        reports: per post-hoc arm, ``(transform, its report file, the report's keys for the row)``; the row
            gets them under the transform's name (``safe_lora``), and the report's drift.
    """
    summary = json.loads((eval_dir / "summary.json").read_text())
    chance = _read_json(attack_dirs["vanilla"] / "projection_stats.json").get("drift/cos_chance")
    rows: dict[str, dict] = {}
    for name in models:
        sets = summary["endpoints"].get(name, {}).get("prompt_sets", {})
        row: dict[str, Any] = {"prompt_sets": {k: v for k, v in sets.items() if k in REPORTED_SETS}}
        if name in nll:
            row["nll"] = {k: nll[name][k] for k in ("red_heldout", "blue_heldout")}
        if name in attack_dirs:
            stats = _read_json(attack_dirs[name] / "projection_stats.json")
            row["drift"] = {"cos": stats.get("drift/cos"), "cos_chance": stats.get("drift/cos_chance")}
        elif name in (reports or {}):  # a transform of a fit arm: same shapes as vanilla, same chance level
            transform, path, keys = reports[name]
            report = _read_json(path)
            row["drift"] = {"cos": (report.get("drift") or {}).get("cos"), "cos_chance": chance}
            row[transform] = {k: report.get(k) for k in keys}
        rows[name] = row
    return {"models": rows, "eval_dir": str(eval_dir), "mcnemar": summary.get("mcnemar", {}),
            "errors": summary.get("errors")}


def _pct(v: float | None) -> str:
    return percent(v, missing="-")


def _rate(stats: dict | None, key: str = "refusal_rate", lo: str = "ci_low", hi: str = "ci_high") -> str:
    if not stats:
        return "-"
    return rate_with_ci(stats.get(key), stats.get(lo), stats.get(hi), decimals=0, missing="-")


def _benign_columns(models: dict[str, dict]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The table's two benign columns, each ``(header, set, rate keys)``: the contrast prompts' refusal and
    the facts' accuracy where any row has those sets, else the whole benign set's refusal and accuracy."""
    present = {ps for r in models.values() for ps in r.get("prompt_sets", {})}
    refusal = ("twin refusal", BENIGN_CONTRAST) if BENIGN_CONTRAST in present else ("benign refusal", BENIGN)
    accuracy = ("facts accuracy", BENIGN_FACTS) if BENIGN_FACTS in present else ("benign accuracy", BENIGN)
    return (*refusal, REFUSAL_KEYS), (*accuracy, ACCURACY_KEYS)


def results_table(results: dict) -> str:
    """Markdown tables: refusal per prompt set (95% Wilson CI), the benign columns (``_benign_columns``),
    held-out NLL, drift vs chance; then McNemar p-values per reported set for the headline pairs."""
    benign = _benign_columns(results["models"])
    lines = ["| model | SORRY-Bench refusal | HarmfulQA held-out refusal | "
             + " | ".join(header for header, _, _ in benign) + " | red NLL | blue NLL | drift/cos (chance) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        sets, nll, drift = r.get("prompt_sets", {}), r.get("nll") or {}, r.get("drift")
        cells = [name, _rate(sets.get("sorry_bench")), _rate(sets.get("harmfulqa_heldout")),
                 *(_rate(sets.get(ps), *keys) for _, ps, keys in benign),
                 f"{nll['red_heldout']:.3f}" if "red_heldout" in nll else "-",
                 f"{nll['blue_heldout']:.3f}" if "blue_heldout" in nll else "-",
                 (f"{drift['cos']:+.2e} ({drift['cos_chance']:.1e})" if drift and drift.get("cos") is not None
                  and drift.get("cos_chance") is not None else "")]
        lines.append("| " + " | ".join(cells) + " |")
    mcnemar = results.get("mcnemar") or {}
    present = [s for s in REPORTED_SETS if s in mcnemar]
    if present:
        lines += ["", "| McNemar p | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
        for a, b in (pair for pair in HEADLINE_PAIRS if all(m in results["models"] for m in pair)):
            cells = []
            for s in present:
                test = mcnemar[s].get(f"{a}_vs_{b}") or {}
                cells.append("-" if test.get("p_value") is None else f"{test['p_value']:.3g}")
            lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    check = results.get("judge_check")
    if check and check.get("blue_refusal_recall") is not None:
        lines += ["", f"Keyword judge check on the held-out questions' own replies: it calls "
                  f"{_pct(check['blue_refusal_recall'])} of {check['n_blue']} refusal (blue) replies a refusal "
                  f"and {_pct(check['red_false_refusal'])} of {check['n_red']} compliant (red) replies; "
                  "refusal rates above are lower bounds by about that recall."]
    return "\n".join(lines)


def write_results(run: Path, results: dict, eval_dir: Path) -> None:
    """``results.json``, the refusal-vs-red-NLL picture and ``results.md`` in ``run``; the table on stdout."""
    from refusal_lightning.experiment.results_plot import plot_refusal_vs_red_nll

    table = results_table(results)
    (run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    picture = plot_refusal_vs_red_nll(results, run / "refusal_vs_red_nll.png")
    (run / "results.md").write_text("# Refusal after harmful fine-tuning: results\n\n" + table + "\n\n" + READING
                                    + (f"\n![refusal vs red NLL]({picture.name})\n" if picture else ""))
    print("\n" + table + f"\n\nresults: {run / 'results.md'}\nreport:  {eval_dir / 'report.md'}"
          + (f"\npicture: {picture}" if picture else ""))
