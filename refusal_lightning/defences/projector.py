"""The projector: applies projection.py's math to an attack model's LoRA parameters at each step.

It stacks same-shaped modules into groups (batched matmuls), keeps their refusal directions on the
parameters' device, projects gradients (``target: grad``) or the optimizer's update (``target: update``),
measures the fraction removed and the drift along the refusal direction, and reports both. Plain torch;
the LightningModule (``train/module.py``) only calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refusal_lightning.defences.lowrank import lowrank_inner
from refusal_lightning.defences.projection import (
    PROJECTIONS,
    TARGETS,
    LoraTarget,
    ModuleGroup,
    ProjectionConfig,
    build_group,
    sq_norms,
)


class Projector:
    """Projects the attack LoRA's gradients or updates off the refusal direction; measures drift.

    Built by ``refusal_lightning.defences.directions.build_projector`` (which validates the directions against
    the attack model first). Per-step methods return 0-d tensors and never synchronise with the host.
    """

    def __init__(
        self,
        cfg: ProjectionConfig,
        targets: Sequence[LoraTarget],
        directions: Mapping[str, Mapping[str, Any]],
        *,
        uncovered: Sequence[LoraTarget] = (),
        metadata: Mapping[str, Any] | None = None,
        n_unused_directions: int = 0,
    ):
        """
        Args:
            cfg: projection settings.
            targets: attack LoRA modules to constrain; each ``name`` must be a key of ``directions``.
            directions: per-module refusal entries as made by ``module_directions`` (already validated).
            uncovered: attack LoRA modules without a direction (trained freely; counted in the norms).
            metadata: the directions file's metadata, reported by ``summary``.
            n_unused_directions: directions for modules the attack does not train (reported only).
        """
        if problems := cfg.problems():
            raise ValueError("bad projection config: " + "; ".join(problems))
        if not targets:
            raise ValueError("no LoRA modules to project")
        self.cfg = cfg
        self.metadata = dict(metadata or {})
        self.n_uncovered = len(uncovered)
        self.uncovered = [p for t in uncovered for p in (t.A, t.B)]
        self.n_unused_directions = n_unused_directions
        self._uncovered_snapshot: list[torch.Tensor] | None = None
        norms = {t.name: float(directions[t.name]["norm"]) for t in targets}
        self.refusal_norm = math.sqrt(sum(n * n for n in norms.values()))
        param_norm = math.sqrt(sum(float(directions[t.name]["A_norm"]) ** 2
                                   + float(directions[t.name]["B_norm"]) ** 2 for t in targets))
        buckets: dict[tuple, list[LoraTarget]] = {}
        for t in targets:
            key = (tuple(t.A.shape), tuple(t.B.shape), tuple(directions[t.name]["A"].shape), t.A.dtype, t.A.device)
            buckets.setdefault(key, []).append(t)
        self._groups: list[ModuleGroup] = [build_group(cfg, ts, directions, self.refusal_norm, param_norm)
                                           for ts in buckets.values()]
        self._project = PROJECTIONS[cfg.mode]
        self._per_module = cfg.granularity == "module"
        device = self._groups[0].device
        # Running [sum, max] of removed_frac per kind ("grad", "update"), kept on the device (no syncs).
        self._frac = {kind: torch.zeros(2, device=device) for kind in TARGETS}
        self._frac_count = dict.fromkeys(TARGETS, 0)

    # ------------------------------------------------------------------------------ placement
    def to_(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Projector:
        """Move the cached direction tensors to ``device`` (and ``dtype``; default: keep fp32 math)."""
        for g in self._groups:
            g.move_(torch.device(device), dtype)
        self._frac = {kind: t.to(device) for kind, t in self._frac.items()}
        return self

    def _follow_params(self) -> None:
        # Python-only check (no sync): follow the parameters if the model moved after construction.
        for g in self._groups:
            if g.A_params[0].device != g.device:
                g.move_(g.A_params[0].device, None)
        if self._frac["grad"].device != self._groups[0].device:
            self._frac = {kind: t.to(self._groups[0].device) for kind, t in self._frac.items()}

    # ------------------------------------------------------------------------------- per step
    def _total_sq(self, stacked: Sequence[torch.Tensor], uncovered: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Squared norm of the stacked groups' tensors plus the uncovered modules' (0-d, no host sync)."""
        total = torch.stack([sq_norms(x).sum() for x in stacked]).sum()
        sq = [t.float().square().sum() for t in uncovered if t is not None]
        return total + torch.stack(sq).sum().to(total) if sq else total

    def _record(self, removed_sq: torch.Tensor, total_sq: torch.Tensor, kind: str) -> torch.Tensor:
        frac = torch.where(total_sq > 0, removed_sq / total_sq.clamp_min(torch.finfo(total_sq.dtype).tiny),
                           0.0).clamp(0, 1).sqrt()
        frac32 = frac.float()
        acc = self._frac[kind]
        acc[0].add_(frac32)
        acc[1].copy_(torch.maximum(acc[1], frac32))
        self._frac_count[kind] += 1
        return frac32

    @torch.no_grad()
    def project_grads_(self, apply: bool) -> dict[str, torch.Tensor]:
        """Project every covered LoRA ``param.grad`` in place (``target: grad``).

        Args:
            apply: change the gradients; ``False`` only measures (monitor-only vanilla runs).

        Returns:
            ``{"proj/removed_frac": ||g - P g|| / ||g||}`` over all trainable LoRA gradients (0-d tensor).
        """
        self._follow_params()
        stacked = [g.grads() for g in self._groups]
        gBs, gAs = [gB for gB, _ in stacked], [gA for _, gA in stacked]
        total = self._total_sq(gBs + gAs, [p.grad for p in self.uncovered])
        removed = self._project(self._groups, gBs, gAs, per_module=self._per_module, apply=apply)
        if apply:
            for g, gB, gA in zip(self._groups, gBs, gAs, strict=True):
                for params, new in ((g.B_params, gB), (g.A_params, gA)):
                    for p, n in zip(params, new.unbind(0), strict=True):
                        if p.grad is None:
                            p.grad = n.to(p.dtype, copy=True)
                        else:
                            p.grad.copy_(n)
        return {"proj/removed_frac": self._record(removed, total, "grad")}

    @torch.no_grad()
    def snapshot_(self) -> None:
        """Remember the LoRA parameters before ``optimizer.step`` (``target: update``)."""
        self._follow_params()
        for g in self._groups:
            g.snapshot = g.params()
        self._uncovered_snapshot = [p.detach().clone() for p in self.uncovered]

    @torch.no_grad()
    def project_update_(self, apply: bool) -> dict[str, torch.Tensor]:
        """Project the parameter change since ``snapshot_`` and write back ``p_old + P(delta)``.

        Args:
            apply: write the projected parameters; ``False`` only measures.

        Returns:
            ``{"proj/removed_frac": ||d - P d|| / ||d||}`` over all trainable LoRA parameters' change ``d``.
        """
        olds = [g.snapshot for g in self._groups]
        if any(old is None for old in olds) or self._uncovered_snapshot is None:
            raise RuntimeError("project_update_ called without snapshot_ before the optimizer step")
        dBs, dAs = [], []
        for g, (a_old, b_old) in zip(self._groups, olds, strict=True):
            a_new, b_new = g.params()
            dAs.append(a_new.sub_(a_old))
            dBs.append(b_new.sub_(b_old))
        unc = [p.detach() - old for p, old in zip(self.uncovered, self._uncovered_snapshot, strict=True)]
        total = self._total_sq(dBs + dAs, unc)
        removed = self._project(self._groups, dBs, dAs, per_module=self._per_module, apply=apply, points=olds)
        if apply:
            for g, dB, dA, (a_old, b_old) in zip(self._groups, dBs, dAs, olds, strict=True):
                for params, new in ((g.B_params, dB.add_(b_old)), (g.A_params, dA.add_(a_old))):
                    for p, n in zip(params, new.unbind(0), strict=True):
                        p.copy_(n)
        for g in self._groups:
            g.snapshot = None
        self._uncovered_snapshot = None
        return {"proj/removed_frac": self._record(removed, total, "update")}

    # ---------------------------------------------------------------------------------- drift
    @torch.no_grad()
    def drift(self) -> dict[str, torch.Tensor]:
        """How far the attack's accumulated update has moved along the refusal direction.

        ``dW_acc = s_a (B A - B0 A0)`` per module (``B0 A0``: the attack's LoRA at construction), all
        modules concatenated; ``D = dW_r / ||dW_r||`` likewise. Returns 0-d tensors
        ``drift/cos = <dW_acc, D> / ||dW_acc||`` and ``drift/along = <dW_acc, D>`` (signed).
        """
        self._follow_params()
        stacks = []
        for g in self._groups:
            a, b = g.params()
            if g.init is not None:  # B A - B0 A0 = [B - B0, B0] @ [A; A - A0]: exactly 0 at the start
                a0, b0 = g.init
                a, b = torch.cat([a, a - a0], 1), torch.cat([b - b0, b0], 2)
            stacks.append((a, b))
        return _drift_of(self._groups, stacks)

    @torch.no_grad()
    def chance_cos(self, draws: int = 16, seed: int = 0) -> float:
        """Chance level of ``|drift/cos|``: its mean over random updates of the attack's shape.

        Each draw fills every covered module's ``A`` and ``B`` with i.i.d. Gaussians (the attack's ranks,
        modules and scales) and measures it with the same code as ``drift``. About
        ``sqrt(2 / (pi N))`` for ``N`` weights; an attack's ``|drift/cos|`` near it is noise, not alignment.
        """
        self._follow_params()
        gen = torch.Generator().manual_seed(seed)
        values = []
        for _ in range(draws):
            stacks = []
            for g in self._groups:
                a_shape, b_shape = (len(g.A_params), *g.A_params[0].shape), (len(g.B_params), *g.B_params[0].shape)
                stacks.append((torch.randn(a_shape, generator=gen).to(g.device, g.dtype),
                               torch.randn(b_shape, generator=gen).to(g.device, g.dtype)))
            values.append(abs(float(_drift_of(self._groups, stacks)["drift/cos"])))
        return sum(values) / len(values)

    # ------------------------------------------------------------------------------ reporting
    @property
    def module_names(self) -> list[str]:
        """Covered attack module names (the directions' keys)."""
        return [n for g in self._groups for n in g.names]

    def cached_numel(self) -> int:
        """Elements held for the directions and the attack's initial state."""
        return sum(t.numel() for g in self._groups for t in (*g.dirs.tensors(), *(g.init or ())))

    def summary(self) -> dict[str, Any]:
        """JSON-able record of the projection: settings, coverage, removed fraction, final drift.

        ``removed_frac`` has running mean/max per kind (``grad``: gradients, measured every step, projected
        when ``target: grad``; ``update``: parameter changes, with ``target: update``); the top-level
        ``removed_frac_mean``/``_max`` are those of the update when one was projected, else the gradient.
        Synchronises with the device (call at checkpoints / the end of fit, not per step).
        """
        drift = {k: float(v) for k, v in self.drift().items()}
        fracs = {}
        for kind, acc in self._frac.items():
            n = self._frac_count[kind]
            if n:
                total, peak = acc.tolist()
                fracs[kind] = {"mean": total / n, "max": peak, "n": n}
        main = fracs.get("update") or fracs.get("grad") or {}
        return {
            "mode": self.cfg.mode,
            "target": self.cfg.target,
            "granularity": self.cfg.granularity,
            "k": self.cfg.k,
            "k_effective": sorted({g.dirs.k for g in self._groups}) if self.cfg.mode == "subspace" else None,
            "enabled": self.cfg.enabled,
            "n_modules_covered": len(self.module_names),
            "n_modules_uncovered": self.n_uncovered,
            "n_directions_unused": self.n_unused_directions,
            "refusal_delta_norm": self.refusal_norm,
            "cached_elements": self.cached_numel(),
            "removed_frac_mean": main.get("mean"),
            "removed_frac_max": main.get("max"),
            "removed_frac": fracs,
            **drift,
            "directions": self.metadata,
        }

    def state_dict(self) -> dict[str, Any]:
        """Running statistics and the attack's initial factors (to resume drift measurement)."""
        return {
            "frac": {kind: t.detach().cpu() for kind, t in self._frac.items()},
            "frac_count": dict(self._frac_count),
            "init": [None if g.init is None else (g.init[0].cpu(), g.init[1].cpu()) for g in self._groups],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (same model and directions)."""
        for kind, t in state["frac"].items():
            self._frac[kind].copy_(t)
        self._frac_count = {kind: int(n) for kind, n in state["frac_count"].items()}
        for g, init in zip(self._groups, state["init"], strict=True):
            g.init = None if init is None else tuple(t.to(g.device, g.dtype) for t in init)


def _drift_of(groups: Sequence[ModuleGroup], stacks: Sequence[tuple[torch.Tensor, torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
    """``drift/cos`` and ``drift/along`` of ``sum_m s_a B_m A_m`` given stacked ``(A, B)`` per group."""
    inner, sq = [], []
    for g, (a, b) in zip(groups, stacks, strict=True):
        left, right_t, w = g.dirs.drift_factors()
        s = g.s_a
        inner.append((s * ((b.mT @ left) * w[:, None, :] * (a @ right_t)).sum((1, 2))).sum())
        sq.append((s * s * lowrank_inner(b, a, b, a)).sum())
    along, norm = torch.stack(inner).sum(), torch.stack(sq).sum().clamp_min(0).sqrt()
    cos = torch.where(norm > 0, along / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return {"drift/cos": cos.float(), "drift/along": along.float()}
