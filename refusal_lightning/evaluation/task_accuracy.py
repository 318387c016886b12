"""Is a fine-tuned task answer right? Exact match of a label (sentiment: ``positive`` / ``negative``) or of a
final number (GSM8K: the number after ``####``, else the last number in the answer). Plain Python."""

from __future__ import annotations

import re
from collections.abc import Callable

from refusal_lightning.train.task_data import TaskFormat

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_word(text: str) -> str:
    """The answer's first word, lower-cased, without surrounding punctuation or markup ("**Positive**." ->
    "positive")."""
    for token in text.split():
        word = token.strip(".,;:!?\"'*()[]{}<>`").lower()
        if word:
            return word
    return ""


def label_correct(answer: str, label: str) -> bool:
    """The answer's first word is the label (case and punctuation aside)."""
    return first_word(answer) == label.strip().lower()


def final_number(text: str) -> str | None:
    """The number after ``####`` (GSM8K's answer format), else the last number, without thousands commas."""
    tail = text.split("####")[-1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    value = value.replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def number_correct(answer: str, reference: str) -> bool:
    """The answer's final number equals the reference's."""
    got, want = final_number(answer), final_number(reference)
    return got is not None and got == want


def task_scorer(format: TaskFormat) -> Callable[[str, str], bool]:
    """How a task's answer is scored against its reference: the final number (gsm8k), else the label."""
    return number_correct if format == "gsm8k" else label_correct
