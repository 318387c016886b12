"""``evaluate`` against the stub server: faults, auth, resume, judges, and the summary's arithmetic."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from conftest import read_jsonl

from refusal_lightning.evaluation.client import GenerationSettings, RetryPolicy
from refusal_lightning.evaluation.judges import JudgeSettings
from refusal_lightning.evaluation.runner import EvaluateConfigError, EvaluationIncomplete, evaluate
from refusal_lightning.evaluation.stub_server import StubConfig

SECRET = "sk-test-SECRET-do-not-print-7781"


def _bucket(key: str) -> int:
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 7


# Deterministic per item: bucket 0-4 fail their first attempt in one way, bucket 5 always fails.
FAULT_BY_BUCKET = {0: "500", 1: "429", 2: "slow", 3: "drop", 4: "malformed"}


def _fault(key: str, attempt: int) -> str | None:
    b = _bucket(key)
    if b == 5:
        return "500"
    return FAULT_BY_BUCKET.get(b) if attempt == 1 else None


def test_faults_every_item_ends_answered_or_errored_and_none_is_asked_twice(tmp_path, stub):
    url, log = stub(StubConfig(models=["m"], fault=_fault, retry_after="0", slow_s=2.5))
    out = tmp_path / "eval"
    args = dict(endpoint=[f"e={url}#m"], output_dir=str(out), concurrency=8,
                retry=RetryPolicy(max_attempts=3, timeout=1.0, backoff_base=0.02), progress=False, limit=30,
                max_error_rate=1.0)
    summary = evaluate(**args)
    rows = read_jsonl(out / "responses.jsonl")
    assert len(rows) == 30 and len({(r["question_id"], r["style"]) for r in rows}) == 30
    counts = log.counts()
    failed = 0
    for r in rows:
        key = f"m|{r['prompt']}|0"
        b = _bucket(key)
        if b == 5:
            failed += 1
            assert r["error"]["type"] == "http_500" and r["response"] is None
            assert counts[key] == 3 == r["attempts"]
        else:
            assert r["error"] is None and r["response"]
            expected = 2 if b in FAULT_BY_BUCKET else 1
            # finished on attempt `expected` and never requested again
            assert counts[key] == expected == r["attempts"], (b, r)
    assert failed > 0 and failed < 30
    e = summary["endpoints"]["e"]["prompt_sets"]["sorry_bench"]
    assert e["n"] == 30 and e["errors"] == failed and e["errors_by_kind"] == {"generation": failed}
    assert summary["failures"]["requests_failed"] == failed == summary["failures"]["failed"]
    assert e["refusals"] + e["fulfillments"] == 30 - failed
    refused = sum("sorry" in (r["response"] or "").lower() for r in rows)
    assert e["refusals"] == refused
    assert json.loads((out / "summary.json").read_text())["endpoints"] == summary["endpoints"]

    # A rerun asks again only for the items that ended in an error.
    before = log.counts()
    summary2 = evaluate(**args)
    after = log.counts()
    changed = {k for k in after if after[k] != before[k]}
    assert changed and all(_bucket(k) == 5 for k in changed)
    assert summary2["endpoints"] == summary["endpoints"]


def test_api_key_is_sent_but_never_written_or_printed(tmp_path, stub, monkeypatch, capsys):
    url, log = stub(StubConfig(models=["m"], api_key=SECRET))
    monkeypatch.setenv("EVAL_TEST_KEY", SECRET)
    out = tmp_path / "eval"
    summary = evaluate(endpoint=[f"e={url}"], output_dir=str(out), api_key_env="EVAL_TEST_KEY", limit=5,
                       judge=JudgeSettings("both", url, model="m", api_key_env="EVAL_TEST_KEY"))
    assert summary["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["errors"] == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path.name
    assert summary["config"]["api_key_env"] == "EVAL_TEST_KEY"


def test_credentials_in_a_judge_url_are_never_written(tmp_path, stub):
    url, _ = stub(StubConfig(models=["m"]))
    with_password = url.replace("http://", f"http://user:{SECRET}@") + "?token=" + SECRET
    out = tmp_path / "eval"
    summary = evaluate(endpoint=[f"e={url}#m"], output_dir=str(out), limit=3, progress=False,
                       judge=JudgeSettings("llm", with_password, model="m"))
    assert summary["judge"]["llm"]["url"] == url  # as given, less the user:password@ and the query
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path.name


def test_wrong_key_aborts_the_endpoint_at_once_and_keeps_the_others(tmp_path, stub, monkeypatch, capsys):
    url, log = stub(StubConfig(models=["m"], api_key="the-right-one"))
    open_url, _ = stub(StubConfig(models=["m"]))
    monkeypatch.setenv("EVAL_TEST_KEY", SECRET)
    out = tmp_path / "eval"
    start = time.perf_counter()
    with pytest.raises(EvaluationIncomplete, match="authentication failed") as info:
        evaluate(endpoint=[f"locked={url}#m", f"open={open_url}#m"], output_dir=str(out), limit=20,
                 concurrency=4, api_key_env="EVAL_TEST_KEY", progress=False)
    assert time.perf_counter() - start < 5
    assert "EVAL_TEST_KEY" in str(info.value) and SECRET not in str(info.value)
    counts = log.counts()
    assert counts and max(counts.values()) == 1  # nothing retried
    assert sum(counts.values()) <= 8  # at most the requests already in flight (2 x concurrency)
    rows = read_jsonl(out / "responses.jsonl")
    assert {r["endpoint"] for r in rows} == {"open"}  # auth failures are not recorded per item
    summary = json.loads((out / "summary.json").read_text())
    assert summary["endpoints"]["locked"]["prompt_sets"]["sorry_bench"]["errors_by_kind"] == {"not run": 20}
    assert summary["endpoints"]["open"]["prompt_sets"]["sorry_bench"]["errors"] == 0
    assert summary["failures"]["not_run"] == 20 and summary["failures"]["by_endpoint"]["open"]["failed"] == 0
    assert "locked" in summary["aborted_endpoints"]
    captured = capsys.readouterr()
    assert "authentication failed" in captured.err and SECRET not in captured.err + captured.out


def test_several_models_without_a_choice_is_a_clear_error(tmp_path, stub):
    url, _ = stub(StubConfig(models=["base", "attack"]))
    with pytest.raises(EvaluationIncomplete, match=r"lists 2 models \(base, attack\)"):
        evaluate(endpoint=[f"e={url}"], output_dir=str(tmp_path), limit=2, progress=False)
    # --model_name picks one (per endpoint, or one bare name for all)
    s = evaluate(endpoint=[f"e={url}"], model_name=["e=attack"], output_dir=str(tmp_path / "b"), limit=2,
                 progress=False)
    assert s["models"] == {"e": "attack"}


def test_invalid_arguments_are_reported_together(tmp_path):
    with pytest.raises(EvaluateConfigError) as info:
        evaluate(endpoint=["bad", "x=http://h", "x=http://h"], concurrency=0, samples=0,
                 judge=JudgeSettings("llm", refusal_markers=str(tmp_path / "missing.txt")),
                 generation=GenerationSettings(top_p=2.0), retry=RetryPolicy(max_attempts=0, timeout=0),
                 model_name=["nope=m"], max_error_rate=1.5, output_dir=str(tmp_path))
    message = str(info.value)
    for part in ("NAME=URL", "unique", "--judge_url", "--concurrency", "--samples", "--generation.top_p", "nope",
                 "--judge.refusal_markers", "--retry.max_attempts", "--retry.timeout", "--max_error_rate"):
        assert part in message, part


def test_judge_errors_are_counted_never_as_refusals(tmp_path, stub):
    url, _ = stub(StubConfig(models=["m"], refuse_percent={"m": 50}, think=True))
    n = {"count": 0}

    def judge_reply(answer: str) -> str:
        n["count"] += 1
        if n["count"] % 4 == 0:
            return "I would rather not say."  # unparseable
        return "0" if "sorry" in answer.lower() else "1"

    judge_url, judge_log = stub(StubConfig(models=["judge"], judge_reply=judge_reply))
    out = tmp_path / "eval"
    s = evaluate(endpoint=[f"e={url}#m"], output_dir=str(out), judge=JudgeSettings("both", judge_url), limit=20,
                 concurrency=1, progress=False, max_error_rate=0.25)
    e = s["endpoints"]["e"]["prompt_sets"]["sorry_bench"]
    assert e["errors"] == 5 and e["errors_by_kind"] == {"judge": 5}
    assert e["refusals"] + e["fulfillments"] == 15
    assert s["judge"]["errors"] == {"llm: unparseable": 5}
    assert s["judge"]["primary"] == "llm"
    agreement = s["judge"]["agreement"]["overall"]
    assert agreement["n"] == 15 and agreement["agreement_rate"] == 1.0  # think blocks were stripped
    assert s["judge"]["keyword_rates"]["e"]["sorry_bench"]["errors"] == 0
    assert s["failures"]["judgments_failed"] == 5 and s["failures"]["error_rate"] == 0.25
    judgments = read_jsonl(out / "judgments.jsonl")
    assert len(judgments) == 40
    assert sum(j["error_type"] == "unparseable" for j in judgments if j["judge"] == "llm") == 5
    # Unparseable answers are final at temperature 0: a rerun does not ask the judge again.
    before = sum(judge_log.counts().values())
    evaluate(endpoint=[f"e={url}#m"], output_dir=str(out), judge=JudgeSettings("both", judge_url), limit=20,
             progress=False, max_error_rate=0.25)
    assert sum(judge_log.counts().values()) == before


def test_growing_the_prompt_set_only_requests_the_new_items(tmp_path, stub):
    url, log = stub(StubConfig(models=["m"]))
    out = tmp_path / "eval"
    evaluate(endpoint=[f"e={url}#m"], output_dir=str(out), limit=5, samples=2, progress=False)
    assert sum(log.counts().values()) == 10
    s = evaluate(endpoint=[f"e={url}#m"], output_dir=str(out), limit=8, samples=2, progress=False)
    counts = log.counts()
    assert sum(counts.values()) == 16 and max(counts.values()) == 1
    assert s["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["n"] == 16 and s["run"]["requests_planned"] == 6
    seeds = {r["body"]["seed"] for r in log.requests if "body" in r}
    assert seeds == {0, 1}  # sample i is sent seed + i
    bodies = [r["body"] for r in log.requests if "body" in r]
    assert all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in bodies)


def test_outputs_are_consistent(tmp_path, stub):
    url, _ = stub(StubConfig(models=["a", "b"], refuse_percent={"a": 90, "b": 10}))
    out = tmp_path / "eval"
    s = evaluate(endpoint=[f"a={url}#a", f"b={url}#b"], output_dir=str(out), progress=False)
    assert s["skipped_prompts"] == {"total": 1, "reasons": {"empty turn": 1}}
    for name in ("a", "b"):
        e = s["endpoints"][name]["prompt_sets"]["sorry_bench"]
        assert e["n"] == 41 == e["refusals"] + e["fulfillments"] + e["errors"]
        assert sum(g["n"] for g in e["categories"].values()) == 41
        assert sum(g["refusals"] for g in e["styles"].values()) == e["refusals"]
    m = s["mcnemar"]["sorry_bench"]["a_vs_b"]
    assert m["n_pairs"] == 41 and m["p_value"] < 0.001
    csv_lines = (out / "summary.csv").read_text().splitlines()
    groups = sum(len(s["endpoints"][n]["prompt_sets"]["sorry_bench"][k]) for k in ("categories", "styles")
                 for n in ("a", "b"))
    assert len(csv_lines) == 1 + 2 + groups
    report = (out / "report.md").read_text()
    assert "McNemar" in report and "| a |" in report and "1 rows skipped (empty turn: 1)" in report
    assert (out / "fulfillment_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reused_output_dir_with_other_prompts_or_model_does_not_reuse_stale_answers(tmp_path, stub):
    url, log = stub(StubConfig(models=["m", "n"], refuse_percent={"m": 100, "n": 0}))
    out = tmp_path / "eval"
    first = tmp_path / "first.jsonl"
    second = tmp_path / "second.jsonl"
    first.write_text(json.dumps({"question_id": 1, "category": "1", "turns": ["placeholder A"]}) + "\n")
    second.write_text(json.dumps({"question_id": 1, "category": "1", "turns": ["placeholder B"]}) + "\n")
    s = evaluate(endpoint=f"e={url}#m", prompts=str(first), output_dir=str(out), progress=False)
    assert s["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["refusals"] == 1
    # same (question_id, style), different text: asked again, judged again
    s = evaluate(endpoint=f"e={url}#m", prompts=str(second), output_dir=str(out), progress=False)
    assert sum(log.counts().values()) == 2 and s["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["refusals"] == 1
    # same name, another model behind it: asked again, and the new (complying) answer is what counts
    s = evaluate(endpoint=f"e={url}#n", prompts=str(second), output_dir=str(out), progress=False)
    assert sum(log.counts().values()) == 3 and s["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["fulfillments"] == 1
    judgments = read_jsonl(out / "judgments.jsonl")
    assert len(judgments) == 3 and len({j["response_sha"] for j in judgments}) == 3


def test_unset_key_variable_is_one_line_naming_it(tmp_path, stub, monkeypatch, capsys):
    from refusal_lightning.cli import main

    url, _ = stub(StubConfig(models=["m"], api_key="the-right-one"))
    monkeypatch.delenv("EVAL_UNSET_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--endpoint", f"locked={url}#m", "--output_dir", str(tmp_path), "--limit", "3",
              "--api_key_env", "EVAL_UNSET_KEY", "--progress", "false"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: evaluate: abandoned endpoint locked: $EVAL_UNSET_KEY is not set")
    assert "key from" not in err and (tmp_path / "summary.json").exists()


def test_cipher_and_translated_styles_are_refused_with_one_line(tmp_path, stub):
    url, log = stub(StubConfig(models=["m"]))
    with pytest.raises(EvaluateConfigError, match=r"--styles: prompt styles caesar, translate-fr are not supported"):
        evaluate(endpoint=[f"e={url}#m"], output_dir=str(tmp_path / "a"), styles=["base", "caesar", "translate-fr"],
                 progress=False)
    # present in the source without being asked for by name (no --styles: every style of the file)
    rows = [{"question_id": 1, "category": "1", "turns": ["placeholder request"], "prompt_style": style}
            for style in ("base", "morse")]
    source = tmp_path / "question.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvaluateConfigError, match="prompt styles morse are not supported: SORRY-Bench decodes"):
        evaluate(endpoint=[f"e={url}#m"], output_dir=str(tmp_path / "b"), prompts=str(source), progress=False)
    assert not [r for r in log.requests if r["path"] != "GET /v1/models" and "body" in r]  # nothing was sent
    summary = evaluate(endpoint=[f"e={url}#m"], output_dir=str(tmp_path / "c"), prompts=str(source),
                       styles=["base"], progress=False)
    assert summary["prompts"]["styles"] == ["base"]
