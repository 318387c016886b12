"""``serve``: OpenAI-compatible API over the tiny Qwen3 model and two LoRA adapters made in-test."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from conftest import make_random_adapter

from refusal_lightning.serve import (
    RequestError,
    ServeConfigError,
    parse_chat_request,
    serve,
    start_background,
)

REPO = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Write the placeholder request 1 about placeholder personal insult."}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_random_adapter(tiny_model_dir, root / name, seed)
            for seed, name in enumerate(("alpha", "beta"))}


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    srv, url = start_background(str(tiny_model_dir), adapter=[f"{n}={p}" for n, p in adapters.items()],
                                served_model_name="base")
    yield url
    srv.shutdown()
    srv.server_close()


def chat(url: str, **body) -> requests.Response:
    body = {"model": "base", "messages": USER, "max_tokens": 12, "temperature": 0, **body}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_request_validation_without_a_model():
    parts = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    req = parse_chat_request({"model": "m", "messages": [{"role": "developer", "content": parts}, *USER],
                              "max_completion_tokens": 5, "temperature": 0, "seed": 3,
                              "chat_template_kwargs": {"enable_thinking": False}})
    assert req.messages[0] == {"role": "system", "content": "be brief"}
    assert (req.max_tokens, req.temperature, req.seed) == (5, 0, 3)
    bad = [({"messages": USER, "stream": True}, "stream"), ({"messages": []}, "messages"),
           ({"messages": [{"role": "robot", "content": "x"}]}, "role"), ({"messages": USER, "n": 2}, "n=1"),
           ({"messages": USER, "temperature": "hot"}, "temperature"),
           ({"messages": USER, "max_tokens": 0}, "max_tokens"),
           ({"messages": USER, "top_p": 0}, "top_p"), ({"messages": USER, "seed": 1.5}, "seed"),
           ({"messages": USER, "chat_template_kwargs": {"tokenize": False}}, "tokenize")]
    for body, word in bad:
        with pytest.raises(RequestError, match=word) as info:
            parse_chat_request(body)
        assert info.value.status == 400


def test_models_lists_base_and_adapters(server, adapters):
    data = requests.get(f"{server}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == ["base", "alpha", "beta"]
    assert data[1]["parent"] == "base" and data[1]["root"] == str(adapters["alpha"])


def test_openai_client_lists_models_and_chats(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]
    reply = client.chat.completions.create(model="alpha", messages=USER, max_tokens=8, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.model == "alpha" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 8


def text_of(response: requests.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def test_model_field_selects_adapter_and_greedy_is_deterministic(server):
    texts = {m: text_of(chat(server, model=m)) for m in ("base", "alpha", "beta")}
    assert len(set(texts.values())) == 3, texts
    assert text_of(chat(server, model="alpha")) == texts["alpha"]
    # base again after an adapter: the adapter is switched off, not left on
    assert text_of(chat(server, model="base")) == texts["base"]


def test_seed_and_sampling(server):
    def sample(seed):
        return text_of(chat(server, model="beta", temperature=1.0, top_p=0.95, seed=seed, max_tokens=16))

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_concurrent_requests_match_sequential_ones(server):
    expected = {m: text_of(chat(server, model=m)) for m in ("base", "alpha", "beta")}
    results: list[tuple[str, str]] = []

    def worker(model: str) -> None:
        results.append((model, text_of(chat(server, model=model))))

    threads = [threading.Thread(target=worker, args=(m,)) for m in ["base", "alpha", "beta"] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 9 and all(text == expected[m] for m, text in results)


def test_enable_thinking_is_passed_to_the_chat_template(server):
    off = chat(server, chat_template_kwargs={"enable_thinking": False}).json()["usage"]["prompt_tokens"]
    on = chat(server, chat_template_kwargs={"enable_thinking": True}).json()["usage"]["prompt_tokens"]
    assert off > on  # the empty <think></think> block of non-thinking mode


def test_max_tokens_is_honoured(server):
    body = chat(server, max_tokens=3).json()
    assert body["usage"]["completion_tokens"] <= 3


def test_errors_are_openai_shaped(server):
    r = chat(server, model="nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = chat(server, stream=True)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    assert set(r.json()["error"]) >= {"message", "type", "code"}
    r = requests.post(f"{server}/v1/chat/completions", data=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = chat(server, messages=[{"role": "user", "content": "x " * 5000}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert requests.get(f"{server}/v1/nothing", timeout=10).status_code == 404


def test_api_key_required_when_configured(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", "serve-secret")
    srv, url = start_background(str(tiny_model_dir), api_key_env="SERVE_TEST_KEY")
    try:
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
        r = requests.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                          headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = requests.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                          headers={"Authorization": "Bearer serve-secret"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == str(tiny_model_dir)
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_adapter_dirs_fail_at_startup_with_one_line(tiny_model_dir, tmp_path, monkeypatch):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(ServeConfigError) as info:
        start_background(str(tiny_model_dir), adapter=[f"x={empty}", f"y={tmp_path / 'missing'}"],
                         dtype="fp7")
    message = str(info.value)
    assert "\n" not in message and "adapter_config.json" in message
    assert "missing" in message and "fp7" in message
    monkeypatch.delenv("UNSET_KEY_VAR", raising=False)
    with pytest.raises(SystemExit) as info:
        serve(str(tiny_model_dir), adapter=[f"x={empty}"], api_key_env="UNSET_KEY_VAR")
    assert str(info.value).startswith("error: serve: ") and "UNSET_KEY_VAR" in str(info.value)


def test_serve_command_prints_ready_line(tiny_model_dir, adapters):
    command = [sys.executable, "-m", "refusal_lightning", "serve", "--model", str(tiny_model_dir),
               "--adapter", f"alpha={adapters['alpha']}", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith(f"serving {tiny_model_dir}, alpha on http://127.0.0.1:"), line
        url = line.rsplit(" on ", 1)[1]
        assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]] == [
            str(tiny_model_dir), "alpha"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        proc.stdout.close()
