"""The base model's own answers to the retain prompts, generated once and cached, and the retain batches.

Both retain losses need token positions to compare the adapted model with the base at: the base's
greedy answers give the positions where the base's behaviour lives (its refusal-or-not opener, its facts).
They are generated with the trained adapter disabled, so on a resumed fit they are still the base's, and
cached as token ids (``retain_answers.json`` beside the adapter, with the prompts and the decoded text):
the ids are what the base produced, with no re-tokenisation of decoded text.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from refusal_lightning.files import atomic_write_text
from refusal_lightning.train.datamodule import IGNORE_INDEX, collate

CACHE_FILE = "retain_answers.json"
GENERATION_BATCH = 16  # prompts per generate() call: bounded memory, batched enough on CPU


def _fingerprint(base_model: str, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int,
                 template_kwargs: dict) -> str:
    parts = [base_model, list(prompts), max_new_tokens, max_prompt_tokens, template_kwargs]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _eos_ids(tokenizer, model) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def generate_base_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, max_prompt_tokens: int,
                          template_kwargs: dict | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy answers of ``model`` with its adapter disabled: ``(prompt_ids, answer_ids)`` per prompt.

    Prompts are rendered with the chat template (generation prompt added) and cut from the left to
    ``max_prompt_tokens``; an answer ends after its first end-of-sequence token or at ``max_new_tokens``.
    The global RNG is left as it was (greedy decoding should draw nothing, and the fit must not depend
    on whether the answers came from the cache).
    """
    kwargs = template_kwargs or {}
    prompt_ids = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True, **kwargs)
        prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(tokenizer, model)
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), model.disable_adapter():
            for start in range(0, len(prompt_ids), GENERATION_BATCH):
                chunk = prompt_ids[start:start + GENERATION_BATCH]
                width = max(len(ids) for ids in chunk)
                # left padding: every row's answer starts at the same column
                ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad)
                for row in out[:, width:].tolist():
                    end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                    answers.append(row[:end])
    finally:
        model.train(was_training)
    return prompt_ids, answers


def cached_base_answers(cache: Path, model, tokenizer, prompts: Sequence[str], base_model: str,
                        max_new_tokens: int, max_prompt_tokens: int, template_kwargs: dict | None = None,
                        write: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """``generate_base_answers``, read from ``cache`` when it was made from the same model, prompts and
    settings; else generated and (with ``write``) written there atomically."""
    kwargs = template_kwargs or {}
    key = _fingerprint(base_model, prompts, max_new_tokens, max_prompt_tokens, kwargs)
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("fingerprint") == key:
            return data["prompt_ids"], data["answer_ids"]
    prompt_ids, answer_ids = generate_base_answers(model, tokenizer, prompts, max_new_tokens, max_prompt_tokens,
                                                   kwargs)
    if write:
        record = {"fingerprint": key, "base_model": base_model, "max_new_tokens": max_new_tokens,
                  "prompts": list(prompts), "answers": tokenizer.batch_decode(answer_ids, skip_special_tokens=True),
                  "prompt_ids": prompt_ids, "answer_ids": answer_ids}
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(record, ensure_ascii=False) + "\n")
    return prompt_ids, answer_ids


class RetainBatches:
    """Retain rows (prompt + base answer, labels on the answer only); ``batch(step, batch_idx)`` draws a
    fixed-size random batch that depends only on the seed and the position in training, so a resumed fit
    draws the same batches as an uninterrupted one (no sampler state to checkpoint)."""

    def __init__(self, prompt_ids: Sequence[list[int]], answer_ids: Sequence[list[int]], batch_size: int,
                 pad_id: int, seed: int = 0):
        rows = [(p, a) for p, a in zip(prompt_ids, answer_ids, strict=True) if a]  # an empty answer teaches nothing
        if not rows:
            raise ValueError("every retain answer is empty: the base model ended each one at once")
        self.items = [{"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a} for p, a in rows]
        self.batch_size = min(batch_size, len(self.items))
        self.seed = seed
        self._collate = collate(pad_id)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, step: int, batch_idx: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}:{step}:{batch_idx}")  # a string seed: stable across processes
        picked = rng.sample(range(len(self.items)), self.batch_size)
        return {k: v.to(device) for k, v in self._collate([self.items[i] for i in picked]).items()}
