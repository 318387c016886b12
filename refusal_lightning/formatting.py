"""How rates, intervals and tables are written in every report (evaluate's, the pipeline's, the
model card): one spelling, so the same number reads the same everywhere."""

from __future__ import annotations

from collections.abc import Sequence


def percent(x: float | None, missing: str = "n/a") -> str:
    """``0.125`` -> ``12.5%``; ``missing`` for None."""
    return missing if x is None else f"{100 * x:.1f}%"


def interval(lo: float | None, hi: float | None, decimals: int = 1, missing: str = "n/a") -> str:
    """A confidence interval in percent, ``[8.1, 18.0]``; ``missing`` when a bound is None."""
    return missing if lo is None or hi is None else f"[{100 * lo:.{decimals}f}, {100 * hi:.{decimals}f}]"


def rate_with_ci(rate: float | None, lo: float | None, hi: float | None, decimals: int = 1,
                 missing: str = "n/a") -> str:
    """``12.5% [8.1, 18.0]``: a rate with its interval (``decimals`` for the bounds; the interval left out
    when unknown); ``missing`` when there is no rate."""
    if rate is None:
        return missing
    return percent(rate) if lo is None or hi is None else f"{percent(rate)} {interval(lo, hi, decimals)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table, one line per row (cells are written as given)."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]
