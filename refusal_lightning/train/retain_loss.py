"""The retain term's KL divergence (plain torch): the adapted model's next-token distribution against the
base model's, at the labelled positions only.

``KL(p_base || p_adapted)`` is the forward KL of distillation (Hinton et al. 2015): it weighs each token by
the base's probability, so it keeps what the base would say, and it is zero, with zero gradient, when the
two distributions agree (at the fit's first step, where PEFT starts ``B`` at zero). Only the answer
positions go through the LM head, a chunk of tokens at a time, as in ``chunked_loss.py``: the base's
logits exist for one chunk at once; the adapted model's are kept by autograd for the backward pass
(``positions x vocab``: 8 answers of 32 tokens at Qwen3's vocabulary hold 155 MB of fp32 logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refusal_lightning.train.chunked_loss import DEFAULT_CHUNK_SIZE, shift_labels


def kl_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``(n,)`` ``KL(softmax(teacher) || softmax(student))`` per row, in fp32 at least."""
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(acc), dim=-1)
    log_p = F.log_softmax(teacher_logits.to(acc), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def next_token_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Mean ``KL(p_teacher || p_student)`` over the positions that predict a labelled token.

    Args:
        student_hidden: ``(batch, seq, dim)`` final hidden states of the adapted model (with grad).
        teacher_hidden: the same for the base model (no grad needed).
        labels: ``(batch, seq)``, ``-100`` where no loss is wanted (shifted as Hugging Face does).
        weight, bias: the LM head, applied to both.
        chunk_size: positions per chunk through the head.

    Returns:
        0-d tensor; zero (still in the graph) when no position is labelled.
    """
    student, _, mask = shift_labels(student_hidden, labels)
    teacher = teacher_hidden[:, :-1][mask].detach()
    if not student.shape[0]:
        return student_hidden.sum() * 0.0
    total = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    for start in range(0, student.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        with torch.no_grad():
            teacher_logits = F.linear(teacher[rows], weight, bias)
        total = total + kl_from_logits(F.linear(student[rows], weight, bias), teacher_logits).sum()
    return total / student.shape[0]


def next_token_kl_from_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
    """``next_token_kl`` from ``(batch, seq, vocab)`` logits the model's own head produced (``loss_impl: full``)."""
    student, _, mask = shift_labels(student_logits, labels)
    if not student.shape[0]:
        return student_logits.sum() * 0.0
    return kl_from_logits(student, teacher_logits[:, :-1][mask].detach()).mean()
