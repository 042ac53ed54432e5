"""A real-time line for a session: audio in and out on one 20 ms clock, like a phone call.

Tests, benchmarks and the file client use it to talk to a session at real-time pace without a network:
each tick pushes 20 ms of caller audio and pulls 20 ms of agent audio. Ticks follow an absolute schedule,
so a slow tick does not shift the rest; how late each tick ran is kept for capacity measurements.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from .session import PipelineSession


class RealtimeLine:
    def __init__(self, session: PipelineSession) -> None:
        self.session = session
        self.in_frame = session.input_rate // 50
        self.out_frame = session.output_rate // 50
        self._out: list[np.ndarray] = []  # one frame of agent audio (or silence) per tick
        self.late_ms: list[float] = []
        self._t0: float | None = None
        self.ticks = 0

    @property
    def elapsed_s(self) -> float:
        return self.ticks * 0.02

    async def play(self, pcm: np.ndarray) -> None:
        """Speak `pcm` (int16 at the session's input rate) into the session in real time."""
        n = len(pcm) // self.in_frame
        pcm = np.pad(pcm, (0, max(0, (n + 1) * self.in_frame - len(pcm))))
        for i in range(n + (1 if len(pcm) > n * self.in_frame else 0)):
            await self._tick(pcm[i * self.in_frame:(i + 1) * self.in_frame])

    async def silence(self, seconds: float) -> None:
        frame = np.zeros(self.in_frame, np.int16)
        for _ in range(round(seconds * 50)):
            await self._tick(frame)

    async def until(self, predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
        """Feed silence until `predicate()` holds (True) or `timeout_s` of line time passes (False)."""
        frame = np.zeros(self.in_frame, np.int16)
        for _ in range(round(timeout_s * 50)):
            if predicate():
                return True
            await self._tick(frame)
        return bool(predicate())

    async def _tick(self, frame: np.ndarray) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()
        due = self._t0 + self.ticks * 0.02
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        self.late_ms.append(max(0.0, time.monotonic() - due) * 1000)
        self.ticks += 1
        self.session.push_audio(frame)
        out = self.session.pull_frame()
        self._out.append(np.frombuffer(out, np.int16) if out else np.zeros(self.out_frame, np.int16))

    def received(self) -> np.ndarray:
        """All agent audio the line carried, aligned with the ticks (silence where the agent was quiet)."""
        return np.concatenate(self._out) if self._out else np.zeros(0, np.int16)
