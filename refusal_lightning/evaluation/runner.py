"""``evaluate``: query endpoints with prompts, judge the answers, summarise, resumably.

Flow per endpoint: resolve the model, send every (prompt, sample) that has no response yet through a
bounded thread pool, append each response to ``responses.jsonl`` as it arrives, then judge every
response that has no judgment yet into ``judgments.jsonl``. The summary is rebuilt from those two
logs, so an interrupted run that is started again with the same arguments ends with the same
summary as an uninterrupted one, without re-sending a finished request.

An item is ``(endpoint, prompt_set, question_id, style, sample)``; the prompt sets (SORRY-Bench,
HarmfulQA held-out, benign) are summarised separately, never pooled. Items whose request failed after
all retries are recorded with their error and retried on the next run; auth failures (401/403)
abandon the endpoint at once and are not recorded per item, so a rerun with the right key picks them
up. So does an endpoint nothing can connect to: after a few requests that all failed to connect, the
rest are not sent.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from refusal_lightning.evaluation.client import (
    AuthError,
    ChatClient,
    ChatResult,
    Endpoint,
    EndpointError,
    GenerationSettings,
    RetryPolicy,
    normalize_base_url,
    parse_endpoint,
    redact_url,
    resolve_model,
)
from refusal_lightning.evaluation.judges import KeywordJudge, LLMJudge, Verdict, load_markers
from refusal_lightning.evaluation.metrics import (
    ItemOutcome,
    answer_matches,
    judge_agreement,
    prompt_sets_of,
    rate_stats,
    summarize,
)
from refusal_lightning.evaluation.prompts import (
    BENIGN,
    HARMFULQA_HELDOUT,
    SORRY_BENCH,
    Prompt,
    PromptSet,
    load_prompts,
)
from refusal_lightning.evaluation.report import endpoint_table, write_reports
from refusal_lightning.evaluation.store import JsonlLog

RESPONSES = "responses.jsonl"
JUDGMENTS = "judgments.jsonl"


class EvaluateConfigError(ValueError):
    """Invalid ``evaluate`` arguments (all problems listed at once)."""


class EvaluationIncomplete(RuntimeError):
    """An endpoint or judge was abandoned (auth failure, unknown model, nothing listening); the outputs
    were still written for everything else, and a rerun resumes."""


class ErrorRateExceeded(EvaluationIncomplete):
    """More items failed (request or judgment) than ``--max_error_rate`` allows; summary and report
    were written and say how many, and a rerun retries the failed ones."""


ResponseKey = tuple[str, str, str, str, int]  # endpoint, prompt_set, question_id, style, sample
JudgmentKey = tuple[str, str, str, str, int, str]  # ... + judge_id

# Abandon an endpoint once this many requests, with none reaching the server yet, failed to connect
# (each after all its retries): nothing is listening, and the remaining requests would only repeat it.
UNREACHABLE_AFTER = 3


@dataclass(frozen=True)
class WorkItem:
    """One request to make: a prompt and which of its samples."""

    prompt: Prompt
    sample: int

    def key(self, endpoint: str) -> ResponseKey:
        p = self.prompt
        return (endpoint, p.prompt_set, str(p.question_id), p.style, self.sample)


def row_prompt_set(row: dict[str, Any]) -> str:
    """A log row's prompt set. Rows written before prompt sets existed have none; theirs follows from
    the id (``hq-`` HarmfulQA, ``benign-`` benign, else SORRY-Bench), and a row placed in the wrong set
    would still not be reused, because an answer counts only for the exact prompt text it answered."""
    found = row.get("prompt_set")
    if isinstance(found, str) and found:
        return found
    qid = str(row["question_id"])
    return HARMFULQA_HELDOUT if qid.startswith("hq-") else BENIGN if qid.startswith("benign-") else SORRY_BENCH


def _response_key(row: dict[str, Any]) -> ResponseKey:
    return (row["endpoint"], row_prompt_set(row), str(row["question_id"]), row["style"], int(row["sample"]))


def _judgment_key(row: dict[str, Any]) -> JudgmentKey:
    return (*_response_key(row), row["judge_id"])


def load_responses(log: JsonlLog) -> dict[ResponseKey, dict[str, Any]]:
    """Latest row per item, where a successful response is never displaced by a later error row."""
    best: dict[ResponseKey, dict[str, Any]] = {}
    for row in log.read():
        try:
            key = _response_key(row)
        except (KeyError, TypeError, ValueError):
            continue
        if row.get("error") is None or key not in best or best[key].get("error") is not None:
            best[key] = row
    return best


def response_digest(row: dict[str, Any]) -> str:
    """Fingerprint of (prompt, response): a judgment counts only for the exchange it judged."""
    text = f"{row.get('prompt') or ''}\0{row.get('response') or ''}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _is_current(row: dict[str, Any] | None, item: WorkItem, model: str | None) -> bool:
    """A finished response for this item as planned now: same prompt text and, when known, same model.
    (An output folder reused with another prompt file or another model behind the same name must
    not pass old answers off as new ones.)"""
    return (row is not None and row.get("error") is None and row.get("prompt") == item.prompt.text
            and (model is None or row.get("model") == model))


def _judgment_for(judgments: dict, key: ResponseKey, judge_id: str,
                  response: dict[str, Any]) -> dict[str, Any] | None:
    j = judgments.get((*key, judge_id))
    return j if j is not None and j.get("response_sha") == response_digest(response) else None


def load_judgments(log: JsonlLog) -> dict[JudgmentKey, dict[str, Any]]:
    """The latest final judgment per item and judge: a label, or an unparseable judge answer
    (temperature 0 would repeat it). Transport failures are left out so the next run asks again."""
    final: dict[JudgmentKey, dict[str, Any]] = {}
    for row in log.read():
        try:
            key = _judgment_key(row)
        except (KeyError, TypeError, ValueError):
            continue
        if row.get("label") is not None or row.get("error_type") == "unparseable":
            final[key] = row
    return final


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


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
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


def _is_connection_failure(err: EndpointError) -> bool:
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

    with _progress(len(items), f"generate {endpoint}", progress) as bar:
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
                    progress: bool = True, desc: str = "judge") -> dict[JudgmentKey, dict[str, Any]]:
    """Judge every successful response without a final judgment by ``judge``; returns the new rows,
    which are also added to ``done`` as they are written. Raises ``AuthError``/``EndpointError`` (judge
    endpoint unusable) after recording what finished."""
    todo = [(key, row) for key, row in responses.items()
            if row.get("error") is None and _judgment_for(done, key, judge.judge_id, row) is None]
    new: dict[JudgmentKey, dict[str, Any]] = {}

    def record(batch: list[tuple[ResponseKey, dict[str, Any], Verdict]]) -> None:
        rows = [((*key, judge.judge_id), _judgment_row(row, judge, verdict)) for key, row, verdict in batch]
        log.append_many([jrow for _, jrow in rows])
        new.update(rows)
        done.update(rows)

    if isinstance(judge, KeywordJudge):  # microseconds each: no threads, one write
        record([(key, row, judge.judge(row["prompt"], row["response"])) for key, row in todo])
        return new

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

    with _progress(len(todo), desc, progress) as bar:
        fatal = run_bounded(todo, work, record, concurrency, bar, name="judge")
    if fatal is not None:
        raise fatal
    return new


def _apply_model_names(endpoints: list[Endpoint], model_name: Sequence[str] | None,
                       problems: list[str]) -> list[Endpoint]:
    """``--model_name NAME=MODEL`` sets one endpoint's model; a bare ``MODEL`` sets every endpoint that
    names none. ``NAME=URL#MODEL`` in ``--endpoint`` wins over both."""
    names = {e.name for e in endpoints}
    per_name: dict[str, str] = {}
    default: str | None = None
    for entry in model_name or []:
        name, sep, model = entry.partition("=")
        if not sep:
            default = entry
        elif name in names:
            per_name[name] = model
        else:
            problems.append(f"--model_name {entry}: no endpoint named {name!r}")
    return [e if e.model else Endpoint(e.name, e.base_url, per_name.get(e.name, default)) for e in endpoints]


def _validate(endpoint: Sequence[str] | None, judge: str, judge_url: str | None, concurrency: int,
              samples: int, max_tokens: int, temperature: float, top_p: float | None, max_attempts: int,
              request_timeout: float, retry_backoff: float, refusal_markers: str | None, max_error_rate: float,
              problems: list[str]) -> list[Endpoint]:
    endpoints: list[Endpoint] = []
    if not endpoint:
        problems.append("no --endpoint given (NAME=URL, repeatable)")
    for spec in endpoint or []:
        try:
            endpoints.append(parse_endpoint(spec))
        except ValueError as err:
            problems.append(str(err))
    dupes = [n for n, c in Counter(e.name for e in endpoints).items() if c > 1]
    if dupes:
        problems.append(f"endpoint names must be unique; repeated: {', '.join(dupes)}")
    if judge in ("llm", "both"):
        if not judge_url:
            problems.append(f"--judge {judge} needs --judge_url (an OpenAI-compatible judge endpoint)")
        else:
            try:
                normalize_base_url(judge_url)
            except ValueError as err:
                problems.append(f"--judge_url: {err}")
    checks = [(concurrency >= 1, "--concurrency must be >= 1"), (samples >= 1, "--samples must be >= 1"),
              (max_tokens >= 1, "--max_tokens must be >= 1"),
              (temperature >= 0, "--temperature must be >= 0"),
              (top_p is None or 0 < top_p <= 1, "--top_p must be in (0, 1]"),
              (max_attempts >= 1, "--max_attempts must be >= 1"),
              (retry_backoff >= 0, "--retry_backoff must be >= 0"),
              (request_timeout > 0, "--request_timeout must be > 0"),
              (0 <= max_error_rate <= 1, "--max_error_rate must be in [0, 1]")]
    problems += [msg for ok, msg in checks if not ok]
    if refusal_markers is not None and not Path(refusal_markers).is_file():
        problems.append(f"--refusal_markers {refusal_markers}: no such file")
    return endpoints


def _outcomes(endpoints: Sequence[str], items: Sequence[WorkItem], responses: dict, judgments: dict,
              judges: dict[str, KeywordJudge | LLMJudge], primary: str,
              models: dict[str, str | None]) -> list[ItemOutcome]:
    outcomes = []
    for name in endpoints:
        for item in items:
            key = item.key(name)
            resp = responses.get(key)
            labels: dict[str, str | None] = {jname: None for jname in judges}
            if resp is not None and resp.get("error") is not None:
                label, error = None, "generation"
            elif not _is_current(resp, item, models.get(name)):
                label, error = None, "not run"
            else:
                for jname, j in judges.items():
                    labels[jname] = (_judgment_for(judgments, key, j.judge_id, resp) or {}).get("label")
                label = labels.get(primary)
                error = None if label is not None else "judge"
            p = item.prompt
            # Accuracy needs only the answer, not the judge: a judge error leaves it counted.
            answered = error is None or error == "judge"
            correct = (answer_matches(resp["response"], p.reference) if answered and p.reference and resp
                       else None)
            outcomes.append(ItemOutcome(endpoint=name, question_id=p.question_id, style=p.style,
                                        sample=item.sample, category=p.category, label=label, error=error,
                                        labels=labels, prompt_set=p.prompt_set, correct=correct))
    return outcomes


def _failure_detail(failures: dict[str, Any], outcomes: list[ItemOutcome],
                    responses: dict[ResponseKey, dict[str, Any]]) -> str:
    """Per endpoint, what failed: ``a: 3 request(s) failed (http_500 3), 1 judgment(s) failed``."""
    parts = []
    for name, f in failures["by_endpoint"].items():
        if not f["failed"]:
            continue
        kinds: Counter = Counter()
        for o in outcomes:
            if o.endpoint == name and o.error == "generation":
                row = responses.get((name, *o.pair_key)) or {}
                kinds[(row.get("error") or {}).get("type", "error")] += 1
        bits = []
        if f["requests_failed"]:
            bits.append(f"{f['requests_failed']} request(s) failed ("
                        + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")")
        if f["judgments_failed"]:
            bits.append(f"{f['judgments_failed']} judgment(s) failed")
        if f["not_run"]:
            bits.append(f"{f['not_run']} not run")
        parts.append(f"{name}: " + ", ".join(bits))
    return "; ".join(parts)


def evaluate(
    endpoint: list[str] | None = None,
    output_dir: str = "artifacts/eval",
    prompts: str = "sample",
    harmfulqa_source: str | None = None,
    harmfulqa_val_fraction: float = 0.1,
    harmfulqa_seed: int = 0,
    benign_prompts: str | None = None,
    categories: list[str] | None = None,
    styles: list[str] | None = None,
    limit: int | None = None,
    judge: Literal["keyword", "llm", "both"] = "keyword",
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key_env: str | None = None,
    refusal_markers: str | None = None,
    model_name: list[str] | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    samples: int = 1,
    temperature: float = 0.7,
    top_p: float | None = None,
    max_tokens: int = 1024,
    seed: int | None = 0,
    disable_thinking: bool = True,
    request_timeout: float = 120.0,
    max_attempts: int = 5,
    retry_backoff: float = 0.5,
    max_error_rate: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure refusal vs fulfillment of OpenAI-compatible endpoints on SORRY-Bench-style prompts.

    Each prompt set is summarised on its own, never pooled: sorry_bench (--prompts),
    harmfulqa_heldout (--harmfulqa_source) and benign (--benign_prompts: refusal there is
    over-refusal, and answers are checked against references). Writes responses.jsonl,
    judgments.jsonl, summary.json/.csv, report.md and fulfillment_by_category.png to output_dir.
    Rerunning with the same output_dir resumes: finished requests and judgments are never sent again.
    Returns the summary dict; raises when an endpoint was abandoned or more items failed than
    --max_error_rate allows (after writing every output).

    Args:
        endpoint: endpoints to evaluate, each NAME=URL or NAME=URL#MODEL; URL is the server root
            (http://127.0.0.1:8000) or its /v1. Repeatable.
        output_dir: folder for all outputs; an existing one is resumed.
        prompts: "sample" (bundled synthetic SORRY-Bench-schema sample), a local SORRY-Bench-schema
            JSONL file or folder, or a hub dataset id such as sorry-bench/sorry-bench-202503 (gated:
            needs HF_TOKEN).
        harmfulqa_source: HarmfulQA file or hub id; its held-out (validation) questions are added as
            prompts with category "harmfulqa:<topic>" and style "base".
        harmfulqa_val_fraction: held-out fraction of HarmfulQA questions (by question id); must match
            the fit config's data.val_fraction so no evaluated question was trained on.
        harmfulqa_seed: seed of the HarmfulQA train/validation split; must match the fit's data.seed.
        benign_prompts: harmless requests to measure over-refusal: "sample" (bundled synthetic set of
            20) or a JSONL file, one {"prompt": ..., "reference": ...} per line. "reference" (optional:
            a string or a list of acceptable answers) makes an answer correct when it contains one
            (case-insensitive, whole words, <think> removed); "id" is optional. A bad row is an
            error naming its file and line.
        categories: evaluate only these categories (e.g. "1" "12", or "harmfulqa:<topic>"); the
            benign set is never filtered.
        styles: evaluate only these prompt styles (e.g. base, slang); the benign set is never filtered.
        limit: evaluate at most this many prompts of each prompt set (after filtering, in file order).
        judge: keyword (refusal markers, offline), llm (SORRY-Bench judge prompt at --judge_url) or both
            (rates from llm, plus keyword agreement and Cohen's kappa).
        judge_url: OpenAI-compatible URL of the judge (e.g. vLLM serving
            sorry-bench/ft-mistral-7b-instruct-v0.2-sorry-bench-202406).
        judge_model: model name at the judge URL; default: the only model it lists.
        judge_api_key_env: environment variable holding the judge's API key; default: --api_key_env.
        refusal_markers: text file of refusal markers for the keyword judge (one per line, # comments);
            default: refusal_lightning.refusal_markers.DEFAULT_REFUSAL_MARKERS.
        model_name: model to request, as NAME=MODEL per endpoint or one bare MODEL for all endpoints
            without one; default: the only model the endpoint lists.
        api_key_env: environment variable holding the endpoints' API key, sent as a Bearer token
            (never printed or stored); unset or empty sends no key.
        concurrency: requests in flight per endpoint.
        samples: responses per prompt (sample i uses seed + i).
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass; default: the server's.
        max_tokens: maximum tokens per response.
        seed: base sampling seed sent with each request (null to send none).
        disable_thinking: send chat_template_kwargs {enable_thinking: false} (Qwen3 non-thinking mode);
            set false for servers that reject unknown request fields. <think> blocks are stripped
            before judging either way.
        request_timeout: seconds to wait for one response before retrying.
        max_attempts: attempts per request (429, 5xx, timeouts, dropped connections and malformed
            replies are retried with exponential backoff and jitter, honouring Retry-After).
        retry_backoff: seconds before the first retry; doubles per attempt, capped at 30 s.
        max_error_rate: largest share of items (requests that failed after retries, judgments without
            a verdict, items of an abandoned endpoint) that may fail before evaluate exits with an
            error; the outputs are written first either way, and a rerun retries the failures.
        progress: show a progress bar per endpoint.
    """
    t0 = time.perf_counter()
    # From Python a lone string is an easy slip for a one-element list; never iterate its characters.
    endpoint, categories, styles, model_name = (
        [v] if isinstance(v, str) else v for v in (endpoint, categories, styles, model_name))
    problems: list[str] = []
    endpoints = _validate(endpoint, judge, judge_url, concurrency, samples, max_tokens, temperature, top_p,
                          max_attempts, request_timeout, retry_backoff, refusal_markers, max_error_rate,
                          problems)
    endpoints = _apply_model_names(endpoints, model_name, problems)
    if problems:
        raise EvaluateConfigError("evaluate: invalid arguments:\n  - " + "\n  - ".join(problems))

    prompt_set: PromptSet = load_prompts(prompts, harmfulqa_source, harmfulqa_val_fraction, harmfulqa_seed,
                                         categories, styles, limit, benign_prompts)
    if not prompt_set.prompts:
        raise EvaluateConfigError(f"evaluate: no prompts left to evaluate (sources: {prompt_set.sources}, "
                                  f"skipped: {prompt_set.skipped_summary()})")
    items = [WorkItem(p, s) for p in prompt_set.prompts for s in range(samples)]
    settings = GenerationSettings(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                  disable_thinking=disable_thinking)
    retry = RetryPolicy(max_attempts=max_attempts, timeout=request_timeout, backoff_base=retry_backoff)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    responses_log, judgments_log = JsonlLog(out / RESPONSES), JsonlLog(out / JUDGMENTS)
    responses = load_responses(responses_log)
    judgments = load_judgments(judgments_log)
    corrupt = responses_log.corrupt_lines + judgments_log.corrupt_lines
    if corrupt:
        print(f"warning: skipped {corrupt} unreadable line(s) in {out}", file=sys.stderr)

    # An unusable judge raises here, before any generation request is spent.
    judges = _build_judges(judge, refusal_markers, judge_url, judge_model, judge_api_key_env or api_key_env,
                           retry)
    primary = "llm" if "llm" in judges else "keyword"
    aborted: dict[str, str] = {}

    api_key = os.environ.get(api_key_env) or None
    models: dict[str, str | None] = {}
    sent = 0
    settings_changed = 0
    for ep in endpoints:
        client = ChatClient(ep.base_url, api_key=api_key, retry=retry, name=ep.name, key_source=api_key_env)
        try:
            models[ep.name] = model = resolve_model(client, ep)
            todo = []
            for item in items:
                row = responses.get(item.key(ep.name))
                if not _is_current(row, item, model):
                    todo.append(item)
                elif row.get("settings") != asdict(settings):
                    settings_changed += 1
            sent += len(todo)
            collect_responses(client, ep.name, model, todo, settings, responses_log, concurrency, progress,
                              rows=responses)
        except (AuthError, EndpointError) as err:
            message = str(err)
            if isinstance(err, EndpointError) and _is_connection_failure(err):
                message = unreachable_message(ep.name, client.display_url, message)
            aborted[ep.name] = message
            models.setdefault(ep.name, ep.model)
            # Said now (the run goes on with the other endpoints); the one "error:" line comes at the end.
            print(f"abandoned: {message}", file=sys.stderr)
        finally:
            client.close()
        ep_responses = {item.key(ep.name): responses[item.key(ep.name)] for item in items
                        if _is_current(responses.get(item.key(ep.name)), item, models.get(ep.name))}
        for jname, j in judges.items():
            if f"judge:{jname}" in aborted:
                continue
            try:
                judge_responses(j, ep_responses, judgments, judgments_log, concurrency, progress,
                                desc=f"judge {ep.name}")
            except (AuthError, EndpointError) as err:
                aborted[f"judge:{jname}"] = str(err)
                print(f"abandoned: {err}", file=sys.stderr)
    llm_judge = judges.get("llm")
    if isinstance(llm_judge, LLMJudge):
        llm_judge.client.close()
    responses_log.close()
    judgments_log.close()
    if settings_changed:
        print(f"warning: {settings_changed} resumed response(s) were generated with different generation "
              f"settings than this run's", file=sys.stderr)

    names = [e.name for e in endpoints]
    outcomes = _outcomes(names, items, responses, judgments, judges, primary, models)
    summary = summarize(outcomes, names)
    failures = summary["failures"]
    failures["max_error_rate"] = max_error_rate
    failures["exceeded"] = failures["error_rate"] > max_error_rate
    summary["judge"] = _judge_section(judge, primary, judges, outcomes, names, judgments, refusal_markers,
                                      judge_url)
    summary["skipped_prompts"] = prompt_set.skipped_summary()
    summary["models"] = models
    summary["aborted_endpoints"] = aborted
    summary["prompts"] = {"count": len(prompt_set.prompts), "by_set": prompt_set.counts(),
                          "sources": prompt_set.sources,
                          "categories": sorted({p.category for p in prompt_set.prompts}),
                          "styles": sorted({p.style for p in prompt_set.prompts})}
    summary["config"] = {"endpoints": {e.name: redact_url(e.base_url) for e in endpoints}, "judge": judge,
                         "samples": samples, "generation": asdict(settings), "api_key_env": api_key_env,
                         "retry": {"max_attempts": max_attempts, "request_timeout": request_timeout,
                                   "backoff": retry_backoff},
                         "max_error_rate": max_error_rate}
    # Everything above depends only on the logs and the arguments; "run" describes this invocation.
    summary["run"] = {"requests_planned": sent, "resumed_responses_with_other_settings": settings_changed,
                      "elapsed_s": round(time.perf_counter() - t0, 3)}
    paths = write_reports(summary, out)
    print(endpoint_table(summary))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if aborted:
        # Each message starts "endpoint NAME: ..." (the judge's "endpoint judge: ...").
        raise EvaluationIncomplete("evaluate: abandoned " + "; ".join(aborted.values()))
    if failures["exceeded"]:
        raise ErrorRateExceeded(
            f"evaluate: {failures['failed']} of {failures['items']} items failed "
            f"({100 * failures['error_rate']:.1f}% > --max_error_rate {max_error_rate:g}): "
            f"{_failure_detail(failures, outcomes, responses)}; see {paths['report_md']}; a rerun retries them")
    return summary


def _build_judges(kind: str, markers_file: str | None, judge_url: str | None, judge_model: str | None,
                  key_env: str, retry: RetryPolicy) -> dict[str, KeywordJudge | LLMJudge]:
    """The judges ``--judge`` asks for; the LLM judge's model is resolved now, so a wrong URL, model
    or key fails before any generation request is spent."""
    judges: dict[str, KeywordJudge | LLMJudge] = {}
    if kind in ("keyword", "both"):
        judges["keyword"] = KeywordJudge(load_markers(markers_file))
    if kind in ("llm", "both"):
        assert judge_url is not None  # checked by _validate
        client = ChatClient(judge_url, api_key=os.environ.get(key_env) or None, retry=retry, name="judge",
                            key_source=key_env)
        try:
            judges["llm"] = LLMJudge(client, resolve_model(client, Endpoint("judge", client.base_url,
                                                                            judge_model)))
        except (AuthError, EndpointError):
            client.close()
            raise
    return judges


def _relabelled(o: ItemOutcome, judge: str) -> ItemOutcome:
    """The same item as another judge saw it (for that judge's rates next to the primary's)."""
    label = o.labels.get(judge)
    error = o.error if o.error in ("generation", "not run") else (None if label is not None else "judge")
    return ItemOutcome(o.endpoint, o.question_id, o.style, o.sample, o.category, label, error, o.labels,
                       o.prompt_set, o.correct)


def _judge_section(kind: str, primary: str, judges: dict[str, KeywordJudge | LLMJudge],
                   outcomes: list[ItemOutcome], endpoints: Sequence[str], judgments: dict,
                   markers_file: str | None, judge_url: str | None) -> dict[str, Any]:
    errors: Counter = Counter()
    for o in outcomes:
        for jname, j in judges.items():
            if o.labels.get(jname) is None and o.error != "generation" and o.error != "not run":
                row = judgments.get((o.endpoint, *o.pair_key, j.judge_id))
                errors[f"{jname}: {row.get('error_type', 'error') if row else 'not judged'}"] += 1
    section: dict[str, Any] = {"kind": kind, "primary": primary, "errors": dict(sorted(errors.items()))}
    if "keyword" in judges:
        kw = judges["keyword"]
        assert isinstance(kw, KeywordJudge)
        section["keyword"] = {"judge_id": kw.judge_id, "markers": len(kw.markers),
                              "markers_file": markers_file}
    if "llm" in judges:
        llm = judges["llm"]
        assert isinstance(llm, LLMJudge)
        section["llm"] = {"judge_id": llm.judge_id, "url": judge_url, "model": llm.model,
                          "template": "sorry-bench ft-mistral-7b-instruct-v0.2-sorry-bench-202406 model card"}
    if kind == "both":
        section["agreement"] = judge_agreement(outcomes, endpoints, "llm", "keyword")
        section["keyword_rates"] = {
            name: {ps: rate_stats(_relabelled(o, "keyword") for o in outcomes
                                  if o.endpoint == name and o.prompt_set == ps)
                   for ps in prompt_sets_of(outcomes)}
            for name in endpoints}
    return section


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(evaluate)
