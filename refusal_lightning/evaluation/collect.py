"""Ask and judge, concurrently: every planned request and judgment goes through a bounded thread pool
and is appended to its log as soon as it is back (group commit), so an interrupted run loses nothing
it already paid for. An endpoint whose first requests all fail to connect is abandoned early.

``EvalRun`` takes one ``evaluate`` call through its endpoints: each is asked for what the store does
not hold yet, then judged; an endpoint or judge that cannot be used is abandoned and the run goes on.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from refusal_lightning.evaluation.client import (
    AuthError,
    ChatClient,
    ChatResult,
    Endpoint,
    EndpointError,
    GenerationSettings,
    RetryPolicy,
    resolve_model,
)
from refusal_lightning.evaluation.judges import KeywordJudge, LLMJudge, Verdict
from refusal_lightning.evaluation.store import (
    EvalStore,
    JsonlLog,
    JudgmentKey,
    ResponseKey,
    WorkItem,
    judgment_for,
    response_digest,
    row_prompt_set,
)

# Abandon an endpoint once this many requests, with none reaching the server yet, failed to connect
# (each after all its retries): nothing is listening, and the remaining requests would only repeat it.
UNREACHABLE_AFTER = 3


def _response_row(endpoint: str, model: str, item: WorkItem, result: ChatResult,
                  settings: GenerationSettings) -> dict[str, Any]:
    p = item.prompt
    return {
        "endpoint": endpoint, "prompt_set": p.prompt_set, "question_id": p.question_id, "style": p.style,
        "sample": item.sample, "category": p.category, "model": model, "prompt": p.text,
        "response": result.content, "error": result.error, "attempts": result.attempts,
        "latency_s": round(result.latency_s, 4), "finish_reason": result.finish_reason, "usage": result.usage,
        "settings": asdict(settings),
    }


_END = object()


def run_bounded(items: Iterable[Any], work: Callable[[Any], Any], handle_batch: Callable[[list[Any]], None],
                concurrency: int, bar: tqdm, name: str = "worker") -> BaseException | None:
    """Run ``work`` over ``items`` on ``concurrency`` threads and hand finished results to
    ``handle_batch`` on this thread, a batch at a time.

    At most ``2 * concurrency`` items are submitted ahead, so memory stays flat and an abort leaves
    little to cancel. Batching is group commit: whatever finished while the last batch was being
    written goes into one write + fsync, so slow disks cost latency, not throughput. On the first
    ``AuthError``/``EndpointError`` nothing new is submitted, what is in flight is still handed over,
    and the error is returned.
    """
    fatal: BaseException | None = None
    source = iter(items)
    exhausted = False
    pending: set[Future] = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name) as pool:
        while True:
            while fatal is None and not exhausted and len(pending) < 2 * concurrency:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                else:
                    pending.add(pool.submit(work, item))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            batch = []
            for fut in done:
                try:
                    value = fut.result()
                except (AuthError, EndpointError) as err:
                    fatal = fatal or err
                    continue
                if value is not None:
                    batch.append(value)
            if batch:
                handle_batch(batch)
                bar.update(len(batch))
    return fatal


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _connection_reason(message: str) -> str:
    """A short reason for a failed connection, from the client's (shortened) exception text."""
    lowered = message.lower()
    if "nameresolution" in lowered or "failed to resolve" in lowered or "name or service not known" in lowered:
        return "host name not found"
    if "refused" in lowered or "newconnectionerror" in lowered or "failed to establish" in lowered:
        return "connection refused"
    return message.split(" (gave up", 1)[0][:160]


def unreachable_message(endpoint: str, url: str, message: str) -> str:
    """One line for an endpoint nothing could connect to, naming its URL."""
    return f"endpoint {endpoint}: cannot connect to {url} ({_connection_reason(message)}); is the server running?"


def is_connection_failure(err: EndpointError) -> bool:
    """``list_models`` failed to connect (the client reports it as an ``EndpointError`` with the
    exception text, which is cut short before the OS's reason)."""
    text = str(err)
    return "cannot list models" in text and ("ConnectionError" in text or "NewConnectionError" in text)


def collect_responses(client: ChatClient, endpoint: str, model: str, items: Sequence[WorkItem],
                      settings: GenerationSettings, log: JsonlLog, concurrency: int,
                      progress: bool = True,
                      rows: dict[ResponseKey, dict[str, Any]] | None = None) -> dict[ResponseKey, dict[str, Any]]:
    """Request every item with at most ``concurrency`` in flight; each response (or its final error)
    is appended to ``log`` as soon as it arrives, and put into ``rows`` (a new dict when None), which
    is returned. Raises ``AuthError``/``EndpointError`` after recording whatever was in flight when the
    endpoint failed (``rows`` then holds it too); ``EndpointError`` also when the first
    ``UNREACHABLE_AFTER`` requests all failed to connect."""
    rows = {} if rows is None else rows
    stop = threading.Event()
    lock = threading.Lock()
    reach = {"reached": False, "unreachable": 0}
    give_up_after = min(UNREACHABLE_AFTER, len(items))

    def work(item: WorkItem) -> tuple[WorkItem, ChatResult] | None:
        if stop.is_set():
            return None
        messages = [{"role": "user", "content": item.prompt.text}]
        try:
            result = client.chat(settings.payload(model, messages, item.sample))
        except (AuthError, EndpointError):
            stop.set()  # the other workers skip what they pick up next
            raise
        with lock:
            if result.error is None or result.error.get("type") != "connection":
                reach["reached"] = True
            else:
                reach["unreachable"] += 1
            give_up = not reach["reached"] and reach["unreachable"] >= give_up_after
        if give_up:
            stop.set()
            assert result.error is not None
            raise EndpointError(unreachable_message(endpoint, client.display_url, result.error["message"]))
        return item, result

    def record(batch: list[tuple[WorkItem, ChatResult]]) -> None:
        new = [(item, _response_row(endpoint, model, item, result, settings)) for item, result in batch]
        log.append_many([row for _, row in new])
        rows.update((item.key(endpoint), row) for item, row in new)

    with progress_bar(len(items), f"generate {endpoint}", progress) as bar:
        fatal = run_bounded(items, work, record, concurrency, bar, name=f"eval-{endpoint}")
    if fatal is not None:
        raise fatal
    return rows


def _judgment_row(response: dict[str, Any], judge: KeywordJudge | LLMJudge,
                  verdict: Verdict) -> dict[str, Any]:
    keep = ("endpoint", "question_id", "style", "sample", "category")
    return {**{k: response[k] for k in keep}, "prompt_set": row_prompt_set(response), "judge": judge.name,
            "judge_id": judge.judge_id, "response_sha": response_digest(response), **verdict.as_dict()}


def judge_responses(judge: KeywordJudge | LLMJudge, responses: dict[ResponseKey, dict[str, Any]],
                    done: dict[JudgmentKey, dict[str, Any]], log: JsonlLog, concurrency: int,
                    progress: bool = True, desc: str = "judge") -> None:
    """Judge every successful response without a final judgment by ``judge``; the new rows are added to
    ``done`` as they are written. Raises ``AuthError``/``EndpointError`` (judge
    endpoint unusable) after recording what finished."""
    todo = [(key, row) for key, row in responses.items()
            if row.get("error") is None and judgment_for(done, key, judge.judge_id, row) is None]

    def record(batch: list[tuple[ResponseKey, dict[str, Any], Verdict]]) -> None:
        rows = [((*key, judge.judge_id), _judgment_row(row, judge, verdict)) for key, row, verdict in batch]
        log.append_many([jrow for _, jrow in rows])
        done.update(rows)

    if isinstance(judge, KeywordJudge):  # microseconds each: no threads, one write
        record([(key, row, judge.judge(row["prompt"], row["response"])) for key, row in todo])
        return

    stop = threading.Event()

    def work(key_row: tuple[ResponseKey, dict[str, Any]]) -> tuple[ResponseKey, dict, Verdict] | None:
        if stop.is_set():
            return None
        key, row = key_row
        try:
            return key, row, judge.judge(row["prompt"], row["response"])
        except (AuthError, EndpointError):
            stop.set()
            raise

    with progress_bar(len(todo), desc, progress) as bar:
        fatal = run_bounded(todo, work, record, concurrency, bar, name="judge")
    if fatal is not None:
        raise fatal


@dataclass
class EvalRun:
    """One invocation across its endpoints: what to ask, where it is logged, what was abandoned."""

    items: list[WorkItem]
    store: EvalStore
    judges: dict[str, KeywordJudge | LLMJudge]
    generation: GenerationSettings
    retry: RetryPolicy
    api_key_env: str
    concurrency: int
    progress: bool
    models: dict[str, str | None] = field(default_factory=dict)
    aborted: dict[str, str] = field(default_factory=dict)
    sent: int = 0
    settings_changed: int = 0

    def generate(self, ep: Endpoint) -> None:
        """Send every item without a current response to ``ep``; an unusable endpoint is abandoned."""
        client = ChatClient(ep.base_url, api_key=os.environ.get(self.api_key_env) or None, retry=self.retry,
                            name=ep.name, key_source=self.api_key_env)
        try:
            self.models[ep.name] = model = resolve_model(client, ep)
            todo = []
            for item in self.items:
                row = self.store.current(item, ep.name, model)
                if row is None:
                    todo.append(item)
                elif row.get("settings") != asdict(self.generation):
                    self.settings_changed += 1
            self.sent += len(todo)
            collect_responses(client, ep.name, model, todo, self.generation, self.store.responses_log,
                              self.concurrency, self.progress, rows=self.store.responses)
        except (AuthError, EndpointError) as err:
            message = str(err)
            if isinstance(err, EndpointError) and is_connection_failure(err):
                message = unreachable_message(ep.name, client.display_url, message)
            self.aborted[ep.name] = message
            self.models.setdefault(ep.name, ep.model)
            # Said now (the run goes on with the other endpoints); the one "error:" line comes at the end.
            print(f"abandoned: {message}", file=sys.stderr)
        finally:
            client.close()

    def judge(self, ep: Endpoint) -> None:
        """Judge ``ep``'s current responses with every judge not abandoned yet."""
        current = {item.key(ep.name): row for item in self.items
                   if (row := self.store.current(item, ep.name, self.models.get(ep.name))) is not None}
        for jname, j in self.judges.items():
            if f"judge:{jname}" in self.aborted:
                continue
            try:
                judge_responses(j, current, self.store.judgments, self.store.judgments_log, self.concurrency,
                                self.progress, desc=f"judge {ep.name}")
            except (AuthError, EndpointError) as err:
                self.aborted[f"judge:{jname}"] = str(err)
                print(f"abandoned: {err}", file=sys.stderr)

    def close(self) -> None:
        llm_judge = self.judges.get("llm")
        if isinstance(llm_judge, LLMJudge):
            llm_judge.client.close()
        self.store.close()
