"""``serve``'s ``ignore_eos`` request field (vLLM's): exactly ``max_tokens`` new tokens, for benchmarks."""

from __future__ import annotations

import pytest
import torch

from refusal_lightning.serving.backend import ChatBackend
from refusal_lightning.serving.http_json import RequestError
from refusal_lightning.serving.request import parse_chat_request

USER = [{"role": "user", "content": "Write the placeholder request 1 about placeholder personal insult."}]


def test_ignore_eos_is_parsed_and_validated():
    assert parse_chat_request({"messages": USER}).ignore_eos is False
    assert parse_chat_request({"messages": USER, "ignore_eos": True}).ignore_eos is True
    with pytest.raises(RequestError, match="ignore_eos") as err:
        parse_chat_request({"messages": USER, "ignore_eos": "yes"})
    assert err.value.status == 400


@pytest.fixture(scope="module")
def eos_backend(tiny_model_dir):
    """The tiny model made to say EOS at every step (its head's EOS logit is forced to the top)."""
    backend = ChatBackend(str(tiny_model_dir), device="cpu", max_batch_size=4, batch_wait_ms=0)
    eos = torch.tensor([min(backend.eos_ids)])
    backend.model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, eos, 1e4))
    yield backend
    backend.close()


def _finish(reply: dict) -> tuple[str, int]:
    return reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]


def test_ignore_eos_generates_every_token_and_leaves_other_rows_alone(eos_backend):
    def job(ignore: bool, max_tokens: int):
        body = {"messages": USER, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore}
        return eos_backend._prepare(parse_chat_request(body))

    assert _finish(eos_backend.generate(parse_chat_request({"messages": USER, "max_tokens": 9,
                                                            "temperature": 0}))) == ("stop", 1)
    assert _finish(eos_backend.generate(parse_chat_request({"messages": USER, "max_tokens": 9, "temperature": 0,
                                                            "ignore_eos": True}))) == ("length", 9)
    # In one batch: the ignore_eos row runs to its budget, the other still stops at its EOS.
    replies = eos_backend._generate_batch([job(True, 7), job(False, 7)])
    assert [_finish(r) for r in replies] == [("length", 7), ("stop", 1)]
