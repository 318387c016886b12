"""Our OpenAI-compatible server.

- ``server``: the ``serve`` command and its HTTP handler.
- ``request``: parsing and checking a ``/v1/chat/completions`` request.
- ``backend``: the model, its adapters and batched generation.
- ``process``: ``serve`` in a background process on a free port (pipeline, sweeps, benchmarks).
- ``vllm_plan``: the real run's vLLM commands and their memory arithmetic.
- ``http_json``: JSON over ``http.server``, shared with the evaluator's stub server.
"""
