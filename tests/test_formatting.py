"""One spelling of rates, intervals, tables and ``NAME=VALUE`` specs for every report and command."""

from __future__ import annotations

from refusal_lightning.formatting import interval, markdown_table, percent, rate_with_ci
from refusal_lightning.specs import split_spec


def test_rates_and_intervals_read_the_same_everywhere():
    assert percent(0.125) == "12.5%" and percent(None) == "n/a" and percent(None, missing="-") == "-"
    assert interval(0.081, 0.18) == "[8.1, 18.0]" and interval(None, 0.2) == "n/a"
    assert rate_with_ci(0.125, 0.081, 0.18) == "12.5% [8.1, 18.0]"
    assert rate_with_ci(0.125, 0.081, 0.18, decimals=0) == "12.5% [8, 18]"  # the pipeline's results table
    assert rate_with_ci(0.125, None, None) == "12.5%"
    assert rate_with_ci(None, 0.1, 0.2, missing="-") == "-"


def test_markdown_table():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |",
                                                                     "| 3 | 4 |"]
    assert markdown_table(("only",), []) == ["| only |", "|---|"]


def test_split_spec():
    assert split_spec(" attack = artifacts/attack ") == ("attack", "artifacts/attack")
    assert split_spec("e=http://h:8000/v1?x=1#m") == ("e", "http://h:8000/v1?x=1#m")  # first '=' only
    assert split_spec("artifacts/refusal_lora") == (None, "artifacts/refusal_lora")
    assert split_spec("=x") == ("", "x") and split_spec("x=") == ("x", "")
