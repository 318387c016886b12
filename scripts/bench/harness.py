"""Interleaved timing: runner threads handed one quota of optimizer steps at a time, and what is measured.

All runners live in one process and are run round-robin (the order rotates every round), so machine noise
hits all of them alike: one optimizer step per runner per round on the CPU presets, five on the GPU preset
(a device sync after every step would hide the host/device overlap). Each framework runs its own,
unmodified training loop (``trainer.fit``, ``SFTTrainer.train``, the plain ``for`` loop) in a worker
thread; a callback at the end of every optimizer step (Lightning ``on_train_batch_end``, transformers
``on_step_end``) records the time and, once the runner's quota for the round is used, parks the thread
until the scheduler hands it the next quota. Only one runner thread runs at a time. A step's time is from
the previous step's end to this one's: it includes everything the framework does between optimizer steps
(fetching and collating the batch, moving it to the device, hooks, logging, the projection), which is the
honest framework overhead. We do not call ``training_step``/``optimizer_step`` by hand: that would skip
the loop code we want to measure. The first ``--warmup`` steps of every runner (lazy init, first-touch
allocation) are not timed. On CUDA the device is synchronised when a runner's quota ends, so the last
step of a round also pays for queued work.

``tokens_per_s`` is ``batch * seq / median step time`` (robust to noise spikes from other processes);
``tokens_per_s_mean`` divides all timed tokens by all timed seconds. The timed rounds stop early, after a
whole round, once ``--budget-s`` is spent (cpu-small: 330 s), so a loaded 2-core machine still finishes
the default run within 10 minutes.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ step hand-over
class StopTraining(Exception):
    """Raised inside a parked runner's training loop when the scheduler is done with it."""


class Baton:
    """Hands a runner thread a quota of optimizer steps and records their times.

    The runner thread calls ``park()`` once when it is ready to train and ``step_done()`` after every
    optimizer step; the scheduler calls ``run(n)`` and blocks until the runner has done n steps.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._go = threading.Event()
        self._parked = threading.Event()
        self._quota = 0
        self._last = (0.0, 0.0)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.stopping = False
        self.error: BaseException | None = None
        self.thread_done = False

    # runner side
    def park(self) -> None:
        self._parked.set()
        self._go.wait()
        self._go.clear()
        if self.stopping:  # leave the framework's loop at once: no leftover steps, no end-of-fit export
            raise StopTraining
        self._last = (time.perf_counter(), time.process_time())

    def step_done(self) -> None:
        self._quota -= 1
        if self._quota == 0 and self.cuda:
            torch.cuda.synchronize()  # the round's last step pays for the work still queued
        # Process CPU time covers every thread (intra-op pool included); the parked runners use none.
        now = (time.perf_counter(), time.process_time())
        self.times.append(now[0] - self._last[0])
        self.cpu_times.append(now[1] - self._last[1])
        self._last = now
        if self._quota == 0:
            self.park()
        elif self._quota < 0:
            raise RuntimeError("runner stepped past its quota")

    def thread_ended(self) -> None:
        """Called by the runner thread on its way out, whatever the reason: wakes a waiting scheduler."""
        self.thread_done = True
        self._parked.set()

    # scheduler side
    def wait_ready(self, thread: threading.Thread) -> None:
        self._parked.wait()
        self._check(thread)

    def run(self, n: int, thread: threading.Thread) -> list[float]:
        self.times, self.cpu_times = [], []
        self._quota = n
        self._parked.clear()
        self._go.set()
        self._parked.wait()
        self._check(thread)
        if len(self.times) != n:
            raise RuntimeError(f"runner finished after {len(self.times)} of {n} steps")
        return self.times

    def finish(self, thread: threading.Thread) -> None:
        self.stopping = True
        self._parked.clear()
        self._go.set()
        thread.join()
        self._check(thread)

    def _check(self, thread: threading.Thread) -> None:
        if self.error is not None:
            raise RuntimeError(f"runner thread failed: {self.error!r}") from self.error
        if self.thread_done and not self.stopping:
            raise RuntimeError("runner thread ended before it was told to")


class Runner:
    """One training setup: builds in the main thread, trains in its own thread under a ``Baton``."""

    def __init__(self, name: str, cuda: bool):
        self.name = name
        self.baton = Baton(cuda)
        self.thread = threading.Thread(target=self._main, name=f"bench-{name}", daemon=True)
        self.lora_params = 0
        self.projector = None

    def start(self) -> None:
        self.thread.start()
        self.baton.wait_ready(self.thread)

    def _main(self) -> None:
        try:
            self.train()
        except StopTraining:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which re-raises
            if not isinstance(exc.__cause__ or exc.__context__, StopTraining):
                self.baton.error = exc
        finally:
            self.baton.thread_ended()

    def train(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------- process memory
def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current RSS of this process (``VmRSS``; psutil where /proc is missing)."""
    current = _status_mb("VmRSS")
    if current is not None:
        return current
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ timing
@dataclass
class Timings:
    """Per runner, per round: the wall and process-CPU seconds of each timed step."""

    wall: dict[str, list[list[float]]]
    cpu: dict[str, list[list[float]]]
    rounds: int
    stopped_by_budget: bool


def summarise(wall: list[list[float]], cpu: list[list[float]], tokens_per_step: int) -> dict[str, Any]:
    """One runner's step-time statistics and throughput."""
    times = sorted(t for rnd in wall for t in rnd)
    median = statistics.median(times)

    def q(p: float) -> float:
        return times[min(len(times) - 1, int(p * len(times)))]

    return {
        "tokens_per_s": tokens_per_step / median,
        "step_s_median": median,
        "step_s_p10": q(0.10),
        "step_s_p90": q(0.90),
        "tokens_per_s_mean": tokens_per_step * len(times) / sum(times),
        "cpu_s_median": statistics.median(t for rnd in cpu for t in rnd),
        "steps_timed": len(times),
    }


def paired_ratio(per_round: dict[str, list[list[float]]], name: str, ref: str) -> float | None:
    """Throughput of ``name`` relative to ``ref``: the median over rounds of ``time(ref) / time(name)``.

    Both ran within seconds of each other in every round, so load that comes and goes over seconds
    (other processes on a shared machine) cancels in each round's ratio; the median drops bursts.
    """
    if name not in per_round or ref not in per_round:
        return None
    return statistics.median(sum(r) / sum(x) for r, x in zip(per_round[ref], per_round[name], strict=True))


def run_interleaved(runners: list[Runner], warmup: int, steps: int, per_round: int, device: torch.device,
                    inproc_mem: bool, budget_s: float) -> tuple[Timings, dict[str, float]]:
    """Warm every runner up, then hand out ``per_round`` steps per runner per round, rotating the order.

    Stops after the round that would overrun ``budget_s`` (at least 5 rounds are always run).
    """
    wall: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    cpu: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    mem: dict[str, float] = {r.name: 0.0 for r in runners}
    for r in runners:
        if warmup:
            r.baton.run(warmup, r.thread)
    t0 = time.perf_counter()
    done = rnd = 0
    stopped = False
    while done < steps:
        n = min(per_round, steps - done)
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
        for r in order:
            if inproc_mem:
                start = _start_inproc_peak(device)
            wall[r.name].append(list(r.baton.run(n, r.thread)))
            cpu[r.name].append(list(r.baton.cpu_times))
            if inproc_mem:
                peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                        else peak_rss_mb())
                mem[r.name] = max(mem[r.name], peak - start)
        done += n
        rnd += 1
        elapsed = time.perf_counter() - t0
        if rnd % 5 == 0 or done >= steps:
            log(f"round {rnd}: {done}/{steps} timed steps per runner, {elapsed:.0f} s")
        if done < steps and rnd >= 5 and elapsed * (rnd + 1) / rnd > budget_s:
            log(f"time budget of {budget_s:.0f} s reached: stopping after {done} timed steps per runner")
            stopped = True
            break
    return Timings(wall, cpu, rnd, stopped), mem


def _start_inproc_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; returns the memory held now (MB), which the peak is measured above."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    reset_peak_rss()
    return rss_mb()
