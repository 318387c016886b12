"""The model side of ``serve``: base model + adapters, owned by one batching worker thread.

HTTP handler threads call ``ChatBackend.generate``, which tokenizes the request, checks the context limit and
queues it; the worker takes the oldest waiting request, lets others join (``_gather``), picks
the ones that can share one left-padded ``generate`` call (``_take_batch``) and answers them
(``_generate_batch``). The batching policy is described in ``serve``'s module docstring.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_lightning.serving.http_json import RequestError
from refusal_lightning.serving.request import DEFAULT_MAX_TOKENS_LIMIT, ChatRequest

# A batch that has company stays open while requests keep arriving at most this far apart: closed-loop
# clients on 2 busy cores send their next requests over tens of milliseconds after a batch returns.
ARRIVAL_GAP_S = 0.02
DEFAULT_BATCH_WAIT_MS = 5.0  # a lone request's wait for company
DEFAULT_BUSY_BATCH_WAIT_MS = 100.0  # the most a batch with company stays open (measured: docs/benchmarks.md)


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class _Job:
    """A validated, tokenized request waiting for the worker; its handler thread waits on ``future``."""

    name: str  # the base model's or an adapter's name
    req: ChatRequest
    prompt_ids: list[int]
    max_new: int  # this request's budget: its max_tokens, capped by the room left in the context
    group: tuple  # jobs with equal groups can share one generate call
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@functools.cache
def _row_budget_class() -> type:
    """A ``StoppingCriteria`` that ends each row at its own token budget (built on first use: this module
    imports no torch, so ``--help`` stays fast)."""
    import torch
    from transformers import StoppingCriteria

    class RowBudget(StoppingCriteria):
        def __init__(self, prompt_width: int, budgets: list[int], device: str):
            self.prompt_width = prompt_width
            self.budgets = torch.tensor(budgets, device=device)

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids.shape[1] - self.prompt_width) >= self.budgets

    return RowBudget


def _stop_at_row_budgets(prompt_width: int, budgets: list[int], device: str):
    """Stopping criteria that finish each row at its own ``max_new`` (None when all budgets are equal:
    ``max_new_tokens`` already does it)."""
    from transformers import StoppingCriteriaList

    if len(set(budgets)) == 1:
        return None
    return StoppingCriteriaList([_row_budget_class()(prompt_width, budgets, device)])


class ChatBackend:
    """Base model + adapters, owned by one batching worker thread.

    Args:
        model: base model path or hub id.
        adapters: adapter name -> PEFT adapter folder.
        dtype: torch dtype name, or ``auto`` for the checkpoint's.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        served_model_name: the base model's name in the API (default: ``model`` as given).
        max_model_len: context length; default: the tokenizer's/model's.
        default_max_tokens: tokens to generate when a request gives no ``max_tokens``.
        max_tokens_limit: most tokens a request may ask for; more is a 400.
        max_batch_size: most requests per ``generate`` call (1 = one at a time).
        batch_wait_ms: how long the oldest waiting request waits for others to join its batch.
        busy_batch_wait_ms: the most a batch stays open while requests keep arriving (each less than
            ``ARRIVAL_GAP_S`` after the one before) or, when the last batch saw several requests, while
            waiting for a first mate.
    """

    def __init__(self, model: str, adapters: dict[str, Path] | None = None, dtype: str = "float32",
                 device: str = "auto", served_model_name: str | None = None, max_model_len: int | None = None,
                 default_max_tokens: int = 512, max_batch_size: int = 16,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
                 busy_batch_wait_ms: float = DEFAULT_BUSY_BATCH_WAIT_MS):
        from transformers import AutoTokenizer

        from refusal_lightning.models.loading import check_model_path, load_causal_lm

        self.base_name = served_model_name or model
        self.adapter_paths = dict(adapters or {})
        self.device = _resolve_device(device)
        source = check_model_path(model)  # one clear error for a bad --model; "~" expanded for both loads
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        base = load_causal_lm(source, dtype)
        if self.adapter_paths:
            from peft import PeftModel

            names = list(self.adapter_paths)
            base = PeftModel.from_pretrained(base, str(self.adapter_paths[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                base.load_adapter(str(self.adapter_paths[name]), adapter_name=name)
        self.model = base.to(self.device).eval()
        self.generation_defaults = self._inner_model().generation_config
        eos = self.generation_defaults.eos_token_id
        self.eos_ids = frozenset(x for x in (eos if isinstance(eos, list) else [eos]) if x is not None)
        # Left padding of a batch and the filler after a row stops; models without a pad token use EOS.
        self.pad_token_id = next((x for x in (self.generation_defaults.pad_token_id, self.tokenizer.pad_token_id,
                                              *sorted(self.eos_ids), self.tokenizer.eos_token_id)
                                  if x is not None), 0)
        model_limit = getattr(self._inner_model().config, "max_position_embeddings", None)
        limits = [x for x in (max_model_len, model_limit) if x]
        self.max_model_len = min(limits) if limits else 4096
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.busy_batch_wait_s = busy_batch_wait_ms / 1000
        self._load = 0  # requests in the server when the last batch was taken (see _gather)
        # (model name, batch size) of recent generate calls: tests and benchmarks read it.
        self.recent_batches: deque[tuple[str, int]] = deque(maxlen=10_000)
        # A fast tokenizer shared between threads can fail with "Already borrowed": handler threads
        # (apply_chat_template) and the worker (decode) take turns.
        self._tokenizer_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._solo_ids = itertools.count()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="serve-batcher", daemon=True)
        self._worker.start()

    def _inner_model(self):
        return self.model.get_base_model() if self.adapter_paths else self.model

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapter_paths]

    def models_listing(self) -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": self.base_name, "object": "model", "created": created, "owned_by": "refusal_lightning",
                 "root": self.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "refusal_lightning",
                  "root": str(path), "parent": self.base_name} for name, path in self.adapter_paths.items()]
        return {"object": "list", "data": data}

    def _temperature(self, req: ChatRequest) -> float:
        return req.temperature if req.temperature is not None else (self.generation_defaults.temperature or 1.0)

    def _generation_config(self, req: ChatRequest, max_new_tokens: int):
        import copy

        cfg = copy.deepcopy(self.generation_defaults)
        cfg.max_new_tokens = max_new_tokens
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.pad_token_id  # else transformers warns and picks EOS itself
        temperature = self._temperature(req)
        if temperature == 0:
            # Greedy; clear sampling knobs so transformers does not warn they are ignored.
            cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
        else:
            cfg.do_sample = True
            cfg.temperature = temperature
            if req.top_p is not None:
                cfg.top_p = req.top_p
        return cfg

    # -- handler threads ----------------------------------------------------------------------------

    def generate(self, req: ChatRequest) -> dict[str, Any]:
        """Answer one request (blocking); ``req.model`` must be one of ``names`` (checked by the caller).
        Raises ``RequestError``: 400 for a prompt the template rejects or that leaves no room to generate,
        500 when its batch failed."""
        job = self._prepare(req)
        if self._closed:
            raise RequestError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        self._queue.put(job)
        return job.future.result()

    def _prepare(self, req: ChatRequest) -> _Job:
        """Tokenize and check the context limit here, per request, so one bad prompt fails alone."""
        name = req.model or self.base_name
        try:
            with self._tokenizer_lock:
                inputs = self.tokenizer.apply_chat_template(
                    req.messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                    return_tensors="pt", **req.chat_template_kwargs)
        except Exception as err:  # jinja raises for conversations the template rejects
            raise RequestError(400, f"the chat template rejected these messages: {err}",
                               param="messages") from None
        prompt_ids = inputs["input_ids"][0].tolist()
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise RequestError(400, f"prompt is {len(prompt_ids)} tokens; the context limit is "
                               f"{self.max_model_len}", param="messages", code="context_length_exceeded")
        temperature = self._temperature(req)
        if temperature == 0:
            group: tuple = (name, "greedy")
        elif req.seed is None:
            group = (name, "sample", temperature, req.top_p)
        else:  # alone: the global RNG is seeded for this request only, as when requests ran one by one
            group = (name, "seeded", next(self._solo_ids))
        return _Job(name, req, prompt_ids, min(req.max_tokens or self.default_max_tokens, room), group)

    def close(self) -> None:
        """Stop the worker after its current batch; requests still waiting get a 503."""
        self._closed = True
        self._queue.put(None)

    # -- the worker thread: the only one that touches the model ----------------------------------------

    def _work(self) -> None:
        pending: list[_Job] = []  # taken off the queue, not yet answered (oldest first)
        while True:
            if not pending:
                job = self._queue.get()
                if job is None:
                    return
                pending.append(job)
            if not self._gather(pending):
                break
            batch = self._take_batch(pending)
            # the load this batch saw: its rows plus those still waiting (> 1: clients send concurrently)
            self._load = len(batch) + len(pending)
            self._answer(batch)
        closing = RequestError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        for job in pending:
            job.future.set_exception(closing)
        with contextlib.suppress(queue.Empty):
            while (job := self._queue.get_nowait()) is not None:
                job.future.set_exception(closing)

    def _gather(self, pending: list[_Job]) -> bool:
        """Move queued jobs into ``pending`` until the oldest one's batch is full or its wait is over
        (measured from its arrival, so a job that waited behind a batch does not wait again).

        A lone request waits ``batch_wait_s`` for a first mate. Closed-loop clients (the evaluator's
        threads) send their next requests only once their replies are back, so after a batch they trickle
        in over some milliseconds: once a mate has joined, or while several requests were in the server
        when the last batch was taken, the batch stays open as long as requests keep arriving less than
        ``ARRIVAL_GAP_S`` apart, up to ``busy_batch_wait_s`` after the oldest one's arrival.
        Returns False when ``close`` was called."""
        head = pending[0]
        cap = head.enqueued + max(self.batch_wait_s, self.busy_batch_wait_s)
        deadline = cap if self._load > 1 else head.enqueued + self.batch_wait_s
        seen = len(pending)
        while True:
            with contextlib.suppress(queue.Empty):  # whatever already arrived joins before deciding
                while True:
                    job = self._queue.get_nowait()
                    if job is None:
                        return False
                    pending.append(job)
            mates = sum(job.group == head.group for job in pending)
            if self.max_batch_size == 1 or head.group[1] == "seeded" or mates >= self.max_batch_size:
                return True
            now = time.monotonic()
            if len(pending) > seen:  # someone arrived: keep the batch open while they keep coming
                seen = len(pending)
                if mates > 1:
                    deadline = min(cap, now + ARRIVAL_GAP_S)
            timeout = deadline - now
            if timeout <= 0:
                return True
            try:
                job = self._queue.get(timeout=timeout)
            except queue.Empty:
                return True
            if job is None:
                return False
            pending.append(job)

    def _take_batch(self, pending: list[_Job]) -> list[_Job]:
        """The oldest job plus the next ones of its group that keep padded prompt + generation within the
        context limit (left padding shifts no row's positions, but absolute-position models index by the
        padded length)."""
        batch = [pending[0]]
        width, budget = len(pending[0].prompt_ids), pending[0].max_new
        for job in pending[1:]:
            if len(batch) == self.max_batch_size:
                break
            w, b = max(width, len(job.prompt_ids)), max(budget, job.max_new)
            if job.group == batch[0].group and w + b <= self.max_model_len:
                batch.append(job)
                width, budget = w, b
        chosen = {id(job) for job in batch}
        pending[:] = [job for job in pending if id(job) not in chosen]
        return batch

    def _answer(self, batch: list[_Job]) -> None:
        try:
            replies = self._generate_batch(batch)
        except Exception as err:  # a bug or an OOM: these requests get a 500, the server keeps serving
            traceback.print_exc(file=sys.stderr)
            for job in batch:
                job.future.set_exception(RequestError(500, f"internal error: {type(err).__name__}: {err}",
                                                      type_="internal_server_error"))
            return
        for job, reply in zip(batch, replies, strict=True):
            job.future.set_result(reply)

    def _use_adapter(self, name: str) -> contextlib.AbstractContextManager:
        if not self.adapter_paths:
            return contextlib.nullcontext()
        if name == self.base_name:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _generate_batch(self, batch: list[_Job]) -> list[dict[str, Any]]:
        """One left-padded ``generate`` call for jobs of one group; each reply as if it ran alone."""
        import torch

        width = max(len(job.prompt_ids) for job in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, job in enumerate(batch):
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            attention_mask[row, width - len(job.prompt_ids):] = 1
        budgets = [job.max_new for job in batch]
        cfg = self._generation_config(batch[0].req, max(budgets))
        if any(job.req.ignore_eos for job in batch):
            # [] rather than None, which generate() refills from the model's config. The other rows
            # are cut at their EOS below, so their answers do not change.
            cfg.eos_token_id = []
        # Rows stop at their own max_tokens, so short requests do not keep the batch going.
        stop = _stop_at_row_budgets(width, budgets, self.device)
        self.recent_batches.append((batch[0].name, len(batch)))
        with torch.inference_mode():
            if batch[0].group[1] == "seeded":
                torch.manual_seed(batch[0].req.seed)  # seeds every device
            with self._use_adapter(batch[0].name):
                out = self.model.generate(input_ids=input_ids.to(self.device),
                                          attention_mask=attention_mask.to(self.device),
                                          generation_config=cfg, stopping_criteria=stop)
        rows = out[:, width:].tolist()
        replies = []
        for job, tokens in zip(batch, rows, strict=True):
            # A row may run on past its own end (filler, or tokens it would not have generated alone).
            tokens = tokens[:job.max_new]
            end = None if job.req.ignore_eos else next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if end is not None:
                tokens = tokens[:end + 1]
            with self._tokenizer_lock:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            replies.append(self._reply(job, tokens, text))
        return replies

    def _reply(self, job: _Job, tokens: list[int], text: str) -> dict[str, Any]:
        prompt_len = len(job.prompt_ids)
        stopped = bool(tokens) and tokens[-1] in self.eos_ids and not job.req.ignore_eos
        finish = "length" if len(tokens) >= job.max_new and not stopped else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": job.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": len(tokens),
                      "total_tokens": prompt_len + len(tokens)},
        }
