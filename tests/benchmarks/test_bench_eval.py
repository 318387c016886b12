"""scripts/bench_eval.py writes its output contract (a short run; the figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


def test_bench_eval_contract(tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench_eval.py"), "--out", str(out),
                             "--latency_ms", "5", "--requests", "16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["latency_ms"] == 5
    assert set(data["rps"]) == {"1", "4", "16", "64"} and "16" in data["bound_ratio"]
    assert all(v > 0 for v in data["rps"].values())


@pytest.mark.slow  # two servers start (~45 s on 2 busy cores)
def test_bench_eval_serve_contract_on_the_tiny_model(tmp_path, tiny_model_dir):
    """``--serve``: our batched server, every reply exactly --max_tokens long (EOS ignored)."""
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench_eval.py"), "--serve", "cpu", "--model",
                             str(tiny_model_dir), "--requests", "4", "--max_tokens", "5", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["rps"]) == {"1", "4", "16"} and all(v > 0 for v in data["rps"].values())
    assert data["bad_replies"] == {"1": 0, "4": 0, "16": 0} and data["c1_bad_replies"] == 0
    assert data["speedup_16_vs_1"] > 0 and data["c1_latency_vs_unbatched"] > 0
    assert {t["metric"] for t in data["targets"]} == {"speedup_16_vs_1", "c1_latency_vs_unbatched"}


def test_bench_eval_serve_without_the_model_says_how_to_make_it(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench_eval.py"), "--serve", "cpu", "--model",
                             str(tmp_path / "nothing"), "--out", str(tmp_path / "x.json")],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode != 0 and "prepare-model" in result.stderr
