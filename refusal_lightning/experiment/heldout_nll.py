"""Did the attack learn? Held-out red and blue reply NLL of every evaluated model.

A defence that "keeps refusal" is only interesting if the attack still learned what it was trained on.
For each model (base, base + refusal, base + combined attack adapters) this computes the token-weighted
mean negative log-likelihood of the replies that the training selection rule picks in the held-out
(validation) conversations: red replies (what the attacks fit) and blue replies (what the refusal fit).
Same split, tokenisation and reply-only labels as training (``HarmfulQADataModule``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch

from refusal_lightning.train.datamodule import IGNORE_INDEX, HarmfulQADataModule, collate

DATA_KEYS = ("source", "selection", "prompt", "max_length", "val_fraction", "seed", "enable_thinking",
             "refusal_markers")


def heldout_batches(data: Mapping[str, Any], thread: str, tokenizer_path: str, batch_size: int = 8,
                    max_pairs: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The validation pairs of ``thread`` under a fit config's ``data`` section, as padded batches
    (the first ``max_pairs`` in the split's order when set: the same pairs for every model)."""
    kwargs = {k: v for k, v in data.items() if k in DATA_KEYS}
    module = HarmfulQADataModule(**kwargs, thread=thread, tokenizer_name_or_path=tokenizer_path,
                                 batch_size=batch_size)
    module.setup("validate")
    assert module.val_set is not None
    n = len(module.val_set) if max_pairs is None else min(max_pairs, len(module.val_set))
    examples = [module.val_set[i] for i in range(n)]
    pad = collate(module.load_tokenizer().pad_token_id)
    return [pad(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def reply_nll(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean NLL over the reply tokens of ``batches`` (labels != -100)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    device = next(model.parameters()).device
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        total += nll.double().cpu()
        count += int((labels != IGNORE_INDEX).sum())
    return {"nll": float(total / max(count, 1)), "tokens": count}


def heldout_nll(base_model: str, adapters: Mapping[str, str | None], red_data: Mapping[str, Any],
                blue_data: Mapping[str, Any], dtype: str = "float32", batch_size: int = 8,
                max_pairs: int | None = None) -> dict[str, dict]:
    """``{model: {red_heldout, blue_heldout, red_tokens, blue_tokens}}`` for each model.

    Args:
        base_model: the plain base model folder or hub id.
        adapters: model name -> adapter folder applied on the plain base (None: the base itself), e.g.
            ``{"base": None, "refusal": refusal_dir, "vanilla": vanilla_dir / "combined"}``.
        red_data: the attack fits' ``data`` section (red thread; selection, prompt, split, seed).
        blue_data: the refusal fit's ``data`` section (blue thread).
        dtype: base weights' dtype.
        batch_size: examples per forward pass.
        max_pairs: at most this many held-out pairs per thread (None: all).
    """
    from peft import PeftModel

    from refusal_lightning.models.loading import load_causal_lm

    red = heldout_batches(red_data, "red", base_model, batch_size, max_pairs)
    blue = heldout_batches(blue_data, "blue", base_model, batch_size, max_pairs)
    model: Any = load_causal_lm(base_model, dtype=dtype).eval()
    named = {name: path for name, path in adapters.items() if path is not None}
    for i, (name, path) in enumerate(named.items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name).eval()
        else:
            model.load_adapter(str(path), adapter_name=name)
    out = {}
    for name, path in adapters.items():
        started = time.perf_counter()
        if path is None:
            context = model.disable_adapter() if named else nullcontext()
        else:
            model.set_adapter(name)
            context = nullcontext()
        with context:
            r, b = reply_nll(model, red), reply_nll(model, blue)
        out[name] = {"red_heldout": r["nll"], "blue_heldout": b["nll"], "red_tokens": r["tokens"],
                     "blue_tokens": b["tokens"]}
        print(f"[nll] {name}: red {r['nll']:.3f}, blue {b['nll']:.3f} "
              f"({r['tokens']} + {b['tokens']} tokens, {time.perf_counter() - started:.1f}s)", flush=True)
    return out
