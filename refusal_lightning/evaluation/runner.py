"""``evaluate``: query endpoints with prompts, judge the answers, summarise, resumably.

Flow per endpoint: resolve the model, send every (prompt, sample) that has no response yet through a
bounded thread pool, append each response to ``responses.jsonl`` as it arrives, then judge every
response that has no judgment yet into ``judgments.jsonl``. The summary is rebuilt from those two
logs, so an interrupted run that is started again with the same arguments ends with the same
summary as an uninterrupted one, without re-sending a finished request.

An item is ``(endpoint, prompt_set, question_id, style, sample)``; the prompt sets (SORRY-Bench,
HarmfulQA held-out, benign, and the benign set's two views) are summarised separately, never pooled.
Items whose request failed after all retries are recorded with their error and retried on the next run;
auth failures (401/403) abandon the endpoint at once and are not recorded per item, so a rerun with the
right key picks them up. So does an endpoint nothing can connect to: after a few requests that all
failed to connect, the rest are not sent.

Here: the command, its checks and the summary. Sending and judging is ``collect``, what a folder already
holds ``store``, rates and judge statistics ``metrics``, the files ``report``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Any

from refusal_lightning.evaluation.client import GenerationSettings, RetryPolicy, parse_endpoints, redact_url
from refusal_lightning.evaluation.collect import EvalRun
from refusal_lightning.evaluation.judges import JudgeSettings, unjudgeable_styles_problem
from refusal_lightning.evaluation.metrics import failure_detail, item_outcomes, judge_section, summarize
from refusal_lightning.evaluation.prompts import PromptSet, load_prompts
from refusal_lightning.evaluation.report import endpoint_table, write_outcomes, write_reports
from refusal_lightning.evaluation.store import EvalStore, WorkItem

# The design's flags for two nested keys, ``--judge llm --judge_url URL``; ``cli`` expands them on the command
# line and ``evaluate_arguments`` in a pipeline's evaluation section.
SHORT_FLAGS = {"judge": "judge.kind", "judge_url": "judge.url"}


class EvaluateConfigError(ValueError):
    """Invalid ``evaluate`` arguments (all problems listed at once)."""


class EvaluationIncomplete(RuntimeError):
    """An endpoint or judge was abandoned (auth failure, unknown model, nothing listening); the outputs
    were still written for everything else, and a rerun resumes."""


class ErrorRateExceeded(EvaluationIncomplete):
    """More items failed (request or judgment) than ``--max_error_rate`` allows; summary and report
    were written and say how many, and a rerun retries the failed ones."""


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
    judge: JudgeSettings = JudgeSettings(),
    generation: GenerationSettings = GenerationSettings(),
    retry: RetryPolicy = RetryPolicy(),
    model_name: list[str] | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    samples: int = 1,
    max_error_rate: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure refusal vs fulfillment of OpenAI-compatible endpoints on SORRY-Bench-style prompts.

    Each prompt set is summarised on its own, never pooled: sorry_bench (--prompts),
    harmfulqa_heldout (--harmfulqa_source) and benign (--benign_prompts: refusal there is
    over-refusal, and answers are checked against references). The benign set is also reported split in
    two, from the same answers and labels: benign_contrast (its rows without a reference) and benign_facts
    (its rows with one); a split set without rows is left out. Writes responses.jsonl,
    judgments.jsonl, summary.json/.csv, report.md, fulfillment_by_category.png and outcomes.jsonl (every
    item's label and answer check, rebuilt each run) to output_dir.
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
        judge: who labels the answers: the keyword judge (offline), SORRY-Bench's LLM judge, or both.
            ``--judge KIND`` and ``--judge_url URL`` are short for ``--judge.kind`` and ``--judge.url``.
        generation: sampling settings sent with every request.
        retry: how hard to try each request (the LLM judge's too).
        model_name: model to request, as NAME=MODEL per endpoint or one bare MODEL for all endpoints
            without one; default: the only model the endpoint lists.
        api_key_env: environment variable holding the endpoints' API key, sent as a Bearer token
            (never printed or stored); unset or empty sends no key.
        concurrency: requests in flight per endpoint.
        samples: responses per prompt (sample i uses generation.seed + i).
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
    endpoints = parse_endpoints(endpoint, model_name, problems)
    problems += judge.problems()
    style_problem = unjudgeable_styles_problem(styles or [])
    if style_problem:
        problems.append(f"--styles: {style_problem}")
    problems += [msg for ok, msg in ((concurrency >= 1, "--concurrency must be >= 1"),
                                     (samples >= 1, "--samples must be >= 1")) if not ok]
    problems += generation.problems() + retry.problems()
    if not 0 <= max_error_rate <= 1:
        problems.append("--max_error_rate must be in [0, 1]")
    if problems:
        raise EvaluateConfigError("evaluate: invalid arguments:\n  - " + "\n  - ".join(problems))

    prompt_set: PromptSet = load_prompts(prompts, harmfulqa_source, harmfulqa_val_fraction, harmfulqa_seed,
                                         categories, styles, limit, benign_prompts)
    style_problem = unjudgeable_styles_problem([p.style for p in prompt_set.prompts])
    if style_problem:  # styles not asked for by name, but present in the source (all of them by default)
        raise EvaluateConfigError(f"evaluate: {prompts}: {style_problem}")
    if not prompt_set.prompts:
        raise EvaluateConfigError(f"evaluate: no prompts left to evaluate (sources: {prompt_set.sources}, "
                                  f"skipped: {prompt_set.skipped_summary()})")
    store = EvalStore(output_dir)
    if store.corrupt_lines:
        print(f"warning: skipped {store.corrupt_lines} unreadable line(s) in {store.folder}", file=sys.stderr)
    # An unusable judge raises here, before any generation request is spent.
    judges = judge.build(retry, api_key_env)
    items = [WorkItem(p, s) for p in prompt_set.prompts for s in range(samples)]
    run = EvalRun(items, store, judges, generation, retry, api_key_env, concurrency, progress)
    for ep in endpoints:
        run.generate(ep)
        run.judge(ep)
    run.close()
    if run.settings_changed:
        print(f"warning: {run.settings_changed} resumed response(s) were generated with different generation "
              f"settings than this run's", file=sys.stderr)

    names = [e.name for e in endpoints]
    outcomes = item_outcomes(names, items, store.responses, store.judgments, judges, judge.primary, run.models)
    summary = summarize(outcomes, names)
    failures = summary["failures"]
    failures["max_error_rate"] = max_error_rate
    failures["exceeded"] = failures["error_rate"] > max_error_rate
    summary["judge"] = judge_section(judge, judges, outcomes, names, store.judgments)
    summary["skipped_prompts"] = prompt_set.skipped_summary()
    summary["models"] = run.models
    summary["aborted_endpoints"] = run.aborted
    summary["prompts"] = {"count": len(prompt_set.prompts), "by_set": prompt_set.counts(),
                          "sources": prompt_set.sources, "datasets": prompt_set.datasets,
                          "categories": sorted({p.category for p in prompt_set.prompts}),
                          "styles": sorted({p.style for p in prompt_set.prompts})}
    summary["config"] = {"endpoints": {e.name: redact_url(e.base_url) for e in endpoints}, "judge": judge.kind,
                         "samples": samples, "generation": asdict(generation), "api_key_env": api_key_env,
                         "retry": asdict(retry),
                         "max_error_rate": max_error_rate}
    # Everything above depends only on the logs and the arguments; "run" describes this invocation.
    summary["run"] = {"requests_planned": run.sent, "resumed_responses_with_other_settings": run.settings_changed,
                      "elapsed_s": round(time.perf_counter() - t0, 3)}
    paths = {**write_reports(summary, store.folder), "outcomes": write_outcomes(outcomes, store.folder)}
    print(endpoint_table(summary))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if run.aborted:
        # Each message starts "endpoint NAME: ..." (the judge's "endpoint judge: ...").
        raise EvaluationIncomplete("evaluate: abandoned " + "; ".join(run.aborted.values()))
    if failures["exceeded"]:
        raise ErrorRateExceeded(
            f"evaluate: {failures['failed']} of {failures['items']} items failed "
            f"({100 * failures['error_rate']:.1f}% > --max_error_rate {max_error_rate:g}): "
            f"{failure_detail(failures, outcomes, store.responses)}; see {paths['report_md']}; a rerun retries them")
    return summary


def evaluate_arguments(section: dict[str, Any], where: str) -> dict[str, Any]:
    """``evaluate``'s arguments from a config section, checked against its signature by jsonargparse (names,
    types, choices) before anything runs; the settings groups come back as their dataclasses."""
    from jsonargparse import ArgumentError, ArgumentParser

    values = dict(section)
    for short, dotted in SHORT_FLAGS.items():
        group, key = dotted.split(".")
        if short in values and not (short == group and isinstance(values[short], dict)):
            value = values.pop(short)
            values[group] = {**(values.get(group) if isinstance(values.get(group), dict) else {}), key: value}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(evaluate, skip={"endpoint", "output_dir"})
    try:
        parsed = parser.instantiate_classes(parser.parse_object(values))
    except (ArgumentError, TypeError, ValueError) as err:
        raise EvaluateConfigError(f"{where}: {' '.join(str(err).split())} (sampling settings sit under generation, "
                                  f"retries under retry, the judge under judge; `python -m refusal_lightning "
                                  f"evaluate --help` lists every key)") from None
    return {name: parsed[name] for name in values}

