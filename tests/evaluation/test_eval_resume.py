"""Kill ``evaluate`` with SIGKILL mid-run, start it again: nothing finished is requested twice and the
summary equals an uninterrupted run's. Judgments resume the same way."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_lightning.evaluation.client import GenerationSettings, RetryPolicy
from refusal_lightning.evaluation.judges import JudgeSettings
from refusal_lightning.evaluation.runner import evaluate
from refusal_lightning.evaluation.stub_server import StubConfig, request_key, start_stub

REPO = Path(__file__).resolve().parents[2]
COMPARED = ("failures", "endpoints", "mcnemar", "judge", "skipped_prompts", "models", "prompts")


def _config() -> StubConfig:
    return StubConfig(models=["a", "b"], latency_s=0.04, refuse_percent={"a": 80, "b": 30})


def _command(url: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "refusal_lightning", "evaluate", "--endpoint", f"a={url}#a",
            "--endpoint", f"b={url}#b", "--output_dir", str(out), "--limit", "20", "--concurrency", "2",
            "--progress", "false", "--generation.max_tokens", "16"]


def _complete_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().split("\n")[:-1]:  # the part after the last newline may be torn
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _key(row: dict) -> str:
    return request_key(row["model"], row["prompt"], row["settings"]["seed"] + row["sample"])


@pytest.fixture
def stubs():
    started = [start_stub(_config()), start_stub(_config())]
    yield [(url, log) for _, url, log in started]
    for server, _, _ in started:
        server.shutdown()
        server.server_close()


def test_sigkill_then_rerun_resumes_without_repeating_finished_requests(tmp_path, stubs):
    (url, log), (ref_url, _) = stubs
    out = tmp_path / "killed"
    responses = out / "responses.jsonl"
    proc = subprocess.Popen(_command(url, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if responses.exists() and responses.read_text().count("\n") >= 12:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"evaluate finished before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stderr.close()
    time.sleep(0.1)  # let requests the dead process had in flight reach the server

    finished = _complete_rows(responses)
    assert 12 <= len(finished) < 40, "the kill should land mid-run"
    counts_at_kill = log.counts()
    # A crash can also tear the line being written; simulate that on top of the kill.
    with responses.open("a") as fh:
        fh.write('{"endpoint": "a", "question_id": 99, "sty')

    summary = evaluate(endpoint=[f"a={url}#a", f"b={url}#b"], output_dir=str(out), limit=20, concurrency=2,
                       progress=False, generation=GenerationSettings(max_tokens=16))
    counts = log.counts()
    for row in finished:
        assert counts[_key(row)] == counts_at_kill[_key(row)] == 1, row["question_id"]
    assert len(counts) == 40  # every item was asked for
    rows = _complete_rows(responses)
    assert len({(r["endpoint"], r["question_id"], r["style"], r["sample"]) for r in rows}) == 40
    judgments = _complete_rows(out / "judgments.jsonl")
    assert len(judgments) == 40  # each response judged exactly once across both runs

    reference = evaluate(endpoint=[f"a={ref_url}#a", f"b={ref_url}#b"], output_dir=str(tmp_path / "ref"),
                         limit=20, concurrency=2, progress=False, generation=GenerationSettings(max_tokens=16))
    for section in COMPARED:
        assert summary[section] == reference[section], section
    on_disk = json.loads((out / "summary.json").read_text())
    assert {k: on_disk[k] for k in COMPARED} == {k: reference[k] for k in COMPARED}


def test_llm_judgments_resume_and_transport_failures_are_retried(tmp_path):
    server, url, _ = start_stub(StubConfig(models=["m"]))
    failing = {"on": True}

    def judge_fault(key: str, attempt: int) -> str | None:
        return "500" if failing["on"] and int(hashlib.md5(key.encode()).hexdigest(), 16) % 3 == 0 else None

    judge_server, judge_url, judge_log = start_stub(StubConfig(models=["judge"], fault=judge_fault))
    try:
        args = dict(endpoint=[f"e={url}#m"], output_dir=str(tmp_path), judge=JudgeSettings("llm", judge_url),
                    limit=15, retry=RetryPolicy(max_attempts=2, backoff_base=0.01), progress=False,
                    max_error_rate=1.0)
        first = evaluate(**args)
        failed = first["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["errors"]
        assert first["failures"]["judgments_failed"] == failed
        assert failed > 0 and first["judge"]["errors"] == {"llm: transport": failed}
        asked = judge_log.counts()
        assert sum(asked.values()) == 15 - failed + 2 * failed
        failing["on"] = False
        second = evaluate(**args)
        again = judge_log.counts()
        new = {k: again[k] - asked.get(k, 0) for k in again if again[k] != asked.get(k, 0)}
        assert len(new) == failed and all(v == 1 for v in new.values())  # only the failed ones, once each
        assert second["endpoints"]["e"]["prompt_sets"]["sorry_bench"]["errors"] == 0
    finally:
        for s in (server, judge_server):
            s.shutdown()
            s.server_close()


def test_logs_written_before_prompt_sets_resume_without_new_requests(tmp_path):
    """Rows without ``prompt_set`` (older logs) get theirs from the id; nothing is asked or judged again."""
    server, url, log = start_stub(_config())
    try:
        args = dict(endpoint=[f"a={url}#a", f"b={url}#b"], output_dir=str(tmp_path), harmfulqa_source="sample",
                    benign_prompts="sample", limit=4, progress=False)
        first = evaluate(**args)
        for name in ("responses.jsonl", "judgments.jsonl"):
            path = tmp_path / name
            rows = _complete_rows(path)
            assert {r.pop("prompt_set") for r in rows} == {"sorry_bench", "harmfulqa_heldout", "benign"}
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        asked = log.counts()
        judged = len(_complete_rows(tmp_path / "judgments.jsonl"))
        second = evaluate(**args)
        assert log.counts() == asked
        assert len(_complete_rows(tmp_path / "judgments.jsonl")) == judged
        assert {k: second[k] for k in COMPARED} == {k: first[k] for k in COMPARED}
        assert second["run"]["requests_planned"] == 0
        assert second["endpoints"]["a"]["prompt_sets"]["harmfulqa_heldout"]["n"] == 4
    finally:
        server.shutdown()
        server.server_close()
