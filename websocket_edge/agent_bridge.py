"""The platform's end of one call's bridge socket, and the `AgentLink` a session talks through.

A `Bridge` belongs to one job (one runner, one call token). It outlives its WebSocket: frames to the runner
are numbered and kept until acknowledged, so when the runner redials with the same token after a drop,
`attach()` replays what it missed, and the runner replays what we missed (see `speechpipe.protocol.Outbox`).
A `BridgeLink` is what `PipelineSession` holds. It normally wraps one bridge for the whole call; when the
agent sends `agent.dispatch`, the hub finds a runner of the other agent_id and the link swaps bridges, so
the session never learns that its agent changed (it sees the new agent's frames on the same link).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, Protocol

from aiohttp import web

from speechpipe import logs
from speechpipe import protocol as p
from speechpipe.pipeline.agent import AgentGone, AgentLink, AgentUnavailable

log = logging.getLogger(__name__)


class NoAgentAvailable(AgentUnavailable):
    """No runner took the session. `reason` is recorded as the session's end reason."""


class Runner(Protocol):
    runner_id: str
    alive: bool


class Job(Protocol):
    """What a bridge needs of its job (`dispatch.Job`)."""

    job_id: str
    session_id: str
    agent_id: str
    runner: Runner


class Hub(Protocol):
    """What bridges and links need of the hub that made them (`dispatch.Hub`)."""

    bridge_grace_s: float
    orphan_grace_s: float
    verbs: Collection[str]
    counters: collections.Counter[str]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...

    def release(self, job: Any, reason: str) -> None: ...

    async def offer(self, session: Any, agent_id: str, within_s: float | None = None) -> Bridge: ...

ALWAYS_SENT = frozenset({p.CALL_STARTED, p.CALL_ENDED, p.ERROR})
_PER_TURN = frozenset({p.USER_INTERRUPTED, p.AGENT_SPEECH_DONE, p.METRIC})
_GONE = object()


class Bridge:
    def __init__(self, hub: Hub, job: Job) -> None:
        self.hub = hub
        self.job = job
        self.ws: web.WebSocketResponse | None = None
        self.outbox = p.Outbox()
        self.inbox = p.Inbox()
        self.lock = asyncio.Lock()
        self.ready = asyncio.Event()  # the runner said hello at least once
        self.done = asyncio.Event()  # over: ended or failed
        self.hellos = 0
        self.events: frozenset[str] | None = None  # what the runner subscribed to (None: everything)
        self.link: BridgeLink | None = None
        self.sent_turns: set[int] = set()
        self.over = False
        self.end_reason: str | None = None
        self._early: list[dict[str, Any]] = []  # frames that came before this bridge was the link's
        self._grace: asyncio.TimerHandle | None = None
        self.detached_at: float | None = None
        self.last_heard = time.monotonic()  # the runner's last frame on this bridge (WebSocket pings not)
        # Made while dispatching a session, so these are its log ids; the bridge socket's task and lines
        # logged from other tasks (a lost runner) get them from here.
        self.log_ids = logs.current()

    @property
    def session_id(self) -> str:
        return self.job.session_id

    @property
    def attached(self) -> bool:
        return self.ws is not None

    def heard_within(self, seconds: float) -> bool:
        """Attached, and a runner frame (a verb, an ack, the SDK's keepalive) came within `seconds`."""
        return self.attached and time.monotonic() - self.last_heard <= seconds

    # ---- socket side -------------------------------------------------------------------------------
    async def attach(self, ws: web.WebSocketResponse, hello: dict[str, Any]) -> bool:
        """A (re)dial with our token: replay the runner's missed frames, then carry the call on `ws`."""
        logs.bind(**self.log_ids)  # the bridge socket's handler task serves this call from now on
        async with self.lock:
            replay = self.outbox.replay_after(int(hello.get("last_seq") or 0))
            if replay is None:
                await send_frame(ws, p.error_frame(p.Codes.RESUME_FAILED,
                                                   "too many frames were missed to resume"))
                return False
            old, self.ws = self.ws, None
            if old is not None and not old.closed:
                self.hub.spawn(close_socket(old, p.CLOSE_REPLACED, "replaced by a newer bridge socket"))
            if "events" in hello:
                self.events = frozenset(p.names(hello["events"])) | ALWAYS_SENT
            ack = {"type": p.HELLO_ACK, "protocol": p.PROTOCOL_VERSION, "session_id": self.session_id,
                   "resumed": self.hellos > 0, "last_seq": self.inbox.last_seq,
                   "events": list(p.PLATFORM_EVENTS), "verbs": list(self.hub.verbs)}
            for frame in [ack, *replay]:
                if not await send_frame(ws, frame):
                    return False
            self.inbox.sent_ack()
            if self.hellos:
                self.hub.counters["bridge_redials"] += 1
                log.info("bridge %s redialled: %d frames replayed", self.session_id, len(replay))
            else:
                log.info("bridge %s up: job %s, runner %s (agent %s)", self.session_id, self.job.job_id,
                         self.job.runner.runner_id, self.job.agent_id)
            self.hellos += 1
            self.ws = ws
            self.detached_at = None
            self.last_heard = time.monotonic()
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self.ready.set()
            return True

    def detach(self, ws: web.WebSocketResponse, *, closing: bool = False) -> None:
        """The socket closed (or failed a send). Unless the call is over, the runner may redial within the
        hub's grace. `closing`: the caller closes `ws` itself (an idle bridge); the grace starts now, not
        once the peer answers the close (a frozen one never does)."""
        if self.ws is not ws:
            return
        self.ws = None
        if not ws.closed and not closing:  # a send failed on a socket that looks open: end it, it redials
            self.hub.spawn(close_socket(ws, p.CLOSE_GOING_AWAY, "send failed"))
        if self.over:
            return
        self.detached_at = time.monotonic()
        self.arm_grace()

    def arm_grace(self) -> None:
        """(Re)start the redial deadline: long while the runner's control socket lives, short once not."""
        if self.over or self.attached:
            return
        if self._grace is not None:
            self._grace.cancel()
        grace = self.hub.bridge_grace_s if self.job.runner.alive else self.hub.orphan_grace_s
        loop = asyncio.get_running_loop()
        self._grace = loop.call_later(grace, self.fail, "bridge_lost")

    async def on_frame(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """One validated frame from the runner; returns an error frame to answer with, if any."""
        self.last_heard = time.monotonic()
        if "ack" in frame:
            self.outbox.ack(frame["ack"])
        kind = frame["type"]
        if kind == p.HELLO:
            return p.error_frame(p.Codes.OUT_OF_ORDER, "hello was already received on this socket")
        if not self.inbox.accept(frame) or kind == p.ACK:
            return None
        if self.inbox.ack_due:
            await self.send_control({"type": p.ACK})
        if self.over:
            return p.error_frame(p.Codes.CALL_ENDED, f"the call is over ({self.end_reason}); {kind} dropped")
        if kind in (p.TEXT_DELTA, p.TEXT_END) and frame["turn_id"] not in self.sent_turns:
            return p.error_frame(p.Codes.UNKNOWN_TURN,
                                 f"{kind}: turn {frame['turn_id']} was never sent to you")
        message = {k: v for k, v in frame.items() if k not in ("seq", "ack")}
        if self.link is not None and self.link.bridge is self:
            self.link.deliver(message)
        else:
            self._early.append(message)
        return None

    def take_early(self) -> list[dict[str, Any]]:
        early, self._early = self._early, []
        return early

    # ---- platform side -------------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        if self.over:
            raise AgentGone(self.end_reason or "bridge closed")
        if self.events is not None and message["type"] not in self.events:
            return
        async with self.lock:
            frame = self.outbox.stamp(message)
            ws = self.ws
            if ws is not None:
                self.hub.counters["frames_out"] += 1
                self.inbox.sent_ack()
                if not await send_frame(ws, {**frame, "ack": self.inbox.last_seq}):
                    self.detach(ws)  # kept in the outbox: a redial replays it

    async def send_control(self, frame: dict[str, Any]) -> None:
        """An unnumbered frame (ack, error) on the current socket; nothing if detached."""
        ws = self.ws
        if ws is not None:
            self.inbox.sent_ack()
            await send_frame(ws, {**frame, "ack": self.inbox.last_seq})

    def fail(self, reason: str) -> None:
        """The runner is gone for this call (no redial in time, runner dead): the session must know."""
        if self.over:
            return
        log.warning("bridge %s (job %s) lost: %s", self.session_id, self.job.job_id, reason,
                    extra=self.log_ids)
        self.hub.counters["bridges_lost"] += 1
        self._finish(reason, p.CLOSE_CALL_OVER)
        if self.link is not None and self.link.bridge is self:
            self.link.gone(reason)

    def end(self, reason: str, code: int = p.CLOSE_NORMAL) -> None:
        """The call is over for this runner (session ended, or handed to another agent)."""
        if not self.over:
            self._finish(reason, code)

    async def wait_ready(self, within_s: float) -> bool:
        """Until the first hello (True), or the bridge is over or `within_s` passes (False)."""
        waits = [asyncio.ensure_future(self.ready.wait()), asyncio.ensure_future(self.done.wait())]
        try:
            await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self.ready.is_set() and not self.over

    def _finish(self, reason: str, code: int) -> None:
        self.over = True
        self.done.set()
        self.end_reason = reason
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        ws, self.ws = self.ws, None
        if ws is not None and not ws.closed:
            self.hub.spawn(close_socket(ws, code, reason))
        self.hub.release(self.job, reason)


class BridgeLink(AgentLink):
    """The session's agent: frames go to the current bridge; `agent.dispatch` swaps bridges in place."""

    def __init__(self, hub: Hub, session: Any, bridge: Bridge) -> None:
        self.hub = hub
        self.session = session
        self.bridge = bridge
        bridge.link = self
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._gone: str | None = None
        self._closed = False
        self._handoff: asyncio.Task[None] | None = None
        self.agent_ids = [bridge.job.agent_id]  # every agent that served this call, in order
        self.on_agent_change: Callable[[str], Awaitable[None] | None] | None = None

    @property
    def agent_id(self) -> str:
        return self.agent_ids[-1]

    async def send(self, message: dict[str, Any]) -> None:
        if self._gone is not None:
            raise AgentGone(self._gone)
        kind = message.get("type")
        if kind == p.USER_TEXT:
            self.bridge.sent_turns.add(int(message["turn_id"]))
        elif kind in _PER_TURN and (message.get("turn_id") or 0) > 0 \
                and message["turn_id"] not in self.bridge.sent_turns:
            return  # about a turn the previous agent had (before a dispatch): this one never saw it
        self.hub.counters["messages_to_agents"] += 1
        await self.bridge.send(message)

    async def recv(self) -> dict[str, Any]:
        item = await self._queue.get()
        if item is _GONE:
            self._queue.put_nowait(_GONE)  # every later recv() raises too
            raise AgentGone(self._gone or "agent gone")
        return item

    async def close(self, reason: str) -> None:
        self._closed = True
        if self._handoff is not None:
            self._handoff.cancel()
        self.bridge.end(reason)

    # ---- from the bridge ------------------------------------------------------------------------------
    def deliver(self, message: dict[str, Any]) -> None:
        if message["type"] == p.DISPATCH:
            self._start_handoff(message["agent_id"], message.get("data"))
            return
        self.hub.counters["messages_from_agents"] += 1
        self._queue.put_nowait(message)

    def gone(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
            self._queue.put_nowait(_GONE)

    # ---- agent.dispatch ---------------------------------------------------------------------------------
    def _start_handoff(self, agent_id: str, data: dict[str, Any] | None) -> None:
        if self._handoff is not None and not self._handoff.done():
            self.hub.spawn(self.bridge.send_control(
                p.error_frame(p.Codes.OUT_OF_ORDER, "a dispatch is already in progress")))
            return
        self._handoff = asyncio.get_running_loop().create_task(self._hand_to(agent_id, data))

    async def _hand_to(self, agent_id: str, data: dict[str, Any] | None) -> None:
        old = self.bridge
        try:
            new = await self.hub.offer(self.session, agent_id)
        except NoAgentAvailable as exc:
            self.hub.counters["handoffs_failed"] += 1
            await old.send_control(p.error_frame(p.Codes.DISPATCH_FAILED,
                                                 f"no runner of {agent_id!r} took the call: {exc.reason}",
                                                 agent_id=agent_id, reason=exc.reason))
            return
        if self._closed or self._gone is not None or old.over:
            new.end("call_over")
            return
        self.hub.counters["handoffs"] += 1
        log.info("session %s handed from %s to %s", old.session_id, old.job.agent_id, agent_id)
        with contextlib.suppress(AgentGone):
            await old.send({"type": p.CALL_ENDED, "reason": "dispatched", "to_agent_id": agent_id})
        old.end("dispatched")
        self.bridge = new
        new.link = self
        self.agent_ids.append(agent_id)
        info = self.session.info
        metadata = {**(info.metadata or {}), "dispatched_from": old.job.agent_id}
        if data is not None:
            metadata["handoff"] = data
        try:
            await new.send({"type": p.CALL_STARTED, "session_id": old.session_id, "direction": info.direction,
                            "pipe_id": info.pipe_id, "agent_id": agent_id, "caller": info.caller,
                            "caller_name": info.caller_name, "metadata": metadata})
        except AgentGone as exc:
            self.gone(str(exc))
            return
        for message in new.take_early():
            self.deliver(message)
        if self.on_agent_change is not None:
            result = self.on_agent_change(agent_id)
            if asyncio.iscoroutine(result):
                await result


SEND_TIMEOUT_S = 10.0  # a peer that reads nothing for this long is treated as gone (no lock held forever)


async def send_frame(ws: web.WebSocketResponse, frame: dict[str, Any]) -> bool:
    """Send one frame; False when the socket is gone (never raises)."""
    try:
        await asyncio.wait_for(ws.send_str(p.encode(frame)), SEND_TIMEOUT_S)
        return True
    except Exception:  # closing transport, reset, timeout: the caller treats the socket as gone
        return False


async def close_socket(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close with `code` and a (truncated) reason; a socket already gone is fine."""
    with contextlib.suppress(Exception):
        await ws.close(code=code, message=reason[:120].encode())
