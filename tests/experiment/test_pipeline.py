"""`pipeline` end to end on a reduced demo config: every artifact, skip on rerun, server stopped."""

from __future__ import annotations

import json
import re
import socket

import pytest
import yaml
from conftest import REPO, tiny_pipeline_config

from refusal_lightning.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tiny_pipeline_config()
    # the subspace variant and the two published baselines as extra arms (as configs/cpu/pipeline_baselines.yaml)
    config["arms"].update({
        "subspace": {"overrides": ["--model.projection.enabled=true", "--model.projection.mode=subspace"]},
        "safe_lora": {"transform": "safe_lora", "of": "vanilla", "args": {"threshold": 0.5, "projector": "paper"}},
        "asft": {"overrides": ["--model.asft.enabled=true"]}})
    config["fit_overrides"] = ["--trainer.max_steps=6", "--trainer.val_check_interval=3",
                               "--trainer.enable_progress_bar=false"]
    config["evaluation"]["limit"] = 6
    config["evaluation"]["generation"]["max_tokens"] = 8
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the arms' order is the table's
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    main(["pipeline", "--config", str(path)])
    yield tmp, path, mp
    mp.undo()


def test_pipeline_writes_every_artifact(demo_run):
    tmp, _, _ = demo_run
    run = tmp / "artifacts/tiny"
    for adapter in ("refusal_lora", "attack_vanilla", "attack_orthogonal"):
        for name in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "data_stats.json"):
            assert (run / adapter / name).exists(), f"{adapter}/{name}"
    for attack in ("attack_vanilla", "attack_orthogonal"):
        assert (run / attack / "projection_stats.json").exists()
    assert (run / "refusal_param_directions.pt").exists()
    for name in ("responses.jsonl", "judgments.jsonl", "summary.json", "summary.csv", "report.md",
                 "fulfillment_by_category.png"):
        assert (run / "eval" / name).exists(), name
    for attack in ("attack_vanilla", "attack_orthogonal"):  # what is served: base + refusal + attack
        assert (run / attack / "combined" / "adapter_model.safetensors").exists()
    results = json.loads((run / "results.json").read_text())
    assert list(results["models"]) == ["base", "refusal", "vanilla", "orthogonal", "subspace", "safe_lora",
                                        "asft"]
    for name, row in results["models"].items():
        # limit 6: the benign sample's first 6 rows all have a reference, so the facts view and no contrast view
        assert set(row["prompt_sets"]) == {"sorry_bench", "harmfulqa_heldout", "benign", "benign_facts"}, name
        for stats in row["prompt_sets"].values():
            assert stats["n"] > 0 and 0.0 <= stats["ci_low"] <= stats["refusal_rate"] <= stats["ci_high"] <= 1.0
            assert stats["errors"] == 0
        assert row["prompt_sets"]["benign"]["accuracy"] is not None
        assert row["nll"]["red_heldout"] > 0 and row["nll"]["blue_heldout"] > 0
    safe = results["models"]["safe_lora"]["safe_lora"]
    assert 0 <= safe["share_projected"] <= 1 and 0 <= safe["refusal_span_share"] <= 1
    assert safe["gate"] == "threshold" and safe["calibration"] is None and safe["score_summary"]["n"] > 0
    assert safe["delta_norm_vs_refusal"] >= 0 and safe["delta_norm_vs_refusal_before"] > 0
    for attack in ("vanilla", "orthogonal", "subspace", "safe_lora", "asft"):
        drift = results["models"][attack]["drift"]
        assert drift["cos"] is not None and 0 < drift["cos_chance"] < 1
    # the attacks learned their red replies: lower held-out red NLL than the refusal model they start from
    models = results["models"]
    assert models["vanilla"]["nll"]["red_heldout"] < models["refusal"]["nll"]["red_heldout"]
    for s in ("sorry_bench", "harmfulqa_heldout", "benign"):
        for pair in ("vanilla_vs_orthogonal", "refusal_vs_orthogonal", "vanilla_vs_subspace", "vanilla_vs_safe_lora",
                     "vanilla_vs_asft"):
            assert 0 <= results["mcnemar"][s][pair]["p_value"] <= 1
    text = (run / "results.md").read_text()
    assert "| orthogonal |" in text and "drift/cos (chance)" in text and "McNemar p" in text
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert "| benign refusal | facts accuracy |" in header  # no contrast view: its column falls back to benign
    assert (run / "refusal_vs_red_nll.png").stat().st_size > 1000
    check = results["judge_check"]  # the keyword judge's recall on held-out refusals, beside the rates
    assert check["n_blue"] > 0 and 0 < check["blue_refusal_recall"] <= 1 and check["red_false_refusal"] == 0
    assert "Keyword judge check" in text
    # the activation stage: the readout of every model (the refusal model is its own reference)
    refusal = models["refusal"]["activation"]
    assert refusal["suppression"] == 1.0 and refusal["rotation_cos"] == 1.0
    assert set(refusal["ablated_refusal"]) == {"sorry_bench", "harmfulqa_heldout"}
    for attack in ("vanilla", "orthogonal", "subspace", "safe_lora", "asft"):
        act = models[attack]["activation"]
        assert act["layer"] == refusal["layer"] and -1 <= act["rotation_cos"] <= 1
        assert act["suppression"] != 1.0 and act["restored_alpha"] >= 0
        for stats in act["restored_refusal"].values():
            assert 0 <= stats["ci_low"] <= stats["rate"] <= stats["ci_high"] <= 1 and stats["n"] > 0
        assert "restored_twin_refusal" in act  # None here: the limited benign sample has no contrast twins
    assert "activation" not in models["base"]
    tb = {p.parent.parent.name for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    assert tb == {"refusal_lora", "attack_vanilla", "attack_orthogonal", "attack_subspace", "attack_asft"}


def test_background_server_is_gone(demo_run):
    tmp, _, _ = demo_run
    log = (tmp / "artifacts/tiny/serve.log").read_text()
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", log).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_rerun_skips_finished_stages_and_force_redoes_one(demo_run, capsys):
    tmp, path, _ = demo_run
    run = tmp / "artifacts/tiny"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("adapter_model.safetensors")}
    capsys.readouterr()
    main(["pipeline", "--config", str(path)])
    out = capsys.readouterr().out
    for stage in ("tiny_model", "refusal", "directions", "vanilla", "orthogonal", "nll", "evaluate", "activation"):
        assert f"[pipeline] {stage}: up to date, skipped" in out
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("adapter_model.safetensors")}

    main(["pipeline", "--config", str(path), "--until", "directions"])
    out = capsys.readouterr().out
    assert "stopped after 'directions'" in out and "[pipeline] vanilla" not in out

    main(["pipeline", "--config", str(path), "--force", "[orthogonal]"])
    out = capsys.readouterr().out
    assert "[pipeline] refusal: up to date, skipped" in out and "[pipeline] vanilla: up to date, skipped" in out
    assert "[pipeline] orthogonal: running" in out and "[pipeline] evaluate: running" in out
    assert "[pipeline] nll: running" in out


# slow (15 s): scripts/sweep_baselines.py, superseded by the sweep command (tests/experiment/test_sweep.py)
@pytest.mark.slow
def test_sweep_baselines_on_the_validation_split(demo_run, capsys):
    import importlib.util

    tmp, path, _ = demo_run
    spec = importlib.util.spec_from_file_location("sweep_baselines", REPO / "scripts" / "sweep_baselines.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    # the validation files are read relative to the working directory, as in the repo
    (tmp / "refusal_lightning").symlink_to(REPO / "refusal_lightning")
    sweep.main(["--pipeline_config", str(path), "--thresholds", "0.5", "0.99", "--lams", "1", "0.1",
                "--nll_max_pairs", "8"])
    out = tmp / "artifacts/tiny/sweep"
    result = json.loads((out / "sweep.json").read_text())
    names = [row["model"] for row in result["rows"]]
    assert names == ["refusal", "vanilla", "safe_lora_t0p5", "safe_lora_t0p99", "asft_lam1", "asft_lam0p1"]
    assert "validation_sorry_proxy" in result["validation"]["prompts"]
    rows = {row["model"]: row for row in result["rows"]}
    for row in rows.values():
        assert row["refusal_n"] == 40 and row["over_refusal_n"] == 40 and row["red_nll"] > 0
        assert row["refusal_ci"][0] <= row["refusal"] <= row["refusal_ci"][1]
    # a higher threshold projects at least as many modules, and keeps at most as much of the attack
    assert rows["safe_lora_t0p99"]["share_projected"] >= rows["safe_lora_t0p5"]["share_projected"]
    assert rows["safe_lora_t0p99"]["delta_norm_kept"] <= rows["safe_lora_t0p5"]["delta_norm_kept"] + 1e-6
    # lam 1 is the pipeline's own fit (reused); lam 0.1 was fitted for the sweep
    assert rows["asft_lam1"]["adapter"].endswith("attack_asft") and (out / "asft_lam0p1" / "combined").is_dir()
    assert "| asft_lam0p1 | lam 0.1 |" in (out / "sweep.md").read_text()


def test_failed_evaluation_exits_non_zero_with_one_error_line(demo_run, capsys):
    # Last in this file: it reruns the evaluate stage against endpoints where nothing listens.
    tmp, path, _ = demo_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = yaml.safe_load(path.read_text())
    config["serve"] = False
    config["endpoints"] = {m: f"http://127.0.0.1:{port}#{m}" for m in ("base", "refusal", "vanilla", "orthogonal",
                                                                    "subspace", "safe_lora", "asft")}
    config["evaluation"]["retry"] = {"max_attempts": 1, "backoff_base": 0.01}
    failing = tmp / "pipeline_unreachable.yaml"
    failing.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(failing)])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: evaluate: abandoned endpoint base: cannot connect"), errors
    assert f"http://127.0.0.1:{port}/v1" in errors[0]
    assert (tmp / "artifacts/tiny/eval/summary.json").exists()  # the outputs are still written


def test_server_batches_as_many_requests_as_the_evaluator_sends():
    from pathlib import Path

    from refusal_lightning.serving.process import ServerProcess

    args = ServerProcess("base-dir", {"refusal": Path("r")}, Path("serve.log"), max_batch_size=128).args
    assert args[args.index("--max_batch_size") + 1] == "128"
    assert args[args.index("--adapter") + 1] == "refusal=r"


def test_a_changed_retain_prompt_file_redoes_the_refusal_fit(tmp_path):
    from refusal_lightning.experiment.pipeline import _data_print

    prompts = tmp_path / "retain.jsonl"
    prompts.write_text('{"prompt": "What is two plus two?"}\n')
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"data": {"source": "sample"},
                                      "model": {"retain": {"enabled": True, "source": str(prompts)}}}))
    before = _data_print(config)
    prompts.write_text('{"prompt": "What is three plus three?"}\n')
    assert _data_print(config) != before
    config.write_text(yaml.safe_dump({"data": {"source": "sample"}, "model": {"retain": {"enabled": False}}}))
    assert _data_print(config) == "sample"  # without the term it prints as it always did


def test_a_code_change_reruns_the_stages(demo_run, capsys, monkeypatch):
    # last in this module: it leaves the run's stages fingerprinted with another code print
    from refusal_lightning.experiment import pipeline as pipeline_module

    tmp, path, _ = demo_run
    main(["pipeline", "--config", str(path), "--until", "refusal"])
    assert "[pipeline] refusal: up to date, skipped" in capsys.readouterr().out
    monkeypatch.setattr(pipeline_module, "tree_sha256", lambda root: "another version of the code")
    main(["pipeline", "--config", str(path), "--until", "refusal"])
    out = capsys.readouterr().out
    assert "[pipeline] tiny_model: running" in out and "[pipeline] refusal: running" in out
