"""A fine-tuned task's held-out accuracy over an OpenAI-compatible endpoint: each row's prompt asked once,
greedy, and the answer scored by exact label or final-number match (``task_accuracy``).

Answers are appended to a crash-safe JSONL log (``store.JsonlLog``) as they come, so an interrupted run
resumes without asking again (a request that failed is asked again); the accuracy is computed from that
log. A row whose request failed after the client's retries counts as an
error, never as a wrong answer, and too many errors stop the run (the accuracy would be of another set).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from refusal_lightning.evaluation.client import ChatClient, GenerationSettings, RetryPolicy
from refusal_lightning.evaluation.collect import progress_bar, run_bounded
from refusal_lightning.evaluation.metrics import wilson_interval
from refusal_lightning.evaluation.store import JsonlLog

ANSWERS_FILE = "task_answers.jsonl"


class TaskEvaluationError(RuntimeError):
    """The task's answers could not be collected (an endpoint failed, or too many requests did)."""


def ask_task(base_url: str, models: Sequence[str], rows: Sequence[Mapping[str, Any]],
             scorer: Callable[[str, str], bool], output_dir: str | Path, max_tokens: int = 8,
             concurrency: int = 16, max_error_rate: float = 0.0, progress: bool = True) -> dict[str, dict]:
    """Ask every model served at ``base_url`` every row's ``prompt`` (greedy, ``max_tokens``) and score the
    answer against the row's ``answer`` with ``scorer``.

    Returns ``{model: {"n", "correct", "accuracy", "ci_low", "ci_high", "errors", "outcomes": {id: 0/1}}}``;
    answers go to ``<output_dir>/task_answers.jsonl`` (resumed). Raises ``TaskEvaluationError`` when more
    than ``max_error_rate`` of a model's rows failed.
    """
    log = JsonlLog(Path(output_dir) / ANSWERS_FILE)
    done = {(row["model"], row["id"]): row for row in log.read()}  # the latest answer of each (model, row)
    settings = GenerationSettings(temperature=0.0, max_tokens=max_tokens, seed=0)
    client = ChatClient(base_url, retry=RetryPolicy(max_attempts=3))
    todo = [(m, r) for m in models for r in rows if (done.get((m, str(r["id"]))) or {}).get("answer") is None]

    def work(item: tuple[str, Mapping[str, Any]]) -> dict:
        model, row = item
        result = client.chat(settings.payload(model, [{"role": "user", "content": row["prompt"]}]))
        answer = result.content if result.ok else None
        return {"model": model, "id": str(row["id"]), "answer": answer,
                "correct": None if answer is None else bool(scorer(answer, row["answer"])),
                "error": None if result.ok else (result.error or {}).get("type", "error")}

    def record(batch: list[dict]) -> None:
        log.append_many(batch)
        done.update({(row["model"], row["id"]): row for row in batch})

    try:
        fatal = run_bounded(todo, work, record, concurrency,
                            progress_bar(len(todo), "task answers", progress and bool(todo)), name="task")
    finally:
        client.close()
        log.close()
    if fatal is not None:
        raise TaskEvaluationError(f"task evaluation at {client.display_url}: {fatal}")
    return {model: _accuracy(model, rows, done, max_error_rate) for model in models}


def _accuracy(model: str, rows: Sequence[Mapping[str, Any]], done: Mapping[tuple[str, str], dict],
              max_error_rate: float) -> dict:
    answered = [done[model, str(r["id"])] for r in rows]
    scored = {a["id"]: int(a["correct"]) for a in answered if a["correct"] is not None}
    errors = len(answered) - len(scored)
    if errors > max_error_rate * len(answered):
        raise TaskEvaluationError(f"task evaluation of {model}: {errors} of {len(answered)} requests failed "
                                  f"(max_error_rate {max_error_rate:g}); rerun to retry them")
    correct = sum(scored.values())
    lo, hi = wilson_interval(correct, len(scored)) or (None, None)
    return {"n": len(scored), "correct": correct, "accuracy": correct / len(scored) if scored else None,
            "ci_low": lo, "ci_high": hi, "errors": errors, "outcomes": scored}
