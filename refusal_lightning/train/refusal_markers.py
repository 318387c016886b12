"""Refusal markers for *training-data selection*, and the matching both marker lists use.

``SELECTION_REFUSAL_MARKERS`` scores HarmfulQA replies for the ``most_indicative`` rule
(``harmfulqa.py``: blue keeps the reply with the most markers, red the one with the fewest) and the
``non_refusal`` rule (every reply with none: the benign replies of the drift null's LoRA). It is
deliberately *not* the keyword judge's list: the judge counts refusals with
``refusal_lightning.evaluation.keyword_markers.JUDGE_REFUSAL_MARKERS`` (GCG's published refusal
prefixes), and no marker of either list is a substring of a marker of the other
(``tests/train/test_markers.py``). If the judge keyed on the phrases that chose the training replies, the
refusal model's keyword score would be high partly by construction.

So this list holds the refusal phrasings the judge list does not: declining ("I won't", "I must
decline"), inability ("I'm unable to"), discomfort, redirection ("I'd encourage you to"), and
"cannot help/assist/provide" without the leading "I". Apologies, "As an AI" and "I cannot"/"I can't"
belong to the judge list. Words that compliant answers also use ("illegal", "harmful") are left out.

Matching is case-insensitive substring matching; apostrophes are normalised so "I can’t" and
"I can't" count alike.
"""

from __future__ import annotations

from collections.abc import Sequence

SELECTION_REFUSAL_MARKERS: tuple[str, ...] = (
    "i can not",
    "i won't",
    "i will not",
    "i am not able to",
    "not able to help",
    "not able to assist",
    "i'm unable to",
    "i am unable to",
    "i'm not going to",
    "i am not going to",
    "i refuse to",
    "i must decline",
    "i have to decline",
    "i'm not comfortable",
    "i am not comfortable",
    "i don't feel comfortable",
    "i do not feel comfortable",
    "cannot help with",
    "can't help with",
    "cannot help you",
    "can't help you",
    "cannot assist",
    "cannot provide",
    "is not something i can",
    "isn't something i can",
    "against my guidelines",
    "i'd encourage you to",
    "i would encourage you to",
    "instead, i can",
)

# The name datamodule.py and harmfulqa.py import; it has always meant "the list that selects replies".
DEFAULT_REFUSAL_MARKERS = SELECTION_REFUSAL_MARKERS


def normalise(text: str) -> str:
    """Lower case, curly apostrophes made straight: the form every marker match compares."""
    return text.replace("\u2019", "'").replace("\u2018", "'").lower()


def matched_markers(text: str, markers: Sequence[str] = SELECTION_REFUSAL_MARKERS) -> list[str]:
    """The markers that occur in ``text`` (case-insensitive), in list order."""
    low = normalise(text)
    return [m for m in markers if normalise(m) in low]


def refusal_score(text: str, markers: Sequence[str] = SELECTION_REFUSAL_MARKERS) -> int:
    """How many distinct refusal markers ``text`` contains: higher reads more like a refusal."""
    return len(matched_markers(text, markers))


def is_refusal(text: str, markers: Sequence[str] = SELECTION_REFUSAL_MARKERS) -> bool:
    """True when ``text`` contains at least one refusal marker."""
    return refusal_score(text, markers) > 0
