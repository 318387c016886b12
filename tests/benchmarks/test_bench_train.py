"""Smoke test of scripts/bench_train.py: the tiny preset, a few steps, the JSON contract other tools read."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "bench_train.py"
MODES = ("lora_param", "delta_weight", "subspace")
TARGETS = ("grad", "update")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bench_train_tiny_writes_the_json_contract(tmp_path):
    out = tmp_path / "train.json"
    result = _run("--preset", "tiny", "--warmup", "1", "--steps", "2", "--mem", "inproc", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    res = json.loads(out.read_text())

    assert res["preset"] == "tiny"
    assert {"nproc", "cpu_model", "torch"} <= set(res["machine"])
    projection_runs = [f"{m}_{t}" for m in MODES for t in TARGETS]
    has_trl = importlib.util.find_spec("trl") is not None
    expected = {"plain", "vanilla", *projection_runs} | ({"trl"} if has_trl else set())
    assert set(res["runs"]) == expected, res.get("skipped")
    for name, run in res["runs"].items():
        assert run["tokens_per_s"] > 0 and run["step_s_median"] > 0, name
        assert run["steps_timed"] == 2, name
        assert run["peak_rss_mb"] > 0, name
    assert set(res["peak_rss_mb"]) == set(res["runs"])
    if not has_trl:
        assert "trl" in res["skipped"]  # a clear note, not a crash

    ratios = res["ratios"]
    for key in ["vanilla_vs_plain", *(f"{r}_vs_vanilla" for r in projection_runs)]:
        assert ratios[key] > 0, key
    assert ("vanilla_vs_trl" in ratios) == has_trl
    assert ("ratios.vanilla_vs_trl" in res["missing"]) != has_trl
    assert "vanilla_vs_vanilla_full" not in ratios and "ratios.vanilla_vs_vanilla_full" not in res["missing"]
    assert None not in ratios.values()

    assert 0.5 < res["padding_efficiency"] <= 1.0
    assert 0 < res["directions_mem_ratio"] <= 2.0
    assert {t["metric"] for t in res["targets"]} >= {"vanilla_vs_plain", "padding_efficiency"}
    table = out.with_suffix(".md").read_text()
    assert "| vanilla |" in table and "| plain |" in table


# slow (15 s): the benchmark's no-TRL path; test_bench_train_tiny_writes_the_json_contract covers the harness
@pytest.mark.slow
def test_bench_train_without_trl_notes_the_skip_and_probes_memory(tmp_path):
    """TRL missing -> a note in ``skipped``, not a crash; ``--mem probe`` measures each runner in a subprocess."""
    fake = tmp_path / "no_trl" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('trl hidden by the test')\n")
    out = tmp_path / "train.json"
    env_path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--runners", "plain,vanilla,trl", "--warmup", "1",
         "--steps", "2", "--mem", "probe", "--mem-steps", "1", "--out", str(out), "--md", str(tmp_path / "t.md")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": env_path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"plain", "vanilla"}
    assert "not importable" in res["skipped"]["trl"]
    # No null ratio: the JSON says why each figure of the missing runner is absent.
    assert "vanilla_vs_trl" not in res["ratios"]
    assert "not importable" in res["missing"]["ratios.vanilla_vs_trl"]
    assert "not importable" in res["missing"]["peak_rss_mb.trl"]
    for name, run in res["runs"].items():
        assert run["peak_rss_mb"] and run["peak_rss_mb"] > 50, (name, run.get("peak_mem_error"))
        assert 0 < run["peak_rss_above_imports_mb"] < run["peak_rss_mb"], name
    assert set(res["peak_rss_mb"]) == {"plain", "vanilla"}
    assert res["mem_ratios"]["vanilla_vs_plain"] > 0
    table = (tmp_path / "t.md").read_text()
    assert "skipped" in table and "missing" in table


def test_bench_train_cpu_vocab_preset_builds_the_real_vocabulary(tmp_path, monkeypatch):
    """cpu-vocab: the tiny model's shape at Qwen3's 151,936-token vocabulary (checked without training it)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from bench.presets import PRESETS
    from bench.workload import build_base_model

    preset = PRESETS["cpu-vocab"]
    assert (preset.vocab_size, preset.hidden_size, preset.num_layers, preset.batch, preset.seq) == (
        151936, 512, 4, 4, 512)
    assert preset.runners == ("plain", "vanilla", "trl")
    from dataclasses import replace

    import torch
    from transformers import AutoConfig

    folder = build_base_model(replace(preset, hidden_size=64, num_layers=1), tmp_path / "m", torch.device("cpu"))
    config = AutoConfig.from_pretrained(folder)
    assert config.vocab_size == 151936 and config.tie_word_embeddings


def test_bench_targets_follow_the_preset_vocabulary(monkeypatch):
    """The targets table: vanilla_vs_plain's threshold and the peak-RSS target depend on the vocabulary."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from bench.targets import targets_of

    result = {"settings": {"vocab_size": None},
              "ratios": {"vanilla_vs_plain": 0.97, "subspace_update_vs_vanilla": 0.89},
              "mem_ratios": {"vanilla_vs_plain": 0.5}, "padding_efficiency": 0.99, "directions_mem_ratio": None}
    small = {t["metric"]: t for t in targets_of(result)}
    assert list(small) == ["vanilla_vs_plain", "subspace_update_vs_vanilla", "padding_efficiency"]
    assert small["vanilla_vs_plain"]["target"] == ">= 0.95" and small["vanilla_vs_plain"]["met"]
    assert small["subspace_update_vs_vanilla"]["target"] == ">= 0.9" and not small["subspace_update_vs_vanilla"]["met"]
    vocab = {t["metric"]: t for t in targets_of({**result, "settings": {"vocab_size": 151936}})}
    assert vocab["vanilla_vs_plain"]["target"] == ">= 1.0" and not vocab["vanilla_vs_plain"]["met"]
    assert vocab["peak_rss_vanilla_vs_plain"] == {"metric": "peak_rss_vanilla_vs_plain", "value": 0.5,
                                                  "target": "<= 0.6", "met": True}


def test_bench_train_help():
    result = _run("--help", timeout=60)
    assert result.returncode == 0
    assert "--preset" in result.stdout and "cpu-small" in result.stdout
