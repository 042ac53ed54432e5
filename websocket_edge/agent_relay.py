"""The agent relay: sessions held by another local process (the SIP media workers) reach the AgentHub.

A worker opens `GET /v1/internal/agents/relay` with the serve process's internal secret, names its session
in a `dispatch` frame, and the hub dispatches it like any web session. From then on the socket carries the
same text messages as `pipeline.agent.AgentLink`, both ways: the worker's session speaks to the runner
through this process. Either side closing ends the other: a lost runner becomes `agent_gone` for the
worker (its caller hears the apology), a lost worker ends the runner's call.

A socket whose first frame is `{"type": "telemetry"}` instead carries a worker's session events for
/metrics (see `metrics.relay_telemetry`); nothing of it reaches a runner. The workers' end of both is
`telephony.relay_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from speechpipe import logs
from speechpipe.pipeline.agent import AgentGone
from speechpipe.protocol import RELAY_PATH

from .dispatch import NoAgentAvailable
from .keys import HUB_KEY
from .metrics import count_dispatch_failure, relay_telemetry

log = logging.getLogger(__name__)

SECRET_KEY = web.AppKey("speechpipe.internal_secret", str)


@dataclass
class _Info:
    pipe_id: str
    agent_id: str
    direction: str
    caller: str | None = None
    caller_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None


class RemoteSession:
    """What the hub needs of a session that lives in another process."""

    def __init__(self, info: _Info) -> None:
        self.info = info
        self.session_id = info.session_id
        self.ended = asyncio.Event()


def setup_agent_relay(app: web.Application, secret: str) -> None:
    app[SECRET_KEY] = secret
    app.router.add_get(RELAY_PATH, relay_socket)


async def relay_socket(request: web.Request) -> web.StreamResponse:
    secret = request.app[SECRET_KEY]
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        raise web.HTTPUnauthorized(text="the relay is for this server's own media workers")
    ws = web.WebSocketResponse(heartbeat=15)
    await ws.prepare(request)
    try:
        first = await ws.receive_json(timeout=10)
        if first.get("type") == "telemetry":
            return await relay_telemetry(request, ws)
        info = _Info(**{k: first[k] for k in _Info.__dataclass_fields__ if k in first})
    except Exception as exc:
        await ws.send_json({"type": "error", "code": "bad_dispatch", "message": str(exc)[:200]})
        await ws.close()
        return ws
    # This socket serves one worker session: its lines and the bridge made for it carry the session's ids.
    logs.bind(session_id=info.session_id, pipe_id=info.pipe_id, direction=info.direction,
              agent_id=info.agent_id)
    session = RemoteSession(info)
    try:
        link = await request.app[HUB_KEY].dispatch(session)
    except NoAgentAvailable as exc:
        count_dispatch_failure(request.app, exc.reason)
        await ws.send_json({"type": "no_agent", "reason": exc.reason})
        await ws.close()
        return ws
    await ws.send_json({"type": "dispatched"})
    log.info("relay: session %s (%s) dispatched to agent %s", info.session_id, info.direction, info.agent_id)

    async def agent_to_worker() -> None:
        while True:
            try:
                message = await link.recv()
            except AgentGone as exc:
                await ws.send_json({"type": "agent_gone", "reason": str(exc)})
                return
            await ws.send_json({"type": "agent", "message": message})

    pump = asyncio.ensure_future(agent_to_worker())
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            frame = msg.json()
            if frame.get("type") == "platform":
                try:
                    await link.send(frame["message"])
                except AgentGone:
                    break
    finally:
        session.ended.set()
        pump.cancel()
        with contextlib.suppress(BaseException):
            await pump
        with contextlib.suppress(Exception):
            await link.close("worker_gone" if not ws.closed else "session_ended")
        await ws.close()
    return ws
