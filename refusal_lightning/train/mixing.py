"""Mixing a fraction of other examples into a training set, evenly: the harmful-fine-tuning threat model
(a user's benign task with a fraction p of harmful samples; Lisa, Vaccine, Booster in git-disl/*) and the
data-mixing defence (Bianchi et al. 2024: safety examples mixed into the fine-tune) share this schedule.

A fraction ``p`` of ``n`` training examples is ``round(p * n)`` examples. They are spread like a Bresenham
line: after ``i`` examples, a part has been drawn ``floor(i * p + 1/2)`` times, up to one early or late when
two parts are due at once, so every window of consecutive examples holds its share to within one example
(a test checks windows of 40). Plain Python: no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

MAIN = "main"


class MixError(ValueError):
    """A mix that cannot be made (fractions out of range, or summing to 1 or more)."""


def check_fractions(fractions: Sequence[float]) -> None:
    bad = [f for f in fractions if not 0.0 <= f < 1.0]
    if bad:
        raise MixError(f"data.mix: every fraction must be in [0, 1), got {bad}")
    if sum(fractions) >= 1.0:
        raise MixError(f"data.mix: the fractions sum to {sum(fractions):g}; they must leave room for the "
                       "main data (sum < 1)")


def part_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Examples of each mixed part in a set of ``n``: ``round(p * n)`` each (the main data gets the rest)."""
    check_fractions(fractions)
    return [math.floor(f * n + 0.5) for f in fractions]


def mix_schedule(n: int, fractions: Sequence[float]) -> list[int]:
    """The source of each of ``n`` positions: ``k`` for the k-th mixed part, ``-1`` for the main data.

    Each part ends with exactly ``part_counts(n, fractions)[k]`` positions, spread evenly."""
    counts = part_counts(n, fractions)
    drawn = [0] * len(fractions)
    schedule = []
    for i in range(n):
        # how far behind its even spread each part is after this position; the furthest behind goes first
        due = [min(counts[k], math.floor((i + 1) * fractions[k] + 0.5)) - drawn[k] for k in range(len(fractions))]
        left = n - i
        must = [k for k in range(len(fractions)) if counts[k] - drawn[k] >= left]  # no room to wait
        candidates = must or [k for k in range(len(fractions)) if due[k] > 0]
        if candidates:
            k = max(candidates, key=lambda j: (due[j], -j))
            drawn[k] += 1
            schedule.append(k)
        else:
            schedule.append(-1)
    return schedule


def mixed_size(main: int, fractions: Sequence[float]) -> int:
    """The smallest ``n`` whose main share ``n - sum(part_counts(n, fractions))`` is ``main``: a mixed set
    that holds every main example once.

    The main share grows by at most one per added example and without bound, so it meets ``main``."""
    check_fractions(fractions)
    n = main
    while n - sum(part_counts(n, fractions)) != main:
        n += 1
    return n


def mixed_order(main: int, sizes: Sequence[int], fractions: Sequence[float], seed: int) -> list[tuple[int, int]]:
    """``(source, index)`` of each position of the mixed training set: ``source`` is ``-1`` for the ``main``
    examples and ``k`` for the k-th part (``sizes[k]`` examples), as ``mix_schedule(mixed_size(...))`` places them.

    The main examples come shuffled by ``seed``, each part's by a seed derived from ``seed`` and ``k``; a part
    with fewer examples than its count cycles through its shuffled order."""
    n = mixed_size(main, fractions)
    counts = part_counts(n, fractions)
    empty = [k for k, (size, count) in enumerate(zip(sizes, counts, strict=True)) if count and not size]
    if empty:
        raise MixError(f"data.mix: parts {empty} have no examples to draw {[counts[k] for k in empty]} from")
    orders = [list(range(main)), *(list(range(size)) for size in sizes)]
    random.Random(seed).shuffle(orders[0])
    for k in range(len(sizes)):
        random.Random(f"mix:{seed}:{k}").shuffle(orders[k + 1])
    drawn = [0] * (len(sizes) + 1)  # main first, then the parts
    out = []
    for source in mix_schedule(n, fractions):
        order = orders[source + 1]
        out.append((source, order[drawn[source + 1] % len(order)]))
        drawn[source + 1] += 1
    return out
