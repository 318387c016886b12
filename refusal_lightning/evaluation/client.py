"""A small client for OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions`` endpoints (our
``serve``, vLLM, ...).

Why not the ``openai`` package: we need per-item control of retries (which errors, how often, how
long), an auth failure that stops an endpoint at once, and the attempt count recorded per item;
``requests`` with one pooled ``Session`` per worker thread gives that in a page of code.

The API key is read from an environment variable by the caller and held only in the request
headers; it is never part of an error message, a record or a log line.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from refusal_lightning.specs import split_spec

RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))


class AuthError(RuntimeError):
    """HTTP 401/403: the key is missing or wrong. Never retried; the endpoint is abandoned."""


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all (bad URL, unknown model, no model to pick)."""


@dataclass(frozen=True)
class Endpoint:
    """A named endpoint: ``base_url`` always ends in ``/v1``; ``model`` None means ask ``/v1/models``."""

    name: str
    base_url: str
    model: str | None = None


def redact_url(url: str) -> str:
    """The URL without user:password@ or a query string, for messages and summaries."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def normalize_base_url(url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all -> ``http://h:8000/v1``."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def parse_endpoint(spec: str) -> Endpoint:
    """Parse ``NAME=URL`` or ``NAME=URL#MODEL`` (URL = server root or its ``/v1``)."""
    name, rest = split_spec(spec)
    if not name or not rest:
        raise ValueError(f"endpoint {spec!r}: expected NAME=URL or NAME=URL#MODEL")
    url, _, model = rest.partition("#")
    return Endpoint(name=name, base_url=normalize_base_url(url), model=model.strip() or None)


def parse_endpoints(specs: Sequence[str] | None, model_name: Sequence[str] | None,
                    problems: list[str]) -> list[Endpoint]:
    """``--endpoint`` specs (unique names) with ``--model_name`` applied; problems are collected.

    ``--model_name NAME=MODEL`` sets one endpoint's model; a bare ``MODEL`` sets every endpoint that
    names none. ``NAME=URL#MODEL`` in ``--endpoint`` wins over both."""
    endpoints: list[Endpoint] = []
    if not specs:
        problems.append("no --endpoint given (NAME=URL, repeatable)")
    for spec in specs or []:
        try:
            endpoints.append(parse_endpoint(spec))
        except ValueError as err:
            problems.append(str(err))
    dupes = [n for n, c in Counter(e.name for e in endpoints).items() if c > 1]
    if dupes:
        problems.append(f"endpoint names must be unique; repeated: {', '.join(dupes)}")
    names = {e.name for e in endpoints}
    per_name: dict[str, str] = {}
    default: str | None = None
    for entry in model_name or []:
        name, model = split_spec(entry)
        if name is None:
            default = model
        elif name in names:
            per_name[name] = model
        else:
            problems.append(f"--model_name {entry}: no endpoint named {name!r}")
    return [e if e.model else Endpoint(e.name, e.base_url, per_name.get(e.name, default)) for e in endpoints]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one request.

    Attributes:
        max_attempts: attempts per request, the first included. 429, 5xx, timeouts, dropped connections and
            malformed replies are retried with exponential backoff and jitter, honouring ``Retry-After``;
            401/403 are not retried.
        timeout: seconds to wait for a response before the attempt counts as failed.
        backoff_base: seconds before the second attempt; the delay doubles per attempt.
        backoff_max: ceiling of the exponential delay, in seconds.
        max_retry_after: ceiling on a server's ``Retry-After`` wish, so one header cannot stall a run.
    """

    max_attempts: int = 5
    timeout: float = 120.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based).

        Exponential with "equal jitter" (half fixed, half random) so concurrent workers that failed
        together do not retry together; never shorter than the server's ``Retry-After``.
        """
        expo = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        jittered = expo / 2 + rng.uniform(0, expo / 2)
        if retry_after is not None:
            return max(min(retry_after, self.max_retry_after), jittered)
        return jittered

    def problems(self) -> list[str]:
        """What is wrong with this policy, in ``evaluate``'s flag names (empty when nothing)."""
        checks = [(self.max_attempts >= 1, "--retry.max_attempts must be >= 1"),
                  (self.backoff_base >= 0, "--retry.backoff_base must be >= 0"),
                  (self.backoff_max >= 0, "--retry.backoff_max must be >= 0"),
                  (self.max_retry_after >= 0, "--retry.max_retry_after must be >= 0"),
                  (self.timeout > 0, "--retry.timeout must be > 0")]
        return [msg for ok, msg in checks if not ok]


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings sent with every request.

    Attributes:
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass; None leaves it to the server.
        max_tokens: cap on generated tokens per response.
        seed: base seed; sample ``i`` of a prompt is sent ``seed + i`` so samples differ but reruns match
            (None sends no seed).
        disable_thinking: send ``chat_template_kwargs: {enable_thinking: false}`` (Qwen3's non-thinking
            mode); turn off for servers that reject unknown fields. ``<think>`` blocks are stripped
            before judging either way.
    """

    temperature: float = 0.7
    top_p: float | None = None
    max_tokens: int = 1024
    seed: int | None = 0
    disable_thinking: bool = True

    def payload(self, model: str, messages: list[dict[str, str]], sample: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": self.temperature,
                                "max_tokens": self.max_tokens, "stream": False}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed + sample
        if self.disable_thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        return body

    def problems(self) -> list[str]:
        """What is wrong with these settings, in ``evaluate``'s flag names (empty when nothing)."""
        checks = [(self.max_tokens >= 1, "--generation.max_tokens must be >= 1"),
                  (self.temperature >= 0, "--generation.temperature must be >= 0"),
                  (self.top_p is None or 0 < self.top_p <= 1, "--generation.top_p must be in (0, 1]")]
        return [msg for ok, msg in checks if not ok]


@dataclass
class ChatResult:
    """Outcome of one chat request after retries: ``content`` on success, else ``error``."""

    content: str | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    served_model: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number (integer per RFC 9110; floats tolerated) or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(resp: requests.Response) -> str:
    """The server's error text (OpenAI ``{"error": {"message"}}`` or raw body), shortened."""
    try:
        body = resp.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message", ""))[:300]
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:300]
    except ValueError:
        pass
    return resp.text[:300]


@dataclass
class _Outcome:
    data: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0


class ChatClient:
    """Thread-safe client for one endpoint; each worker thread gets its own pooled ``Session``.

    Args:
        base_url: the endpoint's ``.../v1`` URL.
        api_key: Bearer token, or None to send no ``Authorization`` header.
        retry: retry policy.
        name: endpoint name used in messages.
        key_source: where the key came from (an env var name), quoted in auth errors instead of the key.
        sleep: injectable for tests.
        seed: seed of the backoff jitter.
    """

    def __init__(self, base_url: str, api_key: str | None = None, retry: RetryPolicy | None = None,
                 name: str = "endpoint", key_source: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
        self.base_url = normalize_base_url(base_url)
        self.display_url = redact_url(self.base_url)  # for messages: no credentials in URLs either
        self.name = name
        self.retry = retry or RetryPolicy()
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._key_sent = bool(api_key)
        self._key_source = key_source
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:  # the default would be harmless, but say explicitly what is shown
        return f"ChatClient(name={self.name!r}, base_url={self.display_url!r})"

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # One connection per thread, kept alive; retries are ours, not urllib3's.
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers.update(self._headers)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        self._local = threading.local()

    def _auth_error(self, status: int) -> AuthError:
        if not self._key_sent and self._key_source:
            # The cause is the unset variable, not a wrong key: lead with it.
            return AuthError(f"endpoint {self.name}: ${self._key_source} is not set, so no API key was sent, "
                             f"and {self.display_url} requires one (HTTP {status}); export it, or name the "
                             "variable that holds the key (--api_key_env / --judge.api_key_env)")
        where = " (no API key was sent)" if not self._key_sent else (
            f" (key from ${self._key_source})" if self._key_source else "")
        return AuthError(f"endpoint {self.name}: HTTP {status} from {self.display_url}: authentication "
                         f"failed{where}; not retried")

    def _backoff(self, attempt: int, retry_after: float | None) -> None:
        with self._rng_lock:
            delay = self.retry.delay(attempt, retry_after, self._rng)
        self._sleep(delay)

    def _call(self, method: str, path: str, payload: dict | None,
              parse: Callable[[Any], Any]) -> _Outcome:
        """One logical request with retries. ``parse`` turns the JSON body into the result or raises
        ``KeyError``/``TypeError``/``ValueError``/``IndexError`` for a malformed reply (then retried)."""
        url = self.base_url + path
        error: dict[str, Any] | None = None
        attempt = 0
        for attempt in range(1, self.retry.max_attempts + 1):
            retry_after = None
            try:
                resp = self._session().request(method, url, json=payload, timeout=self.retry.timeout)
            except requests.Timeout:
                error = {"type": "timeout", "message": f"no response within {self.retry.timeout:g} s"}
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema) as err:
                raise EndpointError(f"endpoint {self.name}: bad URL {redact_url(url)}: {err}") from None
            except requests.RequestException as err:
                error = {"type": "connection", "message": f"{type(err).__name__}: {str(err)[:200]}"}
            else:
                status = resp.status_code
                if status in (401, 403):
                    raise self._auth_error(status)
                if status == 404:
                    raise EndpointError(f"endpoint {self.name}: HTTP 404 from {redact_url(url)}: "
                                        f"{_error_message(resp)}")
                if status in RETRYABLE_STATUS:
                    retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
                    error = {"type": f"http_{status}", "status": status, "message": _error_message(resp)}
                elif status != 200:
                    # Other 4xx say the request itself is wrong (too long, bad field): retrying repeats it.
                    return _Outcome(error={"type": f"http_{status}", "status": status,
                                           "message": _error_message(resp)}, attempts=attempt)
                else:
                    try:
                        return _Outcome(data=parse(resp.json()), attempts=attempt)
                    except (ValueError, KeyError, TypeError, IndexError) as err:
                        error = {"type": "malformed", "message": f"unusable JSON reply: {str(err)[:200]}"}
            if attempt < self.retry.max_attempts:
                self._backoff(attempt, retry_after)
        assert error is not None
        error["message"] = f"{error['message']} (gave up after {attempt} attempts)"
        return _Outcome(error=error, attempts=attempt)

    def list_models(self) -> list[str]:
        """Model ids from ``GET /v1/models``."""
        outcome = self._call("GET", "/models", None, lambda body: [str(m["id"]) for m in body["data"]])
        if outcome.error is not None:
            raise EndpointError(f"endpoint {self.name}: cannot list models at {self.display_url}/models: "
                                f"{outcome.error['message']}")
        return outcome.data

    def chat(self, payload: dict[str, Any]) -> ChatResult:
        """POST ``/v1/chat/completions``; errors come back in the result, except ``AuthError`` and
        ``EndpointError`` which are raised because no other request to this endpoint can succeed."""
        return self._generate("/chat/completions", payload, lambda choice: choice["message"].get("content"))

    def complete(self, payload: dict[str, Any]) -> ChatResult:
        """POST ``/v1/completions`` (a raw prompt, no chat template: how SORRY-Bench's judge is prompted);
        errors as in ``chat``."""
        return self._generate("/completions", payload, lambda choice: choice["text"])

    def _generate(self, path: str, payload: dict[str, Any], text_of: Callable[[dict], Any]) -> ChatResult:
        def parse(body: Any) -> tuple[str, str | None, dict | None, str | None]:
            choice = body["choices"][0]
            content = text_of(choice)
            if content is not None and not isinstance(content, str):
                raise TypeError(f"the reply's text is {type(content).__name__}")
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
            # content None happens (e.g. a reasoning parser that got only thinking): an empty answer.
            return content or "", choice.get("finish_reason"), usage, body.get("model")

        start = time.perf_counter()
        outcome = self._call("POST", path, payload, parse)
        latency = time.perf_counter() - start
        if outcome.error is not None:
            return ChatResult(error=outcome.error, attempts=outcome.attempts, latency_s=latency)
        content, finish, usage, served = outcome.data
        return ChatResult(content=content, attempts=outcome.attempts, latency_s=latency,
                          finish_reason=finish, usage=usage, served_model=served)


def resolve_model(client: ChatClient, endpoint: Endpoint) -> str:
    """The model to request: the one named in the endpoint spec, else the only one the server lists."""
    if endpoint.model:
        return endpoint.model
    models = client.list_models()
    if len(models) == 1:
        return models[0]
    if not models:
        raise EndpointError(f"endpoint {endpoint.name}: {client.display_url}/models lists no models")
    raise EndpointError(
        f"endpoint {endpoint.name}: {client.display_url}/models lists {len(models)} models "
        f"({', '.join(models)}); pick one with {endpoint.name}=URL#MODEL "
        f"or --model_name {endpoint.name}=MODEL"
    )

