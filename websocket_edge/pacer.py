"""The outgoing side of one client WebSocket: agent audio paced at real time, and a bounded send queue.

`Outbox` sends everything for one socket (JSON events and PCM frames) from one task, in order, so a client
that stops reading stalls only that task; the audio it leaves queued is measured and, past a bound, the
connection is declared a slow consumer. `Pacer` pulls the session's 20 ms frames on a 20 ms clock and keeps
the client at most `ahead_s` of audio ahead of real time: enough to ride out network jitter, little enough
that a barge-in `clear` throws away at most that much unheard audio.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

FRAME_S = 0.02


class Outbox:
    """One sender per socket. `on_overflow` is called (once) when queued audio exceeds `max_backlog_bytes`."""

    def __init__(self, ws: web.WebSocketResponse, *, max_backlog_bytes: int,
                 on_overflow: Callable[[], None]) -> None:
        self._ws = ws
        self._queue: collections.deque[tuple[bool, bytes | str]] = collections.deque()
        self._audio_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.max_backlog_bytes = max_backlog_bytes
        self._on_overflow = on_overflow
        self.overflowed = False
        self.closed = False
        self.audio_bytes_sent = 0
        self.dropped_audio_bytes = 0  # dropped by `clear` before they were sent
        self.first_audio_sent_at: float | None = None

    @property
    def backlog_bytes(self) -> int:
        return self._audio_bytes

    def event(self, data: dict[str, Any]) -> None:
        if self.closed:
            return
        if data.get("type") == "clear":
            self.drop_audio()  # stale now: the client is told to drop what it has, we drop what we have
        self._put(False, json.dumps(data, separators=(",", ":"), ensure_ascii=False))

    def audio(self, pcm: bytes) -> None:
        if self.closed or self.overflowed:
            return
        self._audio_bytes += len(pcm)
        self._put(True, pcm)
        if self._audio_bytes > self.max_backlog_bytes:
            self.overflowed = True
            self._on_overflow()

    def drop_audio(self) -> None:
        kept = [item for item in self._queue if not item[0]]
        self.dropped_audio_bytes += self._audio_bytes
        self._queue.clear()
        self._queue.extend(kept)
        self._audio_bytes = 0

    def _put(self, binary: bool, payload: bytes | str) -> None:
        self._queue.append((binary, payload))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self.closed:
                if not self._queue:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                binary, payload = self._queue.popleft()
                if binary:
                    self._audio_bytes -= len(payload)
                    if self.first_audio_sent_at is None:
                        self.first_audio_sent_at = time.monotonic()
                    await self._ws.send_bytes(payload)  # type: ignore[arg-type]
                    self.audio_bytes_sent += len(payload)
                else:
                    await self._ws.send_str(payload)  # type: ignore[arg-type]
        except (ConnectionError, RuntimeError):
            pass  # the socket closed under us; the connection's reader sees it too
        finally:
            self.closed = True
            self._idle.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued has been handed to the socket (False on timeout)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        return False

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self._audio_bytes = 0
        self._wake.set()


class Pacer:
    """Pulls 20 ms frames from `pull` on an absolute 20 ms schedule and keeps the client ≤ `ahead_s` ahead."""

    def __init__(self, pull: Callable[[], bytes | None], outbox: Outbox, *, ahead_s: float = 0.1) -> None:
        self._pull = pull
        self._outbox = outbox
        self.ahead_s = ahead_s
        self._covered = 0.0  # monotonic time up to which the client has audio to play
        self.frames_sent = 0
        self.ticks = 0
        self.late_ms: collections.deque[float] = collections.deque(maxlen=30000)  # tick lateness

    def reset(self) -> None:
        """The client dropped its buffer (`clear`): it is no longer ahead."""
        self._covered = 0.0

    async def run(self) -> None:
        t0 = time.monotonic()
        tick = 0
        while True:
            now = time.monotonic()
            self._covered = max(self._covered, now)
            # Small epsilon so that `ahead_s` of exactly N frames gives N frames, not N+1 or N-1.
            while self._covered < now + self.ahead_s - 1e-6:
                frame = self._pull()
                if frame is None:
                    break
                self._outbox.audio(frame)
                self._covered += FRAME_S
                self.frames_sent += 1
            tick += 1
            self.ticks += 1
            due = t0 + tick * FRAME_S
            delay = due - time.monotonic()
            if delay < -0.5:  # stalled (loop blocked, machine suspended): rebase rather than burst
                t0, tick = time.monotonic(), 0
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))
            self.late_ms.append(max(0.0, time.monotonic() - due) * 1000)
