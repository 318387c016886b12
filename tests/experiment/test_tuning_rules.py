"""The validation-split tuning rules of the activation guard's weight and of LoX's extrapolation."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_act_guard_weight_is_the_best_validation_refusal_that_still_learns():
    choose = _script("tune_act_guard").choose
    rows = [{"lam": 0.0, "refusal": 0.20, "final_train_loss": 2.50},
            {"lam": 10.0, "refusal": 0.35, "final_train_loss": 2.55},
            {"lam": 30.0, "refusal": 0.57, "final_train_loss": 2.74},   # +9.6%: inside the 10% margin
            {"lam": 100.0, "refusal": 0.95, "final_train_loss": 2.90}]  # +16%: learns too little to count
    assert choose(rows, 0.10)["lam"] == 30.0
    assert choose(rows, 0.20)["lam"] == 100.0
    assert choose(rows[:1], 0.10)["lam"] == 0.0  # nothing but vanilla: the rule cannot invent a defence


def test_the_cost_matched_control_takes_the_weight_nearest_the_arms_training_loss():
    matched = _script("tune_act_guard").matched
    # the random direction's validation run (README): act_guard's final training loss was 2.714
    rows = [{"lam": 0.0, "final_train_loss": 2.545}, {"lam": 30.0, "final_train_loss": 2.551},
            {"lam": 300.0, "final_train_loss": 2.736}, {"lam": 1000.0, "final_train_loss": 3.363}]
    assert matched(rows, 2.714)["lam"] == 300.0
    assert matched(rows, 2.5)["lam"] == 30.0  # never vanilla: a control must be guarded
    assert matched(rows, 9.0)["lam"] == 1000.0


def test_lox_takes_the_largest_extrapolation_that_stays_a_sane_refusal_model():
    choose = _script("tune_lox").choose
    ref = {"alpha": None, "k": None, "energy": None, "refusal": 0.90, "twin_refusal": 0.40}
    rows = [ref,
            {"alpha": 0.25, "k": 8, "energy": 1.0, "refusal": 0.92, "twin_refusal": 0.45},
            {"alpha": 0.5, "k": 2, "energy": 0.7, "refusal": 0.88, "twin_refusal": 0.48},
            {"alpha": 0.5, "k": 8, "energy": 1.0, "refusal": 0.95, "twin_refusal": 0.60},  # twins +20: out
            {"alpha": 1.0, "k": 8, "energy": 1.0, "refusal": 0.00, "twin_refusal": 0.00}]  # garbled: out
    chosen = choose(rows, 0.05, 0.10)
    assert (chosen["alpha"], chosen["k"]) == (0.5, 2)  # 0.35 of extrapolation beats 0.25
    assert choose([ref, rows[-1]], 0.05, 0.10) is None
