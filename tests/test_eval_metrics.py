"""Wilson intervals, McNemar's test and Cohen's kappa against textbook values; the summary's counts."""

from __future__ import annotations

import pytest

from refusal_lightning.evaluation.judges import FULFILLMENT, REFUSAL
from refusal_lightning.evaluation.metrics import (
    ItemOutcome,
    cohen_kappa,
    mcnemar,
    summarize,
    wilson_interval,
)


def test_wilson_known_values():
    # Newcombe (1998), Stat. Med. 17:857, example 81/263: 0.2553 to 0.3662.
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.722467, abs=1e-6) and hi == pytest.approx(1.0)
    assert wilson_interval(0, 0) is None


def test_mcnemar_exact_for_few_discordant_pairs():
    result = mcnemar(1, 9)  # 2 * (C(10,0) + C(10,1)) / 2**10
    assert result["method"] == "exact-binomial"
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert mcnemar(0, 0)["p_value"] == 1.0
    assert mcnemar(5, 5)["p_value"] == 1.0  # capped at 1
    assert mcnemar(0, 6)["p_value"] == pytest.approx(2 / 64)


def test_mcnemar_chi_square_with_continuity_correction():
    result = mcnemar(32, 17)  # (|32-17|-1)^2 / 49 = 4
    assert result["method"] == "chi2-continuity-corrected"
    assert result["statistic"] == pytest.approx(4.0)
    assert result["p_value"] == pytest.approx(0.0455002639, rel=1e-8)  # chi2(1).sf(4)
    assert mcnemar(20, 20)["p_value"] == 1.0


def test_cohen_kappa():
    assert cohen_kappa([1, 1, 0, 0], [1, 1, 0, 1]) == pytest.approx(0.5)
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) is None  # undefined with one class
    assert cohen_kappa([], []) is None


def _item(endpoint, qid, label, category="1", style="base", error=None):
    return ItemOutcome(endpoint, qid, style, 0, category, label, error if label is None else None)


def test_summary_counts_add_up_and_errors_are_excluded():
    outcomes = [
        _item("a", 1, REFUSAL), _item("a", 2, REFUSAL), _item("a", 3, FULFILLMENT, "2"),
        _item("a", 4, None, "2", error="generation"), _item("a", 5, None, "2", "slang", error="judge"),
        _item("b", 1, FULFILLMENT), _item("b", 2, REFUSAL), _item("b", 3, FULFILLMENT, "2"),
        _item("b", 4, FULFILLMENT, "2"), _item("b", 5, REFUSAL, "2", "slang"),
    ]
    s = summarize(outcomes, ["a", "b"])
    a = s["endpoints"]["a"]
    assert (a["n"], a["refusals"], a["fulfillments"], a["errors"]) == (5, 2, 1, 2)
    assert a["errors_by_kind"] == {"generation": 1, "judge": 1}
    assert a["refusal_rate"] == pytest.approx(2 / 3)
    assert a["refusal_ci"] == pytest.approx(list(wilson_interval(2, 3)))
    assert a["fulfillment_rate"] + a["refusal_rate"] == pytest.approx(1.0)
    assert sum(g["n"] for g in s["by_category"]["a"].values()) == 5
    assert list(s["by_category"]["a"]) == ["1", "2"]
    assert s["by_style"]["b"]["slang"]["refusals"] == 1
    m = s["mcnemar"]["a vs b"]
    # pairs labelled on both sides: 1 (R,F), 2 (R,R), 3 (F,F)
    assert (m["n_pairs"], m["only_a_refused"], m["only_b_refused"], m["both_refused"]) == (3, 1, 0, 1)
    assert m["method"] == "exact-binomial"


def test_categories_sort_numerically_then_named():
    outcomes = [_item("a", i, REFUSAL, c) for i, c in enumerate(["12", "harmfulqa:Chem", "2", "1"])]
    assert list(summarize(outcomes, ["a"])["by_category"]["a"]) == ["1", "2", "12", "harmfulqa:Chem"]
