"""The process's STT decode pool: a bounded set of threads (one per core by default) shared by every session,
where work runs by priority instead of arrival.

A decode that ends a turn must not queue behind another session's speculative decode, nor behind a
speculation that speech has already made stale. So every job has a priority (`CONTROL` for the cheap
stream bookkeeping, `FINAL` for a decode whose text ends a turn, `SPECULATIVE` for a decode at a pause that
may still be overtaken by speech); the queue is a heap on (priority, arrival). A queued speculative job is
`promote`d to `FINAL` once its text is what the turn waits for (a stale one is skipped by the lane, see
`stt_lane.STTLane.speculate`). How long each job waited is handed to its `on_start(wait_s)`, so sessions
can report queueing delay.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

CONTROL, FINAL, SPECULATIVE = 0, 1, 2

# Like concurrent.futures' own pools: worker threads are not daemons (a daemon thread still inside a native
# decode when the interpreter finalises aborts the process), and at exit every pool is told to stop, its
# queued work runs, and its threads are joined.
_pools: weakref.WeakSet[DecodePool] = weakref.WeakSet()


def _stop_all() -> None:
    for pool in list(_pools):
        pool.shutdown(wait=True)


threading._register_atexit(_stop_all)  # type: ignore[attr-defined]  # runs before threads are joined


class Job:
    """One queued call: its future, priority and arrival time."""

    __slots__ = ("args", "fn", "future", "on_start", "priority", "queued_at", "taken")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], priority: int,
                 on_start: Callable[[float], None] | None) -> None:
        self.fn, self.args, self.priority, self.on_start = fn, args, priority, on_start
        self.future: Future[Any] = Future()
        self.queued_at = time.monotonic()
        self.taken = False  # a worker took it: its other heap entries (from a promote) are skipped


class DecodePool(Executor):
    """A priority thread pool. `submit()` queues at `CONTROL` priority (an ordinary executor call);
    `submit_job()` takes a priority and returns the `Job` for `promote`."""

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "stt") -> None:
        self.max_workers = max_workers or os.cpu_count() or 2
        self._prefix = thread_name_prefix
        self._heap: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shutdown = False
        _pools.add(self)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            return self.submit_job(lambda: fn(*args, **kwargs), priority=CONTROL).future
        return self.submit_job(fn, *args, priority=CONTROL).future

    def submit_job(self, fn: Callable[..., Any], *args: Any, priority: int,
                   on_start: Callable[[float], None] | None = None) -> Job:
        job = Job(fn, args, priority, on_start)
        with self._cv:
            if self._shutdown:
                raise RuntimeError("cannot schedule new decodes after shutdown")
            heapq.heappush(self._heap, (priority, next(self._seq), job))
            if self._idle:
                self._cv.notify()
            elif len(self._threads) < self.max_workers:
                t = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
        return job

    def promote(self, job: Job, priority: int = FINAL) -> None:
        """Move a queued job up to `priority` (nothing if it already runs or ran)."""
        with self._cv:
            if job.taken or job.priority <= priority:
                return
            job.priority = priority
            heapq.heappush(self._heap, (priority, next(self._seq), job))  # the old entry is skipped

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(1 for _, _, job in self._heap if not job.taken)

    def _next(self) -> Job | None:
        with self._cv:
            while True:
                while self._heap:
                    _, _, job = heapq.heappop(self._heap)
                    if not job.taken:
                        job.taken = True
                        return job
                if self._shutdown:
                    return None
                self._idle += 1
                self._cv.wait()
                self._idle -= 1

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.on_start is not None:
                try:
                    job.on_start(time.monotonic() - job.queued_at)
                except Exception:  # a report must never lose the decode
                    pass
            try:
                result = job.fn(*job.args)
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cv:
            self._shutdown = True
            if cancel_futures:
                for _, _, job in self._heap:
                    if not job.taken:
                        job.taken = True
                        job.future.cancel()
                self._heap.clear()
            self._cv.notify_all()
            threads = list(self._threads)
        if wait:
            for t in threads:
                t.join()
