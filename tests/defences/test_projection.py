"""projection.py: low-rank algebra and the projector, against hand-made answers and dense references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_lightning.defences.lowrank import lowrank_inner, lowrank_norm, lowrank_svd
from refusal_lightning.defences.projection import (
    GRANULARITIES,
    MODES,
    TARGETS,
    LoraTarget,
    ProjectionConfig,
    module_directions,
)
from refusal_lightning.defences.projector import Projector


# ------------------------------------------------------------------------------------ fixtures
def make_case(seed: int, n_modules: int = 3, r_r: int = 3, r_a: int = 3, zero_b: bool = False,
              dtype: torch.dtype = torch.float64):
    """Random refusal factors + attack LoRA parameters (with random grads) over a few module shapes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (4, 6), (5, 7), (6, 3)][:n_modules]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    refusal, targets, directions = {}, [], {}
    for i, (out_f, in_f) in enumerate(shapes):
        name = f"layers.{i}.proj"
        a_r, b_r, s_r = rnd(r_r, in_f), rnd(out_f, r_r), 0.5 + i
        refusal[name] = (a_r, b_r, s_r)
        directions[name] = module_directions(a_r, b_r, s_r)
        a = torch.nn.Parameter(rnd(r_a, in_f).to(dtype))
        b = torch.nn.Parameter((torch.zeros(out_f, r_a) if zero_b else rnd(out_f, r_a)).to(dtype))
        a.grad, b.grad = rnd(r_a, in_f).to(dtype), rnd(out_f, r_a).to(dtype)
        targets.append(LoraTarget(name, a, b, 2.0 / (i + 1)))
    return targets, directions, refusal


def projector(mode: str, gran: str = "module", k: int | None = None, target: str = "grad", **case):
    targets, directions, refusal = make_case(**case)
    cfg = ProjectionConfig(enabled=True, directions_path="x", mode=mode, granularity=gran, k=k, target=target)
    return Projector(cfg, targets, directions), targets, refusal


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def grads(targets) -> torch.Tensor:
    return flat([x for t in targets for x in (t.B.grad, t.A.grad)])


def embed(targets, pieces: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]) -> torch.Tensor:
    """A full (g_B, g_A)-ordered vector that is zero except for the given modules' pieces."""
    parts = []
    for i, t in enumerate(targets):
        b, a = pieces.get(i, (None, None))
        parts += [torch.zeros_like(t.B, dtype=torch.float64) if b is None else b,
                  torch.zeros_like(t.A, dtype=torch.float64) if a is None else a]
    return flat(parts)


def dense_constraints(mode: str, gran: str, targets, refusal, k: int | None = None) -> torch.Tensor:
    """Columns spanning what the projection removes, built from materialised out x in matrices."""
    cols = []
    dense = {n: s * b @ a for n, (a, b, s) in refusal.items()}
    glob = math.sqrt(sum(float(d.square().sum()) for d in dense.values()))
    if mode == "lora_param":
        if gran == "module":
            for i, t in enumerate(targets):
                a_r, b_r, _ = refusal[t.name]
                cols += [embed(targets, {i: (b_r / b_r.norm(), None)}),
                         embed(targets, {i: (None, a_r / a_r.norm())})]
        else:
            pieces = {i: (refusal[t.name][1], refusal[t.name][0]) for i, t in enumerate(targets)}
            cols.append(embed(targets, pieces))
    elif mode == "delta_weight":
        pieces = {}
        for i, t in enumerate(targets):
            d = dense[t.name] / (dense[t.name].norm() if gran == "module" else glob)
            a, b = t.A.detach().double(), t.B.detach().double()
            pieces[i] = (t.scale * d @ a.T, t.scale * b.T @ d)
        if gran == "module":
            cols += [embed(targets, {i: p}) for i, p in pieces.items()]
        else:
            cols.append(embed(targets, pieces))
    else:
        for i, t in enumerate(targets):
            u, _, vh = torch.linalg.svd(dense[t.name], full_matrices=False)
            kk = k or refusal[t.name][0].shape[0]
            r_a = t.A.shape[0]
            for j in range(kk):
                for c in range(r_a):
                    e = torch.zeros(r_a, dtype=torch.float64)
                    e[c] = 1
                    cols.append(embed(targets, {i: (torch.outer(u[:, j], e), None)}))
                    cols.append(embed(targets, {i: (None, torch.outer(e, vh[j]))}))
    return torch.stack(cols, 1)


def dense_project(g: torch.Tensor, constraints: torch.Tensor) -> torch.Tensor:
    q = torch.linalg.qr(constraints).Q
    return g - q @ (q.T @ g)


# ------------------------------------------------------------------------------ low-rank algebra
def test_lowrank_norm_inner_and_svd_match_dense():
    gen = torch.Generator().manual_seed(0)
    b1, a1 = torch.randn(9, 3, generator=gen, dtype=torch.float64), torch.randn(3, 11, generator=gen,
                                                                                  dtype=torch.float64)
    b2, a2 = torch.randn(9, 5, generator=gen, dtype=torch.float64), torch.randn(5, 11, generator=gen,
                                                                                  dtype=torch.float64)
    assert torch.allclose(lowrank_norm(b1, a1), (b1 @ a1).norm(), atol=1e-10)
    assert torch.allclose(lowrank_inner(b1, a1, b2, a2), ((b1 @ a1) * (b2 @ a2)).sum(), atol=1e-10)
    u, s, v = lowrank_svd(b1, a1, scale=0.7)
    assert torch.allclose(u @ torch.diag(s) @ v.T, 0.7 * b1 @ a1, atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(0.7 * b1 @ a1)[:3], atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_module_directions_fields():
    a, b = torch.randn(4, 10), torch.randn(6, 4)
    d = module_directions(a, b, 2.0, k_max=2)
    dense = 2.0 * b.double() @ a.double()
    assert d["norm"] == pytest.approx(float(dense.norm()), rel=1e-9)
    assert d["rank"] == 4 and d["scale"] == 2.0
    assert d["U"].shape == (6, 2) and d["S"].shape == (2,) and d["V"].shape == (10, 2)
    assert torch.allclose(d["S"].double(), torch.linalg.svdvals(dense)[:2], rtol=1e-5)
    assert torch.allclose(d["A_dir"].norm(), torch.tensor(1.0))
    assert torch.allclose(d["B_dir"].norm(), torch.tensor(1.0))
    zero = module_directions(a, torch.zeros(6, 4), 2.0)
    assert zero["norm"] == 0 and not zero["B_dir"].any()


# --------------------------------------------------------------------------- hand-made answers
def _hand_made(mode: str, target: str = "grad"):
    """out=2, in=3, r=1. dW_r = e1 e1^T; attack A = [1, 1, 0], B = 0; g_B = [5, 6], g_A = [2, 3, 4]."""
    directions = {"m": module_directions(torch.tensor([[1.0, 0, 0]]), torch.tensor([[1.0], [0]]), 1.0)}
    a = torch.nn.Parameter(torch.tensor([[1.0, 1, 0]]))
    b = torch.nn.Parameter(torch.zeros(2, 1))
    a.grad, b.grad = torch.tensor([[2.0, 3, 4]]), torch.tensor([[5.0], [6]])
    cfg = ProjectionConfig(enabled=True, directions_path="x", mode=mode, target=target)
    return Projector(cfg, [LoraTarget("m", a, b, 1.0)], directions), a, b


@pytest.mark.parametrize(("mode", "expect_b", "expect_a", "removed"), [
    # lora_param: the B grad loses its e1 part (5), the A grad its e1 part (2)
    ("lora_param", [[0.0], [6.0]], [[0.0, 3.0, 4.0]], math.sqrt(29 / 90)),
    # delta_weight: c_B = D A^T = [1, 0]^T, c_A = B^T D = 0 -> only g_B[0] is removed
    ("delta_weight", [[0.0], [6.0]], [[2.0, 3.0, 4.0]], math.sqrt(25 / 90)),
    # subspace (k = r = 1): U = e1, V = e1
    ("subspace", [[0.0], [6.0]], [[0.0, 3.0, 4.0]], math.sqrt(29 / 90)),
])
def test_hand_made_known_answers(mode, expect_b, expect_a, removed):
    proj, a, b = _hand_made(mode)
    before_a, before_b = a.grad.clone(), b.grad.clone()
    monitor = proj.project_grads_(apply=False)["proj/removed_frac"]
    assert torch.equal(a.grad, before_a) and torch.equal(b.grad, before_b)  # monitor-only changes nothing
    stats = proj.project_grads_(apply=True)
    assert torch.allclose(b.grad, torch.tensor(expect_b)) and torch.allclose(a.grad, torch.tensor(expect_a))
    assert stats["proj/removed_frac"].shape == () and monitor.shape == ()
    assert stats["proj/removed_frac"].item() == pytest.approx(removed, rel=1e-6)
    assert monitor.item() == pytest.approx(removed, rel=1e-6)
    assert proj.summary()["removed_frac_max"] == pytest.approx(removed, rel=1e-6)


def test_hand_made_update_target():
    proj, a, b = _hand_made("delta_weight", target="update")
    proj.snapshot_()
    with torch.no_grad():  # a fake optimizer step
        b += torch.tensor([[5.0], [6.0]])
        a += torch.tensor([[2.0, 3.0, 4.0]])
    proj.project_update_(apply=True)
    assert torch.allclose(b, torch.tensor([[0.0], [6.0]]))
    assert torch.allclose(a, torch.tensor([[3.0, 4.0, 4.0]]))
    with pytest.raises(RuntimeError, match="snapshot_"):
        proj.project_update_(apply=True)


# ------------------------------------------------------------------------ dense references
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize(("mode", "r_a", "k"), [("lora_param", 3, None), ("delta_weight", 2, None),
                                                ("subspace", 4, None), ("subspace", 2, 2)])
def test_factor_projection_equals_dense(mode, gran, r_a, k):
    # float32 parameters: the projector's own fp32 math is what must meet atol 1e-5
    proj, targets, refusal = projector(mode, gran, k=k, seed=1, r_a=r_a, dtype=torch.float32)
    g = grads(targets).double()
    expected = dense_project(g, dense_constraints(mode, gran, targets, refusal, k=k))
    removed = proj.project_grads_(apply=True)["proj/removed_frac"]
    assert torch.allclose(grads(targets).double(), expected, atol=1e-5)
    assert removed.item() == pytest.approx(float((g - expected).norm() / g.norm()), abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_drift_equals_dense(mode):
    proj, targets, refusal = projector(mode, "module", seed=3, r_a=3)
    init = {t.name: t.scale * t.B.detach() @ t.A.detach() for t in targets}
    assert proj.drift()["drift/cos"].item() == pytest.approx(0, abs=1e-12)
    with torch.no_grad():
        for t in targets:
            t.A += 0.3 * t.A.grad
            t.B -= 0.2 * t.B.grad
        acc = flat([t.scale * t.B @ t.A - init[t.name] for t in targets])
    ref = flat([s * b @ a for a, b, s in refusal.values()])
    drift = proj.drift()  # float32 outputs
    assert drift["drift/along"].item() == pytest.approx(float(acc @ ref / ref.norm()), rel=1e-6)
    assert drift["drift/cos"].item() == pytest.approx(float(acc @ ref / ref.norm() / acc.norm()), rel=1e-6)


def test_drift_with_truncated_subspace_uses_full_factors():
    targets, directions, refusal = make_case(4, r_a=3)
    directions = {n: {**d, "U": d["U"][:, :1], "S": d["S"][:1], "V": d["V"][:, :1]}
                  for n, d in directions.items()}
    cfg = ProjectionConfig(enabled=True, directions_path="x", mode="subspace", k=1)
    proj = Projector(cfg, targets, directions)
    with torch.no_grad():
        for t in targets:
            t.B += t.B.grad
        acc = flat([t.scale * t.B.grad @ t.A for t in targets])  # B - B0 = grad, A unchanged
    ref = flat([s * b @ a for a, b, s in refusal.values()])
    assert proj.drift()["drift/along"].item() == pytest.approx(float(acc @ ref / ref.norm()), rel=1e-6)


# --------------------------------------------------------------------------------- properties
def params(targets) -> torch.Tensor:
    return flat([x.detach().clone() for t in targets for x in (t.B, t.A)])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), r_a=st.integers(1, 4), zero_b=st.booleans())
def test_projection_equals_dense_reference(mode, gran, target, seed, r_a, zero_b):
    """Any case, every mode x granularity x target: the factor projection is the dense one, leaves the
    gradient (or update) orthogonal to every constraint, never grows it, and is idempotent."""
    r_a = 3 if mode == "lora_param" else r_a
    proj, targets, refusal = projector(mode, gran, target=target, seed=seed, r_a=r_a, zero_b=zero_b)
    constraints = dense_constraints(mode, gran, targets, refusal)  # delta_weight: linearised at the old point
    if target == "grad":
        g = grads(targets)
        proj.project_grads_(apply=True)
        once = grads(targets)
    else:
        old = params(targets)
        proj.snapshot_()
        with torch.no_grad():
            for t in targets:  # an AdamW-like step with decoupled weight decay
                t.B -= 0.1 * t.B.grad + 0.01 * t.B
                t.A -= 0.1 * t.A.grad + 0.01 * t.A
        g = params(targets) - old
        proj.project_update_(apply=True)
        once = params(targets) - old
    # the directions file is float32: that is the precision to meet
    assert torch.allclose(once, dense_project(g, constraints), atol=1e-6 * float(g.norm()))
    inner = (constraints.T @ once).abs()
    scale = g.norm() * constraints.norm(dim=0)
    assert bool((inner <= 1e-6 * scale).all()), (inner / scale).max()
    assert once.norm() <= g.norm() * (1 + 1e-12)
    if target == "grad":
        proj.project_grads_(apply=True)
        assert torch.allclose(grads(targets), once, atol=1e-6 * float(g.norm()))


# ------------------------------------------------------------------------------ bookkeeping
def test_uncovered_gradients_count_in_the_denominator():
    proj_full, targets, _ = projector("subspace", seed=5)
    frac_full = proj_full.project_grads_(apply=False)["proj/removed_frac"]
    extra = LoraTarget("free", torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)),
                       torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)), 1.0)
    g = grads(targets)
    extra.A.grad = torch.full((2, 2), float(g.norm()) / 2, dtype=torch.float64)  # |extra grad| = |g|
    targets2, directions, _ = make_case(5)
    proj = Projector(ProjectionConfig(mode="subspace"), targets2, directions, uncovered=[extra])
    frac = proj.project_grads_(apply=False)["proj/removed_frac"]
    assert frac.item() == pytest.approx(frac_full.item() / math.sqrt(2), rel=1e-6)
    assert proj.summary()["n_modules_uncovered"] == 1


def test_missing_grad_is_zero_and_bf16_params_use_fp32_math():
    targets, directions, _ = make_case(6, dtype=torch.bfloat16)
    targets[0].A.grad = None
    proj = Projector(ProjectionConfig(mode="delta_weight"), targets, directions)
    assert proj._groups[0].dirs.left.dtype == torch.float32
    proj.project_grads_(apply=True)
    assert targets[0].A.grad is not None and targets[0].A.grad.dtype == torch.bfloat16


def test_summary_state_dict_and_to():
    proj, targets, _ = projector("delta_weight", seed=7)
    proj.project_grads_(apply=True)
    proj.project_grads_(apply=True)
    summary = proj.summary()
    assert summary["removed_frac"]["grad"]["n"] == 2 and "update" not in summary["removed_frac"]
    assert summary["n_modules_covered"] == 3
    assert summary["removed_frac_max"] >= summary["removed_frac_mean"] > 0
    assert {"drift/cos", "drift/along", "mode", "target", "granularity", "enabled"} <= set(summary)
    state = proj.state_dict()
    other, _, _ = projector("delta_weight", seed=7)
    other.load_state_dict(state)
    assert other.summary()["removed_frac"] == summary["removed_frac"]
    proj.to_("cpu", torch.float64)
    assert proj._groups[0].dirs.left.dtype == torch.float64
    with pytest.raises(ValueError, match="bad projection config"):
        Projector(ProjectionConfig(mode="nope"), targets, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("zero_b", [True, False])
@pytest.mark.parametrize("gran", GRANULARITIES)
@pytest.mark.parametrize("mode", MODES)
def test_cached_directions_fit_in_twice_the_lora_size(mode, gran, zero_b):
    # only what the mode needs is kept; PEFT's B0 = 0 start costs no memory for the drift baseline
    proj, targets, _ = projector(mode, gran, seed=8, zero_b=zero_b)
    lora = sum(t.A.numel() + t.B.numel() for t in targets)
    per_module_scalars = 8 * len(targets)  # scales / singular values: r + 1 numbers per module
    assert proj.cached_numel() <= (1 if zero_b else 2) * lora + per_module_scalars


def test_chance_cos_matches_dense_monte_carlo_and_sqrt_2_over_pi_n():
    # A random update's |cos| with dW_r: the chance level printed beside every drift figure.
    gen = torch.Generator().manual_seed(7)
    shapes, r = [(64, 48), (32, 48), (64, 32)], 4
    targets, directions, dense_ref = [], {}, []
    for i, (out_f, in_f) in enumerate(shapes):
        a_r, b_r = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
        directions[f"m{i}"] = module_directions(a_r, b_r, 2.0)
        dense_ref.append(2.0 * b_r.double() @ a_r.double())
        targets.append(LoraTarget(f"m{i}", torch.nn.Parameter(torch.zeros(r, in_f)),
                                  torch.nn.Parameter(torch.zeros(out_f, r)), 1.5))
    proj = Projector(ProjectionConfig(directions_path="x"), targets, directions)
    chance = proj.chance_cos(draws=300)
    ref = flat(dense_ref)
    dense = []
    for _ in range(300):  # independent dense estimate: materialised dW = s B A per module
        dw = flat([t.scale * torch.randn(t.B.shape, generator=gen, dtype=torch.float64)
                   @ torch.randn(t.A.shape, generator=gen, dtype=torch.float64) for t in targets])
        dense.append(abs(float(dw @ ref / (dw.norm() * ref.norm()))))
    n_weights = sum(o * i for o, i in shapes)
    assert chance == pytest.approx(sum(dense) / len(dense), rel=0.2)
    assert chance == pytest.approx(math.sqrt(2 / (math.pi * n_weights)), rel=0.2)
    assert all(float(t.B.abs().sum()) == 0 for t in targets)  # the attack's parameters are untouched
