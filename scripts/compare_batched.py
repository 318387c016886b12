"""How often does batched greedy generation change an answer? Our `serve` with max_batch_size 16 vs 1.

    python scripts/compare_batched.py --model artifacts/models/smollm2-135m-instruct --n 100 --max_tokens 24

Starts two in-process servers on the same model (batched and unbatched), sends the same greedy requests
(SORRY-Bench-proxy + benign prompts) concurrently to each, and prints the share of answers that differ.
On the tiny model they must not differ (tests/serving/test_serve.py); on a real model fp32 rounding differs with
the padded batch shape, so near-ties can flip.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from refusal_lightning.evaluation.client import ChatClient, GenerationSettings
from refusal_lightning.evaluation.prompts import BENIGN, load_prompts
from refusal_lightning.serving.server import start_background

DATA = Path(__file__).resolve().parents[1] / "refusal_lightning" / "data" / "proxy"


def prompts(n: int) -> list[str]:
    """The first ``n`` of the demo's SORRY-Bench-proxy and benign prompts, alternating."""
    loaded = load_prompts(str(DATA / "sorry_bench_proxy.jsonl"), benign_prompts=str(DATA / "benign_eval.jsonl"))
    harm = [p.text for p in loaded.prompts if p.prompt_set != BENIGN]
    benign = [p.text for p in loaded.prompts if p.prompt_set == BENIGN]
    return [p for pair in zip(harm, benign, strict=False) for p in pair][:n]


def answers(url: str, texts: list[str], max_tokens: int, concurrency: int) -> list[str]:
    settings = GenerationSettings(temperature=0.0, max_tokens=max_tokens, seed=None, disable_thinking=False)
    client = ChatClient(f"{url}/v1", name="compare")

    def ask(text: str) -> str:
        body = settings.payload("", [{"role": "user", "content": text}])
        del body["model"]  # the server's only model
        result = client.chat(body)
        if result.content is None:
            raise RuntimeError(f"request failed: {result.error}")
        return result.content

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(ask, texts))
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/models/smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max_tokens", type=int, default=24)
    args = parser.parse_args()
    texts = prompts(args.n)
    results = {}
    for size, concurrency in ((1, 1), (16, 16)):
        server, url = start_background(args.model, max_batch_size=size)
        try:
            results[size] = answers(url, texts, args.max_tokens, concurrency)
        finally:
            server.shutdown()
            server.server_close()
    differ = [i for i, (a, b) in enumerate(zip(results[1], results[16], strict=True)) if a != b]
    print(json.dumps({"model": args.model, "n": len(texts), "max_tokens": args.max_tokens,
                      "differing": len(differ), "share_differing": len(differ) / len(texts)}, indent=2))


if __name__ == "__main__":
    main()
