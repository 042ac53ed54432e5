"""Agent speech out: text (whole or streamed) → sentences → TTS → 20 ms frames the transport pulls.

The transport pulls frames at its own clock (`pull()`, safe from a foreign thread: it only pops and
appends to deques); the session's loop later reads what was pulled (`take_played()`) to keep the books:
when each reply started and finished leaving the server, and which words the user actually heard.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .audio import FrameChunker, Resampler
from .config import TTSConfig
from .text import SETTLE_S, SentenceSplitter
from .tts import TTSEngine

log = logging.getLogger(__name__)


@dataclass
class Sentence:
    text: str
    samples: int = 0  # synthesised so far (at the output rate)
    played: int = 0
    synthesized: bool = False


@dataclass
class Reply:
    """One agent turn's audio: everything the agent says in answer to one user turn (or one `say`).
    The session's books on it (text as sent, the turn it answers, cuts) wrap it: `reply.ReplyHandle`."""

    turn_id: int
    interruptible: bool = True
    sentences: list[Sentence] = field(default_factory=list)
    text_done: bool = False  # the agent sent all of its text
    synth_done: bool = False  # ... and all of it became audio
    cancelled: bool = False
    started_at: float | None = None  # wall clock of the first frame pulled
    first_frame_pos: int | None = None  # recording position (samples) of the first frame
    last_frame_pos: int | None = None
    finished: bool = False  # every frame was played (or the reply was cut)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences).strip()

    def heard_text(self, played_samples: int | None = None) -> str:
        """Fully played sentences, plus the played share of the current one cut at a word boundary.

        `played_samples` overrides what left the server with what the client says it played.
        """
        words: list[str] = []
        budget = played_samples if played_samples is not None else sum(s.played for s in self.sentences)
        for s in self.sentences:
            played = min(s.played if played_samples is None else s.samples, budget)
            budget -= played
            if s.synthesized and s.samples and played >= s.samples:
                words.append(s.text)
                continue
            if played and s.samples:
                share = played / max(s.samples, 1)
                cut = int(len(s.text) * share)
                part = s.text[:cut]
                if cut < len(s.text) and not s.text[cut:cut + 1].isspace():
                    part = part.rsplit(" ", 1)[0] if " " in part else ""
                if part.strip():
                    words.append(part.strip())
            break
        return " ".join(words).strip()

    @property
    def played_all(self) -> bool:
        return self.synth_done and all(s.played >= s.samples for s in self.sentences)


@dataclass
class Played:
    pcm: bytes
    reply: Reply
    sentence: Sentence
    wall: float
    last: bool  # last queued frame of its reply at the time it was pulled


class Speaker:
    def __init__(self, tts: TTSEngine, config: TTSConfig, output_rate: int,
                 max_buffered_s: float = 2.0) -> None:
        self._tts = tts
        self.config = config
        self.output_rate = output_rate
        self.frame_samples = output_rate // 50
        self._frames: collections.deque[tuple[bytes, Reply, Sentence]] = collections.deque()
        self._played: collections.deque[Played] = collections.deque()
        self._max_buffered = int(max_buffered_s * 50)
        self._space = asyncio.Event()
        self._space.set()
        self.paused = False
        self.replies: list[Reply] = []  # queued or playing, in order
        self._work: asyncio.Queue[tuple[Reply, str | None]] = asyncio.Queue()
        self._splitters: dict[int, SentenceSplitter] = {}
        self._settle_timers: dict[int, asyncio.TimerHandle] = {}
        self._task = asyncio.get_running_loop().create_task(self._synthesis_loop(), name="speaker")
        self.synth_first_chunk_ms: list[float] = []
        # Per synthesized sentence: first_audio_ms (synthesis start → first chunk), compute_ms (synthesis
        # time, waits for buffer space excluded) and audio_s; the session emits it as a `tts` metric.
        self.on_metric: Callable[[dict[str, float]], None] | None = None
        self.on_error: Callable[[str], None] | None = None  # a sentence the TTS engine failed on
        self._waited_s = 0.0  # time synthesis spent blocked on a full buffer

    # ---- text in (session loop) -------------------------------------------------------------------
    def begin(self, turn_id: int, interruptible: bool = True) -> Reply:
        reply = Reply(turn_id=turn_id, interruptible=interruptible)
        self.replies.append(reply)
        self._splitters[id(reply)] = SentenceSplitter()
        return reply

    def push_text(self, reply: Reply, delta: str) -> None:
        if reply.cancelled or reply.text_done:
            return
        splitter = self._splitters[id(reply)]
        for sentence in splitter.push(delta):
            self._work.put_nowait((reply, sentence))
        timer = self._settle_timers.pop(id(reply), None)
        if timer is not None:
            timer.cancel()
        if splitter.waiting:  # a sentence may have just ended: speak it if the agent pauses here
            self._settle_timers[id(reply)] = asyncio.get_running_loop().call_later(
                SETTLE_S, self._settle, reply)

    def _settle(self, reply: Reply) -> None:
        self._settle_timers.pop(id(reply), None)
        splitter = self._splitters.get(id(reply))
        if splitter is None or reply.cancelled or reply.text_done:
            return
        sentence = splitter.settle()
        if sentence is not None:
            self._work.put_nowait((reply, sentence))

    def end_text(self, reply: Reply) -> None:
        if reply.text_done:
            return
        timer = self._settle_timers.pop(id(reply), None)
        if timer is not None:
            timer.cancel()
        rest = self._splitters.pop(id(reply)).flush()
        if rest and not reply.cancelled:
            self._work.put_nowait((reply, rest))
        reply.text_done = True
        self._work.put_nowait((reply, None))  # marks the end of this reply's synthesis

    def say(self, text: str, turn_id: int, interruptible: bool = True) -> Reply:
        reply = self.begin(turn_id, interruptible)
        self.push_text(reply, text)
        self.end_text(reply)
        return reply

    # ---- synthesis ----------------------------------------------------------------------------------
    async def _synthesis_loop(self) -> None:
        while True:
            reply, text = await self._work.get()
            if reply.cancelled:
                continue
            if text is None:
                reply.synth_done = True
                if not reply.sentences:
                    reply.finished = True  # nothing to say
                continue
            try:
                await self._synthesize(reply, text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("TTS failed for %r; the sentence is skipped", text[:80])
                if self.on_error is not None:
                    self.on_error(f"{type(exc).__name__}: {exc}")

    async def _synthesize(self, reply: Reply, text: str) -> None:
        sentence = Sentence(text=text)
        reply.sentences.append(sentence)
        resampler = Resampler(self._tts.sample_rate, self.output_rate)
        chunker = FrameChunker(self.output_rate)
        t0, waited0 = time.monotonic(), self._waited_s
        first, first_ms = True, 0.0
        stream = self._tts.stream(text, voice=self.config.voice, rate_wpm=self.config.rate_wpm,
                                  pitch=self.config.pitch)
        async with contextlib.aclosing(stream):  # a cut reply kills espeak-ng now, not at GC
            async for chunk in stream:
                if reply.cancelled:
                    return
                if first:
                    first_ms = (time.monotonic() - t0) * 1000
                    self.synth_first_chunk_ms.append(first_ms)
                    first = False
                for frame in chunker.push(resampler.process(chunk)):
                    await self._enqueue(reply, sentence, frame)
                    if reply.cancelled:
                        return
        for frame in chunker.push(resampler.flush()):
            await self._enqueue(reply, sentence, frame)
        rest = chunker.flush()  # zero-padded to a whole frame
        if rest is not None:
            await self._enqueue(reply, sentence, rest)
        sentence.synthesized = True
        if self.on_metric is not None and not first:
            compute_s = time.monotonic() - t0 - (self._waited_s - waited0)
            self.on_metric({"first_audio_ms": first_ms, "compute_ms": compute_s * 1000,
                            "audio_s": sentence.samples / self.output_rate})

    async def _enqueue(self, reply: Reply, sentence: Sentence, frame: np.ndarray) -> None:
        while len(self._frames) >= self._max_buffered and not reply.cancelled:
            self._space.clear()
            t = time.monotonic()
            await self._space.wait()
            self._waited_s += time.monotonic() - t
        if reply.cancelled:
            return
        sentence.samples += len(frame)
        self._frames.append((frame.astype(np.int16, copy=False).tobytes(), reply, sentence))

    # ---- frames out (transport clock, any thread) ---------------------------------------------------
    def pull(self) -> bytes | None:
        """One 20 ms frame at the output rate, or None when the agent is silent (or paused)."""
        if self.paused:
            return None
        try:
            pcm, reply, sentence = self._frames.popleft()
        except IndexError:
            return None
        last = not self._frames or self._frames[0][1] is not reply
        self._played.append(Played(pcm, reply, sentence, time.monotonic(), last))
        return pcm

    @property
    def buffered_frames(self) -> int:
        return len(self._frames)

    # ---- bookkeeping (session loop) -----------------------------------------------------------------
    def take_played(self) -> list[Played]:
        out = []
        while self._played:
            p = self._played.popleft()
            p.sentence.played += len(p.pcm) // 2
            out.append(p)
        if len(self._frames) < self._max_buffered:
            self._space.set()
        return out

    @property
    def active(self) -> Reply | None:
        """The reply the user is hearing or is about to hear."""
        for r in self.replies:
            if not r.finished and not r.cancelled:
                return r
        return None

    def cancel(self, reply: Reply) -> None:
        """Stop a reply now: its queued frames are dropped, its synthesis stops."""
        reply.cancelled = True
        kept = collections.deque(f for f in self._frames if f[1] is not reply)
        self._frames.clear()
        self._frames.extend(kept)
        self._space.set()

    def cancel_all(self) -> list[Reply]:
        cut = [r for r in self.replies if not r.finished and not r.cancelled]
        for r in cut:
            r.cancelled = True
        self._frames.clear()
        self._space.set()
        return cut

    def forget(self, reply: Reply) -> None:
        if reply in self.replies:
            self.replies.remove(reply)

    async def close(self) -> None:
        self.cancel_all()
        for timer in self._settle_timers.values():
            timer.cancel()
        self._settle_timers.clear()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
