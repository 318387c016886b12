"""The chunked LM-head cross-entropy equals the full-logits loss: the function, and the LightningModule."""

from __future__ import annotations

import pytest
import torch

from refusal_lightning.train import chunked_loss
from refusal_lightning.train.chunked_loss import (
    linear_cross_entropy,
    next_token_loss,
    next_token_loss_and_hits,
    per_example_loss,
)
from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule


def _labels(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random targets with the prompt part of each row ignored, one row ignored entirely."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :5] = -100
    labels[1, : seq // 2] = -100
    labels[-1] = -100
    return labels


def _full_loss(hidden, labels, weight, bias=None, reduction="mean"):
    logits = torch.nn.functional.linear(hidden, weight, bias)[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                             reduction=reduction)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_loss_and_every_gradient_equal_full_logits(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(4, 13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    labels = _labels(4, 13, 50)
    want = _full_loss(hidden, labels, weight, bias)
    got = next_token_loss(hidden, labels, weight, bias, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(torch.autograd.grad(got, (hidden, weight, bias)), torch.autograd.grad(want, (hidden, weight, bias)),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_gradcheck_per_token_and_per_example():
    torch.manual_seed(1)
    hidden = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = _labels(3, 6, 11)
    assert torch.autograd.gradcheck(lambda h, w: per_example_loss(h, labels, w, chunk_size=2), (hidden, weight))
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h: linear_cross_entropy(h, weight.detach(), targets, chunk_size=3),
                                    (torch.randn(7, 5, dtype=torch.float64, requires_grad=True),))


def test_per_example_loss_matches_full_and_is_zero_without_labels():
    torch.manual_seed(2)
    hidden, weight, labels = torch.randn(4, 9, 8), torch.randn(30, 8), _labels(4, 9, 30)
    per_token = _full_loss(hidden, labels, weight, reduction="none")
    counts = (labels[:, 1:] != -100).sum(1).clamp(min=1)
    got = per_example_loss(hidden, labels, weight, chunk_size=3)
    torch.testing.assert_close(got, per_token.sum(1) / counts, rtol=1e-5, atol=1e-6)
    assert got[-1] == 0
    nothing = torch.full_like(labels, -100)
    hidden.requires_grad_(True)
    loss = next_token_loss(hidden, nothing, weight)
    loss.backward()  # a batch without reply tokens: a zero loss that still backpropagates, not NaN
    assert loss.item() == 0 and hidden.grad is not None and not hidden.grad.any()


def test_only_labelled_tokens_go_through_the_head_a_chunk_at_a_time(monkeypatch):
    seen: list[tuple[int, ...]] = []
    original = chunked_loss._chunk_logits

    def spy(h, weight, bias):
        out = original(h, weight, bias)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(chunked_loss, "_chunk_logits", spy)
    hidden = torch.randn(4, 32, 8, requires_grad=True)
    weight = torch.randn(40, 8)
    labels = _labels(4, 32, 40)
    next_token_loss(hidden, labels, weight, chunk_size=16).backward()
    labelled = int((labels[:, 1:] != -100).sum())
    assert max(rows for rows, _ in seen) <= 16
    assert sum(rows for rows, _ in seen) == labelled  # one pass: the frozen head needs no recomputation


def test_bf16_autocast_follows_the_linear_layer():
    torch.manual_seed(3)
    hidden, weight, labels = torch.randn(2, 24, 32), torch.randn(64, 32) * 0.1, _labels(2, 24, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _full_loss(hidden, labels, weight)
        got = next_token_loss(hidden.requires_grad_(), labels, weight, chunk_size=5)
    got.backward()
    assert hidden.grad.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------- the LightningModule
def _module(model_dir, tmp_path, loss_impl: str, **lora) -> RefusalLoRAModule:
    torch.manual_seed(0)
    module = RefusalLoRAModule(model_name_or_path=str(model_dir), output_dir=str(tmp_path / loss_impl),
                               lora=LoRASettings(r=4, alpha=8, dropout=0.0, **lora), loss_impl=loss_impl,
                               loss_chunk_size=7)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at 0, which would leave every A gradient 0
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return module


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, vocab, (3, 20), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 15:] = 0  # a right-padded row
    labels = input_ids.clone()
    labels[:, :8] = -100  # prompt tokens
    labels[2, 15:] = -100
    labels[1] = -100  # a row with no reply tokens at all
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    out = tmp_path_factory.mktemp("untied") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied_embeddings", "untied_head"])
def test_module_chunked_loss_and_lora_grads_equal_full_fp32(tmp_path, tiny_model_dir, untied_model_dir, tied):
    model_dir = tiny_model_dir if tied else untied_model_dir
    full, chunked = _module(model_dir, tmp_path, "full"), _module(model_dir, tmp_path, "chunked")
    from refusal_lightning.train.chunked_loss import decoder_and_head

    decoder, head = decoder_and_head(chunked.model)
    assert (head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()) == tied
    batch = _batch(head.weight.shape[0])
    losses, grads = [], []
    for module in (full, chunked):
        loss = module._loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, want in grads[0].items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


def test_module_predict_step_per_example_loss_equals_full(tmp_path, tiny_model_dir):
    full, chunked = _module(tiny_model_dir, tmp_path, "full"), _module(tiny_model_dir, tmp_path, "chunked")
    batch = _batch(1024)
    with torch.inference_mode():
        want = full.predict_step(batch, 0)["reply_loss"]
        got = chunked.predict_step(batch, 0)["reply_loss"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got[1] == 0 and (got[[0, 2]] > 0).all()


def test_lora_on_lm_head_is_rejected_by_the_chunked_loss(tmp_path, tiny_model_dir):
    targets = ["q_proj", "v_proj", "lm_head"]
    with pytest.raises(ValueError, match="lm_head.*loss_impl: full"):
        _module(tiny_model_dir, tmp_path, "chunked", target_modules=targets)
    _module(tiny_model_dir, tmp_path, "full", target_modules=targets)  # the full loss runs the wrapped head


def test_liger_without_the_package_says_what_to_do(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a))
    with pytest.raises(ValueError, match="Liger-Kernel is not installed.*loss_impl: chunked"):
        _module(tiny_model_dir, tmp_path, "liger")


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_token_hits_equal_full_logits_argmax_and_come_with_the_loss(chunk_size):
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(4, 13, 16), torch.randn(50, 16), torch.randn(50)
    labels = _labels(4, 13, 50)
    predicted = torch.nn.functional.linear(hidden, weight, bias)[:, :-1].argmax(-1)
    labels[:, 1::2] = torch.where(labels[:, 1::2] != -100, predicted[:, ::2], -100)  # every other token a hit
    mask = labels[:, 1:] != -100
    want = (predicted == labels[:, 1:])[mask]
    loss, got = next_token_loss_and_hits(hidden, labels, weight, bias, chunk_size=chunk_size)
    assert got.dtype == torch.bool and torch.equal(got, want) and 0 < int(want.sum()) < want.numel()
    # the same pass gives the loss, bit for bit
    assert torch.equal(loss, next_token_loss(hidden, labels, weight, bias, chunk_size=chunk_size))
    loss, none = next_token_loss_and_hits(hidden, torch.full_like(labels, -100), weight, bias)
    assert not none.numel() and float(loss) == 0.0
