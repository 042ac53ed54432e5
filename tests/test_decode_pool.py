"""The STT decode pool: priority order, promotion, bounded threads, and the lane's stale speculations.

Plain callables that block on events stand in for decodes here, because the order work starts in is the
point and a real decode cannot be held at will; tests/test_turn_taking.py runs the real engine.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from speechpipe.pipeline.decode_pool import CONTROL, FINAL, SPECULATIVE, DecodePool
from speechpipe.pipeline.stt.base import Transcript
from speechpipe.pipeline.stt_lane import STTLane


def blocked_pool(workers: int = 1) -> tuple[DecodePool, threading.Event, list[str]]:
    """A pool whose every thread is held by a job until the returned event is set."""
    pool, gate, order = DecodePool(max_workers=workers), threading.Event(), []
    started = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit_job(lambda: (started.wait(), gate.wait()), priority=CONTROL)
    started.wait()
    return pool, gate, order


def test_finals_run_before_speculations_queued_earlier() -> None:
    pool, gate, order = blocked_pool()
    jobs = [pool.submit_job(order.append, f"spec{i}", priority=SPECULATIVE) for i in range(3)]
    jobs.append(pool.submit_job(order.append, "final", priority=FINAL))
    jobs.append(pool.submit_job(order.append, "accept", priority=CONTROL))
    gate.set()
    for job in jobs:
        job.future.result(5)
    assert order == ["accept", "final", "spec0", "spec1", "spec2"]
    pool.shutdown()


def test_a_promoted_speculation_overtakes_the_others_once() -> None:
    pool, gate, order = blocked_pool()
    jobs = [pool.submit_job(order.append, f"spec{i}", priority=SPECULATIVE) for i in range(3)]
    pool.promote(jobs[2])
    pool.promote(jobs[2])  # twice: still runs once
    gate.set()
    for job in jobs:
        job.future.result(5)
    assert order == ["spec2", "spec0", "spec1"]
    pool.shutdown()


def test_threads_are_bounded_and_waits_reported() -> None:
    pool, gate, _ = blocked_pool(workers=2)
    waits: list[float] = []
    job = pool.submit_job(threading.get_ident, priority=FINAL, on_start=waits.append)
    assert pool.queued == 1 and len(pool._threads) == 2  # no third thread for it: it waits
    gate.set()
    job.future.result(5)
    assert len(waits) == 1 and waits[0] >= 0
    pool.shutdown()


class _Stream:
    """An STT stream that records its calls; final() blocks until released."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()

    def accept(self, pcm: np.ndarray) -> None:
        self.calls.append(f"accept{len(pcm)}")

    def final(self) -> Transcript:
        self.calls.append("final")
        self.release.wait(5)
        return Transcript("words", 0.0, 0.0)

    def reset(self) -> None:
        self.calls.append("reset")

    def close(self) -> None:
        pass


async def test_a_speculation_overtaken_by_speech_is_skipped() -> None:
    pool, gate, _ = blocked_pool()  # the pool is busy: the speculation stays queued
    stream = _Stream()
    lane = STTLane(pool, stream, streaming=False, on_partial=lambda text: None)
    kinds: list[str] = []
    lane._on_queue_wait = lambda kind, s: kinds.append(kind)
    lane.feed(np.zeros(320, np.int16))
    speculation = lane.speculate()
    lane.hold(np.zeros(320, np.int16))
    lane.release_held()  # speech resumed before the speculation started
    stream.release.set()
    gate.set()
    assert await asyncio.wait_for(speculation, 5) is None
    final = await asyncio.wait_for(lane.final(), 5)
    assert final.text == "words" and stream.calls.count("final") == 1 and lane.speculations_stale == 1
    await asyncio.sleep(0.01)
    assert kinds == ["speculative", "final"]
    pool.shutdown()
