"""The session's books on agent replies: one `ReplyHandle` per reply, from the user turn it answers to
what the user heard of it.

A handle exists from the moment an answer is awaited (or a `say` is queued); it wraps the speaker's
`Reply` (sentences, frames played) once the agent's text arrives, and keeps what the speaker does not: the
agent's text as sent, the user turn it answers, whether and where barge-in cut it, and what the client
reports it played. `Replies` holds the live handles by turn id (compare livekit-agents' `SpeechHandle`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

from .speaker import Reply


@dataclass
class UserTurn:
    seq: int
    text: str
    end_wall: float
    typed: bool = False
    answer: ReplyHandle | None = None  # the reply to this turn (kept after it finished, for the join)
    endpoint_ms: int | None = None  # the silence that ended it (the turn detector's verdict)


@dataclass
class ReplyHandle:
    turn_id: int
    user: UserTurn | None = None  # the user turn it answers; None for a `say`
    audio: Reply | None = None  # the speaker's reply, from the agent's first text on
    parts: list[str] = field(default_factory=list)  # the agent's text as it arrived
    done: bool = False  # played out, cut or superseded: no longer live
    interrupted: bool = False
    heard: str | None = None  # what the user heard, once done
    cut: bool = False  # barge-in cut it
    cut_at: int | None = None  # ... where it had begun playing (session samples); None: never audible
    client_heard_s: float | None = None  # the client's own count of what it played (web)
    client_stopped: asyncio.Event | None = None  # set when that report arrives

    def add_text(self, delta: str) -> None:
        self.parts.append(delta)

    @property
    def text(self) -> str:
        """The agent's text so far, as sent (the speaker's sentences may be split and trimmed)."""
        return "".join(self.parts).strip()

    @property
    def started(self) -> bool:
        """Its first frame left the server."""
        return self.audio is not None and self.audio.started_at is not None

    @property
    def playing(self) -> bool:
        """Heard now: started, neither played out nor cut."""
        audio = self.audio
        return self.started and audio is not None and not audio.finished and not audio.cancelled

    def mark_cut(self) -> None:
        """Barge-in cut it: remember where its audio began, if the user heard any."""
        self.cut = True
        self.cut_at = self.audio.first_frame_pos if self.audio is not None and self.started else None

    def client_report(self, seconds: float) -> None:
        self.client_heard_s = seconds
        if self.client_stopped is not None:
            self.client_stopped.set()

    def heard_text(self, output_rate: int) -> str:
        """What the user heard: by the client's report when there is one, else by the frames sent."""
        if self.audio is None:
            return ""
        seconds, self.client_heard_s = self.client_heard_s, None  # a report counts once
        played = round(seconds * output_rate) if seconds is not None else None
        return self.audio.heard_text(played)

    def finish(self, *, interrupted: bool, heard: str) -> None:
        self.done = True
        self.interrupted = interrupted
        self.heard = heard


class Replies:
    """The live handles by turn id: answers awaited or playing (user turn seq) and `say`s (negative ids)."""

    def __init__(self) -> None:
        self._live: dict[int, ReplyHandle] = {}

    def answer(self, user: UserTurn) -> ReplyHandle:
        """The agent owes `user` an answer."""
        handle = ReplyHandle(user.seq, user=user)
        user.answer = handle
        self._live[user.seq] = handle
        return handle

    def say(self, turn_id: int, audio: Reply, text: str) -> ReplyHandle:
        handle = ReplyHandle(turn_id, audio=audio, parts=[text])
        self._live[turn_id] = handle
        return handle

    def get(self, turn_id: int) -> ReplyHandle | None:
        return self._live.get(turn_id)

    def audio(self, turn_id: int) -> Reply | None:
        """The speaker's reply for a live turn, if its text has begun."""
        handle = self._live.get(turn_id)
        return handle.audio if handle is not None else None

    def close(self, turn_id: int) -> ReplyHandle | None:
        """Take a handle out of the live set (it finished or was superseded)."""
        return self._live.pop(turn_id, None)

    def answering(self) -> list[ReplyHandle]:
        """Live answers to user turns, in the order the turns came."""
        return [h for h in self._live.values() if h.user is not None]

    def __iter__(self) -> Iterator[ReplyHandle]:
        return iter(list(self._live.values()))

    def __contains__(self, turn_id: int) -> bool:
        return turn_id in self._live
