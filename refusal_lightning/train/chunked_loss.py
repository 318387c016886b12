"""Next-token cross-entropy through the LM head in token chunks: no ``tokens x vocab`` logits (plain torch).

A causal LM's loss is ``CE(h_t W^T + b, y_{t+1})`` averaged over the positions whose next token has a
label. Computed the usual way it builds fp32 logits for every position: at Qwen3's vocabulary (151,936)
a 4 x 512 batch holds 1.2 GB of logits, as much again for their log-softmax and for their gradient.
Here only the labelled positions go through the head (a chat fit labels the reply tokens only), a chunk
of ``chunk_size`` tokens at a time, so at most ``chunk_size x vocab`` logits exist at once.

The gradient (Liger-Kernel's fused linear cross-entropy does the same, arXiv:2410.10989 section 3.2):
a token's loss depends on its own hidden state only, so ``d nll_i / d h_i = (softmax_i - onehot_i) W``
is computed in the forward pass while the chunk's logits are at hand, and the backward scales it by
the incoming gradient - no second pass over the head for the usual frozen head (LoRA). If the head's
weight (or bias) needs a gradient, that one depends on the incoming per-token gradient, so the backward
recomputes each chunk's logits for it.
"""

from __future__ import annotations

import importlib.util

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 512
"""Tokens per chunk: at vocab 151,936 a chunk's fp32 logits take 311 MB."""


def shift_labels(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a labelled token, as Hugging Face shifts them.

    Args:
        hidden: ``(batch, seq, dim)`` final hidden states (after the last norm).
        labels: ``(batch, seq)`` token ids, ``-100`` where no loss is wanted.

    Returns:
        ``(hidden_sel, targets, mask)``: ``(n, dim)`` states at the positions ``t`` with
        ``labels[:, t + 1] != -100``, their ``(n,)`` targets, and the ``(batch, seq - 1)`` mask that chose them.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return hidden[:, :-1][mask], targets[mask], mask


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What ``F.linear`` would multiply in: the autocast dtype under autocast, else the promoted dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and loss precision: at least fp32 (as Hugging Face upcasts the logits)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h W^T + b`` of one chunk, multiplied in the inputs' dtype (as ``lm_head`` does), at least fp32."""
    logits = torch.nn.functional.linear(h, weight, bias)
    return logits.to(_acc_dtype(logits.dtype))


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the last dim; returns ``logsumexp`` (one ``chunk x vocab`` buffer, no temporaries)."""
    peak = logits.amax(-1, keepdim=True)
    logits.sub_(peak).exp_()
    total = logits.sum(-1, keepdim=True)
    logits.div_(total)
    return (peak + total.log()).squeeze(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``nll_i = logsumexp(h_i W^T + b) - (h_i W^T + b)[y_i]``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, hidden_grad, hits):  # noqa: D102
        n, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
        nll = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        # d nll / d hidden, per token, filled while each chunk's logits exist (see the module docstring).
        grad_hidden = torch.empty_like(hidden, dtype=acc) if hidden_grad else None
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            h, y = hidden[rows], targets[rows]
            logits = _chunk_logits(h, weight, bias)
            if hits is not None:  # token accuracy, while this chunk's logits exist (not a differentiable output)
                hits[rows] = logits.argmax(-1) == y
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            lse[rows] = _softmax_(logits)
            nll[rows] = lse[rows] - target_logit
            if grad_hidden is not None:
                probs = logits  # softmax, in place
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_hidden[rows] = probs.to(weight.dtype) @ weight
        ctx.chunk_size, ctx.hidden_dtype = chunk_size, hidden.dtype
        needs_weight = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        ctx.save_for_backward(grad_hidden, hidden if needs_weight else None, weight if needs_weight else None,
                              bias if needs_weight else None, targets if needs_weight else None,
                              lse if needs_weight else None)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):  # noqa: D102
        grad_hidden, hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_nll = grad_nll.to(lse.dtype if lse is not None else grad_hidden.dtype)
        d_hidden = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            if grad_hidden is None:
                raise RuntimeError("chunked cross-entropy: the hidden-state gradient was not prepared in forward "
                                   "(hidden_grad=False); call it with grad enabled")
            d_hidden = (grad_hidden * grad_nll[:, None]).to(ctx.hidden_dtype)
        if weight is not None:  # the head trains: recompute each chunk's softmax for its gradient
            acc = lse.dtype
            d_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
            d_bias = (torch.zeros_like(bias, dtype=acc)
                      if bias is not None and ctx.needs_input_grad[2] else None)
            n = hidden.shape[0]
            for start in range(0, n, ctx.chunk_size):
                rows = slice(start, min(start + ctx.chunk_size, n))
                y = targets[rows]
                probs = _chunk_logits(hidden[rows], weight, bias).sub_(lse[rows, None]).exp_()
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                probs.mul_(grad_nll[rows, None])
                if d_weight is not None:
                    d_weight.addmm_(probs.t(), hidden[rows].to(acc))
                if d_bias is not None:
                    d_bias += probs.sum(0)
            d_weight = None if d_weight is None else d_weight.to(weight.dtype)
            d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         hits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ``cross_entropy(hidden @ weight.T + bias, targets)`` without the full logits.

    Args:
        hidden: ``(n, dim)`` hidden states (select the labelled ones first: ``shift_labels``).
        weight: ``(vocab, dim)`` LM head weight (tied or not).
        targets: ``(n,)`` token ids, all valid (no ``-100``).
        bias: optional ``(vocab,)`` head bias.
        chunk_size: tokens per chunk; memory holds ``chunk_size x vocab`` fp32 logits at a time.
        hits: optional ``(n,)`` bool buffer, filled with whether each target is the head's argmax (token
            accuracy, from the same logits; costs one argmax per chunk).

    Returns:
        ``(n,)`` negative log-likelihoods (fp32, or fp64 for fp64 inputs); differentiable in ``hidden``,
        ``weight`` and ``bias``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(hidden, weight)
    hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                         targets, chunk_size, hidden_grad, hits)


def next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens: Hugging Face's causal-LM loss, chunked.

    Equal to ``model(..., labels=labels).loss``. A batch without any labelled token gives a zero loss
    (still connected to the graph) where the full loss gives NaN.
    """
    return _labelled_loss(hidden, labels, weight, bias, chunk_size, with_hits=False)[0]


@torch.no_grad()
def next_token_loss_and_hits(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``next_token_loss`` (no gradient) and ``(n,)`` bool: whether each labelled next token is the head's
    argmax (token accuracy), from one chunked pass over the head."""
    loss, hits = _labelled_loss(hidden, labels, weight, bias, chunk_size, with_hits=True)
    assert hits is not None
    return loss, hits


def _labelled_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   chunk_size: int, with_hits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_sel, targets, _ = shift_labels(hidden, labels)
    hits = torch.zeros(targets.numel(), dtype=torch.bool, device=hidden.device) if with_hits else None
    if not targets.numel():
        return hidden.sum() * 0.0, hits
    return linear_cross_entropy(hidden_sel, weight, targets, bias, chunk_size, hits).sum() / targets.numel(), hits


def per_example_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """``(batch,)`` mean next-token cross-entropy of each row's labelled tokens (0 for a row without any)."""
    hidden_sel, targets, mask = shift_labels(hidden, labels)
    nll = linear_cross_entropy(hidden_sel, weight, targets, bias, chunk_size)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return sums / mask.sum(1).clamp(min=1)


# ------------------------------------------------------------------------- the model's decoder and head
# Config fields that change the logits between the head and the softmax (Gemma 2 softcapping, Cohere and
# Granite scaling, ...); the chunked loss applies a plain linear head only, so such models use ``full``.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (``input_ids -> last_hidden_state``, final norm included) and the LM head of a
    Hugging Face causal LM, seen through ``torch.compile`` and PEFT wrappers. LoRA layers inside the
    decoder are injected in place, so calling it runs them as the wrapped model would."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings()


def check_loss_impl(model: torch.nn.Module, impl: str, chunk_size: int) -> None:
    """Raise ``ValueError`` (every problem in one message) if ``impl`` cannot reproduce ``model``'s loss."""
    problems = []
    if chunk_size < 1:
        problems.append(f"loss_chunk_size must be >= 1, got {chunk_size}")
    _, head = decoder_and_head(model)
    if type(head) is not torch.nn.Linear:
        problems.append(
            f"its LM head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear "
            "(LoRA or modules_to_save on lm_head?); this loss applies the head's weight itself and would "
            "skip the wrapper: drop lm_head from lora.target_modules or set loss_impl: full")
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1:
            problems.append(f"its config sets {name}={value}, a logit transform this loss does not apply: "
                            "set loss_impl: full")
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        problems.append("Liger-Kernel is not installed (pip install liger-kernel; it needs CUDA and Triton): "
                        "use loss_impl: chunked, its pure-torch equivalent")
    if problems:
        raise ValueError(f"loss_impl {impl!r} cannot be used with this model: " + "; ".join(problems))


def liger_next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """``next_token_loss`` computed by Liger-Kernel's fused linear cross-entropy (Triton, CUDA only)."""
    if hidden.device.type != "cuda":
        raise RuntimeError(f"loss_impl 'liger' runs Triton kernels on CUDA only, not on {hidden.device.type}: "
                           "use loss_impl: chunked")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden_sel, targets, _ = shift_labels(hidden, labels)
    if not targets.numel():
        return hidden.sum() * 0.0
    dtype = _compute_dtype(hidden, weight)
    loss = liger_fused_linear_cross_entropy(hidden_sel.to(dtype), weight.to(dtype), targets,
                                            None if bias is None else bias.to(dtype), reduction="mean")
    return loss[0] if isinstance(loss, tuple) else loss
