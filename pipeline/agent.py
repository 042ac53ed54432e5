"""The pipeline's side of the text-only agent channel.

A session talks to its agent through an `AgentLink`: JSON-able dicts both ways, in the shapes of
`speechpipe.protocol` (docs/architecture.md § Agent channel; the WebSocket bridge carries exactly these).
`CallbackAgent` is an in-process agent for the built-in demo and the pipeline benchmark: a plain function
from user text to reply text.
"""

from __future__ import annotations

import asyncio
import inspect
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# The message names are the agent channel's wire vocabulary, defined once in its protocol module.
from speechpipe.protocol import (
    AGENT_ERROR,
    AGENT_SPEECH_DONE,
    CALL_ENDED,
    CALL_STARTED,
    DISPATCH,
    DTMF,
    END_CALL,
    ERROR,
    INTERRUPT,
    METRIC,
    RECORDING_PAUSE,
    RECORDING_RESUME,
    SAY,
    SILENCE,
    TEXT_DELTA,
    TEXT_END,
    TRANSFER,
    USER_INTERRUPTED,
    USER_PARTIAL,
    USER_TEXT,
)

Message = dict[str, Any]

__all__ = [
    "AGENT_ERROR",
    "AGENT_SPEECH_DONE",
    "CALL_ENDED",
    "CALL_STARTED",
    "DISPATCH",
    "DTMF",
    "END_CALL",
    "ERROR",
    "INTERRUPT",
    "METRIC",
    "RECORDING_PAUSE",
    "RECORDING_RESUME",
    "SAY",
    "SILENCE",
    "TEXT_DELTA",
    "TEXT_END",
    "TRANSFER",
    "USER_INTERRUPTED",
    "USER_PARTIAL",
    "USER_TEXT",
    "AgentGone",
    "AgentLink",
    "CallbackAgent",
    "Message",
    "echo_reply",
]


class AgentGone(Exception):
    """The agent disappeared (crashed, disconnected for good, or never came)."""


class AgentUnavailable(Exception):
    """No agent takes the session; `reason` becomes its end reason (`no_runner`, `at_capacity`, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AgentLink(ABC):
    @abstractmethod
    async def send(self, message: Message) -> None:
        """Deliver one platform event to the agent. Raises AgentGone if it cannot be delivered."""

    @abstractmethod
    async def recv(self) -> Message:
        """The agent's next message. Raises AgentGone when the agent is gone for good."""

    async def close(self, reason: str) -> None:  # noqa: B027 - optional hook
        """The session is over; release the channel."""


Reply = str | AsyncIterator[str] | None
ReplyFn = Callable[[str], Reply | Awaitable[Reply]]


class CallbackAgent(AgentLink):
    """An agent living in the platform process: `reply(user_text)` returns text or streams deltas."""

    def __init__(self, reply: ReplyFn, greeting: str | None = None) -> None:
        self._reply = reply
        self._greeting = greeting
        self._out: asyncio.Queue[Message] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._closed = False

    async def send(self, message: Message) -> None:
        if self._closed:
            raise AgentGone("agent closed")
        kind = message.get("type")
        if kind == CALL_STARTED and self._greeting:
            await self._out.put({"type": SAY, "text": self._greeting})
        elif kind == USER_TEXT:
            turn_id = int(message["turn_id"])
            self._tasks[turn_id] = asyncio.get_running_loop().create_task(
                self._answer(turn_id, message["text"]))
        elif kind == USER_INTERRUPTED:
            task = self._tasks.pop(int(message.get("turn_id", -1)), None)
            if task:
                task.cancel()

    async def _answer(self, turn_id: int, text: str) -> None:
        result = self._reply(text)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str):
            await self._out.put({"type": TEXT_DELTA, "turn_id": turn_id, "text": result})
        elif result is not None:
            async for delta in result:
                await self._out.put({"type": TEXT_DELTA, "turn_id": turn_id, "text": delta})
        await self._out.put({"type": TEXT_END, "turn_id": turn_id})
        self._tasks.pop(turn_id, None)

    async def recv(self) -> Message:
        if self._closed:
            raise AgentGone("agent closed")
        return await self._out.get()

    async def close(self, reason: str) -> None:
        self._closed = True
        for task in self._tasks.values():
            task.cancel()


def echo_reply(text: str) -> str:
    return f"You said: {text}"
