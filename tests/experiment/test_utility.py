"""The utility grid: its plan, the fit overrides it builds, its statistics against hand-computed values, and
(end to end on the tiny tier) the ``utility.cells`` contract of ``results.json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_pipeline_config

from refusal_lightning.experiment.arms import parse_arms
from refusal_lightning.experiment.utility import UtilityConfigError, _cell, mixed_overrides, plan_grid
from refusal_lightning.experiment.utility_stats import grid_rows, seed_bootstrap


def _cpu_arms():
    config = yaml.safe_load((REPO / "configs/cpu/sweep.yaml").read_text())
    return parse_arms(config["arms"], yaml.safe_load((REPO / config["pipeline"]).read_text())["attack_config"])


def test_the_cpu_grid_is_every_chosen_arm_at_0_and_01_and_the_extra_arms_at_005_and_02():
    config = yaml.safe_load((REPO / "configs/cpu/sweep_utility.yaml").read_text())
    units = plan_grid(_cpu_arms(), config["arms"], config["ps"], config["extra_arms"], config["extra_ps"], [0, 1, 2])
    got = {(u.arm.name, u.p, u.seed) for u in units}
    want = {(a, p, s) for s in (0, 1, 2) for a in config["arms"] for p in (0.0, 0.1)}
    want |= {(a, p, s) for s in (0, 1, 2) for a in config["extra_arms"] for p in (0.05, 0.2)}
    assert got == want and len(units) == len(want)
    assert "act_guard" in config["extra_arms"] and "vanilla" in config["extra_arms"]
    assert units[0].name == "vanilla-p0-s0" and {u.name for u in units} >= {"act_guard-p0.05-s2"}


def test_a_posthoc_arm_travels_with_its_fit_and_bad_grids_are_refused():
    arms = _cpu_arms()
    units = plan_grid(arms, ["vanilla", "safe_lora"], [0.1], [], [], [0])
    assert [(u.arm.name, [a.name for a in u.posthoc]) for u in units] == [("vanilla", ["safe_lora"])]
    with pytest.raises(UtilityConfigError) as err:
        plan_grid(arms, ["orthogonal", "nope"], [0.1, 1.0], ["act_guard"], [], [0])
    message = str(err.value)
    for part in ("arm 'nope'", "p = 1.0", "needs vanilla", "extra arm 'act_guard'"):
        assert part in message


def test_the_harmful_part_joins_an_arms_own_mix_and_the_task_becomes_the_main_data():
    task = {"source": "task.jsonl", "format": "prompt_answer"}
    harmful = {"source": "hq.json", "thread": "red", "half": "attacker"}
    own = "--data.mix=[{source: hq.json, thread: blue, fraction: 0.1, half: defender}]"
    out = mixed_overrides(["--model.lox.enabled=true", own], task, harmful, 0.2)
    assert out[0] == "--model.lox.enabled=true"
    assert yaml.safe_load(out[1].split("=", 1)[1]) == task
    parts = yaml.safe_load(out[2].split("=", 1)[1])
    assert parts == [{"source": "hq.json", "thread": "blue", "fraction": 0.1, "half": "defender"},
                     {**harmful, "fraction": 0.2}]
    assert mixed_overrides([], task, harmful, 0.0)[-1] == "--data.mix=[]"  # p = 0: the task alone


def test_a_cell_scores_harm_accuracy_and_twins_from_its_outcomes():
    outcomes = {"sorry_bench": {"a": 1, "b": 0, "c": 0, "d": 1}, "task": {"1": 1, "2": 1, "3": 0},
                "benign_contrast": {"x": 0, "y": 1}}
    cell = _cell("vanilla", 2, 0.1, outcomes)
    assert cell["harmful_score"] == 0.5 and cell["finetune_accuracy"] == pytest.approx(2 / 3)
    assert cell["twin_refusal"] == 0.5
    assert cell["n"] == {"harmful_score": 4, "finetune_accuracy": 3, "twin_refusal": 2}


def test_the_seed_bootstrap_mean_and_paired_difference_match_hand_computation():
    arm = {0: {"a": 1, "b": 1, "c": 0, "d": 0}, 1: {"a": 1, "b": 1, "c": 1, "d": 0}}
    base = {0: {"a": 0, "b": 1, "c": 0, "d": 0}, 1: {"a": 0, "b": 0, "c": 0, "d": 0},
            7: {"a": 1, "b": 1, "c": 1, "d": 1}}
    alone = seed_bootstrap(arm, replicates=500)
    assert alone["mean"] == pytest.approx((0.5 + 0.75) / 2) and alone["n_items"] == 4 and alone["n_seeds"] == 2
    assert alone["ci_low"] <= alone["mean"] <= alone["ci_high"] and alone["ci_high"] - alone["ci_low"] > 0
    assert seed_bootstrap(arm, flip=True, replicates=50)["mean"] == pytest.approx(1 - 0.625)
    paired = seed_bootstrap(arm, base, replicates=500)  # seed 7 has no arm cell: left out
    assert paired["mean"] == pytest.approx(((0.5 - 0.25) + (0.75 - 0.0)) / 2) and paired["n_seeds"] == 2
    same = seed_bootstrap(arm, arm, replicates=200)
    assert same["mean"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0  # paired: no noise against itself


def test_grid_rows_compare_with_vanilla_at_the_same_p_and_leave_the_p0_harm_gain_out():
    def cell(arm, p, seed, refused, right):
        return {"arm": arm, "p": p, "seed": seed, "outcomes": {
            "sorry_bench": dict(enumerate(refused)), "task": dict(enumerate(right)), "benign_contrast": {0: 0}}}

    cells = [cell("vanilla", 0.0, 0, [1, 1], [1, 1]), cell("guard", 0.0, 0, [1, 1], [1, 0]),
             cell("vanilla", 0.1, 0, [0, 0], [1, 1]), cell("guard", 0.1, 0, [1, 0], [1, 1])]
    rows = {(r["arm"], r["p"]): r for r in grid_rows(cells, replicates=100)}
    assert rows["guard", 0.1]["harmful_score"]["mean"] == 0.5 and rows["vanilla", 0.1]["harmful_score"]["mean"] == 1
    assert rows["guard", 0.1]["harmful_score_vs_vanilla"]["mean"] == -0.5
    assert rows["guard", 0.0]["finetune_accuracy_vs_vanilla"]["mean"] == -0.5  # the pure utility cost
    assert "harmful_score_vs_vanilla" not in rows["guard", 0.0] and "finetune_accuracy_vs_vanilla" not in rows[
        "vanilla", 0.1]
    assert np.isclose(rows["vanilla", 0.0]["finetune_accuracy"]["mean"], 1.0)


@pytest.fixture(scope="module")
def utility_run(tmp_path_factory):
    """The tiny pipeline's refusal model, then configs/tiny/sweep_utility.yaml on it (sweep settings trimmed)."""
    from refusal_lightning.cli import main

    tmp = tmp_path_factory.mktemp("utility")
    pipe = tiny_pipeline_config()
    pipe["fit_overrides"] = ["--trainer.max_steps=4", "--trainer.val_check_interval=2",
                             "--trainer.enable_progress_bar=false"]
    pipe["evaluation"].update(limit=6, generation={"max_tokens": 8, "temperature": 0.0})
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    sweep = yaml.safe_load((REPO / "configs/tiny/sweep.yaml").read_text())
    sweep.update(pipeline=str(tmp / "pipeline.yaml"), run_dir=str(tmp / "sweep"), trajectory_steps=[0, 4])
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    config = yaml.safe_load((REPO / "configs/tiny/sweep_utility.yaml").read_text())
    config.update(sweep=str(tmp / "sweep.yaml"), run_dir=str(tmp / "utility"))
    for key in ("task", "heldout"):
        config[key]["source"] = str(REPO / config[key]["source"])
    config["evaluation"]["benign_prompts"] = str(REPO / config["evaluation"]["benign_prompts"])
    (tmp / "utility.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    main(["pipeline", "--config", str(tmp / "pipeline.yaml"), "--until", "directions"])
    main(["utility", "--config", str(tmp / "utility.yaml")])
    yield tmp, config, json.loads((tmp / "utility" / "results.json").read_text())
    mp.undo()


def test_the_tiny_grid_writes_the_utility_cells_contract(utility_run):
    tmp, config, record = utility_run
    cells = record["utility"]["cells"]
    assert sorted((c["arm"], c["p"], c["seed"]) for c in cells) == sorted(
        (a, p, s) for a in config["arms"] for p in config["ps"] for s in config["seeds"])
    for c in cells:
        assert set(c) == {"arm", "seed", "p", "harmful_score", "finetune_accuracy", "twin_refusal", "n"}
        for key in ("harmful_score", "finetune_accuracy", "twin_refusal"):
            assert 0 <= c[key] <= 1 and c["n"][key] > 0
        assert c["n"]["finetune_accuracy"] == config["heldout_limit"]
    assert set(record["utility"]["reference"]) == {"base", "refusal"}
    guard = next(r for r in record["utility"]["rows"] if r["arm"] == "act_guard" and r["p"] == 0.1)
    assert guard["harmful_score_vs_vanilla"]["n_seeds"] == 1
    assert (tmp / "utility" / "utility_harmful_vs_accuracy.png").stat().st_size > 0
    assert "| act_guard | 0.1 |" in (tmp / "utility" / "results.md").read_text()
    # the fits trained on the task with the declared share of red replies
    stats = json.loads((tmp / "utility/units/vanilla-p0.1-s0/fit/data_stats.json").read_text())
    assert stats["task"]["source"].endswith("sentiment_train.jsonl")
    (part,) = stats["mix"]["parts"]
    assert part["thread"] == "red" and part["half"] == "attacker" and part["count"] == round(0.1 * stats["mix"]["n"])
    answers = (tmp / "utility/units/vanilla-p0-s0/eval_last/task/task_answers.jsonl").read_text().splitlines()
    assert len(answers) == config["heldout_limit"]


def test_a_finished_grid_is_skipped_when_run_again(utility_run, capsys):
    from refusal_lightning.cli import main

    tmp, config, record = utility_run
    main(["utility", "--config", str(tmp / "utility.yaml")])
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(config["arms"]) * len(config["ps"])
    again = json.loads((tmp / "utility" / "results.json").read_text())
    assert again["utility"]["cells"] == record["utility"]["cells"]


def test_the_real_grid_reads_sst2_from_the_hub_through_the_same_options():
    from refusal_lightning.train.task_data import check_task

    config = yaml.safe_load((REPO / "configs/sweep_utility.yaml").read_text())
    sweep = yaml.safe_load((REPO / config["sweep"]).read_text())
    arms = parse_arms(sweep["arms"], yaml.safe_load((REPO / sweep["pipeline"]).read_text())["attack_config"])
    units = plan_grid(arms, config["arms"], config["ps"], config["extra_arms"], config["extra_ps"], sweep["seeds"])
    assert len(units) == len(sweep["seeds"]) * (2 * len(config["arms"]) + 2 * len(config["extra_arms"]))
    task, heldout = check_task(config["task"]), check_task(config["heldout"])
    assert (task.source, task.format, task.split) == ("stanfordnlp/sst2", "sst2", "train")
    assert heldout.split == "validation"  # SST2's test split is unlabelled


def test_the_controls_script_counts_label_answers_and_one_label_accuracy(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("utility_controls", REPO / "scripts" / "utility_controls.py")
    controls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(controls)
    rows = [{"answer": "positive"}, {"answer": "negative"}, {"answer": "negative"}, {"answer": "Negative"}]
    assert controls.constant_answers(rows) == {"negative": 0.75, "positive": 0.25}
    unit = tmp_path / "vanilla-p0.1-s0"
    (unit / "eval_last" / "task").mkdir(parents=True)
    answers = [("sorry_bench", "Positive."), ("sorry_bench", "I'm sorry, I can't"), ("sorry_bench", "negative"),
               ("benign", "positive")]
    (unit / "eval_last" / "responses.jsonl").write_text("".join(
        json.dumps({"endpoint": "vanilla", "prompt_set": s, "response": r}) + "\n" for s, r in answers))
    (unit / "eval_last" / "task" / "task_answers.jsonl").write_text("".join(
        json.dumps({"model": "vanilla", "answer": a}) + "\n" for a in ("positive", "positive", "negative")))
    got = controls.unit_controls(unit, {"positive", "negative"})["vanilla"]
    assert (got["harmful_answers"], got["label_answers"]) == (3, 2)  # the benign answer is not counted
    assert got["task_first_words"] == {"positive": 2, "negative": 1}


def test_a_bad_task_section_is_one_error_naming_the_section(tmp_path):
    from refusal_lightning.experiment.utility import utility

    sweep = str(REPO / "configs/tiny/sweep.yaml")
    task = {"source": "x.jsonl"}
    cases = (({"source": "x.jsonl", "fromat": "sst2"}, "task"), ({"source": "x", "format": "csv"}, "heldout"))
    for bad, where in cases:
        args = {"task": bad, "heldout": task} if where == "task" else {"task": task, "heldout": bad}
        with pytest.raises(UtilityConfigError, match=f"^utility {where}: "):
            utility(sweep=sweep, run_dir=str(tmp_path), **args)
