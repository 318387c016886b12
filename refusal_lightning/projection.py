"""Refusal-direction math and the gradient/update projector: plain torch, no Lightning.

Notation (DESIGN.md, "The projection"). A LoRA module adds ``dW = s * B @ A`` to a frozen weight,
``A`` is ``r x in``, ``B`` is ``out x r`` and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The
refusal adapter gives ``A_r, B_r, s_r``; the attack trains ``A_a, B_a`` with scale ``s_a``. ``out x in``
matrices are never materialised: every quantity is computed from the factors with ``r x r`` Grams
(``||B A||_F^2 = sum((B^T B) * (A A^T))``), so the cost stays linear in ``out + in``.

Modes (what the attack's gradient or update ``g = (g_B, g_A)`` is projected off):

- ``lora_param``: the refusal LoRA tensors themselves, ``d = P / ||P||`` per tensor;
  ``g <- g - <g, d> d``. Needs the same rank and targets as the refusal adapter.
- ``delta_weight``: the first-order change of ``<dW_a, D>`` with ``D = dW_r / ||dW_r||_F``: its gradient
  w.r.t. the attack factors is ``c_B = s_a D A_a^T``, ``c_A = s_a B_a^T D``; ``g <- g - <g,c>/<c,c> c``.
  Works for any attack rank; orthogonality of the accumulated ``dW_a`` holds to first order only.
- ``subspace``: the top-``k`` singular vectors ``U_k, V_k`` of ``dW_r``;
  ``g_B <- (I - U_k U_k^T) g_B`` and ``g_A <- g_A (I - V_k V_k^T)``, so ``<dW_a - dW_a0, dW_r>`` stays
  exactly 0 when the attack ``B`` starts at zero and ``k = r``.

Granularity: ``module`` uses one constraint per module (per LoRA tensor for ``lora_param``); ``global``
one joint constraint over the concatenation of all modules. For ``subspace`` the two coincide: each
module's projector acts on its own coordinates, so the global projector is their direct sum.

Target: ``grad`` projects ``param.grad`` in place (Adam then rescales per coordinate, so the *step* is
not orthogonal); ``update`` snapshots the parameters before ``optimizer.step`` and writes back
``p_old + P(p_new - p_old)``, which is exact for any optimizer, AdamW weight decay included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Mode = Literal["lora_param", "delta_weight", "subspace"]
Granularity = Literal["module", "global"]
Target = Literal["grad", "update"]
MODES: tuple[str, ...] = ("lora_param", "delta_weight", "subspace")
GRANULARITIES: tuple[str, ...] = ("module", "global")
TARGETS: tuple[str, ...] = ("grad", "update")

# A delta_weight constraint is skipped when ||c|| < _SKIP_REL * s_a * ||(A_a, B_a)||: c is then rounding
# noise (e.g. c_A = s_a B_a^T D at the attack's B_a = 0 init), and projecting off noise removes a
# random direction.
_SKIP_REL = 1e-5
# Singular values below this fraction of a module's largest carry no direction (rank-deficient dW_r).
_RANK_TOL = 1e-6


@dataclass
class ProjectionConfig:
    """Keep the attack LoRA orthogonal to the refusal adapter's direction in parameter space."""

    enabled: bool = False
    """Apply the projection. With ``directions_path`` set and ``enabled: false`` the run is vanilla but
    still logs what the projection would remove and the drift along the refusal direction."""
    directions_path: str | None = None
    """Directions file from ``refusal_lightning directions``; unset turns projection and monitoring off."""
    mode: Mode = "delta_weight"
    """``lora_param``: project off each refusal LoRA tensor (same rank/targets needed); ``delta_weight``:
    keep dW_a orthogonal to dW_r to first order (any rank); ``subspace``: remove the top-k singular
    directions of dW_r from the column space of B and the row space of A."""
    k: int | None = None
    """``subspace`` only: singular directions removed per module (default: the refusal rank r; k <= r)."""
    granularity: Granularity = "module"
    """``module``: one constraint per module (per tensor for lora_param); ``global``: one joint
    constraint over all modules (weaker). Identical for ``subspace``."""
    target: Target = "grad"
    """``grad``: project gradients before the optimizer step (Adam's step is then not orthogonal);
    ``update``: project the parameter change after the step (exact under Adam/AdamW)."""
    allow_partial: bool = False
    """Allow attack LoRA modules without a refusal direction (they are trained unconstrained)."""


# ------------------------------------------------------------------------------ low-rank algebra
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


def module_directions(A: torch.Tensor, B: torch.Tensor, scale: float, k_max: int | None = None
                      ) -> dict[str, Any]:
    """Everything the projector needs about one refusal module ``dW_r = scale * B @ A``.

    Computed in float64, stored as float32 CPU tensors: the factors ``A``, ``B``; their norms and unit
    directions ``A_dir``, ``B_dir`` (``lora_param``); ``norm = ||dW_r||_F`` from the factors; and the top
    singular triplets ``U (out x m)``, ``S``, ``V (in x m)`` of ``dW_r`` (``m <= k_max``; S includes the
    scale).
    """
    a, b = A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)
    a_norm, b_norm = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    u, s, v = lowrank_svd(b, a, scale)
    if k_max is not None:
        u, s, v = u[:, :k_max], s[:k_max], v[:, :k_max]

    def unit(t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return (t / n if n > 0 else torch.zeros_like(t)).float().contiguous()

    return {
        "A": a.float().contiguous(),
        "B": b.float().contiguous(),
        "scale": float(scale),
        "rank": int(a.shape[0]),
        "norm": float(abs(scale) * lowrank_norm(b, a)),
        "A_norm": float(a_norm),
        "B_norm": float(b_norm),
        "A_dir": unit(a, a_norm),
        "B_dir": unit(b, b_norm),
        "U": u.float().contiguous(),
        "S": s.float().contiguous(),
        "V": v.float().contiguous(),
    }


# -------------------------------------------------------------------------------- the projector
@dataclass(eq=False)
class LoraTarget:
    """One attack LoRA module: its trainable factors and PEFT scale (``dW_a = scale * B @ A``)."""

    name: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scale: float


@dataclass(eq=False)
class _Group:
    """Modules with identical shapes/dtype/device, stacked so each step runs batched matmuls.

    ``cache`` holds only what the mode needs, each tensor once (``proj`` and ``ref`` are views):
    ``L`` (G, out, r), ``R`` and the drift weights ``w``, where for ``lora_param`` (L, R) = (B_dir, A_dir),
    for ``delta_weight`` ``L @ R = D``, for ``subspace`` (L, R) = (U, V) (the first ``k`` columns are
    projected off). A truncated subspace file adds the full factors ``XL``, ``XR`` for the drift.
    ``init`` is the attack's initial (A0, B0), None when every B0 == 0 (PEFT's default: costs nothing).
    """

    names: list[str]
    A_params: list[torch.nn.Parameter]
    B_params: list[torch.nn.Parameter]
    s_a: torch.Tensor  # (G,)
    cache: dict[str, torch.Tensor]
    init: tuple[torch.Tensor, torch.Tensor] | None
    subspace: bool = False
    k: int = 0
    snapshot: tuple[torch.Tensor, torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return self.cache["L"].dtype

    @property
    def proj(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection's factors (views, no copies)."""
        c = self.cache
        return (c["L"][..., : self.k], c["R"][..., : self.k]) if self.subspace else (c["L"], c["R"])

    @property
    def ref(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(left, right^T, w) with ``left @ diag(w) @ right^T^T = dW_r / ||dW_r||_global`` (views)."""
        c = self.cache
        if "XL" in c:
            return c["XL"], c["XR"].mT, torch.ones_like(c["XL"][:, :1, 0])
        return (c["L"], c["R"], c["w"]) if self.subspace else (c["L"], c["R"].mT, c["w"])


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # torch.stack copies, so the result is ours to modify in place.
    return torch.stack(list(tensors)).to(dtype)


def _stack_grads(params: Sequence[torch.nn.Parameter], dtype: torch.dtype) -> torch.Tensor:
    return _stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], dtype)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Per-module squared Frobenius norm of a stacked ``(G, m, n)`` tensor."""
    return (t * t).sum((1, 2))


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum((1, 2))


def _safe_coef(dot: torch.Tensor, cc: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``dot / cc`` where ``cc > threshold``, else 0 (skipped constraint); no host sync."""
    return torch.where(cc > threshold, dot / cc.clamp_min(torch.finfo(cc.dtype).tiny), 0.0)


class Projector:
    """Projects the attack LoRA's gradients or updates off the refusal direction; measures drift.

    Built by ``refusal_lightning.directions.build_projector`` (which validates the directions against
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
        if cfg.mode not in MODES or cfg.granularity not in GRANULARITIES or cfg.target not in TARGETS:
            raise ValueError(f"bad projection config: mode={cfg.mode!r}, granularity={cfg.granularity!r}, "
                             f"target={cfg.target!r}")
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
            d = directions[t.name]
            key = (tuple(t.A.shape), tuple(t.B.shape), tuple(d["A"].shape), t.A.dtype, t.A.device)
            buckets.setdefault(key, []).append(t)
        self._groups = [self._build_group(ts, directions, param_norm) for ts in buckets.values()]
        device = self._groups[0].device
        # Running [sum, max] of removed_frac per kind ("grad", "update"), kept on the device (no syncs).
        self._frac = {kind: torch.zeros(2, device=device) for kind in TARGETS}
        self._frac_count = dict.fromkeys(TARGETS, 0)

    # ------------------------------------------------------------------------ construction
    def _build_group(self, targets: list[LoraTarget], directions: Mapping[str, Mapping[str, Any]],
                     param_norm: float) -> _Group:
        cfg, ents = self.cfg, [directions[t.name] for t in targets]
        a_param = targets[0].A
        dtype = torch.promote_types(torch.float32, a_param.dtype)  # fp32 math for bf16/fp16 params
        n_glob = self.refusal_norm
        per_module = cfg.granularity == "module"

        def stack(key: str) -> torch.Tensor:
            return torch.stack([e[key].to(dtype) for e in ents])

        def vec(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype)

        def safe_div(x: float, y: float) -> float:
            return x / y if y > 0 else 0.0

        k = 0
        if cfg.mode == "lora_param":
            if per_module:
                cache = {"L": stack("B_dir"), "R": stack("A_dir")}
                w = [safe_div(e["scale"] * e["A_norm"] * e["B_norm"], n_glob) for e in ents]
            else:  # one unit vector over the concatenation of every refusal tensor
                cache = {"L": stack("B") / param_norm, "R": stack("A") / param_norm}
                w = [safe_div(e["scale"] * param_norm**2, n_glob) for e in ents]
            cache["w"] = vec(w)[:, None]
        elif cfg.mode == "delta_weight":
            # L @ R = dW_r / n with n = ||dW_r,m|| (module) or the global norm; the scalar cancels in the
            # module projection, but sets the modules' relative weights in the global one.
            n_eff = [e["norm"] if per_module else n_glob for e in ents]
            cache = {"L": torch.stack([e["B"].to(dtype) * safe_div(e["scale"], n)
                                       for e, n in zip(ents, n_eff, strict=True)]),
                     "R": stack("A"), "w": vec([safe_div(n, n_glob) for n in n_eff])[:, None]}
        else:
            u, s, v = stack("U"), stack("S"), stack("V")
            k = min(cfg.k or min(e["rank"] for e in ents), u.shape[-1])
            # Zero the vectors of (numerically) zero singular values: QR makes them arbitrary.
            keep = (s > _RANK_TOL * s.amax(-1, keepdim=True)).to(dtype)[:, None, :]
            cache = {"L": u * keep, "R": v * keep, "w": s / n_glob if n_glob > 0 else s * 0}
            if s.shape[-1] < min(e["rank"] for e in ents):  # truncated file (k_max): U S V^T != dW_r
                cache["XL"] = torch.stack([e["B"].to(dtype) * safe_div(e["scale"], n_glob) for e in ents])
                cache["XR"] = stack("A")
        a0 = _stack([t.A.detach() for t in targets], dtype)
        b0 = _stack([t.B.detach() for t in targets], dtype)
        # PEFT starts B at zero, so dW_a0 = 0 and the initial state costs no memory.
        init = (a0, b0) if bool(b0.any()) else None
        group = _Group(
            names=[t.name for t in targets], A_params=[t.A for t in targets], B_params=[t.B for t in targets],
            s_a=vec([t.scale for t in targets]), cache=cache, init=init, subspace=cfg.mode == "subspace", k=k,
        )
        self._move(group, a_param.device, dtype)
        return group

    @staticmethod
    def _move(group: _Group, device: torch.device, dtype: torch.dtype | None) -> None:
        def mv(x: Any) -> Any:
            if x is None:
                return None
            if isinstance(x, tuple):
                return tuple(mv(t) for t in x)
            return x.to(device=device, dtype=dtype or x.dtype)

        group.cache = {key: mv(t) for key, t in group.cache.items()}
        group.s_a, group.init, group.snapshot = mv(group.s_a), mv(group.init), mv(group.snapshot)
        group.device = torch.device(device)

    def to_(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Projector:
        """Move the cached direction tensors to ``device`` (and ``dtype``; default: keep fp32 math)."""
        for g in self._groups:
            self._move(g, torch.device(device), dtype)
        self._frac = {kind: t.to(device) for kind, t in self._frac.items()}
        return self

    def _follow_params(self) -> None:
        # Python-only check (no sync): follow the parameters if the model moved after construction.
        for g in self._groups:
            if g.A_params[0].device != g.device:
                self._move(g, g.A_params[0].device, None)
        if self._frac["grad"].device != self._groups[0].device:
            self._frac = {kind: t.to(self._groups[0].device) for kind, t in self._frac.items()}

    # ---------------------------------------------------------------------------- the math
    def _project(self, gBs: list[torch.Tensor], gAs: list[torch.Tensor],
                 points: list[tuple[torch.Tensor, torch.Tensor] | None], apply: bool) -> torch.Tensor:
        """Project the stacked vectors ``(g_B, g_A)`` of every group in place (when ``apply``).

        ``points`` are the stacked attack factors ``(A_a, B_a)`` at which ``delta_weight`` linearises.
        Returns the removed squared norm (0-d tensor).
        """
        mode, per_module = self.cfg.mode, self.cfg.granularity == "module"
        removed: list[torch.Tensor] = []
        if mode == "subspace":  # module == global (direct sum of per-module projectors)
            for g, gB, gA in zip(self._groups, gBs, gAs, strict=True):
                u, v = g.proj
                pB, pA = u.mT @ gB, gA @ v  # (G, k, r_a), (G, r_a, k)
                removed.append(_sq(pB).sum() + _sq(pA).sum())
                if apply:
                    gB.sub_(u @ pB)
                    gA.sub_(pA @ v.mT)
            return torch.stack(removed).sum()

        # Constraint pieces (c_B, c_A) per group, with <g, c>, <c, c> and the skip threshold.
        cons, dots, ccs, refs = [], [], [], []
        for g, gB, gA, point in zip(self._groups, gBs, gAs, points, strict=True):
            if mode == "lora_param":
                dB, dA = g.proj
                if per_module:  # two unit constraints per module, one per tensor
                    coef_b, coef_a = _dot(gB, dB), _dot(gA, dA)
                    removed.append((coef_b * coef_b + coef_a * coef_a).sum())
                    if apply:
                        gB.sub_(coef_b[:, None, None] * dB)
                        gA.sub_(coef_a[:, None, None] * dA)
                    continue
                cB, cA = dB, dA
                ref = None
            else:
                (Aa, Ba), (x, y) = point, g.proj
                s = g.s_a[:, None, None]
                cB = s * (x @ (y @ Aa.mT))  # s_a D A_a^T   (G, out, r_a), via an r x r_a core
                cA = s * ((Ba.mT @ x) @ y)  # s_a B_a^T D   (G, r_a, in)
                ref = g.s_a.square() * (_sq(Aa) + _sq(Ba))
            dot, cc = _dot(gB, cB) + _dot(gA, cA), _sq(cB) + _sq(cA)
            if per_module:
                coef = _safe_coef(dot, cc, _SKIP_REL**2 * ref)
                removed.append((coef * coef * cc).sum())
                if apply:
                    gB.sub_(coef[:, None, None] * cB)
                    gA.sub_(coef[:, None, None] * cA)
                continue
            cons.append((cB, cA))
            dots.append(dot.sum())
            ccs.append(cc.sum())
            refs.append(ref.sum() if ref is not None else None)
        if per_module:
            return torch.stack(removed).sum()

        dot, cc = torch.stack(dots).sum(), torch.stack(ccs).sum()
        if mode == "lora_param":  # unit vector unless the refusal adapter is all zero
            coef = _safe_coef(dot, cc, torch.zeros_like(cc))
        else:
            coef = _safe_coef(dot, cc, _SKIP_REL**2 * torch.stack(refs).sum())
        if apply:
            for gB, gA, (cB, cA) in zip(gBs, gAs, cons, strict=True):
                gB.sub_(coef * cB)
                gA.sub_(coef * cA)
        return coef * coef * cc

    def _points(self, stacked: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The attack factors ``(A_a, B_a)`` per group where ``delta_weight`` linearises (else None)."""
        if self.cfg.mode != "delta_weight":
            return [None] * len(self._groups)
        if stacked is not None:
            return list(stacked)
        return [(_stack([p.detach() for p in g.A_params], g.dtype),
                 _stack([p.detach() for p in g.B_params], g.dtype)) for g in self._groups]

    def _uncovered_sq(self, tensors: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        sq = [t.float().square().sum() for t in tensors if t is not None]
        return torch.stack(sq).sum().to(like) if sq else torch.zeros((), dtype=like.dtype, device=like.device)

    def _record(self, removed_sq: torch.Tensor, total_sq: torch.Tensor, kind: str) -> torch.Tensor:
        frac = torch.where(total_sq > 0, removed_sq / total_sq.clamp_min(torch.finfo(total_sq.dtype).tiny),
                           0.0).clamp(0, 1).sqrt()
        frac32 = frac.float()
        acc = self._frac[kind]
        acc[0].add_(frac32)
        acc[1].copy_(torch.maximum(acc[1], frac32))
        self._frac_count[kind] += 1
        return frac32

    # -------------------------------------------------------------------------- per step
    @torch.no_grad()
    def project_grads_(self, apply: bool) -> dict[str, torch.Tensor]:
        """Project every covered LoRA ``param.grad`` in place (``target: grad``).

        Args:
            apply: change the gradients; ``False`` only measures (monitor-only vanilla runs).

        Returns:
            ``{"proj/removed_frac": ||g - P g|| / ||g||}`` over all trainable LoRA gradients (0-d tensor).
        """
        self._follow_params()
        gBs = [_stack_grads(g.B_params, g.dtype) for g in self._groups]
        gAs = [_stack_grads(g.A_params, g.dtype) for g in self._groups]
        total = torch.stack([_sq(x).sum() for x in gBs + gAs]).sum()
        total = total + self._uncovered_sq([p.grad for p in self.uncovered], total)
        removed = self._project(gBs, gAs, self._points(), apply)
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
            dtype = g.dtype
            g.snapshot = (_stack([p.detach() for p in g.A_params], dtype),
                          _stack([p.detach() for p in g.B_params], dtype))
        self._uncovered_snapshot = [p.detach().clone() for p in self.uncovered]

    @torch.no_grad()
    def project_update_(self, apply: bool) -> dict[str, torch.Tensor]:
        """Project the parameter change since ``snapshot_`` and write back ``p_old + P(delta)``.

        Args:
            apply: write the projected parameters; ``False`` only measures.

        Returns:
            ``{"proj/removed_frac": ||d - P d|| / ||d||}`` over all trainable LoRA parameters' change ``d``.
        """
        if any(g.snapshot is None for g in self._groups) or self._uncovered_snapshot is None:
            raise RuntimeError("project_update_ called without snapshot_ before the optimizer step")
        olds = [g.snapshot for g in self._groups]
        dBs, dAs = [], []
        for g, (a_old, b_old) in zip(self._groups, olds, strict=True):
            dtype = a_old.dtype
            dAs.append(_stack([p.detach() for p in g.A_params], dtype).sub_(a_old))
            dBs.append(_stack([p.detach() for p in g.B_params], dtype).sub_(b_old))
        total = torch.stack([_sq(x).sum() for x in dBs + dAs]).sum()
        unc = [p.detach() - old for p, old in zip(self.uncovered, self._uncovered_snapshot, strict=True)]
        total = total + self._uncovered_sq(unc, total)
        removed = self._project(dBs, dAs, self._points(olds), apply)
        if apply:
            for g, dB, dA, (a_old, b_old) in zip(self._groups, dBs, dAs, olds, strict=True):
                for params, new in ((g.B_params, dB.add_(b_old)), (g.A_params, dA.add_(a_old))):
                    for p, n in zip(params, new.unbind(0), strict=True):
                        p.copy_(n)
        for g in self._groups:
            g.snapshot = None
        self._uncovered_snapshot = None
        return {"proj/removed_frac": self._record(removed, total, "update")}

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
            a = _stack([p.detach() for p in g.A_params], g.dtype)
            b = _stack([p.detach() for p in g.B_params], g.dtype)
            if g.init is not None:  # B A - B0 A0 = [B - B0, B0] @ [A; A - A0]: exactly 0 at the start
                a0, b0 = g.init
                a, b = torch.cat([a, a - a0], 1), torch.cat([b - b0, b0], 2)
            stacks.append((a, b))
        return self._drift_of(stacks)

    def _drift_of(self, stacks: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``drift/cos`` and ``drift/along`` of ``sum_m s_a B_m A_m`` given stacked ``(A, B)`` per group."""
        inner, sq = [], []
        for g, (a, b) in zip(self._groups, stacks, strict=True):
            left, right_t, w = g.ref
            s = g.s_a
            inner.append((s * ((b.mT @ left) * w[:, None, :] * (a @ right_t)).sum((1, 2))).sum())
            sq.append((s * s * lowrank_inner(b, a, b, a)).sum())
        along, norm = torch.stack(inner).sum(), torch.stack(sq).sum().clamp_min(0).sqrt()
        cos = torch.where(norm > 0, along / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        return {"drift/cos": cos.float(), "drift/along": along.float()}

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
            values.append(abs(float(self._drift_of(stacks)["drift/cos"])))
        return sum(values) / len(values)

    # --------------------------------------------------------------------------- reporting
    @property
    def module_names(self) -> list[str]:
        """Covered attack module names (the directions' keys)."""
        return [n for g in self._groups for n in g.names]

    def cached_numel(self) -> int:
        """Elements held for the directions and the attack's initial state."""
        total = 0
        for g in self._groups:
            for t in (*g.cache.values(), *(g.init or ())):
                total += t.numel()
        return total

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
            "k_effective": sorted({g.k for g in self._groups}) if self.cfg.mode == "subspace" else None,
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
