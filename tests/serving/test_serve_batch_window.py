"""The batching worker's wait policy, on fake jobs (no model): a short window for a lone client, and
while clients send concurrently a wait for as many mates as the last batch had."""

from __future__ import annotations

import queue
import threading
import time

from refusal_lightning.serving.backend import ChatBackend, _Job
from refusal_lightning.serving.request import ChatRequest


def policy(batch_wait_ms: float, busy_batch_wait_ms: float, max_batch_size: int = 16,
           load: int = 0) -> ChatBackend:
    """A ChatBackend with only what ``_gather`` reads (no model, no worker thread)."""
    backend = ChatBackend.__new__(ChatBackend)
    backend.max_batch_size = max_batch_size
    backend.batch_wait_s = batch_wait_ms / 1000
    backend.busy_batch_wait_s = busy_batch_wait_ms / 1000
    backend._load = load
    backend._queue = queue.SimpleQueue()
    return backend


def job() -> _Job:
    req = ChatRequest(model=None, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                      temperature=0.0, top_p=None, seed=None, chat_template_kwargs={})
    return _Job("base", req, [1, 2], 4, ("base", "greedy"))


def arrive_later(backend: ChatBackend, delays_s: list[float]) -> threading.Thread:
    def feed():
        start = time.monotonic()
        for delay in delays_s:
            time.sleep(max(0.0, start + delay - time.monotonic()))
            backend._queue.put(job())

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def gather(backend: ChatBackend) -> tuple[int, float]:
    pending = [job()]
    start = time.monotonic()
    assert backend._gather(pending)
    return len(pending), time.monotonic() - start


def test_lone_client_waits_only_the_short_window():
    backend = policy(batch_wait_ms=20, busy_batch_wait_ms=2000, load=1)
    size, waited = gather(backend)
    assert size == 1 and waited < 1.0  # the busy window does not apply after a one-row batch


def test_after_a_busy_batch_stragglers_still_join():
    # Mates trickle in 10-40 ms after the head: the 5 ms window alone would close a batch of 1.
    backend = policy(batch_wait_ms=5, busy_batch_wait_ms=5000, load=4)
    feeder = arrive_later(backend, [0.01, 0.02, 0.03, 0.04])
    size, waited = gather(backend)
    feeder.join()
    assert size == 5 and waited < 1.0  # closed one arrival gap after the last, long before the cap
    quiet = policy(batch_wait_ms=5, busy_batch_wait_ms=5000, load=1)
    feeder = arrive_later(quiet, [0.06, 0.07])
    size, _ = gather(quiet)
    feeder.join()
    assert size == 1  # a lone client after a lone batch keeps the short window


def test_a_burst_joins_whole_even_after_a_lone_batch():
    backend = policy(batch_wait_ms=5, busy_batch_wait_ms=5000, load=1)
    feeder = arrive_later(backend, [0.001 + 0.008 * i for i in range(15)])  # 15 more, 8 ms apart
    size, waited = gather(backend)
    feeder.join()
    assert size == 16 and waited < 1.0


def test_busy_window_ends_at_its_cap_when_requests_keep_coming():
    backend = policy(batch_wait_ms=0, busy_batch_wait_ms=150, load=8)
    feeder = arrive_later(backend, [0.01 * i for i in range(1, 40)])  # a steady stream, 10 ms apart
    size, waited = gather(backend)
    feeder.join()
    assert 10 <= size < 30 and 0.14 <= waited < 1.0


def test_requests_already_queued_all_join_at_once():
    backend = policy(batch_wait_ms=0, busy_batch_wait_ms=0, max_batch_size=4)
    for _ in range(6):
        backend._queue.put(job())
    size, _ = gather(backend)
    assert size == 7  # all moved to pending; the batch itself takes max_batch_size of them


def test_close_while_waiting_stops_the_gather():
    backend = policy(batch_wait_ms=5000, busy_batch_wait_ms=5000)
    backend._queue.put(None)
    assert backend._gather([job()]) is False


def test_closed_loop_clients_keep_full_batches():
    # 16 clients, each sending its next request as soon as its reply is back (the evaluator's threads). A
    # window of the last batch's rows alone settles into two alternating half batches; counting the rows
    # still waiting too, the batches stay full.
    backend = policy(batch_wait_ms=1, busy_batch_wait_ms=1000, max_batch_size=16)
    backend.max_model_len = 4096
    sizes: list[int] = []

    def answer(batch):
        sizes.append(len(batch))
        time.sleep(0.05)  # generation; replies go back together, next requests trickle in
        for job in batch:
            job.future.set_result("ok")

    backend._answer = answer

    def client(k: int):
        for _ in range(6):
            time.sleep(0.002 * k)  # clients are not in lockstep
            j = job()
            backend._queue.put(j)
            j.future.result(timeout=30)

    worker = threading.Thread(target=backend._work, daemon=True)
    worker.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=60)
    backend._queue.put(None)
    worker.join(timeout=10)
    assert sum(sizes) == 96
    full = sorted(sizes)[len(sizes) // 2]
    assert full == 16, sizes  # the median batch holds every client
