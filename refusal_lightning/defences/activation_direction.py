"""The refusal direction in activation space (Arditi et al. 2024, "Refusal in language models is mediated by
a single direction", arXiv:2406.11717; code: andyrdt/refusal_direction), in plain torch.

- ``last_token_residuals``: the residual stream after every decoder layer at the last prompt token (the end
  of the generation prompt), one row per prompt.
- ``mean_difference``: per layer, mean over harmful prompts minus mean over harmless ones (their section 2.3).
- ``separation`` and ``pick_layer``: our stated layer rule, the layer among the allowed ones (those the LoRAs
  touch) where the harmful and harmless projections are furthest apart in pooled standard deviations. The
  paper picks by the causal effect of ablation and addition on a validation set; this is cheaper, and the
  causal checks are run on the chosen layer afterwards.
- ``direction_ablated``: the direction projected out of every write into the residual stream (the embedding,
  each attention output and each MLP output), at every position. This is the paper's directional ablation,
  and it gives the same logits as ``orthogonalize_weights`` (their section 4.1), which a test checks.
- ``direction_added``: ``alpha * r`` added to one layer's output at every position (their section 2.4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def inner_model(model: torch.nn.Module) -> Any:
    """The transformers causal LM under a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's layers (Llama, Qwen and the like: ``get_decoder().layers``)."""
    layers = getattr(inner_model(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(inner_model(model)).__name__} has no decoder.layers: the readout supports "
                        "Llama-style decoders (Qwen3, SmolLM2)")
    return layers


def residual_writers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module whose output is added to the residual stream: the token embedding, then each layer's
    attention output projection and MLP down projection (LoRA-wrapped ones included, so an adapter's own
    writes are covered)."""
    writers: list[torch.nn.Module] = [inner_model(model).get_input_embeddings()]
    for layer in decoder_layers(model):
        writers += [layer.self_attn.o_proj, layer.mlp.down_proj]
    return writers


def chat_prompt_ids(tokenizer: Any, questions: Sequence[str], chat_template_kwargs: dict | None = None
                    ) -> list[list[int]]:
    """Each question as a single user turn with the generation prompt, as the server formats it."""
    out = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, **(chat_template_kwargs or {}))
        out.append(list(ids["input_ids"]))
    return out


def spread(items: Sequence[str], most: int) -> list[str]:
    """At most ``most`` items, evenly spaced over the list, in order (all of them when there are fewer)."""
    if len(items) <= most:
        return list(items)
    return [items[i * len(items) // most] for i in range(most)]


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with the padding on the left (the last column is every row's last
    token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def last_token_residuals(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], pad_id: int,
                         batch_size: int = 16) -> torch.Tensor:
    """``[n_layers, n_prompts, d_model]``: each decoder layer's output at each prompt's last token (float32).
    Prompts are batched in order of length, so that a batch carries little padding."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = torch.empty(len(layers), len(prompt_ids), inner_model(model).config.hidden_size)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: captured.append(_hidden(o)[:, -1].float().cpu()))
             for layer in layers]
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = left_padded([prompt_ids[i] for i in rows], pad_id)
            captured.clear()
            inner_model(model).get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device))
            out[:, rows] = torch.stack(captured)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """``[n_layers, d]``: per layer, the harmful prompts' mean activation minus the harmless prompts'."""
    return harmful.mean(dim=1) - harmless.mean(dim=1)


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Each row (the last dimension) scaled to unit length."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def projections(activations: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``[n_layers, n]``: each activation's projection on its layer's unit direction."""
    return torch.einsum("lnd,ld->ln", activations, unit(directions))


def separation(harmful: torch.Tensor, harmless: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``[n_layers]``: (mean harmful projection - mean harmless projection) / pooled standard deviation."""
    h, b = projections(harmful, directions), projections(harmless, directions)
    pooled = ((h.var(dim=1) + b.var(dim=1)) / 2).sqrt().clamp_min(1e-12)
    return (h.mean(dim=1) - b.mean(dim=1)) / pooled


def pick_layer(scores: torch.Tensor, allowed: Sequence[int]) -> int:
    """The allowed layer with the highest separation (the earliest on a tie)."""
    if not allowed:
        raise ValueError("no layer to choose from: the adapters touch no decoder layer")
    bad = [i for i in allowed if not 0 <= i < len(scores)]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {len(scores)} layers")
    return max(sorted(allowed), key=lambda i: float(scores[i]))


def suppression(harmful_model: float, harmful_ref: float, harmless_ref: float) -> float:
    """Where the model's harmful prompts sit on the reference scale: 1 = as on the refusal model, 0 = where
    the refusal model puts harmless prompts."""
    return (harmful_model - harmless_ref) / (harmful_ref - harmless_ref)


def rotation_cos(direction: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine between a model's own difference-of-means direction and the reference's."""
    return float(torch.nn.functional.cosine_similarity(direction.double(), reference.double(), dim=0))


@contextlib.contextmanager
def direction_ablated(model: torch.nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``x - (x . r) r`` on every write into the residual stream at every position."""
    r = unit(direction.detach().float())

    def ablate(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        d = r.to(output.device, output.dtype)
        return output - (output @ d).unsqueeze(-1) * d

    hooks = [m.register_forward_hook(ablate) for m in residual_writers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def direction_added(model: torch.nn.Module, direction: torch.Tensor, layer: int, alpha: float
                    ) -> Iterator[None]:
    """Inside the block, ``alpha * r`` (r of unit length) added to ``layer``'s output at every position."""
    r = unit(direction.detach().float()) * alpha

    def add(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _hidden(output)
        moved = hidden + r.to(hidden.device, hidden.dtype)
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    hook = decoder_layers(model)[layer].register_forward_hook(add)
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def orthogonalize_weights(model: torch.nn.Module, direction: torch.Tensor) -> None:
    """Weight orthogonalisation, in place on a plain (unwrapped, unmerged) model: ``W <- W - r r^T W`` for every
    matrix that writes into the residual stream, the embedding rows included. A tied output head is untied
    first, so that only the writes change."""
    inner = inner_model(model)
    r = unit(direction.detach().float())
    embedding = inner.get_input_embeddings()
    head = inner.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    embedding.weight -= torch.outer(embedding.weight @ r, r)  # rows are the written vectors
    for layer in decoder_layers(model):
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight -= torch.outer(r, r @ linear.weight)  # columns write: W is [d_model, d_in]
            if linear.bias is not None:
                linear.bias -= (linear.bias @ r) * r
