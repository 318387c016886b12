"""Evaluate refusal behaviour of OpenAI-compatible endpoints, SORRY-Bench style.

One concept per module:

- ``prompts``: SORRY-Bench-schema prompts (bundled sample, local JSONL, gated hub set) and HarmfulQA
  held-out questions, filtered, with bad rows counted.
- ``client``: ``/v1/chat/completions`` over pooled ``requests`` sessions, retries, auth errors.
- ``judges``: the SORRY-Bench LLM judge prompt and its 0/1 parser; the keyword judge.
- ``store``: append-only JSONL logs that survive a crash.
- ``metrics``: Wilson intervals, McNemar's test, Cohen's kappa, the summary.
- ``report``: ``summary.json``/``.csv``, ``report.md``, the per-category plot, the stdout table.
- ``runner``: the ``evaluate`` command that ties them together and resumes interrupted runs.
- ``stub_server``: a deterministic OpenAI-compatible stand-in with scripted faults (tests, benchmark).
"""
