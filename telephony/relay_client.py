"""The media workers' side of serve's internal relay: agents and telemetry for sessions held here.

A SIP worker's sessions reach the AgentHub in serve through `RelayAgentLink` (`relay_agent` is the agent
factory serve hands its workers), and their counted events reach serve's /metrics through
`TelemetryForwarder`. Both dial `speechpipe.protocol.RELAY_PATH` with serve's internal secret; serve's
end is `websocket_edge.agent_relay`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import AgentGone, AgentLink, AgentUnavailable
from speechpipe.protocol import RELAY_PATH

log = logging.getLogger(__name__)


class RelayAgentLink(AgentLink):
    """The worker's side: an AgentLink whose other end is the hub in the serve process."""

    def __init__(self, ws: Any, http: Any) -> None:
        self._ws = ws
        self._http = http

    @classmethod
    async def open(cls, url: str, secret: str, session: Any) -> RelayAgentLink:
        """Dispatch `session` through the serve process at `url`. Raises AgentUnavailable with the hub's
        reason (`no_runner`, `at_capacity`, ...) when no agent takes it, `hub_unreachable` when serve
        does not answer."""
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(url.rstrip("/") + RELAY_PATH, heartbeat=15,
                                       headers={"Authorization": f"Bearer {secret}"})
            info = session.info
            await ws.send_json({"type": "dispatch", "session_id": session.session_id, "pipe_id": info.pipe_id,
                                "agent_id": info.agent_id, "direction": info.direction, "caller": info.caller,
                                "caller_name": info.caller_name, "metadata": info.metadata})
            answer = await ws.receive_json(timeout=30)
        except Exception as exc:
            await http.close()
            log.exception("relay: cannot reach the agent hub at %s", url)
            raise AgentUnavailable("hub_unreachable") from exc
        if answer.get("type") != "dispatched":
            reason = str(answer.get("reason") or "no_agent")
            log.warning("relay: no agent for session %s: %s", session.session_id, reason)
            await ws.close()
            await http.close()
            raise AgentUnavailable(reason)
        return cls(ws, http)

    async def send(self, message: dict[str, Any]) -> None:
        if self._ws.closed:
            raise AgentGone("relay closed")
        try:
            await self._ws.send_json({"type": "platform", "message": message})
        except ConnectionError as exc:
            raise AgentGone(f"relay lost: {exc}") from exc

    async def recv(self) -> dict[str, Any]:
        msg = await self._ws.receive()
        if msg.type is not WSMsgType.TEXT:
            raise AgentGone("relay closed")
        frame = msg.json()
        if frame.get("type") == "agent":
            return frame["message"]
        raise AgentGone(str(frame.get("reason") or frame.get("type")))

    async def close(self, reason: str) -> None:
        await self._ws.close()
        await self._http.close()


async def relay_agent(session: Any) -> AgentLink:
    """Agent factory for the SIP workers (`SPEECHPIPE_SIP_AGENT_FACTORY`): dispatch through serve's hub."""
    url, secret = os.environ.get("SPEECHPIPE_INTERNAL_URL"), os.environ.get("SPEECHPIPE_INTERNAL_SECRET")
    if not url or not secret:
        log.error("relay: SPEECHPIPE_INTERNAL_URL/SECRET not set; this worker was not started by serve")
        raise AgentUnavailable("hub_unreachable")
    return await RelayAgentLink.open(url, secret, session)


class TelemetryForwarder:
    """Worker side: the counted events of this process's sessions, sent to serve in order over one
    relay socket (redialled when it drops). Frames wait in a bounded queue while serve is unreachable."""

    def __init__(self, url: str, secret: str, *, max_queued: int = 10_000, retry_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.retry_s = retry_s
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_queued)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls) -> TelemetryForwarder | None:
        """The forwarder when this worker was started by `serve` (which sets the internal URL/secret)."""
        url, secret = os.environ.get("SPEECHPIPE_INTERNAL_URL"), os.environ.get("SPEECHPIPE_INTERNAL_SECRET")
        return cls(url, secret) if url and secret else None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def observe(self, session: Any) -> None:
        """Forward `session`'s counted events: subscribe before `session.start()`, on the loop."""
        direction = session.info.direction

        def listener(event: ev.Event) -> None:
            if isinstance(event, ev.METERED):
                self._queue.append({"type": "telemetry", "session_id": session.session_id,
                                    "direction": direction, "event": event.to_json()})
                self._drained.clear()
                self._wake.set()
                if self._task is None or self._task.done():
                    self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry")

        session.subscribe(listener)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(self.url + RELAY_PATH,
                                               headers={"Authorization": f"Bearer {self.secret}"}) as ws:
                        await ws.send_json({"type": "telemetry"})
                        await self._pump(ws)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # serve restarting, or gone: keep the events, dial again
                    log.warning("telemetry: no socket to serve (%s: %s); %d events wait", type(exc).__name__,
                                exc, len(self._queue))
                await asyncio.sleep(self.retry_s)

    async def _pump(self, ws: Any) -> None:
        # Reading answers serve's pings and notices its close; sending waits for events.
        reader = asyncio.ensure_future(ws.receive())
        try:
            while not reader.done():
                while self._queue and not ws.closed:
                    await ws.send_json(self._queue[0])
                    self._queue.popleft()  # only once sent: a dropped socket loses nothing queued
                if not self._queue:
                    self._drained.set()
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if reader.done() and reader.result().type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    reader = asyncio.ensure_future(ws.receive())  # serve says nothing; ignore it
        finally:
            reader.cancel()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (for up to `timeout_s`), then stop."""
        if self._task is None:
            return
        if self._queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
