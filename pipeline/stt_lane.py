"""A session's STT lane: every call on its STT stream runs in submission order in the shared executor.

`SerialLane` is the ordering alone (any callables, one after the other, each on an executor thread), so the
frame loop can hand off work without waiting and a decode never sees audio accepted after it was asked
for. `STTLane` adds the stream's bookkeeping: 100 ms batches of audio, pause frames held back until speech
resumes, and partials tagged with the utterance they belong to, so a late one is never shown for the next.

Partials of an engine that does not stream (Whisper) are whole decodes of the audio so far, so they are
optional work, shed first: one is tried about every `partial_interval_s` of new speech and runs only when
the process's STT has nothing better to do (`DecodeGate`: no final decode queued or running in any lane
on the executor, no other partial decoding). It runs outside the lane's order, on the gate's own thread,
so a final never queues behind it; a shed partial is counted (`partials_shed`, `on_shed`).

On a `DecodePool` executor the lane's calls carry priorities: bookkeeping (accept, reset) first, then the
decode that ends a turn (`final`), then a decode at a pause (`speculate`), which is skipped when speech
resumed before it started (stale) and promoted once the turn waits for its text (`promote_speculation`).
Each decode's wait in the pool's queue goes to `on_queue_wait(kind, seconds)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np

from .decode_pool import CONTROL, FINAL, SPECULATIVE, DecodePool, Job
from .stt.base import STTStream, Transcript

STT_BATCH_FRAMES = 5  # hand the STT 100 ms at a time: fewer executor hops
SAMPLE_RATE = 16000


class DecodeGate:
    """The decodes on one STT executor, across every session using it, so optional partial decodes yield
    to finals: a partial starts only when no final is queued or running and no other partial decodes.
    Partials run on the gate's own single thread, never on one of the executor's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # sessions on several loops may share an executor
        self.finals = 0  # final decodes queued or running
        self.partials = 0  # partial decodes running (at most one)
        self.partial_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stt-partial")

    def final_queued(self) -> None:
        with self._lock:
            self.finals += 1

    def final_done(self) -> None:
        with self._lock:
            self.finals -= 1

    def try_partial(self) -> bool:
        """Take the partial slot when the STT is idle; False: shed this partial."""
        with self._lock:
            if self.finals or self.partials:
                return False
            self.partials += 1
            return True

    def partial_done(self) -> None:
        with self._lock:
            self.partials -= 1


_gates: weakref.WeakKeyDictionary[Executor, DecodeGate] = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def decode_gate(executor: Executor) -> DecodeGate:
    """The executor's gate (one per executor, made on first use)."""
    with _gates_lock:
        gate = _gates.get(executor)
        if gate is None:
            gate = _gates[executor] = DecodeGate()
        return gate


class SerialLane:
    """Runs callables one after the other in `executor`; call `run()` on the loop it was made on."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._tail: asyncio.Future[Any] | None = None

    def run(self, fn: Callable[..., Any], *args: Any, priority: int = CONTROL,
            on_job: Callable[[Job], None] | None = None,
            on_start: Callable[[float], None] | None = None) -> asyncio.Future[Any]:
        """Queue `fn(*args)` after every call queued before it; its future holds its result or error.
        A failed call does not stop the ones after it. On a `DecodePool` it enters the pool's queue at
        `priority` (once its turn in the lane comes), `on_job(job)` gets the pool's job, `on_start(wait_s)`
        its wait in that queue (on a pool thread)."""
        prev = self._tail
        loop, executor = self._loop, self._executor

        async def run() -> Any:
            if prev is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(prev)
            # Executor threads do not inherit the context: carry it, so STT lines keep the session's ids.
            call = contextvars.copy_context().run
            if isinstance(executor, DecodePool):
                job = executor.submit_job(call, fn, *args, priority=priority, on_start=on_start)
                if on_job is not None:
                    on_job(job)
                return await asyncio.wrap_future(job.future)
            return await loop.run_in_executor(executor, call, fn, *args)

        fut = asyncio.ensure_future(run())
        self._tail = fut
        return fut


class STTLane(SerialLane):
    """One session's STT stream behind a `SerialLane`. `on_partial(text)` gets each new partial of the
    current utterance, on the loop: from a streaming engine after every batch, from one that does not
    stream (and whose stream has `partial_decode`, Whisper's) about every `partial_interval_s` of new
    audio when the gate lets it (None: no partials). `on_shed()` is called for each partial shed."""

    def __init__(self, executor: Executor, stream: STTStream, *, streaming: bool,
                 on_partial: Callable[[str], None], partial_interval_s: float | None = None,
                 on_shed: Callable[[], None] | None = None,
                 on_queue_wait: Callable[[str, float], None] | None = None) -> None:
        super().__init__(executor)
        self.stream = stream
        self.streaming = streaming
        self._on_partial_text = on_partial
        self._batch: list[np.ndarray] = []
        self._held: list[np.ndarray] = []  # pause frames not yet given to the STT
        self.last_partial = ""
        self.utterances = 0  # utterances started (tags partials with the utterance they belong to)
        decode = getattr(stream, "partial_decode", None)
        self._partial_decode: Callable[[], str | None] | None = (
            decode if partial_interval_s and not streaming and callable(decode) else None)
        self._partial_every = int((partial_interval_s or 0) * SAMPLE_RATE)
        self._since_partial = 0  # samples fed since the last partial was tried
        self._partial_running = False
        self._finals = 0  # this lane's finals queued or running
        self._finals_asked = 0  # finals asked for so far: a partial begun before one is stale
        self._on_shed = on_shed
        self.gate = decode_gate(executor)
        self.partials_tried = 0
        self.partials_shed = 0
        self._on_queue_wait = on_queue_wait
        self._resumed = 0  # times speech resumed (or the stream reset): a speculation asked before is stale
        self._speculation: Job | None = None  # the pool's job of the latest speculation, once queued
        self._promote_next = False  # promote the latest speculation as soon as it reaches the pool
        self.speculations_stale = 0

    def new_utterance(self) -> None:
        self.utterances += 1
        self._since_partial = 0

    def feed(self, frame: np.ndarray) -> None:
        self._batch.append(frame)
        if len(self._batch) >= STT_BATCH_FRAMES:
            self.flush()

    def hold(self, frame: np.ndarray) -> None:
        """A pause frame: it reaches the STT only if speech resumes (or the turn is cut short)."""
        self._held.append(frame)

    def release_held(self) -> None:
        self._resumed += 1
        for f in self._held:
            self.feed(f)
        self._held.clear()

    def flush(self) -> None:
        if not self._batch:
            return
        audio = np.concatenate(self._batch)
        self._batch = []
        accepted = self.run(self.stream.accept, audio)
        if self.streaming:
            utterance = self.utterances
            self.run(self.stream.partial).add_done_callback(lambda f: self._on_partial(f, utterance))
        elif self._partial_decode is not None:
            self._since_partial += len(audio)
            if self._since_partial >= self._partial_every:
                self._since_partial = 0
                self._try_partial(accepted)

    def _try_partial(self, accepted: asyncio.Future[Any]) -> None:
        """A decode of the audio so far, once `accepted` (its last batch) is in, unless anything else
        wants the STT: then it is shed. It runs beside the lane (the stream's `partial_decode` is safe
        beside the lane's calls), so a final asked for meanwhile does not wait for it."""
        self.partials_tried += 1
        if self._partial_running or self._finals or not self.gate.try_partial():
            self._shed()
            return
        self._partial_running = True
        utterance, asked, decode, gate = self.utterances, self._finals_asked, self._partial_decode, self.gate
        assert decode is not None

        async def run() -> str | None:
            try:
                with contextlib.suppress(Exception):
                    await asyncio.shield(accepted)
                if asked != self._finals_asked or self._finals:  # a final came while it waited
                    self._shed()
                    return None
                return await self._loop.run_in_executor(gate.partial_executor, contextvars.copy_context().run,
                                                        decode)
            finally:
                gate.partial_done()
                self._partial_running = False

        def done(fut: asyncio.Future[str | None]) -> None:
            # Finished after a final was asked for: the final's text (and the turn) may be out already,
            # and a partial must never follow it.
            if asked == self._finals_asked:
                self._on_partial(fut, utterance)

        asyncio.ensure_future(run()).add_done_callback(done)

    def _shed(self) -> None:
        self.partials_shed += 1
        if self._on_shed is not None:
            self._on_shed()

    def _on_partial(self, fut: asyncio.Future[str | None], utterance: int) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        text = fut.result()
        # The lane runs in order, so a partial of this utterance lands before its final even when a busy
        # machine finishes it after the endpoint; only a partial of an earlier utterance is stale.
        if text and text != self.last_partial and utterance == self.utterances:
            self.last_partial = text
            self._on_partial_text(text)

    def final(self) -> asyncio.Future[Transcript]:
        """The utterance's text: the decode that ends a turn (answered from the stream's cache when a
        speculation already decoded the same audio)."""
        return self._decode(self.stream.final, FINAL, "final")

    def speculate(self) -> asyncio.Future[Transcript | None]:
        """A decode of the audio so far at a pause, before the turn is known to be over: skipped (None)
        when speech resumed before it started."""
        self._promote_next = False
        self._speculation = None
        asked = self._resumed

        def decode() -> Transcript | None:
            if asked != self._resumed:
                self.speculations_stale += 1
                return None
            return self.stream.final()

        def queued(job: Job) -> None:
            self._speculation = job
            if self._promote_next:
                self.promote_speculation()

        return self._decode(decode, SPECULATIVE, "speculative", on_job=queued)

    def promote_speculation(self) -> None:
        """The turn now waits for the latest speculation's text: let it run ahead of other speculations."""
        job = self._speculation
        if job is None:
            self._promote_next = True
        elif isinstance(self._executor, DecodePool):
            self._executor.promote(job, FINAL)

    def _decode(self, fn: Callable[[], Any], priority: int, kind: str,
                on_job: Callable[[Job], None] | None = None) -> asyncio.Future[Any]:
        self.flush()
        self._finals += 1
        self._finals_asked += 1
        self.gate.final_queued()
        report = self._on_queue_wait
        loop = self._loop
        on_start = None if report is None else (
            lambda wait_s: loop.call_soon_threadsafe(report, kind, wait_s))
        fut = self.run(fn, priority=priority, on_job=on_job, on_start=on_start)
        fut.add_done_callback(self._final_done)
        return fut

    def _final_done(self, _fut: asyncio.Future[Any]) -> None:
        self._finals -= 1
        self.gate.final_done()

    def latest(self) -> asyncio.Future[Any]:
        """The words so far: the final text of a non-streaming engine, a streaming one's latest partial."""
        return self.run(self._latest_partial) if self.streaming else self.final()

    def _latest_partial(self) -> str:
        # A streaming engine's partial() is None when nothing changed: the words are still the last ones.
        return self.stream.partial() or self.last_partial

    def reset(self) -> None:
        self._resumed += 1
        self._batch.clear()
        self._held.clear()
        self.last_partial = ""
        self._since_partial = 0
        self.run(self.stream.reset)

    def close(self) -> None:
        self.run(self.stream.close)  # a pooled recognizer goes back now, after any decode in flight
