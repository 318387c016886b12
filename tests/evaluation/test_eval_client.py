"""The chat client: endpoint parsing, retry policy, and behaviour against injected faults."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from refusal_lightning.evaluation.client import (
    AuthError,
    ChatClient,
    Endpoint,
    EndpointError,
    GenerationSettings,
    RetryPolicy,
    _retry_after_seconds,
    parse_endpoint,
    redact_url,
    resolve_model,
)
from refusal_lightning.evaluation.stub_server import StubConfig, request_key, start_stub

FAST = RetryPolicy(max_attempts=3, timeout=1.0, backoff_base=0.01, backoff_max=0.05)


@pytest.fixture
def stub(request):
    config = getattr(request, "param", None) or StubConfig()
    server, url, log = start_stub(config)
    yield url, log, config
    server.shutdown()
    server.server_close()


def _payload(prompt: str, model: str = "stub", seed: int = 0) -> dict:
    return GenerationSettings(seed=seed, max_tokens=8).payload(model, [{"role": "user", "content": prompt}])


def test_parse_endpoint_accepts_root_or_v1_and_a_model():
    assert parse_endpoint("base=http://127.0.0.1:8000") == Endpoint("base", "http://127.0.0.1:8000/v1")
    assert parse_endpoint("a=http://h:1/v1/#org/model-x") == Endpoint("a", "http://h:1/v1", "org/model-x")
    assert parse_endpoint(" b = https://api.example.com/v1 ").base_url == "https://api.example.com/v1"
    for bad in ("nourl", "=http://h", "a=", "a=ftp://h"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_urls_are_shown_without_credentials():
    assert redact_url("https://user:pw@host:8443/v1?key=k") == "https://host:8443/v1"
    client = ChatClient("https://user:pw@host/v1")
    assert "pw" not in repr(client) and client.base_url == "https://user:pw@host/v1"


def test_settings_payload():
    body = GenerationSettings(temperature=0.7, seed=3, max_tokens=16).payload("m", [], sample=2)
    assert body["seed"] == 5 and body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "top_p" not in body and body["stream"] is False
    body = GenerationSettings(seed=None, top_p=0.9, disable_thinking=False).payload("m", [])
    assert "seed" not in body and "chat_template_kwargs" not in body and body["top_p"] == 0.9


def test_backoff_is_exponential_jittered_and_respects_retry_after():
    policy = RetryPolicy(backoff_base=1.0, backoff_max=8.0, max_retry_after=5.0)
    rng = random.Random(0)
    for attempt, expo in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 8.0)):
        delays = [policy.delay(attempt, None, rng) for _ in range(50)]
        assert all(expo / 2 <= d <= expo for d in delays) and len(set(delays)) > 1
    assert policy.delay(1, 3.0, rng) >= 3.0
    assert policy.delay(1, 100.0, rng) == 5.0  # capped
    assert _retry_after_seconds("2") == 2.0
    assert _retry_after_seconds("0.25") == 0.25
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= _retry_after_seconds(future) <= 31
    assert _retry_after_seconds("soon") is None and _retry_after_seconds(None) is None


@pytest.mark.parametrize("fault", ["500", "429", "slow", "drop", "malformed"])
def test_transient_faults_are_retried_once_then_succeed(fault):
    config = StubConfig(fault=lambda key, attempt: fault if attempt == 1 else None, slow_s=2.0,
                        retry_after="0.3")
    server, url, log = start_stub(config)
    try:
        client = ChatClient(url, retry=FAST)
        result = client.chat(_payload("placeholder"))
        assert result.ok and result.attempts == 2 and result.content
        times = [r["t"] for r in log.requests if r["path"] == "/v1/chat/completions"]
        assert len(times) == 2
        if fault == "429":
            assert times[1] - times[0] >= 0.3  # Retry-After honoured over the 10 ms backoff
    finally:
        server.shutdown()
        server.server_close()


def test_persistent_failure_is_returned_as_an_error_after_the_cap(stub):
    url, log, config = stub
    config.fault = lambda key, attempt: "500"
    result = ChatClient(url, retry=FAST).chat(_payload("placeholder"))
    assert not result.ok and result.attempts == 3
    assert result.error["type"] == "http_500" and "gave up after 3 attempts" in result.error["message"]
    assert sum(log.counts().values()) == 3


def test_bad_request_is_not_retried(stub):
    url, log, config = stub
    config.fault = lambda key, attempt: "400"
    result = ChatClient(url, retry=FAST).chat(_payload("placeholder"))
    assert result.error["type"] == "http_400" and result.attempts == 1
    assert "prompt too long" in result.error["message"]


def test_401_raises_at_once_without_retry_or_leaking_the_key(stub):
    url, log, config = stub
    config.api_key = "right-key"
    client = ChatClient(url, api_key="sk-wrong-SECRET-4242", retry=FAST, name="ep", key_source="MY_KEY_ENV")
    start = time.perf_counter()
    with pytest.raises(AuthError) as info:
        client.chat(_payload("placeholder"))
    assert time.perf_counter() - start < 2.0
    assert sum(log.counts().values()) == 1
    message = str(info.value)
    assert "401" in message and "MY_KEY_ENV" in message and "SECRET" not in message
    assert "SECRET" not in repr(client)
    with pytest.raises(AuthError):
        client.list_models()


def test_unknown_model_is_an_endpoint_error(stub):
    url, _, _ = stub
    with pytest.raises(EndpointError, match="does not exist"):
        ChatClient(url, retry=FAST).chat(_payload("placeholder", model="nope"))


def test_model_resolution(stub):
    url, _, config = stub
    client = ChatClient(url, retry=FAST)
    assert resolve_model(client, Endpoint("e", client.base_url)) == "stub"
    assert resolve_model(client, Endpoint("e", client.base_url, "given")) == "given"
    config.models = ["base", "attack"]
    with pytest.raises(EndpointError, match=r"lists 2 models \(base, attack\).*e=URL#MODEL"):
        resolve_model(client, Endpoint("e", client.base_url))


def test_unreachable_server_is_a_connection_error():
    retry = RetryPolicy(max_attempts=2, timeout=0.5, backoff_base=0.01)
    client = ChatClient("http://127.0.0.1:9", retry=retry)
    result = client.chat(_payload("placeholder"))
    assert result.error["type"] == "connection" and result.attempts == 2
    with pytest.raises(EndpointError, match="cannot list models"):
        client.list_models()


def test_one_pooled_session_per_thread(stub):
    url, log, _ = stub
    client = ChatClient(url, retry=FAST)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: client.chat(_payload(f"p{i}", seed=i)), range(40)))
    assert all(r.ok for r in results)
    assert 1 <= len(client._sessions) <= 4
    assert log.counts()[request_key("stub", "p7", 7)] == 1
    client.close()
    assert client._sessions == []


def test_unset_key_variable_is_named_as_missing_not_as_a_wrong_key(stub):
    url, log, config = stub
    config.api_key = "right-key"
    client = ChatClient(url, api_key=None, retry=FAST, name="ep", key_source="MY_UNSET_KEY_ENV")
    with pytest.raises(AuthError) as info:
        client.chat(_payload("placeholder"))
    message = str(info.value)
    assert message.startswith("endpoint ep: $MY_UNSET_KEY_ENV is not set, so no API key was sent"), message
    assert "key from" not in message and sum(log.counts().values()) == 1
