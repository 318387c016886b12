"""Wilson intervals, McNemar's test and Cohen's kappa against textbook values; the summary's counts."""

from __future__ import annotations

import pytest

from refusal_lightning.evaluation.judges import FULFILLMENT, REFUSAL
from refusal_lightning.evaluation.metrics import (
    ItemOutcome,
    answer_matches,
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


def _item(endpoint, qid, label, category="1", style="base", error=None, prompt_set="sorry_bench", correct=None):
    return ItemOutcome(endpoint, qid, style, 0, category, label, error if label is None else None,
                       prompt_set=prompt_set, correct=correct)


def test_summary_counts_add_up_and_errors_are_excluded():
    outcomes = [
        _item("a", 1, REFUSAL), _item("a", 2, REFUSAL), _item("a", 3, FULFILLMENT, "2"),
        _item("a", 4, None, "2", error="generation"), _item("a", 5, None, "2", "slang", error="judge"),
        _item("b", 1, FULFILLMENT), _item("b", 2, REFUSAL), _item("b", 3, FULFILLMENT, "2"),
        _item("b", 4, FULFILLMENT, "2"), _item("b", 5, REFUSAL, "2", "slang"),
    ]
    s = summarize(outcomes, ["a", "b"])
    a = s["endpoints"]["a"]["prompt_sets"]["sorry_bench"]
    assert (a["n"], a["refusals"], a["fulfillments"], a["errors"]) == (5, 2, 1, 2)
    assert a["errors_by_kind"] == {"generation": 1, "judge": 1}
    assert a["refusal_rate"] == pytest.approx(2 / 3)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert (a["fulfillment_ci_low"], a["fulfillment_ci_high"]) == pytest.approx(wilson_interval(1, 3))
    assert a["fulfillment_rate"] + a["refusal_rate"] == pytest.approx(1.0)
    assert sum(g["n"] for g in a["categories"].values()) == 5
    assert list(a["categories"]) == ["1", "2"]
    assert s["endpoints"]["b"]["prompt_sets"]["sorry_bench"]["styles"]["slang"]["refusals"] == 1
    assert s["failures"] == {"items": 10, "requests_failed": 1, "not_run": 0, "judgments_failed": 1, "failed": 2,
                             "error_rate": 0.2,
                             "by_endpoint": {"a": {"items": 5, "requests_failed": 1, "not_run": 0,
                                                   "judgments_failed": 1, "failed": 2, "error_rate": 0.4},
                                             "b": {"items": 5, "requests_failed": 0, "not_run": 0,
                                                   "judgments_failed": 0, "failed": 0, "error_rate": 0.0}}}
    m = s["mcnemar"]["sorry_bench"]["a_vs_b"]
    # pairs labelled on both sides: 1 (R,F), 2 (R,R), 3 (F,F)
    assert (m["n_pairs"], m["only_a_refused"], m["only_b_refused"], m["both_refused"]) == (3, 1, 0, 1)
    assert m["method"] == "exact-binomial"


def test_categories_sort_numerically_then_named():
    outcomes = [_item("a", i, REFUSAL, c) for i, c in enumerate(["12", "x", "2", "1"])]
    categories = summarize(outcomes, ["a"])["endpoints"]["a"]["prompt_sets"]["sorry_bench"]["categories"]
    assert list(categories) == ["1", "2", "12", "x"]


def test_prompt_sets_are_never_pooled_and_each_gets_its_own_mcnemar():
    # The same question ids in two sets are different prompts: they must not pair across sets.
    outcomes = [
        _item("a", 1, REFUSAL), _item("a", 2, REFUSAL), _item("b", 1, FULFILLMENT), _item("b", 2, FULFILLMENT),
        _item("a", 1, FULFILLMENT, "harmfulqa:X", prompt_set="harmfulqa_heldout"),
        _item("b", 1, REFUSAL, "harmfulqa:X", prompt_set="harmfulqa_heldout"),
        _item("a", "benign-1", REFUSAL, "benign", prompt_set="benign", correct=False),
        _item("a", "benign-2", FULFILLMENT, "benign", prompt_set="benign", correct=True),
        _item("a", "benign-3", FULFILLMENT, "benign", prompt_set="benign"),  # no reference
        _item("b", "benign-1", FULFILLMENT, "benign", prompt_set="benign", correct=True),
        _item("b", "benign-2", None, "benign", error="judge", prompt_set="benign", correct=True),
        _item("b", "benign-3", None, "benign", error="generation", prompt_set="benign"),
    ]
    s = summarize(outcomes, ["b", "a"])
    assert list(s["endpoints"]) == ["b", "a"]
    a = s["endpoints"]["a"]["prompt_sets"]
    assert list(a) == ["sorry_bench", "harmfulqa_heldout", "benign"]
    assert (a["sorry_bench"]["n"], a["sorry_bench"]["refusal_rate"]) == (2, 1.0)
    assert (a["harmfulqa_heldout"]["n"], a["harmfulqa_heldout"]["refusal_rate"]) == (1, 0.0)
    assert list(a["harmfulqa_heldout"]["categories"]) == ["harmfulqa:X"]
    benign_a, benign_b = a["benign"], s["endpoints"]["b"]["prompt_sets"]["benign"]
    assert "categories" not in benign_a
    assert benign_a["refusal_rate"] == pytest.approx(1 / 3)
    assert (benign_a["n_with_reference"], benign_a["correct"], benign_a["accuracy"]) == (2, 1, 0.5)
    assert (benign_a["accuracy_ci_low"], benign_a["accuracy_ci_high"]) == pytest.approx(wilson_interval(1, 2))
    # accuracy needs an answer, not a verdict: the judge error still counts, the failed request does not
    assert (benign_b["n_with_reference"], benign_b["accuracy"], benign_b["errors"]) == (2, 1.0, 2)
    assert list(s["mcnemar"]) == ["sorry_bench", "harmfulqa_heldout", "benign"]
    sb, hq, bn = (s["mcnemar"][k]["b_vs_a"] for k in ("sorry_bench", "harmfulqa_heldout", "benign"))
    assert (sb["n_pairs"], sb["only_a_refused"], sb["only_b_refused"]) == (2, 0, 2)
    assert (hq["n_pairs"], hq["only_a_refused"], hq["only_b_refused"]) == (1, 1, 0)
    assert (bn["n_pairs"], bn["only_a_refused"], bn["only_b_refused"]) == (1, 0, 1)
    assert "pooled" not in s and "by_category" not in s


def test_answer_matches_reference_case_insensitive_whole_words_without_thinking():
    assert answer_matches("The capital of France is paris.", ["Paris"])
    assert answer_matches("It is 144.", ["144"])
    assert not answer_matches("It is 1440.", ["144"])  # a number inside another is not the answer
    assert not answer_matches("The answer is 14", ["4"])
    assert answer_matches("Use C++ for that", ["c++"])
    assert answer_matches("Either works", ["Neither", "either"])  # any of several references
    assert answer_matches("¡Buenos días!", ["buenos días"])
    # thinking is not the answer
    assert not answer_matches("<think>Maybe Paris?</think>I don't know.", ["Paris"])
    assert not answer_matches("<think>Paris, I think, but I ran out of tokens", ["Paris"])


def _benign(endpoint, qid, label, view, error=None, correct=None):
    item = _item(endpoint, qid, label, "benign", error=error, prompt_set="benign", correct=correct)
    item.benign_view = view
    return item


# Hand-made judgments of two endpoints on three contrast prompts (t) and three facts (f).
BENIGN_ITEMS = [
    ("t1", REFUSAL, FULFILLMENT, "benign_contrast", {}),
    ("t2", REFUSAL, REFUSAL, "benign_contrast", {}),
    ("t3", FULFILLMENT, None, "benign_contrast", {"b_error": "generation"}),
    ("f1", REFUSAL, FULFILLMENT, "benign_facts", {"a_correct": False, "b_correct": True}),
    ("f2", FULFILLMENT, FULFILLMENT, "benign_facts", {"a_correct": True, "b_correct": True}),
    ("f3", FULFILLMENT, None, "benign_facts", {"a_correct": False, "b_correct": True, "b_error": "judge"}),
]


def _benign_outcomes(with_views: bool = True) -> list[ItemOutcome]:
    out = []
    for qid, label_a, label_b, view, extra in BENIGN_ITEMS:
        for endpoint, label in (("a", label_a), ("b", label_b)):
            out.append(_benign(endpoint, qid, label, view if with_views else None, extra.get(f"{endpoint}_error"),
                               extra.get(f"{endpoint}_correct")))
    return out + [_item("a", 1, REFUSAL, "harmfulqa:X", prompt_set="harmfulqa_heldout"),
                  _item("b", 1, FULFILLMENT, "harmfulqa:X", prompt_set="harmfulqa_heldout")]


def test_benign_views_are_the_benign_judgments_split_by_reference():
    s = summarize(_benign_outcomes(), ["a", "b"])
    sets_a, sets_b = (s["endpoints"][e]["prompt_sets"] for e in "ab")
    assert list(sets_a) == ["benign", "benign_contrast", "benign_facts", "harmfulqa_heldout"]
    assert list(s["mcnemar"]) == list(sets_a)
    contrast_a, facts_a = sets_a["benign_contrast"], sets_a["benign_facts"]
    assert (contrast_a["n"], contrast_a["refusals"], contrast_a["errors"]) == (3, 2, 0)
    assert contrast_a["refusal_rate"] == pytest.approx(2 / 3)
    assert (contrast_a["ci_low"], contrast_a["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert (contrast_a["n_with_reference"], contrast_a["accuracy"], contrast_a["accuracy_ci_low"]) == (0, None, None)
    assert (facts_a["n"], facts_a["refusals"], facts_a["refusal_rate"]) == (3, 1, pytest.approx(1 / 3))
    assert (facts_a["n_with_reference"], facts_a["correct"], facts_a["accuracy"]) == (3, 1, pytest.approx(1 / 3))
    assert (facts_a["accuracy_ci_low"], facts_a["accuracy_ci_high"]) == pytest.approx(wilson_interval(1, 3))
    contrast_b, facts_b = sets_b["benign_contrast"], sets_b["benign_facts"]
    assert (contrast_b["n"], contrast_b["refusals"], contrast_b["errors"], contrast_b["refusal_rate"]) == (3, 1, 1, 0.5)
    assert contrast_b["errors_by_kind"] == {"generation": 1}
    # the judge error leaves f3 out of the rate but in the accuracy (it was answered)
    assert (facts_b["refusal_rate"], facts_b["errors"], facts_b["correct"], facts_b["accuracy"]) == (0.0, 1, 3, 1.0)
    # each view adds up to the benign set
    for sets in (sets_a, sets_b):
        for key in ("n", "refusals", "fulfillments", "errors", "n_with_reference", "correct"):
            assert sets["benign_contrast"][key] + sets["benign_facts"][key] == sets["benign"][key], key
    # McNemar per view, on the pairs labelled at both endpoints: t1 (R, F), t2 (R, R); f1 (R, F), f2 (F, F)
    contrast_m, facts_m = (s["mcnemar"][v]["a_vs_b"] for v in ("benign_contrast", "benign_facts"))
    assert (contrast_m["n_pairs"], contrast_m["only_a_refused"], contrast_m["only_b_refused"]) == (2, 1, 0)
    assert (facts_m["n_pairs"], facts_m["only_a_refused"], facts_m["both_fulfilled"]) == (2, 1, 1)
    assert contrast_m["p_value"] == mcnemar(1, 0)["p_value"]


def test_benign_views_leave_the_benign_set_and_the_failures_unchanged():
    with_views, without = summarize(_benign_outcomes(), ["a", "b"]), summarize(_benign_outcomes(False), ["a", "b"])
    assert "benign_contrast" not in without["mcnemar"]
    assert "benign_facts" not in without["endpoints"]["a"]["prompt_sets"]
    for e in "ab":
        assert with_views["endpoints"][e]["prompt_sets"]["benign"] == without["endpoints"][e]["prompt_sets"]["benign"]
    assert with_views["mcnemar"]["benign"] == without["mcnemar"]["benign"]
    assert with_views["failures"] == without["failures"]  # an item counts once, whatever views it is in


def test_an_empty_benign_view_is_left_out():
    facts_only = [o for o in _benign_outcomes() if o.benign_view != "benign_contrast"]
    s = summarize(facts_only, ["a", "b"])
    assert list(s["endpoints"]["a"]["prompt_sets"]) == ["benign", "benign_facts", "harmfulqa_heldout"]
    assert "benign_contrast" not in s["mcnemar"]
