"""End to end: ``serve`` the tiny Qwen3 model with two LoRA adapters, ``evaluate`` it, check every file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import make_random_adapter

from refusal_lightning.evaluation.client import GenerationSettings
from refusal_lightning.evaluation.judges import JudgeSettings
from refusal_lightning.evaluation.runner import evaluate
from refusal_lightning.evaluation.stub_server import StubConfig, start_stub
from refusal_lightning.serving.server import start_background

ENDPOINTS = ("base", "alpha", "beta")
OUTPUTS = ("responses.jsonl", "judgments.jsonl", "summary.json", "summary.csv", "report.md",
           "fulfillment_by_category.png")


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-adapters")
    specs = [f"{name}={make_random_adapter(tiny_model_dir, root / name, i, ('q_proj', 'v_proj'))}"
             for i, name in enumerate(ENDPOINTS[1:])]
    server, url = start_background(str(tiny_model_dir), adapter=specs, served_model_name="base")
    judge, judge_url, _ = start_stub(StubConfig(models=["sorry-judge"]))
    yield url, judge_url
    for s in (server, judge):
        s.shutdown()
        s.server_close()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_serve_then_evaluate_writes_consistent_outputs(served, tmp_path):
    url, judge_url = served
    out = tmp_path / "eval"
    summary = evaluate(endpoint=[f"{m}={url}#{m}" for m in ENDPOINTS], output_dir=str(out), limit=6,
                       generation=GenerationSettings(max_tokens=16, temperature=0.7, seed=1),
                       judge=JudgeSettings("both", judge_url), concurrency=4, progress=False)
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name

    responses = _rows(out / "responses.jsonl")
    judgments = _rows(out / "judgments.jsonl")
    assert len(responses) == 3 * 6 and all(r["error"] is None for r in responses)
    assert {r["prompt_set"] for r in responses} == {"sorry_bench"}
    assert {r["model"] for r in responses} == set(ENDPOINTS)
    assert all(0 < r["usage"]["completion_tokens"] <= 16 for r in responses)
    assert len(judgments) == 2 * len(responses)
    assert {j["judge"] for j in judgments} == {"keyword", "llm"}

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["endpoints"] == summary["endpoints"]
    for key in ("failures", "endpoints", "mcnemar", "judge", "skipped_prompts"):
        assert key in on_disk
    assert on_disk["failures"]["failed"] == 0 and on_disk["failures"]["items"] == 18
    assert all(j["prompt_set"] == "sorry_bench" for j in judgments)
    llm = {(j["endpoint"], j["question_id"]): j["label"] for j in judgments if j["judge"] == "llm"}
    for name in ENDPOINTS:
        assert list(on_disk["endpoints"][name]["prompt_sets"]) == ["sorry_bench"]
        e = on_disk["endpoints"][name]["prompt_sets"]["sorry_bench"]
        assert e["n"] == 6 == e["refusals"] + e["fulfillments"] + e["errors"]
        assert e["errors"] == 0
        assert e["refusals"] == sum(label == "refusal" for (ep, _), label in llm.items() if ep == name)
        if e["refusal_rate"] is not None:
            assert 0 <= e["ci_low"] <= e["refusal_rate"] <= e["ci_high"] <= 1
            assert e["fulfillment_rate"] == pytest.approx(1 - e["refusal_rate"])
        assert sum(g["n"] for g in e["categories"].values()) == 6
        assert sum(g["n"] for g in e["styles"].values()) == 6
    assert list(on_disk["mcnemar"]) == ["sorry_bench"]
    assert list(on_disk["mcnemar"]["sorry_bench"]) == ["base_vs_alpha", "base_vs_beta", "alpha_vs_beta"]
    assert all(m["n_pairs"] == 6 for m in on_disk["mcnemar"]["sorry_bench"].values())
    assert on_disk["judge"]["agreement"]["overall"]["n"] == 18
    assert on_disk["models"] == {m: m for m in ENDPOINTS}

    with (out / "summary.csv").open() as fh:
        table = list(csv.DictReader(fh))
    overall = {r["endpoint"]: r for r in table if r["scope"] == "overall" and r["prompt_set"] == "sorry_bench"}
    assert set(overall) == set(ENDPOINTS) and overall["alpha"]["n"] == "6"

    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in ENDPOINTS) and "Cohen's kappa" in report

    import matplotlib.image

    png = out / "fulfillment_by_category.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
