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
    (the first ``max_pairs`` in the split's order when set: the same pairs for every model). The pairs are
    batched in order of length, so that a batch carries little padding (the NLL does not depend on it)."""
    kwargs = {k: v for k, v in data.items() if k in DATA_KEYS}
    module = HarmfulQADataModule(**kwargs, thread=thread, tokenizer_name_or_path=tokenizer_path,
                                 batch_size=batch_size)
    module.setup("validate")
    assert module.val_set is not None
    n = len(module.val_set) if max_pairs is None else min(max_pairs, len(module.val_set))
    examples = sorted((module.val_set[i] for i in range(n)), key=lambda e: len(e["input_ids"]))
    pad = collate(module.load_tokenizer().pad_token_id)
    return [pad(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def reply_nll(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean NLL over the reply tokens of ``batches`` (labels != -100). The output head runs on
    the reply positions only (``reply_logits``): on a small model it is a quarter of the forward pass."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    device = next(model.parameters()).device
    for batch in batches:
        labels = batch["labels"][:, 1:].to(device)
        keep = labels != IGNORE_INDEX
        logits = reply_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), keep)
        nll = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")
        total += nll.double().sum().cpu()  # summed in float64: the mean does not depend on batch order
        count += int(keep.sum())
    return {"nll": float(total / max(count, 1)), "tokens": count}


def reply_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
    """The next-token logits at the positions ``keep`` (``[batch, length - 1]``, True where the next token is
    scored), as ``[n_kept, vocab]``. A causal LM with a plain output head (``get_decoder`` +
    ``get_output_embeddings``, PEFT-wrapped or not) runs its decoder once and the head on those positions
    only; any other model (a logit soft-cap, say) runs whole."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if head is None or decoder is None or getattr(config, "final_logit_softcapping", None):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden[:, :-1][keep])


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
