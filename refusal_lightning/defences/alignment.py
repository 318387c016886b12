"""The alignment matrix ``C`` of Safe LoRA and AsFT, built from the refusal adapter's factors: plain torch.

Safe LoRA (Hsu et al. 2024, arXiv 2405.16833, Sec. 3) and AsFT (Yang et al. 2026, arXiv 2506.08473) take
per layer the alignment matrix ``V = W_aligned - W_unaligned`` and the ``out x out`` matrix
``C = V V^T / ||V||_F``; both reference implementations compute exactly that
(IBM/SafeLoRA ``model.py`` ``get_aligned_matrix``; huggingface/peft ``src/peft/utils/safelora.py``;
PKU-YuanGroup/AsFT ``AsFT_finetuning.py``). ``C`` acts on the *output* (column) space, so for a LoRA
update ``C (B A) = (C B) A``: the projected update keeps the rank of ``B``.

Here the aligned model is base + refusal LoRA, so ``V = dW_r = s_r B_r A_r`` per module (rank ``r``). With
its thin SVD ``V = U diag(S) Q^T``:

- ``paper``: ``C = V V^T / ||V||_F = U diag(S^2 / ||S||) U^T``, the papers' formula. It is *not* an
  orthogonal projector: its eigenvalues ``S_i^2 / ||S||`` depend on the size of ``V`` (on the CPU demo's
  refusal LoRA about 0.5 for the top direction and < 0.2 for the others), so ``C dW`` also shrinks.
- ``exact``: ``C = U U^T``, the orthogonal projector onto the column space of ``V`` (Safe LoRA's exact
  ``V (V^T V)^-1 V^T``, with a pseudo-inverse because ``V`` has rank ``r``).

Either way ``C = U diag(w) U^T`` is kept as ``(U, w)``: ``out x r`` and ``r`` numbers, never ``out x out``.

Two controls ask whether a result needs the refusal update's directions at all (``alignment_basis``):
``zero`` sets ``C = 0`` (AsFT's term becomes a plain L2 penalty on ``B A``), and ``random`` keeps the
spectrum ``w`` but draws a random orthonormal basis ``Q`` (``C = Q diag(w) Q^T``): a defence whose effect
survives either control is not acting through the refusal subspace.
"""

from __future__ import annotations

from typing import Literal

import torch

from refusal_lightning.defences.lowrank import lowrank_inner, lowrank_svd

AlignmentProjector = Literal["paper", "exact"]
PROJECTORS: tuple[str, ...] = ("paper", "exact")
AlignmentBasis = Literal["refusal", "random", "zero"]
BASES: tuple[str, ...] = ("refusal", "random", "zero")
# Singular values below this fraction of a module's largest carry no direction (rank-deficient dW_r):
# QR makes their vectors arbitrary, so they get weight 0 (they would add a random direction to `exact`).
RANK_TOL = 1e-6


def alignment_factors(A: torch.Tensor, B: torch.Tensor, scale: float, projector: AlignmentProjector = "paper"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, w)`` with ``C = U diag(w) U^T`` for the alignment matrix ``V = scale * B @ A`` (float64).

    Args:
        A: refusal ``lora_A`` (``r x in``).
        B: refusal ``lora_B`` (``out x r``).
        scale: the refusal adapter's PEFT scale (``alpha / r``).
        projector: ``paper`` (``V V^T / ||V||_F``) or ``exact`` (orthogonal projector onto ``col(V)``).

    Returns:
        ``U`` (``out x m``, orthonormal columns) and ``w`` (``m``), ``m = min(r, out, in)``; directions of
        (numerically) zero singular values have ``w = 0``.
    """
    if projector not in PROJECTORS:
        raise ValueError(f"unknown alignment projector '{projector}' (choose from {', '.join(PROJECTORS)})")
    u, s, _ = lowrank_svd(B.detach().double().cpu(), A.detach().double().cpu(), scale)
    keep = s > RANK_TOL * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    if projector == "paper":
        norm = torch.linalg.vector_norm(s)  # ||V||_F = ||S||_2
        w = torch.where(keep, s.square() / norm.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
    else:
        w = keep.to(s.dtype)
    return u * keep.to(u.dtype), w


def alignment_basis(U: torch.Tensor, w: torch.Tensor, basis: AlignmentBasis,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, w)`` of a control of ``C = U diag(w) U^T``: ``refusal`` unchanged; ``zero`` is ``C = 0``;
    ``random`` is ``Q diag(w) Q^T`` with ``Q`` (``out x m``) orthonormal and uniformly random (QR of a
    Gaussian matrix with the signs of ``R``'s diagonal fixed), drawn from ``generator``."""
    if basis not in BASES:
        raise ValueError(f"unknown alignment basis '{basis}' (choose from {', '.join(BASES)})")
    if basis == "zero":
        return U, torch.zeros_like(w)
    if basis == "random":
        q, r = torch.linalg.qr(torch.randn(U.shape, generator=generator, dtype=torch.float64))
        signs = torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        return (q * signs).to(U.dtype), w
    return U, w


def apply_alignment(U: torch.Tensor, w: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``C @ B = U diag(w) (U^T B)`` (batched over leading dims): ``out x r_a``, through an ``m x r_a`` core."""
    return U @ (w[..., :, None] * (U.mT @ B))


def projected_cosine(B: torch.Tensor, A: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
    """Cosine between ``(C B) A`` and ``B A`` from the factors (Safe LoRA's per-layer similarity score).

    Scale-free, so the LoRA scale ``s_a`` cancels; 0 when either product is 0.
    """
    inner = lowrank_inner(CB, A, B, A)
    norms = (lowrank_inner(CB, A, CB, A).clamp_min(0) * lowrank_inner(B, A, B, A).clamp_min(0)).sqrt()
    return torch.where(norms > 0, inner / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def residual_sq(U: torch.Tensor, w: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``||(I - C) B A||_F^2`` from the factors (batched): ``(I - C) B`` is ``out x r_a``, then ``r_a x r_a`` Grams.

    Exact for any symmetric ``C`` (the ``paper`` one is not idempotent, so the projector identity
    ``||BA||^2 - ||C BA||^2`` would be wrong for it).
    """
    R = B - apply_alignment(U, w, B)
    return lowrank_inner(R, A, R, A)
