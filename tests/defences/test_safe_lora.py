"""Safe LoRA post hoc: the projected adapter is C dW_a where selected, dW_a elsewhere, loadable like the attack."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_random_adapter

from refusal_lightning.cli import main
from refusal_lightning.defences.directions import directions
from refusal_lightning.defences.safe_lora import REPORT_FILE, SafeLoraError, safe_lora
from refusal_lightning.models.stacking import COMBINED_DIR, adapter_scale, combine_adapters, read_adapter

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Refusal LoRA on q, v, down (r=4); the attack also trains o_proj, which has no alignment matrix."""
    tmp = tmp_path_factory.mktemp("safe_lora")
    refusal = make_random_adapter(tiny_model_dir, tmp / "refusal", seed=1)
    attack = make_random_adapter(tiny_model_dir, tmp / "attack", seed=2,
                                 targets=("q_proj", "v_proj", "down_proj", "o_proj"))
    dirs = Path(directions(str(refusal), str(tmp / "dirs.pt")))
    return tmp, refusal, attack, dirs


def dense(folder: Path) -> dict[str, torch.Tensor]:
    """``{module: s * B @ A}`` in float64, densely materialised (the test's reference only)."""
    config, factors = read_adapter(folder)
    return {m.removeprefix(PREFIX): adapter_scale(config, m) * b.double() @ a.double() for m, (a, b) in factors.items()}


def dense_c(v: torch.Tensor, projector: str) -> torch.Tensor:
    if projector == "paper":
        return v @ v.T / torch.linalg.matrix_norm(v)  # the papers' C = V V^T / ||V||_F
    return v @ torch.linalg.pinv(v)  # orthogonal projector onto col(V)


def dense_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("projector", ["paper", "exact"])
def test_projected_adapter_equals_dense_c_dw(adapters, projector):
    tmp, refusal, attack, dirs = adapters
    out = Path(safe_lora(str(attack), str(dirs), str(tmp / f"all_{projector}"), threshold=1.0, projector=projector,
                         base_adapters=[str(refusal)]))
    ref, att, got = dense(refusal), dense(attack), dense(out)
    assert got.keys() == att.keys() and len(ref) == 6
    for name, dw_a in att.items():
        if name in ref:  # cos <= 1 always: every module with an alignment matrix is projected
            close(got[name], dense_c(ref[name], projector) @ dw_a)
        else:  # o_proj: no alignment matrix, kept as trained
            assert torch.equal(got[name], dw_a)
    report = json.loads((out / REPORT_FILE).read_text())
    assert (report["n_modules"], report["n_projected"], report["share_projected"]) == (6, 6, 1.0)
    assert report["n_uncovered"] == 2 and all("o_proj" in m for m in report["uncovered"])
    # same rank and config as the attack: B' = C B_a, A unchanged
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((attack / "adapter_config.json").read_text())
    # drift/cos as training logs it (over the modules with a direction), before and after
    def cos(updates):
        return dense_cos(torch.cat([updates[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref]))

    assert report["drift"]["cos"] == pytest.approx(cos(got), abs=1e-6)
    assert report["drift"]["cos_before"] == pytest.approx(cos(att), abs=1e-6)
    # combined/ = refusal + projected attack, for the plain base (what is evaluated)
    combined = dense(out / COMBINED_DIR)
    for name in combined:
        close(combined[name], ref.get(name, 0) + got[name])


def test_threshold_selects_modules_as_specified(adapters):
    tmp, refusal, attack, dirs = adapters
    ref, att = dense(refusal), dense(attack)
    scores = {n: dense_cos(dense_c(ref[n], "paper") @ att[n], att[n]) for n in ref}
    ordered = sorted(scores.values())
    assert ordered[0] < ordered[-1]
    threshold = (ordered[2] + ordered[3]) / 2  # between two scores: rounding cannot flip a decision
    out = Path(safe_lora(str(attack), str(dirs), str(tmp / "half"), threshold=threshold, base_adapters=[str(refusal)]))
    report = json.loads((out / REPORT_FILE).read_text())
    want = {n for n, c in scores.items() if c <= threshold}
    assert {n for n, m in report["modules"].items() if m["projected"]} == want and len(want) == 3
    assert report["share_projected"] == pytest.approx(3 / 6)
    for name, module in report["modules"].items():
        assert module["cos"] == pytest.approx(scores[name], abs=1e-5)
    got = dense(out)
    for name in att:
        assert torch.equal(got[name], att[name]) == (name not in want), name
    # num_projected = k: the k lowest scores, whatever the threshold
    out = Path(safe_lora(str(attack), str(dirs), str(tmp / "two"), num_projected=2, base_adapters=[]))
    report = json.loads((out / REPORT_FILE).read_text())
    lowest = set(sorted(scores, key=scores.get)[:2])
    assert {n for n, m in report["modules"].items() if m["projected"]} == lowest
    assert report["combined"] is None and not (out / COMBINED_DIR).exists()


def test_cli_writes_a_loadable_adapter_and_its_combined_stack(adapters, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, refusal, attack, dirs = adapters
    combine_adapters([refusal, attack], attack / COMBINED_DIR)  # as a fit with merge_adapters writes it
    out = tmp / "cli"
    main(["safe-lora", "--attack_adapter_path", str(attack), "--directions_path", str(dirs),
          "--output_dir", str(out), "--threshold", "0.5"])
    line = capsys.readouterr().out
    report = json.loads((out / REPORT_FILE).read_text())
    assert f"projected {report['n_projected']} of 6 modules" in line and report["n_projected"] > 0
    assert report["base_adapters"] == [str(refusal)]  # found through the attack's combined/
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(adapter: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            return PeftModel.from_pretrained(model, str(adapter)).eval()(input_ids=ids).logits

    projected, trained = logits(out), logits(attack)
    assert torch.isfinite(projected).all() and not torch.allclose(projected, trained)
    assert torch.isfinite(logits(out / COMBINED_DIR)).all()


def test_bad_inputs_are_reported_together(adapters, tiny_model_dir, capsys):
    tmp, refusal, attack, dirs = adapters
    other = make_random_adapter(tiny_model_dir, tmp / "other", seed=3)
    with pytest.raises(SafeLoraError) as exc:
        safe_lora(str(attack), str(dirs), str(attack), base_adapters=[str(other)])
    assert "is the attack adapter itself" in str(exc.value) and "not among the adapters" in str(exc.value)
    with pytest.raises(SystemExit) as code:
        main(["safe-lora", "--attack_adapter_path", str(attack), "--directions_path", str(tmp / "nope.pt"),
              "--output_dir", str(tmp / "x")])
    assert code.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "nope.pt" in err[0]


# ------------------------------------------------------------------ calibrated gate and the row's measures
@pytest.fixture(scope="module")
def benign(adapters, tiny_model_dir):
    """A "benign LoRA" of the attack's recipe (same modules, ranks, frozen refusal LoRA beneath it)."""
    tmp, refusal, _, _ = adapters
    folder = make_random_adapter(tiny_model_dir, tmp / "benign", seed=4,
                                 targets=("q_proj", "v_proj", "down_proj", "o_proj"))
    combine_adapters([refusal, folder], folder / COMBINED_DIR)  # as a fit with merge_adapters writes it
    return folder


def dense_scores(ref: dict[str, torch.Tensor], updates: dict[str, torch.Tensor]) -> dict[str, float]:
    """Safe LoRA's scores, rounded as the reference code rounds them, from dense matrices."""
    return {n: round(dense_cos(dense_c(ref[n], "paper") @ updates[n], updates[n]), 5) for n in ref}


def test_calibrated_gate_leaves_the_benign_lora_unprojected(adapters, benign):
    tmp, refusal, attack, dirs = adapters
    ref, ben, att = dense(refusal), dense(benign), dense(attack)
    floor = min(dense_scores(ref, ben).values())
    # the transform applied to the benign LoRA itself: nothing projected, nothing changed
    out = Path(safe_lora(str(benign), str(dirs), str(tmp / "cal_self"), calibrate_on=str(benign)))
    report = json.loads((out / REPORT_FILE).read_text())
    assert (report["gate"], report["n_projected"], report["share_projected"]) == ("calibrated", 0, 0.0)
    assert report["delta_norm_kept"] == 1.0 and all(torch.equal(dense(out)[n], ben[n]) for n in ben)
    calibration = report["calibration"]
    assert calibration["threshold"] == report["threshold"] < floor == pytest.approx(calibration["benign_scores"]["min"])
    assert calibration["benign_scores"] == report["score_summary"]  # the same adapter, the same scores
    # the attack, calibrated on the benign LoRA: projected exactly where it scores below every benign module
    out = Path(safe_lora(str(attack), str(dirs), str(tmp / "cal_attack"), calibrate_on=str(benign)))
    report = json.loads((out / REPORT_FILE).read_text())
    want = {n for n, cos in dense_scores(ref, att).items() if cos < floor}
    assert {n for n, m in report["modules"].items() if m["projected"]} == want
    assert report["calibration"]["benign_adapter"] == str(benign) and report["base_adapters"] == [str(refusal)]


def test_score_summary_span_share_and_norm_ratio_equal_dense_computations(adapters):
    tmp, refusal, attack, dirs = adapters
    out = Path(safe_lora(str(attack), str(dirs), str(tmp / "measures"), threshold=0.5, base_adapters=[]))
    report = json.loads((out / REPORT_FILE).read_text())
    ref, att, got = dense(refusal), dense(attack), dense(out)
    scores = torch.tensor(list(dense_scores(ref, att).values()), dtype=torch.float64)
    quartiles = torch.quantile(scores, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    summary = report["score_summary"]
    assert summary["n"] == 6
    assert [summary[k] for k in ("min", "q1", "median", "q3", "max")] == pytest.approx(quartiles.tolist(), abs=1e-9)

    def span_share(updates):  # P: orthogonal projector onto col(dW_r) per module; 0 where there is no dW_r
        inside = sum(float((dense_c(ref[n], "exact") @ updates[n]).square().sum()) for n in ref)
        return inside / sum(float(u.square().sum()) for u in updates.values())

    def norm_ratio(updates):  # Frobenius over all modules: all the attack's, all the refusal LoRA's
        return math.sqrt(sum(float(u.square().sum()) for u in updates.values())
                         / sum(float(r.square().sum()) for r in ref.values()))

    assert report["n_projected"] > 0 and not math.isclose(span_share(got), span_share(att))
    assert report["refusal_span_share"] == pytest.approx(span_share(got), rel=1e-6)
    assert report["refusal_span_share_before"] == pytest.approx(span_share(att), rel=1e-6)
    assert report["delta_norm_vs_refusal"] == pytest.approx(norm_ratio(got), rel=1e-6)
    assert report["delta_norm_vs_refusal_before"] == pytest.approx(norm_ratio(att), rel=1e-6)
    assert report["gate"] == "threshold" and report["calibration"] is None


def test_bad_calibration_is_reported_together(adapters, benign, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    tmp, refusal, attack, dirs = adapters
    with pytest.raises(SafeLoraError) as exc:
        safe_lora(str(attack), str(dirs), str(tmp / "x"), threshold=0.3, num_projected=2,
                  calibrate_on=str(tmp / "no_such_lora"))
    message = str(exc.value)
    assert "2 problem(s)" in message and "drop threshold=0.3, num_projected=2" in message
    assert "no_such_lora' does not exist" in message
    # a benign LoRA of other shapes in one module and without the attack's down_proj: both in the one message
    odd = make_random_adapter(tiny_model_dir, tmp / "odd", seed=5, targets=("q_proj", "v_proj"))
    tensors = load_file(odd / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(odd / "adapter_model.safetensors"))
    with pytest.raises(SafeLoraError) as exc:
        safe_lora(str(attack), str(dirs), str(tmp / "x"), calibrate_on=str(odd))
    message = str(exc.value)
    assert "layer shapes do not fit the directions: model.layers.0.self_attn.q_proj" in message
    assert "2 problem(s)" in message and "does not train the attack's modules (missing: " in message
    assert message.count("down_proj") == 2 and message.count("q_proj") == 1  # the mis-shaped one: once, as a shape
