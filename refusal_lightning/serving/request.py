"""What ``serve`` accepts: a ``/v1/chat/completions`` body validated into a ``ChatRequest``.

Pure (no model, no torch): every check raises ``RequestError(400, ...)`` naming the offending field,
as OpenAI and vLLM do, and is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refusal_lightning.serving.http_json import RequestError

# Most tokens one request may ask for (vLLM answers 400 past the context; we also cap below it, so one
# request cannot hold the batch worker for a whole context of decoding).
DEFAULT_MAX_TOKENS_LIMIT = 4096
# Keyword arguments of apply_chat_template that a request must not override via chat_template_kwargs.
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize", "return_tensors", "return_dict",
                                      "add_generation_prompt", "continue_final_message", "padding",
                                      "truncation", "max_length", "tokenizer_kwargs"})


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
