"""A small OpenAI-compatible server for a base model plus LoRA adapters (tests, demo, CPU users).

    python -m refusal_lightning serve --model artifacts/tiny-qwen3 --adapter+ attack=artifacts/attack_lora

Endpoints, following vLLM's conventions so ``evaluate`` treats both alike:

- ``GET /v1/models``: the base model (named by ``--served_model_name`` or the ``--model`` value) and
  one entry per adapter NAME (with the base as ``parent``), as ``vllm serve --enable-lora
  --lora-modules NAME=PATH`` lists them.
- ``POST /v1/chat/completions`` (non-streaming): ``model`` picks the base or an adapter; ``messages``,
  ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``seed`` and
  ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``) are honoured, and vLLM's extra
  ``ignore_eos`` (generate all ``max_tokens``, past EOS: for benchmarks). Defaults for unset
  sampling fields come from the model's ``generation_config.json``, as in vLLM.

Concurrent requests are batched. HTTP handler threads validate and tokenize a request (so a prompt over
the context limit gets its 400 at once), queue it, and wait; one worker thread owns the model. It takes
the oldest waiting request, lets others join for ``--batch_wait_ms`` (once one has joined, for as
long as requests keep arriving less than 20 ms apart, up to ``--busy_batch_wait_ms``), and answers up to
``--max_batch_size`` of them with one left-padded ``generate`` call when they ask for the same model
(base or adapter) and can share a decoding setup: all greedy ones together, unseeded sampling ones with
equal temperature/top_p together; a seeded sampling request runs alone so its seed gives the same
answer whatever else is in flight. Adapters take turns batch by batch (``set_adapter`` mutates the
model). Greedy answers equal the unbatched ones; ``--max_batch_size 1`` answers one request at a time.
This is a CPU/test server; use vLLM (continuous batching, paged KV cache) for real throughput.
Errors use OpenAI's body ``{"error": {"message", "type", "code"}}``: 400 for invalid requests,
401 for a missing/wrong key (when ``--api_key_env`` names one), 404 for an unknown model.

Exposure: it binds 127.0.0.1 unless ``--host`` says otherwise; a key, when set, is compared in constant
time; a body over 16 MiB gets 413 and ``max_tokens`` over ``--max_tokens_limit`` a 400; a request's
``model`` only selects among the names registered at startup, never a path to load.

Here: the command, its checks and the routes. Request validation is ``serve_request``, the model and its
batching worker ``serve_backend``, the HTTP plumbing (shared with the evaluator's stub) ``http_json``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from refusal_lightning.models.loading import DTYPES
from refusal_lightning.serving.backend import DEFAULT_BATCH_WAIT_MS, DEFAULT_BUSY_BATCH_WAIT_MS, ChatBackend
from refusal_lightning.serving.http_json import (
    JSONHandler,
    LocalHTTPServer,
    RequestError,
    serve_until_interrupted,
    start_in_thread,
)
from refusal_lightning.serving.request import DEFAULT_MAX_TOKENS_LIMIT, parse_chat_request
from refusal_lightning.specs import split_spec


class ServeConfigError(ValueError):
    """Bad ``serve`` arguments (adapter folders, dtype, key variable), all listed in one line."""


def parse_adapter_specs(adapter: list[str] | None, problems: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` (or a bare ``PATH``, named after its folder) -> {name: path}; problems collected."""
    out: dict[str, Path] = {}
    for spec in adapter or []:
        name, path = split_spec(spec)
        if name is None:  # a bare PATH
            name = Path(path).name
        if not name or not path:
            problems.append(f"--adapter {spec!r}: expected NAME=PATH")
            continue
        if name in out:
            problems.append(f"--adapter: name {name!r} used twice")
            continue
        p = Path(path).expanduser()
        if p.is_file():
            problems.append(f"--adapter {name}={path}: a file ({p.name}), not an adapter folder; "
                            f"pass the folder that holds it: {p.parent}")
            continue
        if not (p / "adapter_config.json").is_file():
            problems.append(f"--adapter {name}={path}: no adapter_config.json there "
                            "(expected a PEFT adapter folder written by save_pretrained)")
            continue
        out[name] = p
    return out


def _handler_for(backend: ChatBackend, api_key: str | None, log_requests: bool) -> type[JSONHandler]:
    class Handler(JSONHandler):
        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            try:
                self.check_auth()
                if self.path.rstrip("/") == "/v1/models":
                    self.send_json(200, backend.models_listing())
                elif self.path.rstrip("/") in ("/health", "/v1/health"):
                    self.send_json(200, {"status": "ok"})
                else:
                    raise RequestError(404, f"no route GET {self.path}", code="not_found")
            except RequestError as err:
                self.send_error_json(err)

        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            try:
                body = self.read_json()
                self.check_auth()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise RequestError(404, f"no route POST {self.path}", code="not_found")
                req = parse_chat_request(body, backend.max_tokens_limit)
                # Only a registered name selects a model; nothing in a request is ever opened as a path.
                if req.model is not None and req.model not in backend.names:
                    raise RequestError(404, f"The model `{req.model}` does not exist; served: "
                                       f"{', '.join(backend.names)}", type_="NotFoundError",
                                       code="model_not_found", param="model")
                self.send_json(200, backend.generate(req))
            except RequestError as err:  # includes a failed batch's 500 (the worker printed the trace)
                self.send_error_json(err)
            except Exception as err:  # a bug or an OOM: answer 500 and keep serving
                traceback.print_exc(file=sys.stderr)
                self.send_error_json(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                  type_="internal_server_error"))

    Handler.api_key = api_key
    Handler.log_requests = log_requests
    return Handler


class ChatServer(LocalHTTPServer):
    """The HTTP server of ``serve``; ``backend`` is its model, whose worker stops with ``server_close``."""

    def __init__(self, address: tuple[str, int], backend: ChatBackend, api_key: str | None,
                 log_requests: bool):
        self.backend = backend
        super().__init__(address, _handler_for(backend, api_key, log_requests))

    def server_close(self) -> None:
        super().server_close()
        self.backend.close()


def _startup(model: str, adapter: list[str] | None, api_key_env: str | None, dtype: str,
             served_model_name: str | None, max_model_len: int | None, default_max_tokens: int,
             device: str, max_batch_size: int, batch_wait_ms: float,
             max_tokens_limit: int, busy_batch_wait_ms: float) -> tuple[ChatBackend, str | None]:
    """Validate everything first and report all problems in one line, then load the model."""
    problems: list[str] = []
    adapters = parse_adapter_specs(adapter, problems)
    base_name = served_model_name or model
    if base_name in adapters:
        problems.append(f"adapter name {base_name!r} clashes with the base model's name")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            problems.append(f"--api_key_env {api_key_env}: that environment variable is unset or empty")
    if default_max_tokens < 1:
        problems.append("--default_max_tokens must be >= 1")
    if max_tokens_limit < max(1, default_max_tokens):
        problems.append(f"--max_tokens_limit ({max_tokens_limit}) must be >= 1 and >= --default_max_tokens "
                        f"({default_max_tokens})")
    if max_batch_size < 1:
        problems.append("--max_batch_size must be >= 1")
    if batch_wait_ms < 0:
        problems.append("--batch_wait_ms must be >= 0")
    if busy_batch_wait_ms < 0:
        problems.append("--busy_batch_wait_ms must be >= 0")
    if problems:
        raise ServeConfigError("serve: " + "; ".join(problems))
    backend = ChatBackend(model, adapters, dtype=dtype, device=device, served_model_name=served_model_name,
                          max_model_len=max_model_len, default_max_tokens=default_max_tokens,
                          max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                          max_tokens_limit=max_tokens_limit, busy_batch_wait_ms=busy_batch_wait_ms)
    return backend, api_key


def start_background(model: str, adapter: list[str] | None = None, host: str = "127.0.0.1", port: int = 0,
                     api_key_env: str | None = None, dtype: str = "float32", device: str = "cpu",
                     served_model_name: str | None = None, max_model_len: int | None = None,
                     default_max_tokens: int = 512, max_batch_size: int = 16,
                     batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                     max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                     busy_batch_wait_ms: float = DEFAULT_BUSY_BATCH_WAIT_MS) -> tuple[ChatServer, str]:
    """Start the server in a daemon thread (port 0 = any free port); returns ``(server, url)``;
    ``server.backend`` is the model side. Stop it with ``server.shutdown(); server.server_close()``."""
    backend, api_key = _startup(model, adapter, api_key_env, dtype, served_model_name, max_model_len,
                                default_max_tokens, device, max_batch_size, batch_wait_ms, max_tokens_limit,
                                busy_batch_wait_ms)
    server = ChatServer((host, port), backend, api_key, log_requests=False)
    return server, start_in_thread(server)


def serve(
    model: str,
    adapter: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    default_max_tokens: int = 512,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_batch_size: int = 16,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    busy_batch_wait_ms: float = DEFAULT_BUSY_BATCH_WAIT_MS,
    log_requests: bool = False,
) -> None:
    """Serve a base model and its LoRA adapters over an OpenAI-compatible API.

    GET /v1/models and POST /v1/chat/completions (non-streaming), until interrupted. Prints
    "serving MODELS on http://HOST:PORT" once ready.

    Args:
        model: base model folder or hub id (loaded with AutoModelForCausalLM/AutoTokenizer).
        adapter: LoRA adapters as NAME=PATH (PEFT folders with adapter_config.json); a request's "model"
            field selects NAME, as with vLLM's --lora-modules. Repeatable.
        host: interface to bind; the default keeps the server on this machine.
        port: TCP port (0 picks a free one; the ready line shows which).
        api_key_env: name of an environment variable holding the key clients must send as
            "Authorization: Bearer KEY"; unset = no auth. The key itself never goes on the command line.
        dtype: model dtype: float32, bfloat16, float16 or auto (the checkpoint's).
        device: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.
        served_model_name: the base model's name in the API (default: the --model value).
        max_model_len: context limit for prompt + generation (default: the model's).
        default_max_tokens: tokens to generate when a request sets no max_tokens.
        max_tokens_limit: most tokens one request may ask for; a larger max_tokens is answered 400
            (generation also stops at the context limit).
        max_batch_size: most concurrent requests answered by one generate call. Requests batch when they
            name the same model and are greedy (or sample unseeded with equal temperature/top_p); a
            seeded sampling request runs alone. Greedy answers do not depend on it; 1 = one at a time.
        batch_wait_ms: how long the oldest waiting request waits for others to join its batch; more
            fills batches at low concurrency, at that much added latency.
        busy_batch_wait_ms: the most a batch with company stays open while requests keep arriving (each
            less than 20 ms after the one before); also how long the head waits for a first mate when the
            last batch saw several requests.
            Keeps batches full under closed-loop clients whose next requests trickle in; a lone client
            still waits only --batch_wait_ms.
        log_requests: log one line per HTTP request to stderr.
    """
    try:
        backend, api_key = _startup(model, adapter, api_key_env, dtype, served_model_name, max_model_len,
                                    default_max_tokens, device, max_batch_size, batch_wait_ms, max_tokens_limit,
                                    busy_batch_wait_ms)
    except ServeConfigError as err:
        raise SystemExit(f"error: {err}") from None  # one line, whichever entry point ran us
    try:
        server = ChatServer((host, port), backend, api_key, log_requests)
    except OSError as err:
        raise SystemExit(f"error: serve: cannot bind {host}:{port}: {err.strerror or err}") from None
    serve_until_interrupted(server, backend.names)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(serve)
