"""Evaluate refusal behaviour of OpenAI-compatible endpoints, SORRY-Bench style.

One concept per module:

- ``prompts``: SORRY-Bench-schema prompts (bundled sample, local JSONL, gated hub set) and HarmfulQA
  held-out questions, filtered, with bad rows counted.
- ``client``: ``/v1/chat/completions`` over pooled ``requests`` sessions, retries, auth errors; the
  ``--endpoint``/``--model_name`` specs and the generation and retry settings.
- ``judges``: the SORRY-Bench LLM judge prompt and its 0/1 parser; the keyword judge; ``JudgeSettings``.
- ``collect``: requests and judgments through a bounded thread pool, logged as they arrive; one run
  across its endpoints.
- ``store``: append-only JSONL logs that survive a crash, and what an output folder already holds
  (resume bookkeeping).
- ``metrics``: Wilson intervals, McNemar's test, Cohen's kappa, item outcomes, judge statistics, the summary.
- ``report``: ``summary.json``/``.csv``, ``report.md``, the per-category plot, the stdout table.
- ``runner``: the ``evaluate`` command: its checks, the run, the summary.
- ``xstest``: the ``xstest`` command (XSTest's safe prompts as a benign prompt file).
- ``stub_server``: a deterministic OpenAI-compatible stand-in with scripted faults (tests, benchmark).
"""
