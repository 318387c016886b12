"""What ``pip install`` promises: the floors the code needs, the packages it imports, and no vLLM."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {r.name.lower(): r for r in reqs}


def test_transformers_floor_allows_the_dtype_keyword_the_code_uses():
    uses = [p for p in (ROOT / "refusal_lightning").rglob("*.py")
            if re.search(r"from_pretrained\([^)]*\bdtype=", p.read_text(), re.DOTALL)]
    assert uses, "no from_pretrained(dtype=...) left: the floor may be lowered again"
    spec = _requirements()["transformers"].specifier
    # from_pretrained(dtype=) arrived in transformers 4.56; 4.55 only knows torch_dtype
    assert not spec.contains("4.55.4") and spec.contains("4.56.0")


def test_the_model_card_template_engine_is_declared():
    assert "jinja2" in _requirements()


def test_vllm_is_not_a_dependency():
    # vLLM pins its own torch and transformers: it lives in its own environment (README, "The real run")
    assert "vllm" not in _requirements()
