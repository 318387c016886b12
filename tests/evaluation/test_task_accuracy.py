"""Fine-tune task accuracy: exact label match and final-number match on hand-made answers."""

from __future__ import annotations

import pytest

from refusal_lightning.evaluation.task_accuracy import final_number, first_word, label_correct, number_correct


@pytest.mark.parametrize(("answer", "label", "correct"), [
    ("positive", "positive", True),
    ("Positive.", "positive", True),
    ("**Negative** - the review complains", "negative", True),
    ("  negative\n", "negative", True),
    ("The sentiment is positive", "positive", False),  # not the first word: no credit for a sentence
    ("positively", "positive", False),
    ("negative", "positive", False),
    ("", "positive", False),
])
def test_label_match(answer, label, correct):
    assert label_correct(answer, label) is correct


def test_first_word_strips_markup():
    assert first_word('"Negative!"') == "negative"
    assert first_word("... ") == ""


@pytest.mark.parametrize(("answer", "reference", "correct"), [
    ("She has 3 + 4 = 7 apples.\n#### 7", "#### 7", True),
    ("The answer is 1,250.", "1250", True),
    ("First 12, then 18", "18", True),  # the last number when there is no ####
    ("#### 18 (not 12)", "18", True),  # the number right after ####
    ("8.0", "8", True),
    ("I think 7", "8", False),
    ("no number here", "8", False),
])
def test_number_match(answer, reference, correct):
    assert number_correct(answer, reference) is correct


def test_final_number_of_nothing_is_none():
    assert final_number("") is None
