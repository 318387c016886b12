"""Held-out reply NLL: the head-on-reply-positions path gives the NLL of the whole forward pass."""

from __future__ import annotations

import pytest
import torch
import yaml

from refusal_lightning.experiment.heldout_nll import heldout_batches, heldout_nll, reply_nll
from tests.conftest import REPO, make_random_adapter


def _red_data() -> dict:
    return yaml.safe_load((REPO / "configs/tiny/attack.yaml").read_text())["data"]


def _full_forward_nll(model: torch.nn.Module, batches: list[dict]) -> float:
    """The reference: every position's logits, log-softmax, then the reply tokens' mean, one by one."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logp = torch.log_softmax(model(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits.double(), dim=-1)
            for row in range(batch["input_ids"].shape[0]):
                for pos in range(batch["input_ids"].shape[1] - 1):
                    label = int(batch["labels"][row, pos + 1])
                    if label != -100:
                        total -= float(logp[row, pos, label])
                        count += 1
    return total / count


def test_reply_nll_equals_the_whole_forward_pass_with_and_without_an_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batches = heldout_batches(_red_data(), "red", str(tiny_model_dir), batch_size=3, max_pairs=7)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain = reply_nll(base, batches)
    assert plain["nll"] == pytest.approx(_full_forward_nll(base, batches), rel=1e-5)
    assert plain["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) > 0

    torch.manual_seed(0)  # lora_A's init comes from the global generator: the same adapter in any test order
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    with torch.no_grad():  # a large update, so that an adapter left off the path could not pass unseen
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)
    adapted = reply_nll(wrapped, batches)["nll"]
    assert adapted == pytest.approx(_full_forward_nll(wrapped, batches), rel=1e-5)
    # the adapter is on the path: it moves the NLL by more than the 1e-5 tolerance above (the tiny model's
    # normed, small-headed logits keep any NLL near log(vocab), so the move is small in absolute terms)
    assert abs(adapted - plain["nll"]) > 10 * 1e-5 * plain["nll"]


def test_heldout_nll_does_not_depend_on_the_batch_size(tiny_model_dir):
    data = _red_data()
    small = heldout_nll(str(tiny_model_dir), {"base": None}, data, data, batch_size=2, max_pairs=6)["base"]
    large = heldout_nll(str(tiny_model_dir), {"base": None}, data, data, batch_size=8, max_pairs=6)["base"]
    assert small["red_tokens"] == large["red_tokens"]
    assert small["red_heldout"] == pytest.approx(large["red_heldout"], rel=1e-5)


def test_batches_are_sorted_by_length_and_hold_the_first_pairs(tiny_model_dir):
    data = _red_data()
    batches = heldout_batches(data, "red", str(tiny_model_dir), batch_size=2, max_pairs=5)
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths)
    assert sum(b["input_ids"].shape[0] for b in batches) == 5
