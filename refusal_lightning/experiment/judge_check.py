"""How much can the keyword judge see? Its verdicts on held-out training-distribution replies.

The keyword judge's markers are not the ones that selected the refusal training replies, so it is not
circular; but it can miss refusals worded otherwise. Its verdicts on the held-out (validation)
questions' own replies are the check: the share of blue (refusal-thread) replies it calls a refusal
(recall on the refusals the refusal LoRA was taught to give) and the share of red (compliant) replies it
calls a refusal (false refusals). Plain Python, no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refusal_lightning.evaluation.judges import REFUSAL, KeywordJudge, load_markers
from refusal_lightning.train.harmfulqa import (
    extract_pairs,
    load_records,
    record_id,
    split_records,
    valid_records,
)


def keyword_judge_check(source: str, val_fraction: float = 0.1, seed: int = 0,
                        markers: Sequence[str] | None = None) -> dict[str, Any]:
    """The keyword judge on the held-out questions' selected blue and red replies.

    Args:
        source: HarmfulQA source (as in the fit configs' ``data.source``).
        val_fraction: held-out share of question ids (the fits' split).
        seed: split seed.
        markers: judge markers (default: the judge's own list).

    Returns:
        ``{"blue_refusal_recall", "red_false_refusal", "n_blue", "n_red"}`` (rates in [0, 1], None if empty).
    """
    judge = KeywordJudge(tuple(markers) if markers else load_markers(None))
    records = valid_records(load_records(source))
    # the fits' own split (duplicate questions grouped), so the check sees only held-out questions
    val_ids = split_records(records, val_fraction, seed).record_ids("val")
    heldout = [r for r in records if record_id(r) in val_ids]
    out: dict[str, Any] = {}
    for thread, key in (("blue", "blue_refusal_recall"), ("red", "red_false_refusal")):
        pairs, _ = extract_pairs(heldout, thread, "most_indicative", "question")
        if thread == "blue":  # the refusals: replies the selection list marks (HarmfulQA's may have none)
            pairs = [p for p in pairs if p.refusal_score > 0]
        calls = [judge.judge(p.messages[-1]["content"], p.reply).label == REFUSAL for p in pairs]
        out[key] = sum(calls) / len(calls) if calls else None
        out[f"n_{thread}"] = len(calls)
    return out
