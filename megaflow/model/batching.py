"""Dynamic batching: many caller threads, one thread that runs batches.

A model worker runs Celery's threads pool, so many `generate()` calls arrive at once
from different threads. An in-process model is fastest when those calls share one
forward pass, so each call leaves a `Job` here and waits on its future; one background
thread gathers compatible jobs (same `key`) for up to `max_wait_s` after the oldest
one arrived, or until `max_batch_size` are there, and hands them to `run_batch`.

Jobs are taken oldest first, so a job whose key differs from its neighbours waits at
most one batch longer than it would alone.

A *barrier* (`barrier(fn)`) runs `fn` on the batcher thread after every job queued
before it and before any job queued after it: no batch spans it. That is where a
model switches weights (drain, swap, resume), so no request ever runs on a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any

from megaflow.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

#: The key of a barrier job (its payload is the callable to run).
_BARRIER = object()


def wait_result(future: Future, timeout_s: float | None):
    """The job's result, waiting at most `timeout_s` (the call's deadline).

    Raises:
        ModelUnavailableError: no result in time (the batch goes on; its answer is dropped).
    """
    try:
        return future.result(timeout=timeout_s)
    except FuturesTimeout as exc:
        raise ModelUnavailableError(f"no answer within the call's {timeout_s:g}s deadline") from exc


@dataclass
class Job:
    """One call waiting for a batch."""

    key: Hashable
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters since the batcher started, for tests and benchmarks."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)


class MicroBatcher:
    """Gathers jobs from many threads into batches run by one background thread.

    Args:
        run_batch: Called on the batcher thread with jobs of one key; must set each
            job's future. Futures it leaves unset get its exception, or a
            `ModelUnavailableError` if it returned without setting them.
        max_batch_size: Most jobs in one batch.
        max_wait_s: How long the oldest job may wait for others to join it.
        name: Thread name, for logs and debuggers.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], None],
        *,
        max_batch_size: int,
        max_wait_s: float,
        name: str = "megaflow-batcher",
    ):
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._name = name
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()

    @property
    def closing(self) -> bool:
        """True once `close()` began; a long batch may poll it to stop early."""
        return self._closing

    def submit(self, key: Hashable, payload: Any) -> Future:
        """Queue one job; its future completes when its batch has run.

        Raises:
            ModelUnavailableError: the batcher is closed.
        """
        return self._enqueue(Job(key=key, payload=payload))

    def barrier(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the batcher thread between the jobs queued before and after this call.

        Its future gets `fn`'s result or exception.

        Raises:
            ModelUnavailableError: the batcher is closed.
        """
        return self._enqueue(Job(key=_BARRIER, payload=fn))

    def _enqueue(self, job: Job) -> Future:
        with self._cond:
            if self._closing:
                raise ModelUnavailableError("model is closed")
            if self._thread is None:
                # Started on first use, not in __init__, so building a client is free.
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the thread; jobs still queued fail with `ModelUnavailableError`. Idempotent."""
        with self._cond:
            self._closing = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
            thread = self._thread
        for job in pending:
            job.future.set_exception(ModelUnavailableError("model closed before the request ran"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("batcher thread %s did not stop within %.0fs", self._name, timeout_s)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch[0].key is _BARRIER:
                _run_barrier(batch[0])
                continue
            self.stats.batches += 1
            self.stats.jobs += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self.stats.sizes.append(len(batch))
            try:
                self._run_batch(batch)
            except Exception as exc:  # the callers get it; the thread must live on
                logger.exception("batch of %d failed", len(batch))
                error = exc
            else:
                error = ModelUnavailableError("batch finished without an answer for this request")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is due; None when closing."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            oldest = self._queue[0]
            if oldest.key is _BARRIER:
                return [self._queue.pop(0)]
            deadline = oldest.enqueued + self._max_wait_s
            while not self._closing:
                if sum(1 for j in self._open() if j.key == oldest.key) >= self._max_batch_size:
                    break
                if len(self._open()) < len(self._queue):
                    break  # a barrier is queued: later jobs cannot join this batch anyway
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closing:
                return None
            batch: list[Job] = []
            rest: list[Job] = []
            open_jobs = self._open()
            for job in open_jobs:
                if job.key == oldest.key and len(batch) < self._max_batch_size:
                    batch.append(job)
                else:
                    rest.append(job)
            self._queue = rest + self._queue[len(open_jobs):]
            return batch

    def _open(self) -> list[Job]:
        """The queued jobs before the first barrier: those one batch may gather."""
        for i, job in enumerate(self._queue):
            if job.key is _BARRIER:
                return self._queue[:i]
        return self._queue


def _run_barrier(job: Job) -> None:
    try:
        result = job.payload()
    except Exception as exc:  # the caller gets it; the thread must live on
        logger.exception("barrier failed")
        job.future.set_exception(exc)
    else:
        job.future.set_result(result)


class PolicySwitch:
    """A batching backend's switch to published policy versions, at a barrier of its batcher.

    Asking for a version not newer than the last one asked for does nothing, so every
    model call may ask; the swap runs on the batcher thread between batches, so no
    request sees half of it. A swap that fails may be asked for again.
    """

    def __init__(self, batcher: MicroBatcher, swap: Callable[[Any], None]):
        #: The version serving now (0: the config's weights); changed on the batcher thread only.
        self.version = 0
        self._target = 0
        self._lock = threading.Lock()
        self._batcher = batcher
        self._swap = swap

    def request(self, ref: Any) -> Future | None:
        """Switch to `ref` (a `PolicyRef`) before any request submitted after this call.

        Returns:
            The swap's future (done once the new weights serve), or None when `ref` is
            not newer than the last version asked for.
        """
        with self._lock:
            if ref.version <= self._target:
                return None
            self._target = ref.version
        return self._batcher.barrier(lambda: self._run(ref))

    def _run(self, ref: Any) -> None:
        if ref.version <= self.version:
            return
        try:
            self._swap(ref)
        except Exception:
            with self._lock:  # a later request may try this version again
                self._target = min(self._target, self.version)
            raise
        self.version = ref.version
