"""The sweep's grid: which units exist, which shard runs which, and what every unit is compared against.

A **unit** is one fit arm at one seed, with every post-hoc arm of that fit (Safe LoRA of ``vanilla`` travels
with ``vanilla``) and every trajectory point of both. The units are listed seed by seed, the arms in their
declared order within a seed, so ``--shard I/N`` (every N-th unit, from the I-th) spreads arms and seeds
over the shards. Two prerequisites are not units: the refusal model's own point (step 0 of every arm and
seed) and the optional benign LoRA (the drift null and the calibrated Safe LoRA gate); every shard makes
them when they are missing (deterministic: the same files on every machine), and the merge checks that
every unit was made from the same ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from refusal_lightning.experiment.arms import Arm

SHARD = re.compile(r"^(\d+)/(\d+)$")
STEP0 = "step0"  # the refusal model's point: step 0 of every arm and seed
BENIGN_LORA = "benign_lora"  # the attack's recipe on benign replies: the drift null


class SweepConfigError(ValueError):
    """The sweep config cannot run (every problem listed)."""


class SweepError(RuntimeError):
    """A unit of the sweep failed."""


@dataclass(frozen=True)
class Unit:
    """One fit arm at one seed, with its post-hoc arms."""

    arm: Arm
    seed: int
    posthoc: tuple[Arm, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.arm.name}-s{self.seed}"

    @property
    def arms(self) -> tuple[str, ...]:
        """Every row this unit gives points to."""
        return (self.arm.name, *(a.name for a in self.posthoc))


def plan_units(arms: list[Arm], seeds: list[int]) -> list[Unit]:
    """Every (fit arm, seed), seed by seed, each with the post-hoc arms of its fit."""
    posthoc = {a.name: tuple(p for p in arms if not p.is_fit and p.of == a.name) for a in arms if a.is_fit}
    return [Unit(arm, seed, posthoc[arm.name]) for seed in seeds for arm in arms if arm.is_fit]


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; None -> ``(0, 1)`` (every unit)."""
    if shard is None:
        return 0, 1
    match = SHARD.match(shard.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise SweepConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {shard!r}")
    return int(match[1]), int(match[2])


def shard_units(units: list[Unit], shard: tuple[int, int]) -> list[Unit]:
    """The units of shard ``(I, N)``: the I-th, the (I+N)-th, ..."""
    index, count = shard
    return units[index::count]


def check_grid(seeds: list[int], steps: list[int], arms: list[Arm]) -> list[int]:
    """The trajectory steps sorted, after checking seeds and steps (raises listing every problem)."""
    problems = []
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        problems.append(f"seeds must be distinct integers >= 0, got {seeds}")
    if any(not isinstance(s, int) or s < 0 for s in steps) or len(set(steps)) != len(steps):
        problems.append(f"trajectory_steps must be distinct integers >= 0, got {steps}")
    elif 0 not in steps or len(steps) < 2:
        problems.append(f"trajectory_steps must hold 0 (the refusal model) and at least one later step, got {steps}")
    if not any(a.is_fit for a in arms):
        problems.append("the sweep needs at least one fit arm")
    if problems:
        raise SweepConfigError(f"{len(problems)} problem(s) in the sweep config:\n  - " + "\n  - ".join(problems))
    return sorted(steps)


def unit_dir(run: Path, name: str) -> Path:
    return run / "units" / name


def point_name(arm: str, step: int) -> str:
    """A trajectory point's model name (served, and a key of the NLL file): ``arm@step``."""
    return f"{arm}@{step}"
