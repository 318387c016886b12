"""The mixing schedule: each part holds its declared fraction overall and in every window of 40 examples."""

from __future__ import annotations

import math

import pytest

from refusal_lightning.train.mixing import MixError, mix_schedule, part_counts


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.2, 0.25])
@pytest.mark.parametrize("n", [200, 480, 1000])
def test_one_part_holds_its_fraction_in_every_window_of_40(p, n):
    schedule = mix_schedule(n, [p])
    assert schedule.count(0) == round(p * n) == part_counts(n, [p])[0]
    low, high = math.floor(40 * p), math.ceil(40 * p)
    for start in range(n - 40 + 1):
        assert low <= schedule[start:start + 40].count(0) <= high, (p, n, start)


def test_two_parts_each_within_one_of_their_share_in_every_window():
    n, fractions = 600, [0.1, 0.05]
    schedule = mix_schedule(n, fractions)
    assert [schedule.count(k) for k in (0, 1)] == [60, 30]
    assert schedule.count(-1) == n - 90
    for k, p in enumerate(fractions):
        for start in range(n - 40 + 1):
            count = schedule[start:start + 40].count(k)
            assert math.floor(40 * p) - 1 <= count <= math.ceil(40 * p) + 1


def test_a_fraction_is_round_p_times_n_and_zero_gives_nothing():
    assert part_counts(10, [0.15]) == [2]  # 1.5 rounds half up
    assert part_counts(480, [0.1]) == [48]
    assert mix_schedule(50, [0.0]) == [-1] * 50


@pytest.mark.parametrize("fractions", [[1.0], [-0.1], [0.6, 0.5]])
def test_impossible_mixes_are_refused(fractions):
    with pytest.raises(MixError, match="data.mix"):
        mix_schedule(100, fractions)
