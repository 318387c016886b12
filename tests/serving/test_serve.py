"""``serve``: OpenAI-compatible API over the tiny Qwen3 model and two LoRA adapters made in-test."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import make_random_adapter

from refusal_lightning.serving.http_json import RequestError
from refusal_lightning.serving.request import parse_chat_request
from refusal_lightning.serving.server import ServeConfigError, serve, start_background

REPO = Path(__file__).resolve().parents[2]
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
    import hmac

    compared = []
    real_compare = hmac.compare_digest

    def spy(a, b):  # the key check must go through the constant-time comparison
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
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
        assert (b"Bearer wrong", b"Bearer serve-secret") in compared
        assert (b"Bearer serve-secret", b"Bearer serve-secret") in compared
    finally:
        srv.shutdown()
        srv.server_close()


def test_binds_loopback_by_default(tiny_model_dir):
    import inspect

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    srv, url = start_background(str(tiny_model_dir))
    try:
        assert srv.server_address[0] == "127.0.0.1" and url.startswith("http://127.0.0.1:")
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_model_path_under_home_loads_model_and_tokenizer(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    srv, url = start_background("~/models/tiny")  # quoted in a shell or a YAML file: no shell expands it
    try:
        assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "~/models/tiny"
    finally:
        srv.shutdown()
        srv.server_close()


def test_oversized_body_is_refused_before_it_is_read(server):
    import socket

    from refusal_lightning.serving.http_json import MAX_BODY_BYTES

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        # Only the headers are sent: the 413 must come without the server waiting for 16 MiB.
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        status_line = sock.makefile("rb").readline().decode()
    assert " 413 " in status_line, status_line


def test_max_tokens_is_capped(server, tiny_model_dir):
    from refusal_lightning.serving.request import DEFAULT_MAX_TOKENS_LIMIT

    r = chat(server, max_tokens=DEFAULT_MAX_TOKENS_LIMIT + 1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert str(DEFAULT_MAX_TOKENS_LIMIT) in r.json()["error"]["message"]
    assert parse_chat_request({"messages": USER, "max_tokens": 64}, max_tokens_limit=64).max_tokens == 64
    with pytest.raises(RequestError, match="max_tokens"):
        parse_chat_request({"messages": USER, "max_completion_tokens": 65}, max_tokens_limit=64)
    with pytest.raises(ServeConfigError, match="max_tokens_limit"):
        start_background(str(tiny_model_dir), default_max_tokens=512, max_tokens_limit=100)


def test_model_field_never_becomes_a_path(server, adapters, tiny_model_dir, tmp_path):
    # Only names registered at startup select a model: a served adapter's folder, another valid adapter
    # folder, a relative path or a traversal is an unknown model (404), and nothing new is loaded.
    gamma = make_random_adapter(tiny_model_dir, tmp_path / "gamma", seed=5)
    for model in (str(adapters["alpha"]), str(gamma), "../alpha", "alpha/../beta", "/etc/passwd"):
        r = chat(server, model=model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", model
    listed = [m["id"] for m in requests.get(f"{server}/v1/models", timeout=10).json()["data"]]
    assert listed == ["base", "alpha", "beta"]


def test_bad_adapter_dirs_fail_at_startup_with_one_line(tiny_model_dir, tmp_path, monkeypatch):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(ServeConfigError) as info:
        start_background(str(tiny_model_dir), adapter=[f"x={empty}", f"y={tmp_path / 'missing'}"],
                         dtype="fp7")
    message = str(info.value)
    assert "\n" not in message and "adapter_config.json" in message
    assert "missing" in message and "fp7" in message
    weights = empty / "adapter_model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ServeConfigError, match=r"a file \(adapter_model.safetensors\), not an adapter folder"):
        start_background(str(tiny_model_dir), adapter=[f"x={weights}"])
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


# ---------------------------------------------------------------------------------------------------
# Batching: concurrent requests share generate calls, and greedy answers do not change


@pytest.fixture(scope="module")
def one_at_a_time(tiny_model_dir, adapters):
    srv, url = start_background(str(tiny_model_dir), adapter=[f"{n}={p}" for n, p in adapters.items()],
                                served_model_name="base", max_batch_size=1)
    yield srv, url
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def batching(tiny_model_dir, adapters):
    # A long wait so that requests sent at once on a busy 2-core machine still meet in one batch.
    srv, url = start_background(str(tiny_model_dir), adapter=[f"{n}={p}" for n, p in adapters.items()],
                                served_model_name="base", max_batch_size=16, batch_wait_ms=100)
    yield srv, url
    srv.shutdown()
    srv.server_close()


def varied_requests(models: list[str]) -> list[dict]:
    """Prompts of different lengths (so rows are left-padded differently) and different max_tokens."""
    return [{"model": model, "max_tokens": 4 + 5 * i,
             "messages": [{"role": "user", "content": f"Write the placeholder request {i} about "
                                                      + "placeholder insult " * (3 * i)}]}
            for i, model in enumerate(models)]


def all_at_once(url: str, bodies: list[dict]) -> list[requests.Response]:
    barrier = threading.Barrier(len(bodies))

    def send(body: dict) -> requests.Response:
        barrier.wait()
        return chat(url, **body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def answer(response: requests.Response) -> tuple:
    assert response.status_code == 200, response.text
    body = response.json()
    return text_of(response), body["choices"][0]["finish_reason"], body["usage"]


def test_concurrent_greedy_requests_are_batched_and_answer_as_alone(batching, one_at_a_time):
    # An adapter, not the base: the tiny base answers every prompt with newlines, which would hide
    # a padding bug (alpha's answers differ when the attention mask is dropped).
    srv, url = batching
    bodies = varied_requests(["alpha"] * 8)
    expected = [answer(chat(one_at_a_time[1], **body)) for body in bodies]
    assert set(one_at_a_time[0].backend.recent_batches) == {("alpha", 1)}
    srv.backend.recent_batches.clear()
    got = [answer(r) for r in all_at_once(url, bodies)]
    assert max(size for _, size in srv.backend.recent_batches) > 1, srv.backend.recent_batches
    assert got == expected
    texts = sorted((text for text, _, _ in expected), key=len)
    assert any(not long.startswith(short) for short, long in itertools.pairwise(texts))


def test_two_adapters_in_flight_each_get_their_own_answer(batching, one_at_a_time):
    srv, url = batching
    bodies = varied_requests(["alpha", "beta"] * 4)
    expected = [answer(chat(one_at_a_time[1], **body)) for body in bodies]
    srv.backend.recent_batches.clear()
    responses = all_at_once(url, bodies)
    assert [r.json()["model"] for r in responses] == [body["model"] for body in bodies]
    assert [answer(r) for r in responses] == expected
    batches = list(srv.backend.recent_batches)
    assert {name for name, _ in batches} == {"alpha", "beta"} and sum(n for _, n in batches) == 8
    assert max(n for _, n in batches) > 1, batches


def test_a_failed_batch_answers_500_to_its_requests_only(batching, monkeypatch):
    srv, url = batching
    real = srv.backend._generate_batch

    def failing(batch):
        if batch[0].name == "alpha":
            raise RuntimeError("injected batch failure")
        return real(batch)

    monkeypatch.setattr(srv.backend, "_generate_batch", failing)
    responses = all_at_once(url, varied_requests(["alpha", "beta"] * 2))
    assert [r.status_code for r in responses] == [500, 200, 500, 200]
    assert "injected batch failure" in responses[0].json()["error"]["message"]
    monkeypatch.undo()
    assert chat(url, model="alpha").status_code == 200  # the worker kept serving


def test_batching_arguments_are_validated(tiny_model_dir):
    with pytest.raises(ServeConfigError, match="max_batch_size.*batch_wait_ms"):
        start_background(str(tiny_model_dir), max_batch_size=0, batch_wait_ms=-1)


def test_each_row_of_a_batch_ends_at_its_own_eos_and_max_tokens(batching, monkeypatch):
    import torch

    backend = batching[0].backend
    eos = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = backend.tokenizer.encode(" placeholder")[0]
    calls = []

    def scripted_generate(input_ids, attention_mask, generation_config, stopping_criteria):
        # Left-padded rows (the shorter prompts) say EOS as their third token; the full row never does.
        calls.append((generation_config.max_new_tokens, stopping_criteria))
        new = torch.full((len(input_ids), 8), word)
        new[attention_mask[:, 0] == 0, 2] = eos
        new[attention_mask[:, 0] == 0, 3:] = backend.pad_token_id
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(backend.model, "generate", scripted_generate)
    short = [{"role": "user", "content": "hi"}]
    jobs = [backend._prepare(parse_chat_request({"model": "alpha", "messages": messages, "max_tokens": n}))
            for messages, n in ((short, 6), (USER, 3), (short, 2))]
    replies = backend._generate_batch(jobs)
    assert calls[0][0] == 6 and calls[0][1] is not None  # the batch runs to the largest budget
    finishes = [(r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"]) for r in replies]
    assert finishes == [("stop", 3), ("length", 3), ("length", 2)]
    assert [r["usage"]["prompt_tokens"] for r in replies] == [len(job.prompt_ids) for job in jobs]
    assert len(jobs[0].prompt_ids) < len(jobs[1].prompt_ids)


def test_seeded_samples_run_alone_and_unseeded_ones_share_a_batch(batching, one_at_a_time):
    srv, url = batching
    sampled = {"model": "beta", "temperature": 1.0, "top_p": 0.95, "max_tokens": 16}
    seeded = [{**sampled, "seed": seed} for seed in range(4)]
    expected = [text_of(chat(one_at_a_time[1], **body)) for body in seeded]
    srv.backend.recent_batches.clear()
    responses = all_at_once(url, [*seeded, *[sampled] * 4])
    assert all(r.status_code == 200 for r in responses)
    assert [text_of(r) for r in responses[:4]] == expected  # a seed means the same answer under load
    sizes = sorted(n for _, n in srv.backend.recent_batches)
    assert sizes[:4] == [1, 1, 1, 1] and sizes[-1] > 1, sizes
