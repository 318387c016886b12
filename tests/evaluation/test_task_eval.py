"""The task evaluation's resume: answers are not asked twice, failed requests are, a torn last line is
ignored, and the accuracy is the hand-computed share of first-word label matches."""

from __future__ import annotations

import json

import refusal_lightning.evaluation.task_eval as task_eval
from refusal_lightning.evaluation.client import ChatResult
from refusal_lightning.evaluation.task_accuracy import label_correct


class FakeClient:
    """Answers "positive" to every prompt, or fails the prompts named in ``failing``; counts calls."""

    asked: list[str] = []
    failing: set[str] = set()

    def __init__(self, base_url, retry=None):
        self.display_url = base_url

    def chat(self, payload):
        prompt = payload["messages"][0]["content"]
        FakeClient.asked.append(prompt)
        if prompt in FakeClient.failing:
            return ChatResult(error={"type": "http_503"})
        return ChatResult(content="Positive.")

    def close(self):
        pass


def test_answers_resume_retry_failures_and_score_labels(tmp_path, monkeypatch):
    monkeypatch.setattr(task_eval, "ChatClient", FakeClient)
    rows = [{"id": i, "prompt": f"review {i}", "answer": label} for i, label in
            enumerate(["positive", "negative", "positive", "positive"])]
    FakeClient.asked, FakeClient.failing = [], {"review 3"}
    first = task_eval.ask_task("http://x", ["m"], rows, label_correct, tmp_path, max_error_rate=0.25, progress=False)
    assert first["m"]["n"] == 3 and first["m"]["correct"] == 2 and first["m"]["errors"] == 1
    assert first["m"]["outcomes"] == {"0": 1, "1": 0, "2": 1}
    path = tmp_path / task_eval.ANSWERS_FILE
    with path.open("a") as handle:
        handle.write('{"model": "m", "id": "1", "ans')  # a crash mid-line
    FakeClient.asked, FakeClient.failing = [], set()
    again = task_eval.ask_task("http://x", ["m"], rows, label_correct, tmp_path, progress=False)
    assert FakeClient.asked == ["review 3"]  # only the failed request is asked again
    assert again["m"]["n"] == 4 and again["m"]["accuracy"] == 0.75 and again["m"]["errors"] == 0
    assert all(json.loads(line) for line in path.read_text().splitlines())  # the torn line was cut
