"""`sweep` end to end on the tiny tier: the contract of ``results.json``, a gain recomputed from its cells
without the package's code, resume, shards and the merge's refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_pipeline_config

from refusal_lightning.cli import main
from refusal_lightning.experiment.arms import parse_arms
from refusal_lightning.experiment.sweep_plan import SweepConfigError, parse_shard, plan_units, shard_units

SEEDS, STEPS = [0, 1], [0, 3, 6]
ARMS = ["vanilla", "orthogonal", "lox", "safe_lora", "safe_lora_calibrated"]
RANDOM_MARKERS = ["is", "al", "three"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    pipe = tiny_pipeline_config()
    pipe["fit_overrides"] = ["--trainer.max_steps=6", "--trainer.val_check_interval=3",
                             "--model.optimizer.init_args.lr=1.0e-2", "--trainer.enable_progress_bar=false"]
    pipe["evaluation"].update(limit=6, generation={"max_tokens": 8, "temperature": 0.0})  # greedy, as the readout
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    config = yaml.safe_load((REPO / "configs/tiny/sweep.yaml").read_text())
    config.update(pipeline=str(tmp / "pipeline.yaml"), run_dir=str(tmp / "sweep"), seeds=SEEDS,
                  trajectory_steps=STEPS, nll_max_pairs=8)
    config["arms"] = {k: v for k, v in config["arms"].items() if k in ARMS}
    config["evaluation"]["limit"] = 6
    # The tiny model is random and never says "I'm sorry": markers common in its output make the outcomes
    # mixed, so the gains below are computed on something (the machinery, not a finding).
    (tmp / "markers.txt").write_text("".join(m + "\n" for m in RANDOM_MARKERS))
    config["evaluation"]["judge"] = {"kind": "keyword", "refusal_markers": str(tmp / "markers.txt")}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    main(["pipeline", "--config", str(tmp / "pipeline.yaml"), "--until", "directions"])
    main(["sweep", "--config", str(tmp / "sweep.yaml")])
    yield tmp, json.loads((tmp / "sweep" / "results.json").read_text())
    mp.undo()


def test_cells_hold_every_arm_seed_and_step_with_outcomes_and_nll(swept):
    _, record = swept
    cells = record["sweep"]["cells"]
    assert sorted((c["arm"], c["seed"], c["step"]) for c in cells) == sorted(
        (a, s, t) for a in ARMS for s in SEEDS for t in STEPS)
    for c in cells:
        assert c["metric"] == "keyword@8"
        assert {"sorry_bench", "harmfulqa_heldout"} <= set(c["outcomes"])
        for prompt_set, outcomes in c["outcomes"].items():
            assert set(outcomes.values()) <= {0, 1}
            assert c["refusal"][prompt_set] == pytest.approx(sum(outcomes.values()) / len(outcomes))
        assert set(c["nll"]) == {"red_heldout", "blue_heldout"}
    # the benign set only at step 0 and the last step; drift on every trained point
    assert {c["step"] for c in cells if "benign" in c["outcomes"]} == {0, STEPS[-1]}
    assert all("drift" in c for c in cells if c["arm"] == "vanilla" and c["step"] > 0)
    rates = [r for c in cells for s, r in c["refusal"].items() if s != "benign"]
    assert 0 < sum(rates) / len(rates) < 1  # mixed outcomes: the gain test below is not trivially zero
    # step 0 is one model, the refusal LoRA, for every arm and seed but LoX, which starts from its extrapolation
    zero = [c for c in cells if c["step"] == 0 and c["arm"] != "lox"]
    assert all(c["outcomes"] == zero[0]["outcomes"] and c["nll"] == zero[0]["nll"] for c in zero)
    lox = [c for c in cells if c["step"] == 0 and c["arm"] == "lox"]
    assert len(lox) == len(SEEDS) and all("benign" in c["outcomes"] for c in lox)  # its step 0's over-refusal
    assert all(c["nll"] != zero[0]["nll"] for c in lox)  # its own model: the extrapolated refusal update
    assert lox[0]["nll"] == lox[1]["nll"]  # training-free: the same starting model at every seed


def test_the_attack_learns_along_its_trajectory(swept):
    _, record = swept
    for seed in SEEDS:
        nll = {c["step"]: c["nll"]["red_heldout"] for c in record["sweep"]["cells"]
               if c["arm"] == "vanilla" and c["seed"] == seed}
        assert nll[STEPS[-1]] < nll[0]  # red NLL falls: the points are not one model repeated


def test_arms_report_gain_final_and_mcnemar(swept):
    _, record = swept
    arms = record["sweep"]["arms"]
    assert set(arms) == set(ARMS)
    for arm in ("orthogonal", "safe_lora", "safe_lora_calibrated"):
        for prompt_set in ("sorry_bench", "harmfulqa_heldout"):
            gain = arms[arm]["gain_at_matched_nll"][prompt_set]
            assert set(gain) == {"mean", "ci_low", "ci_high", "n_points", "n_outside"}
            assert gain["n_points"] + gain["n_outside"] == len(SEEDS) * (len(STEPS) - 1)
            final = arms[arm]["final"][prompt_set]
            assert 0 <= final["mean"] <= 1 and final["seed_sd"] is not None
            assert 0 <= arms[arm]["p_vs_vanilla"][prompt_set] <= 1
    assert arms["vanilla"]["gain_at_matched_nll"] == {}  # the frontier is not scored against itself


def test_controls_drift_null_and_safe_lora_reports(swept):
    _, record = swept
    null = record["drift_null"]
    assert set(null) == {"cos_gaussian", "cos_benign_lora"} and 0 <= null["cos_benign_lora"] <= 1
    last = {c["arm"]: c for c in record["sweep"]["cells"] if c["seed"] == 0 and c["step"] == STEPS[-1]}
    for arm in ("safe_lora", "safe_lora_calibrated"):
        report = last[arm]["transform"]
        assert {"share_projected", "score_summary", "refusal_span_share", "delta_norm_vs_refusal"} <= set(report)
    assert last["safe_lora_calibrated"]["transform"]["gate"] == "calibrated"
    # calibrated on the benign LoRA: it projects no more modules than the reference threshold does
    assert last["safe_lora_calibrated"]["transform"]["share_projected"] <= last["safe_lora"]["transform"][
        "share_projected"]


def _pava(points):
    """Independent pool-adjacent-violators on (x, y) sorted by x, ties averaged."""
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(x, []).append(y)
    blocks = [[float(np.mean(ys)), 1, [x]] for x, ys in sorted(merged.items())]
    i = 0
    while i < len(blocks) - 1:
        if blocks[i][0] > blocks[i + 1][0]:
            a, b = blocks[i], blocks.pop(i + 1)
            a[0] = (a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1])
            a[1] += b[1]
            a[2] += b[2]
            i = max(i - 1, 0)
        else:
            i += 1
    return [(x, mean) for mean, _, xs in blocks for x in xs]


def _gain(cells, arm, prompt_set, counts=None, seed_weights=None):
    keys = sorted(set.intersection(*(set(c["outcomes"][prompt_set]) for c in cells)))
    def rate(c):
        values = np.array([c["outcomes"][prompt_set][k] for k in keys], dtype=float)
        return float(values.mean()) if counts is None else float(values @ counts / counts.sum())
    diffs = []
    for seed, weight in (seed_weights or {s: 1 for s in SEEDS}).items():
        knots = _pava([(c["nll"]["red_heldout"], rate(c)) for c in cells
                       if c["arm"] == "vanilla" and c["seed"] == seed])
        xs, ys = [k[0] for k in knots], [k[1] for k in knots]
        for c in cells:
            if c["arm"] == arm and c["seed"] == seed and c["step"] >= 1 and xs[0] <= c["nll"]["red_heldout"] <= xs[-1]:
                diffs += [rate(c) - float(np.interp(c["nll"]["red_heldout"], xs, ys))] * weight
    return float(np.mean(diffs)) if diffs else None


def test_a_gain_and_its_interval_recomputed_from_the_cells_alone(swept):
    _, record = swept
    cells = [c for c in record["sweep"]["cells"] if c["arm"] in ("vanilla", "orthogonal")
             and "sorry_bench" in c["outcomes"]]
    reported = record["sweep"]["arms"]["orthogonal"]["gain_at_matched_nll"]["sorry_bench"]
    mean = _gain(cells, "orthogonal", "sorry_bench")
    assert (mean is None) == (reported["mean"] is None)
    if mean is None:
        pytest.skip("no point inside vanilla's range in this tiny run")
    assert reported["mean"] == pytest.approx(mean, abs=1e-12)
    # an independent bootstrap (other random draws): prompts, one draw shared by every cell, then seeds
    rng = np.random.default_rng(123)
    n = len(next(iter(cells))["outcomes"]["sorry_bench"])
    gains = []
    for _ in range(2000):
        counts = rng.multinomial(n, np.full(n, 1 / n)).astype(float)
        draw = rng.choice(SEEDS, size=len(SEEDS))
        weights = {int(s): int((draw == s).sum()) for s in set(draw.tolist())}
        value = _gain(cells, "orthogonal", "sorry_bench", counts, weights)
        if value is not None:
            gains.append(value)
    lo, hi = np.percentile(gains, [2.5, 97.5])
    assert reported["ci_low"] == pytest.approx(lo, abs=0.08)
    assert reported["ci_high"] == pytest.approx(hi, abs=0.08)
    assert reported["ci_low"] <= reported["mean"] <= reported["ci_high"]


def test_rerun_skips_every_unit_and_merge_reproduces_results(swept, capsys):
    tmp, record = swept
    capsys.readouterr()
    main(["sweep", "--config", str(tmp / "sweep.yaml")])
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(SEEDS) * 3  # three fit arms per seed
    main(["sweep", "--config", str(tmp / "sweep.yaml"), "--merge", "true"])
    assert json.loads((tmp / "sweep" / "results.json").read_text())["sweep"]["arms"] == record["sweep"]["arms"]
    assert (tmp / "sweep" / "sweep_refusal_vs_red_nll.png").stat().st_size > 0
    assert (tmp / "sweep" / "sweep_refusal_vs_step.png").stat().st_size > 0


def test_a_unit_run_without_a_declared_posthoc_arm_is_finished_without_refitting(swept, capsys):
    tmp, _ = swept
    unit = tmp / "sweep" / "units" / "vanilla-s1"
    cells = unit / "cells.json"
    saved = json.loads(cells.read_text())
    weights = unit / "fit" / "adapter_model.safetensors"
    fitted = weights.stat().st_mtime_ns
    cells.write_text(json.dumps({**saved, "cells": [c for c in saved["cells"] if c["arm"] != "safe_lora_calibrated"]}))
    capsys.readouterr()
    main(["sweep", "--config", str(tmp / "sweep.yaml")])
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(SEEDS) * 3 - 1 and "vanilla-s1: done" in out
    assert weights.stat().st_mtime_ns == fitted  # the fit is reused: only the missing arm's points are made
    again = json.loads(cells.read_text())["cells"]
    assert sorted((c["arm"], c["step"]) for c in again) == sorted((c["arm"], c["step"]) for c in saved["cells"])


def test_merge_refuses_foreign_and_missing_units(swept, capsys):
    tmp, _ = swept
    cells = tmp / "sweep" / "units" / "orthogonal-s1" / "cells.json"
    saved = cells.read_text()
    record = json.loads(saved)
    record["fingerprint"]["code"] = "0" * 16
    cells.write_text(json.dumps(record))
    with pytest.raises(SystemExit) as err:
        main(["sweep", "--config", str(tmp / "sweep.yaml"), "--merge", "true"])
    assert err.value.code == 2 and "orthogonal-s1: code" in capsys.readouterr().err
    shutil.move(cells, cells.with_suffix(".bak"))
    with pytest.raises(SystemExit):
        main(["sweep", "--config", str(tmp / "sweep.yaml"), "--merge", "true"])
    assert "not finished: orthogonal-s1" in capsys.readouterr().err
    cells.with_suffix(".bak").replace(cells)
    cells.write_text(saved)


def test_shards_split_the_units_seed_by_seed():
    arms = parse_arms({"vanilla": {}, "orthogonal": {}, "safe_lora": {"transform": "safe_lora", "of": "vanilla"}},
                      "attack.yaml")
    units = plan_units(arms, [0, 1, 2])
    assert [u.name for u in units] == ["vanilla-s0", "orthogonal-s0", "vanilla-s1", "orthogonal-s1",
                                       "vanilla-s2", "orthogonal-s2"]
    assert units[0].arms == ("vanilla", "safe_lora")  # a post-hoc arm travels with its source
    shards = [shard_units(units, parse_shard(f"{i}/4")) for i in range(4)]
    assert sorted(u.name for s in shards for u in s) == sorted(u.name for u in units)
    for bad in ("4/4", "1-4", "-1/2"):
        with pytest.raises(SweepConfigError, match="I/N"):
            parse_shard(bad)


def test_sweep_before_its_pipeline_says_what_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = yaml.safe_load((REPO / "configs/tiny/pipeline.yaml").read_text())
    pipe["run_dir"] = str(tmp_path / "never")
    pipe["refusal_config"] = str(REPO / pipe["refusal_config"])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipe))
    with pytest.raises(SystemExit) as err:
        main(["sweep", "--config", str(REPO / "configs/tiny/sweep.yaml"), "--pipeline", str(tmp_path / "p.yaml")])
    assert err.value.code == 2
    assert "pipeline --config" in capsys.readouterr().err


def test_the_schedule_control_note_follows_its_interval():
    from refusal_lightning.experiment.sweep_report import schedule_note

    def control(lo, hi):
        return {"gain_at_matched_nll": {"sorry_bench": {"mean": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}}}

    assert "depends on the schedule" in schedule_note(control(0.05, 0.2), ["sorry_bench"])
    assert "depends on the schedule" in schedule_note(control(-0.3, -0.1), ["sorry_bench"])
    assert "lies on the frontier" in schedule_note(control(-0.05, 0.2), ["sorry_bench"])
    assert schedule_note({}, ["sorry_bench"]) == ""  # no such arm in the sweep: nothing to say


def _cpu_sweep(name: str) -> tuple[dict, dict]:
    config = yaml.safe_load((REPO / "configs/cpu" / name).read_text())
    arms = parse_arms(config["arms"], yaml.safe_load((REPO / config["pipeline"]).read_text())["attack_config"])
    return config, {a.name: a for a in arms}


def test_the_cpu_sweep_declares_the_issues_grid():
    from refusal_lightning.experiment.sweep_plan import check_grid

    config, by_name = _cpu_sweep("sweep.yaml")
    assert list(by_name) == ["vanilla", "vanilla_lowlr", "orthogonal", "subspace", "asft", "asft_l2", "asft_random",
                             "act_guard", "act_guard_random_matched", "safe_lora", "safe_lora_calibrated"]
    lam = next(o for o in by_name["act_guard"].overrides if o.startswith("--model.act_guard.lam="))
    assert float(lam.split("=", 1)[1]) > 0  # the weight chosen on the validation split (README)
    matched = by_name["act_guard_random_matched"].overrides
    assert "--model.act_guard.direction=random" in matched and lam not in matched  # its own, cost-matched weight
    steps = check_grid(config["seeds"], config["trajectory_steps"], list(by_name.values()))
    assert len(config["seeds"]) == 3 and len(steps) >= 5
    attack = yaml.safe_load((REPO / "configs/cpu/attack.yaml").read_text())
    assert steps[-1] >= attack["trainer"]["max_steps"]  # the trajectory reaches at least the demo's attack
    assert config["benign_lora"]["overrides"] == ["--data.thread=blue", "--data.selection=non_refusal"]


def test_the_mechanism_sweep_shares_the_sweeps_settings_and_refits_its_own_frontier():
    config, by_name = _cpu_sweep("sweep.yaml")
    other, arms = _cpu_sweep("sweep_mechanism.yaml")
    assert {k: v for k, v in other.items() if k not in ("arms", "run_dir")} == \
        {k: v for k, v in config.items() if k not in ("arms", "run_dir")}
    assert other["run_dir"] != config["run_dir"]  # its merge must not overwrite make sweep's results
    assert list(arms) == ["vanilla", "act_guard_random", "data_mix_p05", "data_mix_p10", "lox", "lox_tuned"]
    lam = next(o for o in by_name["act_guard"].overrides if o.startswith("--model.act_guard.lam="))
    control = arms["act_guard_random"].overrides
    assert lam in control and "--model.act_guard.direction=random" in control  # the same weight, another direction
    for arm, fraction in (("data_mix_p05", 0.05), ("data_mix_p10", 0.1)):
        (mix,) = arms[arm].overrides
        part = yaml.safe_load(mix.split("=", 1)[1])[0]
        assert part["fraction"] == fraction and part["half"] == "defender" and part["thread"] == "blue"


def _independent_projection(base_dir, adapter, questions, layer, direction) -> float:
    """Mean projection of each question's last-token state after ``layer`` on ``direction``: each prompt alone,
    unpadded, from ``output_hidden_states`` with the final norm removed (so the last entry is the last layer's
    output), without the readout's hooks or batching."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    model.get_base_model().model.norm = torch.nn.Identity()
    values = []
    with torch.no_grad():
        for q in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True,
                                                enable_thinking=False)["input_ids"]  # as the evaluation sends
            states = model(input_ids=torch.tensor([list(ids)]), output_hidden_states=True).hidden_states
            values.append(float(states[layer + 1][0, -1] @ direction))
    return sum(values) / len(values)


def test_readout_follows_the_direction_along_every_trajectory_and_resumes(swept, capsys):
    import torch

    from refusal_lightning.experiment.readout import readout_prompts
    from refusal_lightning.experiment.sweep import sweep_context

    tmp, _ = swept
    args = ["readout", "--sweep", str(tmp / "sweep.yaml"), "--max_prompts", "5", "--batch_size", "3",
            "--causal_arms", "[vanilla]"]
    main(args)
    out = tmp / "sweep" / "readout"
    result = json.loads((out / "readout.json").read_text())
    assert result["layer"] in result["allowed_layers"] and len(result["separation"]) == 2
    assert result["prompts"] == {"harmful_defender": 5, "harmless": 5, "harmful_heldout": 5}
    points = {(p["arm"], p["seed"], p["step"]): p for p in result["points"]}
    trained = {(a, s, t) for a in ARMS for s in SEEDS for t in STEPS if t or a == "lox"}  # LoX's own step 0
    control = {("benign_lora", SEEDS[0], t) for t in STEPS if t}  # any fine-tune's effect: the control
    assert set(points) == {("refusal", -1, 0)} | trained | control
    assert points[("refusal", -1, 0)]["suppression"] == pytest.approx(1.0)  # the reference is itself
    assert points[("refusal", -1, 0)]["rotation_cos"] == pytest.approx(1.0)
    # the suppression of one attacked point, recomputed without the readout's code path
    saved = torch.load(out / "direction.pt")
    ctx, *_ = sweep_context(tmp / "sweep.yaml")
    prompts = readout_prompts(ctx.attack_data, None, 5)
    layer, r = saved["layer"], saved["direction"]
    h_ref = _independent_projection(ctx.base_model, ctx.refusal_dir, prompts["harmful_heldout"], layer, r)
    b_ref = _independent_projection(ctx.base_model, ctx.refusal_dir, prompts["harmless"], layer, r)
    snapshot = tmp / "sweep" / "units" / "vanilla-s1" / "fit" / "steps" / str(STEPS[-1]) / "combined"
    h = _independent_projection(ctx.base_model, snapshot, prompts["harmful_heldout"], layer, r)
    expected = (h - b_ref) / (h_ref - b_ref)
    assert points[("vanilla", 1, STEPS[-1])]["suppression"] == pytest.approx(expected, abs=1e-3)
    assert points[("vanilla", 1, STEPS[-1])]["suppression"] != pytest.approx(1.0, abs=1e-3)  # the attack moved it
    summary = result["summary"]
    assert summary["refusal"]["0"]["ci_low"] == pytest.approx(1.0) == summary["refusal"]["0"]["ci_high"]
    last = summary["vanilla"][str(STEPS[-1])]
    assert last["n_seeds"] == len(SEEDS) and last["seed_min"] <= last["mean"] <= last["seed_max"]
    assert last["ci_low"] <= last["mean"] <= last["ci_high"] and last["ci_low"] < last["ci_high"]
    # causal checks: rates with intervals, the addition never negative, the same verdicts as the served sweep
    causal = result["causal"]
    assert set(causal["refusal"]) == {"plain", "ablated", "agreement_with_sweep"}
    for entry in (causal["refusal"]["plain"], causal["refusal"]["ablated"], causal["vanilla"]["restored"]):
        for stats in entry.values():
            assert stats["n"] == len(stats["outcomes"]) > 0 and stats["rate"] == stats["k"] / stats["n"]
    assert causal["vanilla"]["alpha"] >= 0
    assert {"sorry_bench", "harmfulqa_heldout"} <= set(causal["vanilla"]["restored"])
    assert set(causal["vanilla"]["random_direction"]) == {"sorry_bench", "harmfulqa_heldout"}
    for check in (causal["refusal"]["agreement_with_sweep"], causal["vanilla"]["agreement_with_sweep"]):
        assert check["sorry_bench"]["n"] > 0 and check["sorry_bench"]["share"] >= 0.8
    cells = json.loads((tmp / "sweep" / "results.json").read_text())["sweep"]["cells"]
    assert all("suppression" in c and "rotation_cos" in c for c in cells)
    assert (out / "readout_suppression_vs_step.png").stat().st_size > 0
    capsys.readouterr()
    main([*args[:-2], "--causal_arms", "[]"])  # resumed: no point is read again
    assert "suppression" not in "".join(line for line in capsys.readouterr().out.splitlines(True)
                                        if line.startswith("[readout]") and "/" in line.split(":")[0])


def test_readout_at_a_given_layer_writes_beside_the_rule_and_leaves_the_cells_alone(swept, capsys):
    tmp, _ = swept
    base = ["readout", "--sweep", str(tmp / "sweep.yaml"), "--max_prompts", "5", "--batch_size", "3",
            "--arms", "[vanilla]", "--seeds", f"[{SEEDS[0]}]", "--causal_arms", "[]"]
    results = tmp / "sweep" / "results.json"
    main(base)
    ruled = json.loads((tmp / "sweep" / "readout" / "readout.json").read_text())
    cells_before = results.read_text()
    other = next(i for i in ruled["allowed_layers"] if i != ruled["layer"])
    main([*base, "--layer", str(other)])
    given = json.loads((tmp / "sweep" / "readout" / f"layer{other}" / "readout.json").read_text())
    assert given["layer"] == other and given["layer_rule"] == "given (--layer)"
    last = given["summary"]["vanilla"][str(STEPS[-1])]["mean"]
    assert last != pytest.approx(ruled["summary"]["vanilla"][str(STEPS[-1])]["mean"], abs=1e-6)  # another layer
    assert json.loads((tmp / "sweep" / "readout" / "readout.json").read_text()) == ruled  # the rule's, kept
    assert results.read_text() == cells_before  # the sweep's cells keep the rule's layer
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*base, "--layer", "7"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--layer 7" in err and ", ".join(map(str, ruled["allowed_layers"])) in err
    assert not (tmp / "sweep" / "readout" / "layer7").exists()  # refused before any folder is made


def test_readout_names_an_unknown_arm(swept):
    tmp, _ = swept
    with pytest.raises(SystemExit) as exc:
        main(["readout", "--sweep", str(tmp / "sweep.yaml"), "--arms", "[nonesuch]"])
    assert exc.value.code != 0


def test_spread_takes_evenly_spaced_items_in_order():
    from refusal_lightning.defences.activation_direction import spread

    assert spread(list("abcdefghij"), 5) == list("acegi")
    assert spread(list("abc"), 5) == list("abc")


def test_pictures_draw_seeds_that_agree_to_the_last_bit(tmp_path):
    """Three seeds with refusal 0.3 at a step: their mean sits a rounding error above their range (bars of
    -3.6e-15 made matplotlib refuse the picture in the CPU sweep's merge)."""
    from refusal_lightning.experiment.sweep_report import write_sweep_pictures

    cells = [{"arm": arm, "seed": seed, "step": step, "refusal": {"sorry_bench": 0.3 if step else 0.9},
              "nll": {"red_heldout": 4.0 - step / 10}} for arm in ("vanilla", "orthogonal") for seed in (0, 1, 2)
             for step in (0, 5)]
    record = {"sweep": {"prompt_sets": ["sorry_bench"], "arms_order": ["vanilla", "orthogonal"], "cells": cells,
                        "seeds": [0, 1, 2], "metric": "keyword@8"}}
    paths = write_sweep_pictures(record, tmp_path)
    assert [p.name for p in paths] == ["sweep_refusal_vs_red_nll.png", "sweep_refusal_vs_step.png"]
