"""The proxy data's bag-of-words control (``make_proxy_data.py`` writes it into ``report.json``).

If word counts alone separated the held-out harmful prompts from their benign twins, a refusal model could
score well by keying on words; this measures how far they do, with the intent words and without them.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class NaiveBayes:
    """Multinomial naive Bayes on word counts, add-one smoothing, uniform class prior (label 1 = harmful)."""

    def __init__(self, texts: list[str], labels: list[int], drop: frozenset[str] = frozenset()):
        self.drop = drop
        counts = {0: Counter(), 1: Counter()}
        for text, label in zip(texts, labels, strict=True):
            counts[label].update(self._tokens(text))
        vocab = sorted(set(counts[0]) | set(counts[1]))
        self.logp = {}
        for label in (0, 1):
            total = sum(counts[label].values()) + len(vocab)
            self.logp[label] = {w: math.log((counts[label][w] + 1) / total) for w in vocab}

    def _tokens(self, text: str) -> list[str]:
        return [w for w in words(text) if w not in self.drop]

    def predict(self, text: str) -> int:
        # words never seen in training carry no evidence either way; a tie goes to benign
        score = {label: sum(self.logp[label].get(w, 0.0) for w in self._tokens(text)) for label in (0, 1)}
        return int(score[1] > score[0])

    def accuracy(self, texts: list[str], labels: list[int]) -> float:
        hits = sum(self.predict(t) == y for t, y in zip(texts, labels, strict=True))
        return round(hits / len(texts), 4) if texts else float("nan")


def intent_words(phrases: list[str]) -> frozenset[str]:
    """Every word of every intent phrase (harmful and twin; ``{o}`` marks the object), for the masked control."""
    return frozenset(w for phrase in phrases for w in words(phrase.replace("{o}", "")))


def bow_control(labels: dict[str, int], sorry: list[dict], benign: list[dict], contrast: list[dict],
                intent_phrases: list[str]) -> dict:
    """Can word counts alone tell the held-out harmful prompts from the held-out benign ones? Once with all
    words, once with every word of ``intent_phrases`` removed."""
    harmful_train = sorted(t for t, y in labels.items() if y == 1)
    benign_train = sorted(t for t, y in labels.items() if y == 0)
    train_x = harmful_train + benign_train
    train_y = [1] * len(harmful_train) + [0] * len(benign_train)
    sets = {
        "sorry_bench_proxy": ([r["turns"][0] for r in sorry], 1),
        "benign_proxy": ([r["prompt"] for r in benign], 0),
        "benign_contrast_proxy": ([r["prompt"] for r in contrast], 0),
    }
    out: dict = {
        "model": "multinomial naive Bayes on lowercase word unigrams, add-one smoothing, uniform class prior",
        "train": {"harmful_prompts": len(harmful_train), "benign_prompts": len(benign_train)},
    }
    for variant, drop in (("all_words", frozenset()), ("intent_words_removed", intent_words(intent_phrases))):
        clf = NaiveBayes(train_x, train_y, drop)
        per_set = {name: clf.accuracy(texts, [y] * len(texts)) for name, (texts, y) in sets.items()}
        all_x = [t for texts, _ in sets.values() for t in texts]
        all_y = [y for texts, y in sets.values() for _ in texts]
        pairs_x = sets["sorry_bench_proxy"][0] + sets["benign_contrast_proxy"][0]
        pairs_y = [1] * len(sets["sorry_bench_proxy"][0]) + [0] * len(sets["benign_contrast_proxy"][0])
        factual_x = sets["sorry_bench_proxy"][0] + sets["benign_proxy"][0]
        factual_y = [1] * len(sets["sorry_bench_proxy"][0]) + [0] * len(sets["benign_proxy"][0])
        out[variant] = {
            "train_accuracy": clf.accuracy(train_x, train_y),
            "heldout_accuracy": clf.accuracy(all_x, all_y),
            "heldout_harmful_vs_benign_contrast": clf.accuracy(pairs_x, pairs_y),
            "heldout_harmful_vs_benign_factual": clf.accuracy(factual_x, factual_y),
            "heldout_per_set_accuracy": per_set,
        }
        if drop:
            out[variant]["removed_words"] = len(drop)
    n_h = len(sets["sorry_bench_proxy"][0])
    n_all = sum(len(t) for t, _ in sets.values())
    out["chance"] = {"heldout_accuracy": round(max(n_h, n_all - n_h) / n_all, 4),
                     "heldout_harmful_vs_benign_contrast": 0.5}
    return out
