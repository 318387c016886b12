"""Evaluator throughput against a loopback server with a fixed per-request latency.

    python scripts/bench_eval.py --out artifacts/bench/eval.json [--latency_ms 50] [--requests N]

With latency L and C requests in flight, no client can beat C / L requests per second; this measures
how close ``evaluate``'s request path gets to that bound at C = 1, 4, 16, 64. The stub server runs in
its own process (so its threads do not share our GIL) and the measured code is the evaluator's own:
``collect_responses`` with its thread pool, pooled sessions, retries and the fsynced
``responses.jsonl`` appends. Target: C = 16 reaches at least 0.8x the bound.

Writes ``{"latency_ms", "rps": {"1", "4", "16", "64"}, "bound_ratio": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from refusal_lightning.evaluation.client import ChatClient, GenerationSettings, RetryPolicy
from refusal_lightning.evaluation.prompts import Prompt
from refusal_lightning.evaluation.runner import WorkItem, collect_responses
from refusal_lightning.evaluation.store import JsonlLog

LEVELS = (1, 4, 16, 64)


def start_stub(latency_ms: float) -> tuple[subprocess.Popen, str]:
    """The stub server in a child process; returns (process, url) once it prints its ready line."""
    proc = subprocess.Popen([sys.executable, "-m", "refusal_lightning.evaluation.stub_server",
                             "--latency_ms", str(latency_ms), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"stub server exited with code {proc.returncode}")
        if line.startswith("serving "):
            return proc, line.rsplit(" on ", 1)[1].strip()
    proc.kill()
    raise RuntimeError("stub server did not start within 60 s")


def measure(url: str, concurrency: int, n: int, workdir: Path) -> dict[str, float]:
    """Send ``n`` distinct requests through ``collect_responses`` at ``concurrency``; wall-clock rate."""
    prompts = [Prompt(question_id=i, category="bench", style="base", text=f"placeholder bench request {i}",
                      source="bench") for i in range(n)]
    items = [WorkItem(p, sample=0) for p in prompts]
    client = ChatClient(url, retry=RetryPolicy(max_attempts=3, timeout=30.0), name=f"c{concurrency}")
    log = JsonlLog(workdir / f"responses_c{concurrency}.jsonl")
    settings = GenerationSettings(max_tokens=16)
    try:
        start = time.perf_counter()
        rows = collect_responses(client, f"c{concurrency}", "stub", items, settings, log, concurrency,
                                 progress=False)
        wall = time.perf_counter() - start
    finally:
        client.close()
        log.close()
    errors = sum(r["error"] is not None for r in rows.values())
    return {"requests": n, "wall_s": wall, "rps": n / wall, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--latency_ms", type=float, default=50.0, help="server latency per request")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per concurrency level (default: max(100, 25 x concurrency))")
    args = parser.parse_args()

    latency_s = args.latency_ms / 1000
    proc, url = start_stub(args.latency_ms)
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
            measure(url, 4, 8, Path(tmp))  # warm-up: imports, first connections
            for c in LEVELS:
                n = args.requests or max(100, 25 * c)
                results[str(c)] = measure(url, c, n, Path(tmp))
                bound = c / latency_s
                print(f"concurrency {c:>2}: {results[str(c)]['rps']:7.1f} req/s over {n} requests "
                      f"(bound {bound:.0f}, ratio {results[str(c)]['rps'] / bound:.2f}, "
                      f"errors {results[str(c)]['errors']})", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    out = {
        "latency_ms": args.latency_ms,
        "rps": {c: round(r["rps"], 2) for c, r in results.items()},
        "bound_rps": {c: round(int(c) / latency_s, 2) for c in results},
        "bound_ratio": {c: round(r["rps"] / (int(c) / latency_s), 4) for c, r in results.items()},
        "requests": {c: r["requests"] for c, r in results.items()},
        "wall_s": {c: round(r["wall_s"], 3) for c, r in results.items()},
        "errors": {c: r["errors"] for c, r in results.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "speedup_16_vs_1": round(results["16"]["rps"] / results["1"]["rps"], 2),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
