"""A session's STT lane: every call on its STT stream runs in submission order in the shared executor.

`SerialLane` is the ordering alone (any callables, one after the other, each on an executor thread), so the
frame loop can hand off work without waiting and a decode never sees audio accepted after it was asked
for. `STTLane` adds the stream's bookkeeping: 100 ms batches of audio, pause frames held back until speech
resumes, and partials tagged with the utterance they belong to, so a late one is never shown for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from .stt.base import STTStream, Transcript

STT_BATCH_FRAMES = 5  # hand the STT 100 ms at a time: fewer executor hops


class SerialLane:
    """Runs callables one after the other in `executor`; call `run()` on the loop it was made on."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._tail: asyncio.Future[Any] | None = None

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue `fn(*args)` after every call queued before it; its future holds its result or error.
        A failed call does not stop the ones after it."""
        prev = self._tail
        loop, executor = self._loop, self._executor

        async def run() -> Any:
            if prev is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(prev)
            # Executor threads do not inherit the context: carry it, so STT lines keep the session's ids.
            return await loop.run_in_executor(executor, contextvars.copy_context().run, fn, *args)

        fut = asyncio.ensure_future(run())
        self._tail = fut
        return fut


class STTLane(SerialLane):
    """One session's STT stream behind a `SerialLane`. `on_partial(text)` gets each new partial of the
    current utterance (streaming engines only), on the loop."""

    def __init__(self, executor: Executor, stream: STTStream, *, streaming: bool,
                 on_partial: Callable[[str], None]) -> None:
        super().__init__(executor)
        self.stream = stream
        self.streaming = streaming
        self._on_partial_text = on_partial
        self._batch: list[np.ndarray] = []
        self._held: list[np.ndarray] = []  # pause frames not yet given to the STT
        self.last_partial = ""
        self.utterances = 0  # utterances started (tags partials with the utterance they belong to)

    def new_utterance(self) -> None:
        self.utterances += 1

    def feed(self, frame: np.ndarray) -> None:
        self._batch.append(frame)
        if len(self._batch) >= STT_BATCH_FRAMES:
            self.flush()

    def hold(self, frame: np.ndarray) -> None:
        """A pause frame: it reaches the STT only if speech resumes (or the turn is cut short)."""
        self._held.append(frame)

    def release_held(self) -> None:
        for f in self._held:
            self.feed(f)
        self._held.clear()

    def flush(self) -> None:
        if not self._batch:
            return
        audio = np.concatenate(self._batch)
        self._batch = []
        self.run(self.stream.accept, audio)
        if self.streaming:
            utterance = self.utterances
            self.run(self.stream.partial).add_done_callback(lambda f: self._on_partial(f, utterance))

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
        self.flush()
        return self.run(self.stream.final)

    def latest(self) -> asyncio.Future[Any]:
        """The words so far: the final text of a non-streaming engine, a streaming one's latest partial."""
        return self.run(self._latest_partial) if self.streaming else self.final()

    def _latest_partial(self) -> str:
        # A streaming engine's partial() is None when nothing changed: the words are still the last ones.
        return self.stream.partial() or self.last_partial

    def reset(self) -> None:
        self._batch.clear()
        self._held.clear()
        self.last_partial = ""
        self.run(self.stream.reset)

    def close(self) -> None:
        self.run(self.stream.close)  # a pooled recognizer goes back now, after any decode in flight
