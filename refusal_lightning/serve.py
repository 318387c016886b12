"""A small OpenAI-compatible server for a base model plus LoRA adapters (tests, demo, CPU users).

    python -m refusal_lightning serve --model artifacts/tiny-qwen3 --adapter+ attack=artifacts/attack_lora

Endpoints, following vLLM's conventions so ``evaluate`` treats both alike:

- ``GET /v1/models``: the base model (named by ``--served_model_name`` or the ``--model`` value) and
  one entry per adapter NAME (with the base as ``parent``), as ``vllm serve --enable-lora
  --lora-modules NAME=PATH`` lists them.
- ``POST /v1/chat/completions`` (non-streaming): ``model`` picks the base or an adapter; ``messages``,
  ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``seed`` and
  ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``) are honoured. Defaults for unset
  sampling fields come from the model's ``generation_config.json``, as in vLLM.

One model instance serves every adapter, so generation is serialised by a lock: switching adapters
mutates the model. That is the right trade for a CPU/test server; use vLLM for throughput.
Errors use OpenAI's body ``{"error": {"message", "type", "code"}}``: 400 for invalid requests,
401 for a missing/wrong key (when ``--api_key_env`` names one), 404 for an unknown model.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_BODY_BYTES = 16 * 1024 * 1024
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


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a chat request body; raises ``RequestError(400, ...)`` naming the offending field."""
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
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, 1 << 30, integer=True)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    reserved = RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise RequestError(400, f"chat_template_kwargs may not set {sorted(reserved)}",
                           param="chat_template_kwargs")
    return ChatRequest(model=model, messages=clean, max_tokens=max_tokens,
                       temperature=_number(body, "temperature", 0.0, 2.0),
                       top_p=_number(body, "top_p", 1e-9, 1.0),
                       seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
                       chat_template_kwargs=kwargs)


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


class ChatBackend:
    """Base model + adapters behind one lock.

    Args:
        model: base model path or hub id.
        adapters: adapter name -> PEFT adapter folder.
        dtype: torch dtype name, or ``auto`` for the checkpoint's.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        served_model_name: the base model's name in the API (default: ``model`` as given).
        max_model_len: context length; default: the tokenizer's/model's.
        default_max_tokens: tokens to generate when a request gives no ``max_tokens``.
    """

    def __init__(self, model: str, adapters: dict[str, Path] | None = None, dtype: str = "float32",
                 device: str = "auto", served_model_name: str | None = None, max_model_len: int | None = None,
                 default_max_tokens: int = 512):
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
        model_limit = getattr(self._inner_model().config, "max_position_embeddings", None)
        limits = [x for x in (max_model_len, model_limit) if x]
        self.max_model_len = min(limits) if limits else 4096
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()

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

    def _generation_config(self, req: ChatRequest, max_new_tokens: int):
        import copy

        cfg = copy.deepcopy(self.generation_defaults)
        cfg.max_new_tokens = max_new_tokens
        temperature = req.temperature if req.temperature is not None else (cfg.temperature or 1.0)
        if temperature == 0:
            # Greedy; clear sampling knobs so transformers does not warn they are ignored.
            cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
        else:
            cfg.do_sample = True
            cfg.temperature = temperature
            if req.top_p is not None:
                cfg.top_p = req.top_p
        return cfg

    def generate(self, req: ChatRequest) -> dict[str, Any]:
        """Run one request; ``req.model`` must be one of ``names`` (checked by the caller)."""
        import torch

        name = req.model or self.base_name
        # Everything under the lock: set_adapter mutates the model, and a fast tokenizer shared between
        # threads can fail with "Already borrowed".
        with self.lock, torch.inference_mode():
            try:
                inputs = self.tokenizer.apply_chat_template(
                    req.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                    return_tensors="pt", **req.chat_template_kwargs)
            except Exception as err:  # jinja raises for conversations the template rejects
                raise RequestError(400, f"the chat template rejected these messages: {err}",
                                   param="messages") from None
            prompt_len = int(inputs["input_ids"].shape[1])
            room = self.max_model_len - prompt_len
            if room <= 0:
                raise RequestError(400, f"prompt is {prompt_len} tokens; the context limit is "
                                   f"{self.max_model_len}", param="messages", code="context_length_exceeded")
            max_new = min(req.max_tokens or self.default_max_tokens, room)
            cfg = self._generation_config(req, max_new)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            if req.seed is not None:
                torch.manual_seed(req.seed)  # seeds every device
            if name == self.base_name and self.adapter_paths:
                with self.model.disable_adapter():
                    out = self.model.generate(**inputs, generation_config=cfg)
            else:
                if self.adapter_paths:
                    self.model.set_adapter(name)
                out = self.model.generate(**inputs, generation_config=cfg)
            new_tokens = out[0, prompt_len:].tolist()
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        stopped = bool(new_tokens) and new_tokens[-1] in eos
        finish = "length" if len(new_tokens) >= max_new and not stopped else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": len(new_tokens),
                      "total_tokens": prompt_len + len(new_tokens)},
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
                req = parse_chat_request(body)
                if req.model is not None and req.model not in backend.names:
                    raise RequestError(404, f"The model `{req.model}` does not exist; served: "
                                       f"{', '.join(backend.names)}", type_="NotFoundError",
                                       code="model_not_found", param="model")
                self.send_json(200, backend.generate(req))
            except RequestError as err:
                self.send_error_json(err)
            except Exception as err:  # a bug or an OOM: answer 500 and keep serving
                traceback.print_exc(file=sys.stderr)
                self.send_error_json(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                  type_="internal_server_error"))

    Handler.api_key = api_key
    Handler.log_requests = log_requests
    return Handler


def _startup(model: str, adapter: list[str] | None, api_key_env: str | None, dtype: str,
             served_model_name: str | None, max_model_len: int | None, default_max_tokens: int,
             device: str) -> tuple[ChatBackend, str | None]:
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
    if problems:
        raise ServeConfigError("serve: " + "; ".join(problems))
    backend = ChatBackend(model, adapters, dtype=dtype, device=device, served_model_name=served_model_name,
                          max_model_len=max_model_len, default_max_tokens=default_max_tokens)
    return backend, api_key


def start_background(model: str, adapter: list[str] | None = None, host: str = "127.0.0.1", port: int = 0,
                     api_key_env: str | None = None, dtype: str = "float32", device: str = "cpu",
                     served_model_name: str | None = None, max_model_len: int | None = None,
                     default_max_tokens: int = 512) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a daemon thread (port 0 = any free port); returns ``(server, url)``.
    Stop it with ``server.shutdown(); server.server_close()``."""
    backend, api_key = _startup(model, adapter, api_key_env, dtype, served_model_name, max_model_len,
                                default_max_tokens, device)
    server = LocalHTTPServer((host, port), _handler_for(backend, api_key, log_requests=False))
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
        log_requests: log one line per HTTP request to stderr.
    """
    try:
        backend, api_key = _startup(model, adapter, api_key_env, dtype, served_model_name, max_model_len,
                                    default_max_tokens, device)
    except ServeConfigError as err:
        raise SystemExit(f"error: {err}") from None  # one line, whichever entry point ran us
    try:
        server = LocalHTTPServer((host, port), _handler_for(backend, api_key, log_requests))
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
