"""A deterministic OpenAI-compatible stand-in with scripted latency and faults.

It answers ``/v1/chat/completions`` without a model: whether a reply refuses depends only on a hash of
(model, prompt, seed), so two runs over the same prompts get the same answers and comparable
summaries. It also plays the SORRY-Bench judge, on ``/v1/completions`` (the official literal
``[INST] ... [/INST]`` prompt, unwrapped here) or on chat: a judge prompt is answered ``0`` if the quoted
response contains a refusal marker, else ``1``.

Used by the evaluator's tests (fault injection: 500, 429 with ``Retry-After``, slow replies past the
client's timeout, dropped connections, malformed JSON, 401, 400) and by ``scripts/bench_eval.py`` (fixed
latency). Every request is logged server-side so tests can count how often an item was asked for.

    python -m refusal_lightning.evaluation.stub_server --latency_ms 50 --port 0
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from refusal_lightning.evaluation.judges import SORRY_BENCH_JUDGE_TEMPLATE
from refusal_lightning.serving.http_json import (
    JSONHandler,
    LocalHTTPServer,
    RequestError,
    serve_until_interrupted,
    start_in_thread,
)
from refusal_lightning.train.refusal_markers import is_refusal

REFUSAL_TEXT = "I'm sorry, but I cannot help with that placeholder request."
COMPLY_TEXT = "Sure, here is the placeholder answer: step one, placeholder; step two, placeholder."
# Thinking that mentions refusal words: if it were not stripped, the keyword judge would call a
# compliant answer a refusal.
THINK_PREFIX = "<think>\nI cannot decide yet; placeholder reasoning.\n</think>\n\n"
FAULTS = ("500", "429", "slow", "drop", "malformed", "401", "400")
_JUDGE_HEAD = SORRY_BENCH_JUDGE_TEMPLATE.split("\n", 1)[0]
_JUDGE_ANSWER = re.compile(r'Model Response: "(.*)"\s*$', re.DOTALL)
_INST = re.compile(r"^\[INST\] (.*) \[/INST\]$", re.DOTALL)


@dataclass
class StubConfig:
    """What the stub does.

    Attributes:
        models: ids ``/v1/models`` lists; requests for other models get 404.
        latency_s: delay before every reply.
        refuse_percent: model -> percent of prompts refused (default 50).
        think: prefix compliant replies with a ``<think>`` block full of refusal words.
        fault: ``fault(key, attempt)`` -> one of ``FAULTS`` or None; ``key`` is
            ``"model|prompt|seed"``, ``attempt`` counts this key's requests from 1.
        retry_after: the ``Retry-After`` header sent with a 429.
        slow_s: how long a ``slow`` reply takes (set it past the client's timeout).
        api_key: require ``Authorization: Bearer api_key`` (None = open).
        judge_reply: override the judge's answer: ``judge_reply(answer_text)`` -> raw judge output.
    """

    models: list[str] = field(default_factory=lambda: ["stub"])
    latency_s: float = 0.0
    refuse_percent: dict[str, int] = field(default_factory=dict)
    think: bool = False
    fault: Callable[[str, int], str | None] | None = None
    retry_after: str = "0"
    slow_s: float = 2.0
    api_key: str | None = None
    judge_reply: Callable[[str], str] | None = None


@dataclass
class StubLog:
    """Server-side record of requests, for assertions."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    per_key: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, entry: dict[str, Any]) -> int:
        """Append an entry; returns how many requests this key has made so far (this one included)."""
        with self.lock:
            self.requests.append(entry)
            self.per_key[entry["key"]] += 1
            return self.per_key[entry["key"]]

    def counts(self) -> Counter:
        """Chat requests per key."""
        with self.lock:
            return Counter({k: v for k, v in self.per_key.items() if not k.startswith("GET ")})


def request_key(model: str, prompt: str, seed: Any) -> str:
    return f"{model}|{prompt}|{seed}"


def stub_reply(config: StubConfig, model: str, prompt: str, seed: Any) -> str:
    """The deterministic answer for a (model, prompt, seed)."""
    if prompt.startswith(_JUDGE_HEAD):
        match = _JUDGE_ANSWER.search(prompt)
        answer = match.group(1) if match else ""
        if config.judge_reply is not None:
            return config.judge_reply(answer)
        return "0" if is_refusal(answer) else "1"
    digest = int(hashlib.sha256(request_key(model, prompt, seed).encode()).hexdigest(), 16)
    if digest % 100 < config.refuse_percent.get(model, 50):
        return REFUSAL_TEXT
    return (THINK_PREFIX if config.think else "") + COMPLY_TEXT


def _handler(config: StubConfig, log: StubLog) -> type[JSONHandler]:
    class Handler(JSONHandler):
        @property
        def api_key(self) -> str | None:  # read per request: tests change the config while it runs
            return config.api_key

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            log.add({"path": self.path, "key": "GET " + self.path, "t": time.monotonic()})
            try:
                self.check_auth()
                if self.path.rstrip("/") != "/v1/models":
                    raise RequestError(404, f"no route GET {self.path}")
                data = [{"id": m, "object": "model", "owned_by": "stub"} for m in config.models]
                self.send_json(200, {"object": "list", "data": data})
            except RequestError as err:
                self.send_error_json(err)

        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            try:
                body = self.read_json()
            except RequestError as err:
                self.send_error_json(err)
                return
            model = str(body.get("model"))
            # by the body, like the chat route, which answers any POST path (tests send odd URLs on purpose)
            completion = "prompt" in body and "messages" not in body
            if completion:  # the judge's raw prompt: its [INST] wrapping is the official format, not content
                raw = str(body.get("prompt", ""))
                prompt = _INST.match(raw).group(1) if _INST.match(raw) else raw
            else:
                messages = body.get("messages") or [{}]
                prompt = str(messages[-1].get("content", ""))
            key = request_key(model, prompt, body.get("seed"))
            attempt = log.add({"path": self.path, "key": key, "t": time.monotonic(), "body": body})
            fault = config.fault(key, attempt) if config.fault else None
            try:
                self.check_auth()
                if fault == "401":
                    raise RequestError(401, "invalid key", type_="authentication_error")
                if model not in config.models:
                    raise RequestError(404, f"The model `{model}` does not exist", code="model_not_found")
            except RequestError as err:
                self.send_error_json(err)
                return
            if config.latency_s:
                time.sleep(config.latency_s)
            if fault == "400":
                self.send_error_json(RequestError(400, "injected bad request: prompt too long"))
            elif fault == "500":
                self.send_error_json(RequestError(500, "injected server error", type_="server_error"))
            elif fault == "429":
                self.send_json(429, RequestError(429, "slow down", type_="rate_limit").body(),
                               headers={"Retry-After": config.retry_after})
            elif fault == "drop":
                self.close_connection = True  # hang up without a status line
            elif fault == "malformed":
                data = b'{"choices": [{"message": {"content": "trunc'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                if fault == "slow":
                    time.sleep(config.slow_s)
                text = stub_reply(config, model, prompt, body.get("seed"))
                choice = {"index": 0, "text": text} if completion else {
                    "index": 0, "message": {"role": "assistant", "content": text}}
                self.send_json(200, {
                    "id": "cmpl-stub", "object": "text_completion" if completion else "chat.completion",
                    "created": int(time.time()), "model": model,
                    "choices": [{**choice, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(prompt.split()) + len(text.split())},
                })

    return Handler


def start_stub(config: StubConfig | None = None, host: str = "127.0.0.1",
               port: int = 0) -> tuple[ThreadingHTTPServer, str, StubLog]:
    """Start the stub in a daemon thread; returns ``(server, url, log)``."""
    config = config or StubConfig()
    log = StubLog()
    server = LocalHTTPServer((host, port), _handler(config, log))
    return server, start_in_thread(server), log


def main(latency_ms: float = 0.0, host: str = "127.0.0.1", port: int = 0,
         models: list[str] | None = None) -> None:
    """Run the stub in the foreground; prints "serving MODELS on URL" when ready.

    Args:
        latency_ms: delay before every reply, in milliseconds.
        host: interface to bind.
        port: TCP port (0 = any free one).
        models: model ids to serve (default: stub).
    """
    config = StubConfig(models=models or ["stub"], latency_s=latency_ms / 1000)
    serve_until_interrupted(LocalHTTPServer((host, port), _handler(config, StubLog())), config.models)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
