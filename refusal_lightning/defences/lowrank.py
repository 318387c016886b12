"""Low-rank algebra on LoRA factors: inner products, norms and the SVD of ``B @ A`` from the factors alone.

``out x in`` matrices are never formed: everything goes through ``r x r`` Grams and QR factors, so the cost
stays linear in ``out + in``. Used by the projection, the directions, Safe LoRA and AsFT alike.
"""

from __future__ import annotations

import torch


def lowrank_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product ``<B1 @ A1, B2 @ A2>`` from the factors (batched over leading dims).

    ``tr(A1^T B1^T B2 A2) = sum((B1^T B2) * (A1 A2^T))``: two ``r1 x r2`` products, never ``out x in``.
    """
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum((-2, -1))


def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Frobenius norm ``||B @ A||_F`` from the ``r x r`` Grams (batched over leading dims)."""
    return lowrank_inner(B, A, B, A).clamp_min(0).sqrt()


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``scale * B @ A = U diag(S) V^T`` via QR of ``B`` and ``A^T`` and a small SVD.

    ``B = Q_B R_B``, ``A^T = Q_A R_A`` give ``B A = Q_B (R_B R_A^T) Q_A^T``; the SVD of the
    ``r x r`` core rotates the orthonormal ``Q``s. Returns ``U (out x m)``, ``S (m)``, ``V (in x m)``,
    ``m = min(r, out, in)``, singular values descending.
    """
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.mT)
    u, s, vh = torch.linalg.svd(scale * (r_b @ r_a.mT), full_matrices=False)
    return q_b @ u, s, q_a @ vh.mT
