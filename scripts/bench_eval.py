"""Evaluator throughput against a loopback server with a fixed per-request latency, or against ``serve``.

    python scripts/bench_eval.py --out artifacts/bench/eval.json [--latency_ms 50] [--requests N]
    python scripts/bench_eval.py --serve cpu --out artifacts/bench/serve.json [--model DIR]

With latency L and C requests in flight, no client can beat C / L requests per second; this measures
how close ``evaluate``'s request path gets to that bound at C = 1, 4, 16, 64. The stub server runs in
its own process (so its threads do not share our GIL) and the measured code is the evaluator's own:
``collect_responses`` with its thread pool, pooled sessions, retries and the fsynced
``responses.jsonl`` appends. Target: C = 16 reaches at least 0.8x the bound.

Writes ``{"latency_ms", "rps": {"1", "4", "16", "64"}, "bound_ratio": {...}, ...}``.

``--serve cpu`` measures our batched ``serve`` instead, with the demo's CPU model (SmolLM2-135M-Instruct,
the folder ``python -m refusal_lightning prepare-model`` writes): fixed prompts, greedy, exactly
``--max_tokens`` (48) new tokens per request (``ignore_eos``), 16 requests at concurrency 1 and 64 at 4
and at 16, from a client thread pool in this process against the server in its own process; the levels'
requests are split over ``--rounds`` (4) rounds, each running a share of every level, so load swings on a
shared machine hit all levels alike. Its concurrency-1 latency is compared with the same server started
with ``--max_batch_size 1`` (unbatched generation), the two asked in turns. Target: concurrency 16 at least
6x the requests/s of concurrency 1, with concurrency-1 latency no worse than unbatched. Writes
``{"rps": {"1", "4", "16"}, "latency_s": {...}, "speedup_16_vs_1", "c1_latency_vs_unbatched", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from refusal_lightning.evaluation.client import ChatClient, GenerationSettings, RetryPolicy
from refusal_lightning.evaluation.collect import collect_responses
from refusal_lightning.evaluation.prompts import Prompt
from refusal_lightning.evaluation.store import JsonlLog, WorkItem
from refusal_lightning.serving.process import ServerProcess

LEVELS = (1, 4, 16, 64)
SERVE_LEVELS = {1: 16, 4: 64, 16: 64}  # concurrency -> requests
SERVE_MODELS = {"cpu": Path("artifacts/models/smollm2-135m-instruct")}
# Fixed prompts (the i-th request asks the (i mod 16)-th): benign, of varied lengths, as the evaluator sends.
SERVE_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain photosynthesis in simple terms.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg so the yolk stays soft?",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly golden retriever.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "List four fruits that are high in vitamin C.",
    "How many legs does a spider have, and why?",
    "Translate 'good morning' into Spanish and Italian.",
    "What are some good stretches after a long run?",
    "Describe how a bicycle's gears help when climbing a hill.",
    "Recommend a short book for a beginner learning about astronomy.",
    "What should I pack for a weekend hiking trip in the mountains?",
]


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
                        help="requests per concurrency level (default: max(100, 25 x concurrency); "
                        "--serve: 16 at concurrency 1, 64 at 4 and 16)")
    parser.add_argument("--serve", choices=sorted(SERVE_MODELS), default=None,
                        help="benchmark our batched `serve` with this tier's real model instead of the stub")
    parser.add_argument("--model", type=Path, default=None, help="--serve: model folder (default: the tier's)")
    parser.add_argument("--max_tokens", type=int, default=48, help="--serve: new tokens per request (EOS ignored)")
    parser.add_argument("--max_batch_size", type=int, default=16, help="--serve: the server's --max_batch_size")
    parser.add_argument("--batch_wait_ms", type=float, default=None,
                        help="--serve: the server's --batch_wait_ms (default: serve's own)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="--serve: the levels' requests are split over this many interleaved rounds")
    args = parser.parse_args()
    if args.serve:
        serve_main(args)
        return

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


# ------------------------------------------------------------------------------------ --serve
def serve_payload(i: int, max_tokens: int) -> dict:
    """Request ``i``: fixed prompt, greedy, exactly ``max_tokens`` new tokens."""
    settings = GenerationSettings(temperature=0.0, max_tokens=max_tokens, seed=None, disable_thinking=False)
    messages = [{"role": "user", "content": SERVE_PROMPTS[i % len(SERVE_PROMPTS)]}]
    body = settings.payload("", messages)
    del body["model"]  # the server's only model
    return {**body, "ignore_eos": True}


def _check(result, max_tokens: int) -> str | None:
    """Why a reply does not count (an error, or not exactly ``max_tokens`` tokens), else None."""
    if result.error is not None:
        return f"{result.error.get('type')}: {result.error.get('message')}"
    got = (result.usage or {}).get("completion_tokens")
    if got != max_tokens:
        return f"{got} completion tokens instead of {max_tokens}"
    return None


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    xs = sorted(latencies)
    return {"p50": round(statistics.median(xs), 4), "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 4),
            "mean": round(statistics.fmean(xs), 4)}


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(client: ChatClient, concurrency: int, indices: list[int], max_tokens: int) -> tuple[list, float]:
    """Requests ``indices`` from ``concurrency`` client threads, each sending its next one when one returns;
    (results, wall seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: client.chat(serve_payload(i, max_tokens)), indices))
    return results, time.perf_counter() - start


def _rounds(clients: dict[str, ChatClient], server_pid: int, levels: dict[int, int], rounds: int, max_tokens: int
            ) -> tuple[dict[int, list], dict[int, float], dict[int, float], list, list[dict[int, float]]]:
    """Every level's requests in ``rounds`` interleaved rounds: per level its results, wall seconds and the
    batched server's CPU seconds; the unbatched server's concurrency-1 results; each round's req/s."""
    results: dict[int, list] = {c: [] for c in levels}
    wall: dict[int, float] = dict.fromkeys(levels, 0.0)
    cpu: dict[int, float] = dict.fromkeys(levels, 0.0)
    unbatched: list = []
    round_rps: list[dict[int, float]] = []
    # Load on a shared machine swings over minutes: every round runs a share of every level (order
    # rotating), so the swings hit all levels alike, as bench_train interleaves its runners.
    for r in range(rounds):
        this_round: dict[int, float] = {}
        order = list(levels)[r % len(levels):] + list(levels)[:r % len(levels)]
        for c in order:
            indices = list(range(levels[c]))[r::rounds]
            cpu0 = process_cpu_s(server_pid)
            if c == 1:  # one request at a time, each also to the unbatched server, in turns
                got, seconds = [], 0.0
                for k, i in enumerate(indices):
                    for name in (("batched", "unbatched") if (k + r) % 2 == 0 else ("unbatched", "batched")):
                        result = clients[name].chat(serve_payload(i, max_tokens))
                        if name == "batched":
                            got.append(result)
                            seconds += result.latency_s
                        else:
                            unbatched.append(result)
            else:
                got, seconds = run_level(clients["batched"], c, indices, max_tokens)
            cpu1 = process_cpu_s(server_pid)
            results[c] += got
            wall[c] += seconds
            cpu[c] += (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else float("nan")
            this_round[c] = len(got) / seconds
        round_rps.append(this_round)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"c{c} {v:.3f} req/s" for c, v in this_round.items()),
              flush=True)
    return results, wall, cpu, unbatched, round_rps


def serve_main(args: argparse.Namespace) -> None:
    """Concurrency 1 (each request also sent to an unbatched server), 4 and 16, interleaved in rounds."""
    import signal

    model = args.model or SERVE_MODELS[args.serve]
    if not (model / "config.json").exists():
        raise SystemExit(f"error: no model folder at {model}: make it with `python -m refusal_lightning "
                         "prepare-model` (the demo's SmolLM2-135M-Instruct), or pass --model DIR")
    levels = {c: args.requests or n for c, n in SERVE_LEVELS.items()}
    rounds = max(1, min(args.rounds, *levels.values()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on the way out
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the servers inherit it
    t0, load_before = time.perf_counter(), os.getloadavg()
    logs = Path(args.out).parent  # each server runs in a child process (its own GIL) and logs here
    options = ["--device", "cpu", "--dtype", "float32"]
    options += ["--batch_wait_ms", str(args.batch_wait_ms)] if args.batch_wait_ms is not None else []
    retry = RetryPolicy(max_attempts=1, timeout=900.0)
    with (ServerProcess(str(model), {}, logs / "serve-batched.log", timeout_s=300,
                        max_batch_size=args.max_batch_size, extra_args=options) as batched,
          ServerProcess(str(model), {}, logs / "serve-unbatched.log", timeout_s=300, max_batch_size=1,
                        extra_args=options) as single):
        clients = {"batched": ChatClient(f"{batched.url}/v1", retry=retry, name="batched"),
                   "unbatched": ChatClient(f"{single.url}/v1", retry=retry, name="unbatched")}
        try:
            for client in clients.values():  # warm-up: first-call allocation, connection
                client.chat(serve_payload(0, args.max_tokens))
            results, wall, cpu, unbatched, round_rps = _rounds(clients, batched.proc.pid, levels, rounds,
                                                               args.max_tokens)
        finally:
            for client in clients.values():
                client.close()

    rps = {c: len(results[c]) / wall[c] for c in levels}
    bad = {c: [p for p in (_check(x, args.max_tokens) for x in results[c]) if p] for c in levels}
    bad_unbatched = [p for p in (_check(x, args.max_tokens) for x in unbatched) if p]
    speedup = rps[16] / rps[1]
    c1_ratios = [b.latency_s / u.latency_s for b, u in zip(results[1], unbatched, strict=True)]
    c1_vs_unbatched = statistics.median(c1_ratios)
    for c in levels:
        print(f"concurrency {c:>2}: {rps[c]:.3f} req/s over {len(results[c])} requests "
              f"({rps[c] * args.max_tokens:.1f} tok/s), latency p50 "
              f"{statistics.median(x.latency_s for x in results[c]):.2f} s, bad replies {len(bad[c])}")
    out = {
        "mode": "serve", "tier": args.serve, "model": str(model), "max_tokens": args.max_tokens,
        "ignore_eos": True, "greedy": True, "dtype": "float32", "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms, "prompts": len(SERVE_PROMPTS), "rounds": rounds,
        "rps": {str(c): round(v, 4) for c, v in rps.items()},
        "tokens_per_s": {str(c): round(v * args.max_tokens, 2) for c, v in rps.items()},
        "latency_s": {str(c): _latency_summary([x.latency_s for x in results[c]]) for c in levels},
        "requests": {str(c): len(results[c]) for c in levels},
        "wall_s": {str(c): round(v, 3) for c, v in wall.items()},
        "bad_replies": {str(c): len(v) for c, v in bad.items()},
        "first_problem": next((v[0] for v in (*bad.values(), bad_unbatched) if v), None),
        # Server CPU seconds per request: what batching saves, whatever else the machine is doing.
        "server_cpu_s_per_request": {str(c): round(cpu[c] / len(results[c]), 4) for c in levels},
        "speedup_16_vs_1": round(speedup, 3),
        "speedup_16_vs_1_paired": round(statistics.median(x[16] / x[1] for x in round_rps), 3),
        "c1_latency_s": {"batched": _latency_summary([x.latency_s for x in results[1]]),
                         "unbatched": _latency_summary([x.latency_s for x in unbatched])},
        "c1_latency_vs_unbatched": round(c1_vs_unbatched, 4),
        "c1_latency_method": "median over requests of the paired latency ratio batched / unbatched "
                             "(--max_batch_size 1), the two servers asked in turns",
        "c1_bad_replies": len(bad[1]) + len(bad_unbatched),  # the paired comparison, both servers
        "targets": [
            {"metric": "speedup_16_vs_1", "value": round(speedup, 3), "target": ">= 6", "met": speedup >= 6},
            {"metric": "c1_latency_vs_unbatched", "value": round(c1_vs_unbatched, 4), "target": "<= 1.0",
             "met": c1_vs_unbatched <= 1.0},
        ],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]},
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"16 vs 1: {speedup:.2f}x (per round: {out['speedup_16_vs_1_paired']:.2f}x); concurrency-1 latency "
          f"batched / unbatched: {c1_vs_unbatched:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
