"""AsFT (Yang et al., AAAI 2026, arXiv 2506.08473): a loss term that anchors the LoRA update to the alignment
subspace: plain torch, no Lightning.

The authors' code (PKU-YuanGroup/AsFT ``utils/AsFT_train_utils.py``, ``train``) adds to every micro-batch's
loss, over all LoRA modules ``m``,

    lam * sum_m ||(I - C_m) B_m A_m||_F^2,    C_m = V_m V_m^T / ||V_m||_F

with ``V_m`` the aligned-minus-unaligned weights of the layer (``AsFT_finetuning.py``
``SafeLoRA.get_aligned_matrix``) and ``B_m A_m`` the LoRA product *without* PEFT's scale ``alpha / r``.
Their scripts use ``--lambda_reg 1`` (``scripts/*/AsFT_reg1_p_0.1.sh``). Here ``V_m`` is the refusal
adapter's ``dW_r`` of the module (``alignment.py``; ``projector: paper`` is their ``C``, ``exact`` the
orthogonal projector onto ``col(dW_r)``). The term is computed from the factors: ``(I - C) B`` is
``out x r_a`` and the norm comes from ``r_a x r_a`` Grams, never an ``out x out`` or ``out x in`` matrix.
Since the paper's ``C`` is not idempotent, the projector identity ``||BA||^2 - ||C BA||^2`` is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from refusal_lightning.defences.alignment import (
    BASES,
    PROJECTORS,
    AlignmentBasis,
    AlignmentProjector,
    alignment_basis,
    alignment_factors,
    residual_sq,
)
from refusal_lightning.defences.directions import DirectionsError, check_attack, direction_key, listed_names
from refusal_lightning.defences.projection import LoraTarget

DEFAULT_LAMBDA = 1.0  # PKU-YuanGroup/AsFT scripts/*/AsFT_reg1_p_0.1.sh: --lambda_reg 1


@dataclass
class AsftConfig:
    """AsFT regulariser: ``lam * sum_m ||(I - C_m) B_m A_m||_F^2`` over the trained LoRA, added to the loss."""

    enabled: bool = False
    """Add the term to the training loss (logged as ``asft/penalty``; ``train/loss`` stays the task loss)."""
    lam: float = DEFAULT_LAMBDA
    """Weight lambda (the authors' scripts: ``--lambda_reg 1``). It multiplies the unscaled ``B A``."""
    directions_path: str | None = None
    """Directions file of the refusal adapter: its ``dW_r`` per module is the alignment matrix ``V``
    (null: ``projection.directions_path``)."""
    projector: AlignmentProjector = "paper"
    """``paper``: ``C = V V^T / ||V||_F`` as in the authors' code; ``exact``: the orthogonal projector onto
    the column space of ``V`` (then the term is the squared norm of the part of ``B A`` outside it)."""
    alignment_basis: AlignmentBasis = "refusal"
    """A control of ``C``: ``refusal`` (AsFT); ``zero``: ``C = 0``, so the term is plain L2 on ``B A``;
    ``random``: ``C``'s spectrum on a random orthonormal basis per module. Does AsFT need the refusal
    directions, or would any penalty of this size do?"""
    basis_seed: int = 0
    """Seed of the ``random`` basis (modules draw in directions-file order)."""


@dataclass(eq=False)
class _Group:
    """Modules with identical shapes/dtype/device, stacked so each step runs a few batched matmuls."""

    names: list[str]
    A_params: list[torch.nn.Parameter]
    B_params: list[torch.nn.Parameter]
    U: torch.Tensor  # (G, out, m)
    w: torch.Tensor  # (G, m)


class AsftPenalty:
    """The AsFT term over the attack LoRA's modules; calling it returns a 0-d tensor with autograd.

    Gradients reach only the given LoRA parameters: ``U`` and ``w`` are constants built from the frozen
    refusal adapter's factors.
    """

    def __init__(self, targets: Sequence[LoraTarget], alignment: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 lam: float, metadata: dict[str, Any] | None = None):
        """
        Args:
            targets: the trained LoRA modules (``name`` is the directions key).
            alignment: ``(U, w)`` per target, ``C = U diag(w) U^T`` (``alignment.alignment_factors``).
            lam: the weight lambda.
            metadata: reported by ``summary``.
        """
        if not targets:
            raise ValueError("no LoRA modules to regularise")
        self.lam = float(lam)
        self.metadata = dict(metadata or {})
        buckets: dict[tuple, list[int]] = {}
        for i, (t, (u, _)) in enumerate(zip(targets, alignment, strict=True)):
            buckets.setdefault((tuple(t.A.shape), tuple(t.B.shape), u.shape[1], t.A.dtype, t.A.device), []).append(i)
        self._groups = []
        for idx in buckets.values():
            ts = [targets[i] for i in idx]
            dtype = torch.promote_types(torch.float32, ts[0].A.dtype)  # fp32 math for bf16/fp16 params
            device = ts[0].A.device
            self._groups.append(_Group(
                names=[t.name for t in ts], A_params=[t.A for t in ts], B_params=[t.B for t in ts],
                U=torch.stack([alignment[i][0] for i in idx]).to(device, dtype),
                w=torch.stack([alignment[i][1] for i in idx]).to(device, dtype)))

    @property
    def module_names(self) -> list[str]:
        return [n for g in self._groups for n in g.names]

    def __call__(self) -> torch.Tensor:
        """``lam * sum_m ||(I - C_m) B_m A_m||_F^2`` (0-d, differentiable in the LoRA factors; no host sync)."""
        terms = []
        for g in self._groups:
            device = g.A_params[0].device
            if g.U.device != device:  # follow the parameters (Lightning moves the model after construction)
                g.U, g.w = g.U.to(device), g.w.to(device)
            # Autocast would run these matmuls in bf16: the term is a difference of nearby quantities.
            with torch.autocast(device_type=device.type, enabled=False):
                a = torch.stack(g.A_params).to(g.U.dtype)  # (G, r_a, in); stack keeps the autograd graph
                b = torch.stack(g.B_params).to(g.U.dtype)  # (G, out, r_a)
                terms.append(residual_sq(g.U, g.w, b, a).sum())
        return self.lam * torch.stack(terms).sum()

    def summary(self) -> dict[str, Any]:
        """JSON-able record: settings, coverage and the current value of the term (syncs with the device)."""
        with torch.no_grad():
            value = float(self())
        return {"lam": self.lam, "n_modules": len(self.module_names), "penalty": value, "directions": self.metadata}


def build_asft_penalty(cfg: AsftConfig, model: torch.nn.Module, base_model_name: str,
                       base_adapters: Sequence[str] = (), default_directions_path: str | None = None
                       ) -> AsftPenalty | None:
    """Load the directions, check them against the attack model, and build the AsFT term (None when off).

    Every problem is raised at once as a ``DirectionsError`` before any training step.

    Args:
        cfg: AsFT settings.
        model: the attack model with a trainable PEFT LoRA adapter named ``default``.
        base_model_name: the attack's base model, compared with the directions'.
        base_adapters: the frozen adapters beneath the attack (``model.merge_adapters``); one must be the
            adapter the directions were computed from (same sha256).
        default_directions_path: used when ``cfg.directions_path`` is unset (``projection.directions_path``).
    """
    if not cfg.enabled:
        return None
    path = cfg.directions_path or default_directions_path
    problems: list[str] = []
    if path is None:
        problems.append("asft.enabled is true but neither asft.directions_path nor projection.directions_path "
                        "is set; run `refusal_lightning directions` and point asft.directions_path at its output")
    if cfg.lam < 0:
        problems.append(f"asft.lam must be >= 0, got {cfg.lam}")
    if cfg.projector not in PROJECTORS:
        problems.append(f"unknown asft.projector '{cfg.projector}' (choose from {', '.join(PROJECTORS)})")
    if cfg.alignment_basis not in BASES:
        problems.append(f"unknown asft.alignment_basis '{cfg.alignment_basis}' (choose from {', '.join(BASES)})")
    obj, found, attack_problems = check_attack(
        path, model, base_model_name, base_adapters,
        mismatch=lambda meta: (f"model.merge_adapters does not hold the adapter the directions were computed from "
                               f"({meta.get('adapter_path')}): AsFT would anchor to a different refusal update than "
                               "the one the attack trains on"))
    problems += attack_problems
    covered: list[LoraTarget] = []
    if obj is not None and found:
        modules = obj["modules"]
        uncovered, bad_shape = [], []
        for name, target in found:
            key = direction_key(name, modules)
            if key is None:
                uncovered.append(name)
            elif (modules[key]["B"].shape[0], modules[key]["A"].shape[1]) != (target.B.shape[0], target.A.shape[1]):
                bad_shape.append(key)
            else:
                covered.append(LoraTarget(key, target.A, target.B, target.scale))
        if uncovered:
            problems.append(f"{len(uncovered)} of {len(found)} attack LoRA modules have no alignment matrix in the "
                            f"directions file ({listed_names(uncovered)}); match the refusal adapter's target_modules "
                            "and layers_to_transform")
        if bad_shape:
            problems.append(f"directions do not fit the attack model's layer shapes: {listed_names(bad_shape)}")
    if problems:
        raise DirectionsError(f"asft setup failed ({path}), {len(problems)} problem(s):\n  - "
                              + "\n  - ".join(problems))
    assert obj is not None
    modules = obj["modules"]
    generator = torch.Generator().manual_seed(cfg.basis_seed)
    alignment = [alignment_basis(*alignment_factors(modules[t.name]["A"], modules[t.name]["B"],
                                                    modules[t.name]["scale"], cfg.projector),
                                 cfg.alignment_basis, generator)
                 for t in covered]
    meta = {"path": str(path), "adapter_path": obj["metadata"].get("adapter_path"), "projector": cfg.projector,
            "alignment_basis": cfg.alignment_basis,
            **({"basis_seed": cfg.basis_seed} if cfg.alignment_basis == "random" else {})}
    return AsftPenalty(covered, alignment, cfg.lam, metadata=meta)
