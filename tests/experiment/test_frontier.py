"""frontier.py: the no-defence frontier and the gain at matched red NLL, on hand-made points."""

from __future__ import annotations

import pytest

from refusal_lightning.experiment.frontier import (
    Cell,
    Frontier,
    Point,
    arm_statistics,
    gain_at_matched_nll,
    monotone,
    pooled_discordance,
)

VANILLA = {0: [Point(0, 4.0, 0.9), Point(5, 2.0, 0.1)]}


def test_gain_on_the_issues_hand_made_points():
    gain = gain_at_matched_nll({0: [Point(5, 3.0, 0.8)]}, VANILLA)
    assert gain.mean == pytest.approx(0.3) and (gain.n_points, gain.n_outside) == (1, 0)  # frontier(3.0) = 0.5
    outside = gain_at_matched_nll({0: [Point(5, 5.0, 0.9)]}, VANILLA)
    assert outside.mean is None and (outside.n_points, outside.n_outside) == (0, 1)  # never extrapolated


def test_step_zero_is_the_shared_refusal_model_and_is_not_scored():
    gain = gain_at_matched_nll({0: [Point(0, 4.0, 0.9), Point(5, 3.0, 0.8)]}, VANILLA)
    assert (gain.n_points, gain.mean) == (1, pytest.approx(0.3))


def test_an_arm_that_only_slows_the_attack_gains_nothing():
    vanilla = {0: [Point(0, 4.0, 0.9), Point(5, 3.0, 0.6), Point(10, 2.0, 0.1)]}
    slower = {0: [Point(5, 3.5, 0.75), Point(10, 3.0, 0.6)]}  # on the frontier, just not as far along
    assert gain_at_matched_nll(slower, vanilla).mean == pytest.approx(0.0)


def test_pool_adjacent_violators_makes_refusal_non_decreasing_in_nll():
    assert monotone([(1.0, 0.5), (2.0, 0.3), (3.0, 0.9)]) == [(1.0, 0.4), (2.0, 0.4), (3.0, 0.9)]
    assert monotone([(1.0, 0.2), (1.0, 0.4), (2.0, 0.5)]) == [(1.0, pytest.approx(0.3)), (2.0, 0.5)]
    fitted = [y for _, y in monotone([(x, y) for x, y in enumerate([0.9, 0.1, 0.5, 0.2, 0.8, 0.7])])]
    assert fitted == sorted(fitted)


def test_frontier_interpolates_between_monotone_points_and_not_beyond():
    frontier = Frontier.of([Point(0, 4.0, 0.9), Point(3, 3.0, 0.2), Point(6, 2.0, 0.4)])
    # (2.0, 0.4) and (3.0, 0.2) violate monotonicity and pool to 0.3
    assert frontier.at(2.5) == pytest.approx(0.3) and frontier.at(3.5) == pytest.approx(0.6)
    assert frontier.at(1.9) is None and frontier.at(4.1) is None


def test_seed_pairing_is_per_seed_and_a_missing_vanilla_seed_is_an_error():
    vanilla = {0: VANILLA[0], 1: [Point(0, 4.0, 0.9), Point(5, 2.0, 0.5)]}
    gain = gain_at_matched_nll({0: [Point(5, 3.0, 0.8)], 1: [Point(5, 3.0, 0.8)]}, vanilla)
    assert gain.mean == pytest.approx((0.3 + 0.1) / 2)  # seed 1's frontier at 3.0 is 0.7
    with pytest.raises(ValueError, match="seed 2"):
        gain_at_matched_nll({2: [Point(5, 3.0, 0.8)]}, vanilla)


def _cells(arm: str, seed: int, trajectory: list[tuple[int, float, list[int]]]) -> list[Cell]:
    return [Cell(arm, seed, step, nll, {f"p{i}": o for i, o in enumerate(outcomes)})
            for step, nll, outcomes in trajectory]


def test_bootstrap_of_an_arm_identical_to_vanilla_is_zero_with_a_zero_interval():
    trajectory = [(0, 4.0, [1] * 18 + [0] * 2), (5, 3.0, [1] * 10 + [0] * 10), (10, 2.0, [1] * 2 + [0] * 18)]
    cells = [*_cells("vanilla", 0, trajectory), *_cells("copy", 0, trajectory),
             *_cells("vanilla", 1, trajectory), *_cells("copy", 1, trajectory)]
    stats = arm_statistics(cells, "copy", replicates=200)
    gain = stats["gain_at_matched_nll"]
    assert gain["mean"] == pytest.approx(0.0) and gain["ci_low"] == pytest.approx(0.0)
    assert gain["ci_high"] == pytest.approx(0.0) and gain["n_points"] == 4
    assert stats["final"]["mean"] == pytest.approx(0.1) and stats["final"]["seed_sd"] == pytest.approx(0.0)


def test_bootstrap_interval_covers_a_real_gain_and_excludes_zero():
    vanilla = [(0, 4.0, [1] * 36 + [0] * 4), (10, 2.0, [1] * 4 + [0] * 36)]
    # the defence: at NLL 3.0 (frontier 0.5) it still refuses 36 of 40 prompts
    defended = [(0, 4.0, [1] * 36 + [0] * 4), (10, 3.0, [1] * 36 + [0] * 4)]
    cells = [
        c for s in range(3) for c in (*_cells("vanilla", s, vanilla), *_cells("defended", s, defended))]
    stats = arm_statistics(cells, "defended", replicates=300)
    gain = stats["gain_at_matched_nll"]
    assert gain["mean"] == pytest.approx(0.9 - 0.5)
    assert 0 < gain["ci_low"] < gain["mean"] < gain["ci_high"]


def test_mcnemar_discordant_pairs_are_summed_over_seeds_at_the_last_step():
    cells = [*_cells("vanilla", 0, [(0, 4.0, [1, 1, 1]), (10, 2.0, [0, 0, 1])]),
             *_cells("arm", 0, [(10, 2.5, [1, 0, 0])]),
             *_cells("vanilla", 1, [(10, 2.0, [0, 1, 0])]),
             *_cells("arm", 1, [(5, 3.0, [0, 0, 0]), (10, 2.5, [1, 1, 1])])]
    # seed 0: arm-only p0, vanilla-only p2; seed 1: arm-only p0 and p2
    assert pooled_discordance(cells, "arm") == (3, 1)
