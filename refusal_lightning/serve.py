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
the oldest waiting request, lets others join for ``--batch_wait_ms`` (or, while clients are sending
concurrently, i.e. the last batch had several rows, until as many as last time have arrived or
``--busy_batch_wait_ms`` is over), and answers up to
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
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import itertools
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_BODY_BYTES = 16 * 1024 * 1024
# Most tokens one request may ask for (vLLM answers 400 past the context; we also cap below it, so one
# request cannot hold the batch worker for a whole context of decoding).
DEFAULT_MAX_TOKENS_LIMIT = 4096
# Keyword arguments of apply_chat_template that a request must not override via chat_template_kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize", "return_tensors", "return_dict",
                                      "add_generation_prompt", "continue_final_message", "padding",
                                      "truncation", "max_length", "tokenizer_kwargs"})


class ServeConfigError(ValueError):
    """Bad ``serve`` arguments (adapter folders, dtype, key variable), all listed in one line."""


class RequestError(Exception):
    """An error reply: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or str(self.status)}}


class LocalHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with daemon worker threads and a listen backlog deep enough for an
    evaluator running 64 requests at once (the stdlib default of 5 drops connections under load)."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class JSONHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive JSON plumbing shared by ``serve`` and the evaluator's stub server."""

    protocol_version = "HTTP/1.1"
    server_version = "refusal-lightning"
    api_key: str | None = None  # set on a subclass; None = no auth
    log_requests = False

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes; with Nagle on, the body waits for the client's delayed
        # ACK of the headers (~40 ms per request on Linux loopback).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.log_requests:
            super().log_message(format, *args)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout); nothing to tell it

    def send_error_json(self, err: RequestError) -> None:
        self.send_json(err.status, err.body())

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length required")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "bad Content-Length") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(size)

    def read_json(self) -> dict[str, Any]:
        raw = self.read_body()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    def check_auth(self) -> None:
        if not self.api_key:
            return
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise RequestError(401, "missing or invalid API key (send it as 'Authorization: Bearer ...')",
                               type_="authentication_error", code="invalid_api_key")


def start_in_thread(server: ThreadingHTTPServer) -> str:
    """Run ``server.serve_forever`` in a daemon thread; returns ``http://host:port``. Stop it with
    ``server.shutdown(); server.server_close()``."""
    # A short poll interval makes shutdown() return in ~50 ms instead of the default 0.5 s.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http-server",
                     daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------------------
# Request validation (pure; tested without a model)


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    model: str | None
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    chat_template_kwargs: dict[str, Any]
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens, past any EOS (benchmarks)


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if wrong_type or (integer and not isinstance(value, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    if not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param="messages")


def parse_chat_request(body: dict[str, Any], max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> ChatRequest:
    """Validate a chat request body; raises ``RequestError(400, ...)`` naming the offending field
    (``max_tokens`` above ``max_tokens_limit`` included)."""
    if body.get("stream"):
        raise RequestError(400, "stream=true is not supported by this server; send stream=false",
                           param="stream", code="unsupported_stream")
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError(400, "only n=1 is supported; send one request per sample", param="n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}].role must be system, user or assistant", param="messages")
        clean.append({"role": role, "content": _message_text(m.get("content"), i)})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, max_tokens_limit, integer=True)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    reserved = RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise RequestError(400, f"chat_template_kwargs may not set {sorted(reserved)}",
                           param="chat_template_kwargs")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(400, "'ignore_eos' must be true or false", param="ignore_eos")
    return ChatRequest(model=model, messages=clean, max_tokens=max_tokens,
                       temperature=_number(body, "temperature", 0.0, 2.0),
                       top_p=_number(body, "top_p", 1e-9, 1.0),
                       seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
                       chat_template_kwargs=kwargs, ignore_eos=ignore_eos)


# ---------------------------------------------------------------------------------------------------
# The model side


def parse_adapter_specs(adapter: list[str] | None, problems: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` (or a bare ``PATH``, named after its folder) -> {name: path}; problems collected."""
    out: dict[str, Path] = {}
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        name, path = name.strip(), path.strip()
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


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class _Job:
    """A validated, tokenized request waiting for the worker; its handler thread waits on ``future``."""

    name: str  # the base model's or an adapter's name
    req: ChatRequest
    prompt_ids: list[int]
    max_new: int  # this request's budget: its max_tokens, capped by the room left in the context
    group: tuple  # jobs with equal groups can share one generate call
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@functools.cache
def _row_budget_class() -> type:
    """A ``StoppingCriteria`` that ends each row at its own token budget (built on first use: this module
    imports no torch, so ``--help`` stays fast)."""
    import torch
    from transformers import StoppingCriteria

    class RowBudget(StoppingCriteria):
        def __init__(self, prompt_width: int, budgets: list[int], device: str):
            self.prompt_width = prompt_width
            self.budgets = torch.tensor(budgets, device=device)

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - self.prompt_width) >= self.budgets

    return RowBudget


def _stop_at_row_budgets(prompt_width: int, budgets: list[int], device: str):
    """Stopping criteria that finish each row at its own ``max_new`` (None when all budgets are equal:
    ``max_new_tokens`` already does it)."""
    from transformers import StoppingCriteriaList

    if len(set(budgets)) == 1:
        return None
    return StoppingCriteriaList([_row_budget_class()(prompt_width, budgets, device)])


class ChatBackend:
    """Base model + adapters, owned by one batching worker thread.

    Args:
        model: base model path or hub id.
        adapters: adapter name -> PEFT adapter folder.
        dtype: torch dtype name, or ``auto`` for the checkpoint's.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        served_model_name: the base model's name in the API (default: ``model`` as given).
        max_model_len: context length; default: the tokenizer's/model's.
        default_max_tokens: tokens to generate when a request gives no ``max_tokens``.
        max_tokens_limit: most tokens a request may ask for; more is a 400.
        max_batch_size: most requests per ``generate`` call (1 = one at a time).
        batch_wait_ms: how long the oldest waiting request waits for others to join its batch.
        busy_batch_wait_ms: the same wait while clients send concurrently (the last batch had several
            rows): the batch closes once as many requests as last time are waiting, or after this long.
    """

    def __init__(self, model: str, adapters: dict[str, Path] | None = None, dtype: str = "float32",
                 device: str = "auto", served_model_name: str | None = None, max_model_len: int | None = None,
                 default_max_tokens: int = 512, max_batch_size: int = 16, batch_wait_ms: float = 5.0,
                 max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, busy_batch_wait_ms: float = 100.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_name = served_model_name or model
        self.adapter_paths = dict(adapters or {})
        self.device = _resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        if self.adapter_paths:
            from peft import PeftModel

            names = list(self.adapter_paths)
            base = PeftModel.from_pretrained(base, str(self.adapter_paths[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                base.load_adapter(str(self.adapter_paths[name]), adapter_name=name)
        self.model = base.to(self.device).eval()
        self.generation_defaults = self._inner_model().generation_config
        eos = self.generation_defaults.eos_token_id
        self.eos_ids = frozenset(x for x in (eos if isinstance(eos, list) else [eos]) if x is not None)
        # Left padding of a batch and the filler after a row stops; models without a pad token use EOS.
        self.pad_token_id = next((x for x in (self.generation_defaults.pad_token_id, self.tokenizer.pad_token_id,
                                              *sorted(self.eos_ids), self.tokenizer.eos_token_id)
                                  if x is not None), 0)
        model_limit = getattr(self._inner_model().config, "max_position_embeddings", None)
        limits = [x for x in (max_model_len, model_limit) if x]
        self.max_model_len = min(limits) if limits else 4096
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.busy_batch_wait_s = busy_batch_wait_ms / 1000
        self._last_batch_size = 0
        # (model name, batch size) of recent generate calls: tests and benchmarks read it.
        self.recent_batches: deque[tuple[str, int]] = deque(maxlen=10_000)
        # A fast tokenizer shared between threads can fail with "Already borrowed": handler threads
        # (apply_chat_template) and the worker (decode) take turns.
        self._tokenizer_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._solo_ids = itertools.count()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="serve-batcher", daemon=True)
        self._worker.start()

    def _inner_model(self):
        return self.model.get_base_model() if self.adapter_paths else self.model

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapter_paths]

    def models_listing(self) -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": self.base_name, "object": "model", "created": created, "owned_by": "refusal_lightning",
                 "root": self.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "refusal_lightning",
                  "root": str(path), "parent": self.base_name} for name, path in self.adapter_paths.items()]
        return {"object": "list", "data": data}

    def _temperature(self, req: ChatRequest) -> float:
        return req.temperature if req.temperature is not None else (self.generation_defaults.temperature or 1.0)

    def _generation_config(self, req: ChatRequest, max_new_tokens: int):
        import copy

        cfg = copy.deepcopy(self.generation_defaults)
        cfg.max_new_tokens = max_new_tokens
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.pad_token_id  # else transformers warns and picks EOS itself
        temperature = self._temperature(req)
        if temperature == 0:
            # Greedy; clear sampling knobs so transformers does not warn they are ignored.
            cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
        else:
            cfg.do_sample = True
            cfg.temperature = temperature
            if req.top_p is not None:
                cfg.top_p = req.top_p
        return cfg

    # -- handler threads ----------------------------------------------------------------------------

    def generate(self, req: ChatRequest) -> dict[str, Any]:
        """Answer one request (blocking); ``req.model`` must be one of ``names`` (checked by the caller).
        Raises ``RequestError``: 400 for a prompt the template rejects or that leaves no room to generate,
        500 when its batch failed."""
        job = self._prepare(req)
        if self._closed:
            raise RequestError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        self._queue.put(job)
        return job.future.result()

    def _prepare(self, req: ChatRequest) -> _Job:
        """Tokenize and check the context limit here, per request, so one bad prompt fails alone."""
        name = req.model or self.base_name
        try:
            with self._tokenizer_lock:
                inputs = self.tokenizer.apply_chat_template(
                    req.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                    return_tensors="pt", **req.chat_template_kwargs)
        except Exception as err:  # jinja raises for conversations the template rejects
            raise RequestError(400, f"the chat template rejected these messages: {err}",
                               param="messages") from None
        prompt_ids = inputs["input_ids"][0].tolist()
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise RequestError(400, f"prompt is {len(prompt_ids)} tokens; the context limit is "
                               f"{self.max_model_len}", param="messages", code="context_length_exceeded")
        temperature = self._temperature(req)
        if temperature == 0:
            group: tuple = (name, "greedy")
        elif req.seed is None:
            group = (name, "sample", temperature, req.top_p)
        else:  # alone: the global RNG is seeded for this request only, as when requests ran one by one
            group = (name, "seeded", next(self._solo_ids))
        return _Job(name, req, prompt_ids, min(req.max_tokens or self.default_max_tokens, room), group)

    def close(self) -> None:
        """Stop the worker after its current batch; requests still waiting get a 503."""
        self._closed = True
        self._queue.put(None)

    # -- the worker thread: the only one that touches the model ----------------------------------------

    def _work(self) -> None:
        pending: list[_Job] = []  # taken off the queue, not yet answered (oldest first)
        while True:
            if not pending:
                job = self._queue.get()
                if job is None:
                    return
                pending.append(job)
            if not self._gather(pending):
                break
            batch = self._take_batch(pending)
            self._answer(batch)
        closing = RequestError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        for job in pending:
            job.future.set_exception(closing)
        with contextlib.suppress(queue.Empty):
            while (job := self._queue.get_nowait()) is not None:
                job.future.set_exception(closing)

    def _gather(self, pending: list[_Job]) -> bool:
        """Move queued jobs into ``pending`` until the oldest one's batch is full or its wait is over
        (measured from its arrival, so a job that waited behind a batch does not wait again).

        Closed-loop clients (the evaluator's threads) send their next requests only once their replies
        are back, so after a batch they trickle in over some milliseconds: while the last batch had
        several rows, the head waits up to ``busy_batch_wait_s`` for as many mates as that batch had,
        instead of closing a small batch after ``batch_wait_s``. A lone client keeps the short wait.
        Returns False when ``close`` was called."""
        head = pending[0]
        busy = self._last_batch_size > 1
        deadline = head.enqueued + (max(self.batch_wait_s, self.busy_batch_wait_s) if busy else self.batch_wait_s)
        enough = min(self._last_batch_size, self.max_batch_size) if busy else self.max_batch_size
        while True:
            with contextlib.suppress(queue.Empty):  # whatever already arrived joins before deciding
                while True:
                    job = self._queue.get_nowait()
                    if job is None:
                        return False
                    pending.append(job)
            mates = sum(job.group == head.group for job in pending)
            if self.max_batch_size == 1 or head.group[1] == "seeded" or mates >= enough:
                return True
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return True
            try:
                job = self._queue.get(timeout=timeout)
            except queue.Empty:
                return True
            if job is None:
                return False
            pending.append(job)

    def _take_batch(self, pending: list[_Job]) -> list[_Job]:
        """The oldest job plus the next ones of its group that keep padded prompt + generation within the
        context limit (left padding shifts no row's positions, but absolute-position models index by the
        padded length)."""
        batch = [pending[0]]
        width, budget = len(pending[0].prompt_ids), pending[0].max_new
        for job in pending[1:]:
            if len(batch) == self.max_batch_size:
                break
            w, b = max(width, len(job.prompt_ids)), max(budget, job.max_new)
            if job.group == batch[0].group and w + b <= self.max_model_len:
                batch.append(job)
                width, budget = w, b
        chosen = {id(job) for job in batch}
        pending[:] = [job for job in pending if id(job) not in chosen]
        return batch

    def _answer(self, batch: list[_Job]) -> None:
        try:
            replies = self._generate_batch(batch)
        except Exception as err:  # a bug or an OOM: these requests get a 500, the server keeps serving
            traceback.print_exc(file=sys.stderr)
            for job in batch:
                job.future.set_exception(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                      type_="internal_server_error"))
            return
        for job, reply in zip(batch, replies, strict=True):
            job.future.set_result(reply)

    def _use_adapter(self, name: str) -> contextlib.AbstractContextManager:
        if not self.adapter_paths:
            return contextlib.nullcontext()
        if name == self.base_name:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _generate_batch(self, batch: list[_Job]) -> list[dict[str, Any]]:
        """One left-padded ``generate`` call for jobs of one group; each reply as if it ran alone."""
        import torch

        width = max(len(job.prompt_ids) for job in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, job in enumerate(batch):
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            attention_mask[row, width - len(job.prompt_ids):] = 1
        budgets = [job.max_new for job in batch]
        cfg = self._generation_config(batch[0].req, max(budgets))
        if any(job.req.ignore_eos for job in batch):
            # [] rather than None, which generate() refills from the model's config. The other rows
            # are cut at their EOS below, so their answers do not change.
            cfg.eos_token_id = []
        # Rows stop at their own max_tokens, so short requests do not keep the batch going.
        stop = _stop_at_row_budgets(width, budgets, self.device)
        self.recent_batches.append((batch[0].name, len(batch)))
        self._last_batch_size = len(batch)
        with torch.inference_mode():
            if batch[0].group[1] == "seeded":
                torch.manual_seed(batch[0].req.seed)  # seeds every device
            with self._use_adapter(batch[0].name):
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention_mask.to(self.device),
                                          generation_config=cfg, stopping_criteria=stop)
        rows = out[:, width:].tolist()
        replies = []
        for job, tokens in zip(batch, rows, strict=True):
            # A row may run on past its own end (filler, or tokens it would not have generated alone).
            tokens = tokens[:job.max_new]
            end = None if job.req.ignore_eos else next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if end is not None:
                tokens = tokens[:end + 1]
            with self._tokenizer_lock:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            replies.append(self._reply(job, tokens, text))
        return replies

    def _reply(self, job: _Job, tokens: list[int], text: str) -> dict[str, Any]:
        prompt_len = len(job.prompt_ids)
        stopped = bool(tokens) and tokens[-1] in self.eos_ids and not job.req.ignore_eos
        finish = "length" if len(tokens) >= job.max_new and not stopped else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": job.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": len(tokens),
                      "total_tokens": prompt_len + len(tokens)},
        }


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
             max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
             busy_batch_wait_ms: float = 100.0) -> tuple[ChatBackend, str | None]:
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
                     batch_wait_ms: float = 5.0,
                     max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                     busy_batch_wait_ms: float = 100.0) -> tuple[ChatServer, str]:
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
    batch_wait_ms: float = 5.0,
    busy_batch_wait_ms: float = 100.0,
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
        busy_batch_wait_ms: the wait while clients send concurrently (the last batch had several rows):
            the batch closes as soon as as many requests as last time are waiting, or after this long.
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


def serve_until_interrupted(server: ThreadingHTTPServer, names: list[str]) -> None:
    """Print the ready line (``serving NAMES on URL``, which the pipeline waits for) and serve until ^C."""
    host, port = server.server_address[:2]
    print(f"serving {', '.join(names)} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(serve)
