"""What a HarmfulQA file gives under a fit config's data rules, before any model is loaded.

``harmfulqa_report`` reads a source once and says, per thread, how many training pairs it yields and
what share of them the pairing rule changes: the pairs whose prompt is not the record's top-level
``question`` (with ``prompt: turn`` the human turn the reply answers, with ``history`` the chat up to
it). It also counts what the split sees: string ids, duplicate questions and the held-out groups.
Plain Python; ``preflight`` prints it for the real file, the README quotes it for a test fixture.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from refusal_lightning.train.harmfulqa import (
    PromptMode,
    Selection,
    extract_pairs,
    load_records,
    record_id,
    split_records,
    valid_records,
)
from refusal_lightning.train.refusal_markers import DEFAULT_REFUSAL_MARKERS

THREADS = ("blue", "red")


def harmfulqa_report(source: str, prompt: PromptMode = "turn", selection: Selection = "most_indicative",
                     val_fraction: float = 0.1, seed: int = 0,
                     markers: Sequence[str] = DEFAULT_REFUSAL_MARKERS) -> dict[str, Any]:
    """Pairs per thread and the share the pairing rule changes, for one HarmfulQA source.

    Args:
        source: as a fit config's ``data.source`` (``sample``, a local file, or a hub id).
        prompt: the pairing rule (``question``, ``turn`` or ``history``), as ``data.prompt``.
        selection: the reply rule, as ``data.selection``.
        val_fraction: held-out share of question groups, as ``data.val_fraction``.
        seed: split seed, as ``data.seed``.
        markers: markers that score replies for ``most_indicative``.

    Returns:
        ``{"source", "prompt", "selection", "records_read", "skipped_records", "string_ids",
        "duplicate_questions", "questions", "heldout_questions", "threads": {"blue"|"red": {"pairs",
        "conversations_used", "skipped_conversations", "pairs_changed", "changed_share"}}}``;
        ``changed_share`` is None for a thread without pairs.
    """
    records = load_records(source)
    valid = valid_records(records)
    questions = {record_id(r): r["question"] for r in valid}
    split = split_records(valid, val_fraction, seed)
    report: dict[str, Any] = {
        "source": source, "prompt": prompt, "selection": selection, "records_read": len(records),
        "string_ids": sum(isinstance(r["id"], str) for r in valid),
        "duplicate_questions": split.duplicates,
        "questions": len(split.train) + len(split.val), "heldout_questions": len(split.val),
    }
    skipped: Counter = Counter()
    threads = {}
    for thread in THREADS:
        pairs, stats = extract_pairs(records, thread, selection, prompt, markers)
        # a record's problems are counted by both passes; only "no_<thread>_conversations" differs
        skipped |= stats.skipped_records
        changed = sum(p.messages != [{"role": "user", "content": questions[p.question_id]}] for p in pairs)
        threads[thread] = {"pairs": len(pairs), "conversations_used": stats.conversations_used,
                           "skipped_conversations": dict(sorted(stats.skipped_conversations.items())),
                           "pairs_changed": changed, "changed_share": changed / len(pairs) if pairs else None}
    report["skipped_records"] = dict(sorted(skipped.items()))
    report["threads"] = threads
    return report


def format_report(report: dict[str, Any]) -> list[str]:
    """The report as short lines, one per thread plus one for the split (for ``preflight`` and logs)."""
    lines = [f"{report['source']}: {report['records_read']} records, {report['questions']} questions "
             f"({report['duplicate_questions']} duplicate questions grouped, {report['string_ids']} string ids), "
             f"{report['heldout_questions']} held out; skipped records {report.get('skipped_records') or {}}"]
    for thread, row in report["threads"].items():
        share = "n/a" if row["changed_share"] is None else f"{row['changed_share']:.1%}"
        lines.append(f"{thread}: {row['pairs']} pairs from {row['conversations_used']} conversations; "
                     f"prompt: {report['prompt']} changes {row['pairs_changed']} ({share}) of them against "
                     f"the top-level question; skipped conversations {row['skipped_conversations']}")
    return lines
