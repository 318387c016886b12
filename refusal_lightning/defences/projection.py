"""Refusal-direction math: plain torch on stacked LoRA factors, no Lightning, no state.

Notation (DESIGN.md, "The projection"). A LoRA module adds ``dW = s * B @ A`` to a frozen weight,
``A`` is ``r x in``, ``B`` is ``out x r`` and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The
refusal adapter gives ``A_r, B_r, s_r``; the attack trains ``A_a, B_a`` with scale ``s_a``. ``out x in``
matrices are never materialised: every quantity is computed from the factors with ``r x r`` Grams
(``||B A||_F^2 = sum((B^T B) * (A A^T))``), so the cost stays linear in ``out + in``.

Modes (what the attack's gradient or update ``g = (g_B, g_A)`` is projected off), one function each:

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
``projector.Projector`` applies these functions to a model's LoRA parameters at each step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from refusal_lightning.defences.lowrank import lowrank_norm, lowrank_svd

Mode = Literal["lora_param", "delta_weight", "subspace"]
Granularity = Literal["module", "global"]
Target = Literal["grad", "update"]
MODES: tuple[str, ...] = get_args(Mode)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
TARGETS: tuple[str, ...] = get_args(Target)

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

    def problems(self) -> list[str]:
        """Every inconsistent setting, in the user's words; [] when the settings can be used."""
        problems = []
        for key, value, allowed in (("projection mode", self.mode, MODES),
                                    ("granularity", self.granularity, GRANULARITIES),
                                    ("target", self.target, TARGETS)):
            if value not in allowed:
                problems.append(f"unknown {key} '{value}' (choose from {', '.join(allowed)})")
        if self.k is not None and self.mode != "subspace":
            problems.append(f"k={self.k} is only used by mode 'subspace' (mode is '{self.mode}')")
        if self.k is not None and self.k < 1:
            problems.append(f"k must be >= 1, got {self.k}")
        return problems


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


# ------------------------------------------------------------------------- stacked modules
@dataclass(eq=False)
class LoraTarget:
    """One attack LoRA module: its trainable factors and PEFT scale (``dW_a = scale * B @ A``)."""

    name: str
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scale: float


@dataclass(eq=False)
class DirectionCache:
    """What a group keeps of its refusal directions, stacked over its ``G`` modules; only what the mode
    needs, each tensor once.

    ``lora_param``: ``left, right = B_dir, A_dir`` (``B, A`` over the global parameter norm for
    ``global``); ``delta_weight``: ``left @ right = D`` (``s_r B_r / n``, ``A_r``); ``subspace``:
    ``left, right = U, V`` of which the first ``k`` columns are projected off. ``weight`` holds the drift
    weights (``left @ diag(weight) @ right = dW_r / ||dW_r||_global``); a truncated subspace file adds the
    full factors ``full = (s_r B_r / ||dW_r||_global, A_r)`` for the drift.
    """

    left: torch.Tensor  # (G, out, r) or (G, out, m)
    right: torch.Tensor  # (G, r, in) or, for subspace, (G, in, m)
    weight: torch.Tensor  # (G, 1) or, for subspace, (G, m)
    k: int | None = None
    """``subspace`` only: singular directions projected off; None for the other modes."""
    full: tuple[torch.Tensor, torch.Tensor] | None = None

    def projected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection's factors (views, no copies)."""
        if self.k is None:
            return self.left, self.right
        return self.left[..., : self.k], self.right[..., : self.k]

    def drift_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(left, right^T, w)`` with ``left @ diag(w) @ right^T^T = dW_r / ||dW_r||_global`` (views)."""
        if self.full is not None:
            left, right = self.full
            return left, right.mT, torch.ones_like(left[:, :1, 0])
        return self.left, self.right if self.k is not None else self.right.mT, self.weight

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right, self.weight, *(self.full or ())]

    def to(self, device: torch.device, dtype: torch.dtype | None) -> DirectionCache:
        left, right, weight, full = _moved((self.left, self.right, self.weight, self.full), device, dtype)
        return DirectionCache(left, right, weight, self.k, full)


def _moved(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``x`` (a tensor, a tuple of them, or None) on ``device`` in ``dtype`` (None: each keeps its own)."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_moved(t, device, dtype) for t in x)
    return x.to(device=device, dtype=dtype or x.dtype)


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # torch.stack copies, so the result is ours to modify in place.
    return torch.stack(list(tensors)).to(dtype)


@dataclass(eq=False)
class ModuleGroup:
    """Modules with identical shapes/dtype/device, stacked so each step runs batched matmuls.

    ``init`` is the attack's initial (A0, B0), None when every B0 == 0 (PEFT's default: costs nothing).
    """

    names: list[str]
    A_params: list[torch.nn.Parameter]
    B_params: list[torch.nn.Parameter]
    s_a: torch.Tensor  # (G,)
    dirs: DirectionCache
    init: tuple[torch.Tensor, torch.Tensor] | None
    snapshot: tuple[torch.Tensor, torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return self.dirs.left.dtype

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(A, B)``, stacked (a copy) in the group's dtype."""
        return (_stack([p.detach() for p in self.A_params], self.dtype),
                _stack([p.detach() for p in self.B_params], self.dtype))

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(g_B, g_A)``, stacked (a copy); a missing gradient is zero."""
        def stack(params: list[torch.nn.Parameter]) -> torch.Tensor:
            return _stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], self.dtype)

        return stack(self.B_params), stack(self.A_params)

    def move_(self, device: torch.device, dtype: torch.dtype | None) -> None:
        self.dirs = self.dirs.to(device, dtype)
        self.s_a, self.init, self.snapshot = _moved((self.s_a, self.init, self.snapshot), device, dtype)
        self.device = torch.device(device)


# ------------------------------------------------------------------ direction caches, per mode
def _safe_div(x: float, y: float) -> float:
    return x / y if y > 0 else 0.0


def _stacked(ents: Sequence[Mapping[str, Any]], key: str, dtype: torch.dtype) -> torch.Tensor:
    """The refusal entries' ``key`` tensors, stacked."""
    return _stack([e[key] for e in ents], dtype)


def _lora_param_cache(ents: Sequence[Mapping[str, Any]], cfg: ProjectionConfig, dtype: torch.dtype,
                      n_glob: float, param_norm: float) -> DirectionCache:
    if cfg.granularity == "module":
        left, right = _stacked(ents, "B_dir", dtype), _stacked(ents, "A_dir", dtype)
        w = [_safe_div(e["scale"] * e["A_norm"] * e["B_norm"], n_glob) for e in ents]
    else:  # one unit vector over the concatenation of every refusal tensor
        left, right = _stacked(ents, "B", dtype) / param_norm, _stacked(ents, "A", dtype) / param_norm
        w = [_safe_div(e["scale"] * param_norm**2, n_glob) for e in ents]
    return DirectionCache(left, right, torch.tensor(w, dtype=dtype)[:, None])


def _delta_weight_cache(ents: Sequence[Mapping[str, Any]], cfg: ProjectionConfig, dtype: torch.dtype,
                        n_glob: float, param_norm: float) -> DirectionCache:
    # left @ right = dW_r / n with n = ||dW_r,m|| (module) or the global norm; the scalar cancels in the
    # module projection, but sets the modules' relative weights in the global one.
    n_eff = [e["norm"] if cfg.granularity == "module" else n_glob for e in ents]
    left = torch.stack([e["B"].to(dtype) * _safe_div(e["scale"], n) for e, n in zip(ents, n_eff, strict=True)])
    w = torch.tensor([_safe_div(n, n_glob) for n in n_eff], dtype=dtype)[:, None]
    return DirectionCache(left, _stacked(ents, "A", dtype), w)


def _subspace_cache(ents: Sequence[Mapping[str, Any]], cfg: ProjectionConfig, dtype: torch.dtype,
                    n_glob: float, param_norm: float) -> DirectionCache:
    u, s, v = _stacked(ents, "U", dtype), _stacked(ents, "S", dtype), _stacked(ents, "V", dtype)
    rank = min(e["rank"] for e in ents)
    k = min(cfg.k or rank, u.shape[-1])
    # Zero the vectors of (numerically) zero singular values: QR makes them arbitrary.
    keep = (s > _RANK_TOL * s.amax(-1, keepdim=True)).to(dtype)[:, None, :]
    full = None
    if s.shape[-1] < rank:  # truncated file (k_max): U S V^T != dW_r
        full = (torch.stack([e["B"].to(dtype) * _safe_div(e["scale"], n_glob) for e in ents]),
                _stacked(ents, "A", dtype))
    return DirectionCache(u * keep, v * keep, s / n_glob if n_glob > 0 else s * 0, k=k, full=full)


_CACHES: dict[str, Callable[..., DirectionCache]] = {
    "lora_param": _lora_param_cache, "delta_weight": _delta_weight_cache, "subspace": _subspace_cache,
}


def build_group(cfg: ProjectionConfig, targets: Sequence[LoraTarget], directions: Mapping[str, Mapping[str, Any]],
                refusal_norm: float, param_norm: float) -> ModuleGroup:
    """Stack same-shaped attack modules with the refusal directions their mode needs (fp32 math or wider)."""
    ents = [directions[t.name] for t in targets]
    a_param = targets[0].A
    dtype = torch.promote_types(torch.float32, a_param.dtype)  # fp32 math for bf16/fp16 params
    dirs = _CACHES[cfg.mode](ents, cfg, dtype, refusal_norm, param_norm)
    a0 = _stack([t.A.detach() for t in targets], dtype)
    b0 = _stack([t.B.detach() for t in targets], dtype)
    group = ModuleGroup(
        names=[t.name for t in targets], A_params=[t.A for t in targets], B_params=[t.B for t in targets],
        s_a=torch.tensor([t.scale for t in targets], dtype=dtype), dirs=dirs,
        init=(a0, b0) if bool(b0.any()) else None,  # PEFT starts B at zero: dW_a0 = 0 costs no memory
    )
    group.move_(a_param.device, dtype)
    return group


# ------------------------------------------------------------------------ projections, per mode
# Each takes the groups and their stacked (g_B, g_A), projects those in place when `apply`, and returns
# the removed squared norm as a 0-d tensor (no host sync).
def sq_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-module squared Frobenius norm of a stacked ``(G, m, n)`` tensor."""
    return (t * t).sum((1, 2))


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum((1, 2))


def _safe_coef(dot: torch.Tensor, cc: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``dot / cc`` where ``cc > threshold``, else 0 (skipped constraint); no host sync."""
    return torch.where(cc > threshold, dot / cc.clamp_min(torch.finfo(cc.dtype).tiny), 0.0)


def _off_joint(gBs: list[torch.Tensor], gAs: list[torch.Tensor], cons: list[tuple[torch.Tensor, torch.Tensor]],
               skip_below: torch.Tensor | None, apply: bool) -> torch.Tensor:
    """Project off the one constraint that concatenates every group's ``(c_B, c_A)`` (``global``)."""
    dot = torch.stack([(_dot(gB, cB) + _dot(gA, cA)).sum()
                       for gB, gA, (cB, cA) in zip(gBs, gAs, cons, strict=True)]).sum()
    cc = torch.stack([(sq_norms(cB) + sq_norms(cA)).sum() for cB, cA in cons]).sum()
    coef = _safe_coef(dot, cc, torch.zeros_like(cc) if skip_below is None else skip_below)
    if apply:
        for gB, gA, (cB, cA) in zip(gBs, gAs, cons, strict=True):
            gB.sub_(coef * cB)
            gA.sub_(coef * cA)
    return coef * coef * cc


def project_lora_param(groups: Sequence[ModuleGroup], gBs: list[torch.Tensor], gAs: list[torch.Tensor],
                       *, per_module: bool, apply: bool,
                       points: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Off the refusal LoRA tensors: each unit tensor (``module``) or their unit concatenation."""
    if not per_module:  # unit vector unless the refusal adapter is all zero
        return _off_joint(gBs, gAs, [g.dirs.projected() for g in groups], None, apply)
    removed = []
    for g, gB, gA in zip(groups, gBs, gAs, strict=True):  # two unit constraints per module, one per tensor
        dB, dA = g.dirs.projected()
        coef_b, coef_a = _dot(gB, dB), _dot(gA, dA)
        removed.append((coef_b * coef_b + coef_a * coef_a).sum())
        if apply:
            gB.sub_(coef_b[:, None, None] * dB)
            gA.sub_(coef_a[:, None, None] * dA)
    return torch.stack(removed).sum()


def project_delta_weight(groups: Sequence[ModuleGroup], gBs: list[torch.Tensor], gAs: list[torch.Tensor],
                         *, per_module: bool, apply: bool,
                         points: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Off ``c = (s_a D A_a^T, s_a B_a^T D)``, the gradient of ``<dW_a, D>`` at ``points`` (stacked
    ``(A_a, B_a)`` per group; default: the current parameters)."""
    cons, refs = [], []
    for g, (Aa, Ba) in zip(groups, points or [g.params() for g in groups], strict=True):
        x, y = g.dirs.projected()
        s = g.s_a[:, None, None]
        cons.append((s * (x @ (y @ Aa.mT)),  # s_a D A_a^T   (G, out, r_a), via an r x r_a core
                     s * ((Ba.mT @ x) @ y)))  # s_a B_a^T D   (G, r_a, in)
        refs.append(g.s_a.square() * (sq_norms(Aa) + sq_norms(Ba)))
    if not per_module:
        return _off_joint(gBs, gAs, cons, _SKIP_REL**2 * torch.stack([r.sum() for r in refs]).sum(), apply)
    removed = []
    for gB, gA, (cB, cA), ref in zip(gBs, gAs, cons, refs, strict=True):
        dot, cc = _dot(gB, cB) + _dot(gA, cA), sq_norms(cB) + sq_norms(cA)
        coef = _safe_coef(dot, cc, _SKIP_REL**2 * ref)
        removed.append((coef * coef * cc).sum())
        if apply:
            gB.sub_(coef[:, None, None] * cB)
            gA.sub_(coef[:, None, None] * cA)
    return torch.stack(removed).sum()


def project_subspace(groups: Sequence[ModuleGroup], gBs: list[torch.Tensor], gAs: list[torch.Tensor],
                     *, per_module: bool, apply: bool,
                     points: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Off the top-k singular vectors: ``g_B -= U U^T g_B``, ``g_A -= g_A V V^T`` (module == global)."""
    removed = []
    for g, gB, gA in zip(groups, gBs, gAs, strict=True):
        u, v = g.dirs.projected()
        pB, pA = u.mT @ gB, gA @ v  # (G, k, r_a), (G, r_a, k)
        removed.append(sq_norms(pB).sum() + sq_norms(pA).sum())
        if apply:
            gB.sub_(u @ pB)
            gA.sub_(pA @ v.mT)
    return torch.stack(removed).sum()


PROJECTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "lora_param": project_lora_param, "delta_weight": project_delta_weight, "subspace": project_subspace,
}

