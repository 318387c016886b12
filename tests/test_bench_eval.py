"""scripts/bench_eval.py writes its output contract (a short run; the figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

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
