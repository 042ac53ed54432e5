"""The agent channel's two WebSocket routes: the runners' control socket and the per-call bridge socket.

`setup_agent_channel(app, hub)` adds `GET /v1/agents/connect` (API key in `Authorization: Bearer`; runner
registration, heartbeats, job offers; a runner gets sessions of its key's workspace only) and
`GET /v1/agents/bridge/{session_id}` (call token in the first frame, `hello`). Every frame is validated by
`speechpipe.protocol`; a bad one gets an `error` frame (code + message) and the socket goes on, up to the
hub's error budget. Nothing a peer sends can raise out
of a handler. Only frames keep a socket open: a control socket silent past the heartbeat timeout, or a
bridge past `bridge_idle_s`, is closed with 4408 even if its peer keeps answering or sending WebSocket pings.
The registry and dispatch logic live in `dispatch.AgentHub`; the bridge in `agent_bridge`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSMsgType, web

from speechpipe import protocol as p
from speechpipe.errors import SpeechPipeError

from .agent_bridge import Bridge, close_socket, send_frame
from .dispatch import AgentHub, NoAgentAvailable, RunnerConn
from .keys import HUB_KEY, STORE_KEY

log = logging.getLogger(__name__)

CONTROL_PATH = "/v1/agents/connect"
BRIDGE_PATH = "/v1/agents/bridge/{session_id}"

__all__ = ["BRIDGE_PATH", "CONTROL_PATH", "HUB_KEY", "AgentHub", "NoAgentAvailable", "setup_agent_channel"]


def setup_agent_channel(app: web.Application, hub: AgentHub | None = None) -> AgentHub:
    """Mount the agent channel on `app` and return its hub (closed with the app). Without `hub`, one is
    made on the app's AsyncStore (`create_app`'s STORE_KEY), so this is also a plain route group."""
    if hub is None:
        hub = AgentHub(app[STORE_KEY])
    app[HUB_KEY] = hub
    app.router.add_get(CONTROL_PATH, control_socket)
    app.router.add_get(BRIDGE_PATH, bridge_socket)

    async def _close_hub(_: web.Application) -> None:
        await hub.close()

    app.on_shutdown.append(_close_hub)
    return hub


def _api_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("X-API-Key")


def _bridge_base(request: web.Request) -> str:
    scheme = "wss" if request.secure else "ws"
    return f"{scheme}://{request.host}"


async def _next_frame(ws: web.WebSocketResponse, spec: p.Spec,
                      within_s: float | None) -> dict[str, Any] | None:
    """The next validated frame; None when the socket is done. Raises ProtocolError for a bad frame, and
    TimeoutError after `within_s` (an overall deadline: receive(timeout=) restarts at every ping/pong, which
    aiohttp answers inside receive(), so pings never reset it; asyncio.timeout, not wait_for: no task per
    frame)."""
    async with asyncio.timeout(within_s):
        msg = await ws.receive()
    if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
        return p.parse(msg.data, spec)
    return None  # CLOSE, CLOSING, CLOSED, ERROR (too large frames end up here, as aiohttp closes with 1009)


class _Budget:
    """Errors a socket may earn before it is closed: a confused peer gets answers, a hostile one a limit."""

    def __init__(self, hub: AgentHub) -> None:
        self.hub = hub
        self.errors = 0

    async def report(self, ws: web.WebSocketResponse, error: dict[str, Any]) -> bool:
        """Send the error frame; False when the budget is spent and the socket was closed."""
        self.errors += 1
        self.hub.counters["protocol_errors"] += 1
        await send_frame(ws, error)
        if self.errors >= self.hub.max_errors:
            await send_frame(ws, p.error_frame(p.Codes.TOO_MANY_ERRORS, "too many bad frames; closing"))
            await close_socket(ws, p.CLOSE_PROTOCOL, "too many protocol errors")
            return False
        return True


async def control_socket(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    try:
        key_id, workspace_id = await hub.authenticate(_api_key(request))
    except SpeechPipeError as exc:
        hub.counters["auth_failures"] += 1
        return web.json_response(exc.to_dict(), status=exc.status)
    ws = web.WebSocketResponse(max_msg_size=p.MAX_FRAME_BYTES)
    await ws.prepare(request)
    runner: RunnerConn | None = None
    budget = _Budget(hub)
    try:
        while not ws.closed:
            try:
                frame = await _next_frame(ws, p.CONTROL_FROM_RUNNER,
                                          None if runner is not None else hub.hello_timeout_s)
                if frame is None:
                    break
                if runner is None:
                    if frame["type"] != p.REGISTER:
                        raise p.ProtocolError(p.Codes.OUT_OF_ORDER, f"send register before {frame['type']}")
                    proto = frame.get("protocol", p.PROTOCOL_VERSION)
                    if proto != p.PROTOCOL_VERSION:
                        await send_frame(ws, p.error_frame(p.Codes.PROTOCOL_UNSUPPORTED,
                                                      f"protocol {proto} unsupported; this server speaks "
                                                      f"{p.PROTOCOL_VERSION}"))
                        await close_socket(ws, p.CLOSE_PROTOCOL, "protocol unsupported")
                        break
                    # The runner serves its key's workspace only: sessions of that workspace's pipes.
                    runner = hub.register(ws, frame, key_id, _bridge_base(request), workspace_id)
                    await send_frame(ws, hub.registered_frame(runner))
                    continue
                reply = await hub.on_control_frame(runner, frame)
                if reply is not None:
                    if reply["type"] == p.ERROR and not await budget.report(ws, reply):
                        break
                    if reply["type"] != p.ERROR:
                        await send_frame(ws, reply)
            except p.ProtocolError as exc:
                if not await budget.report(ws, exc.frame()):
                    break
            except TimeoutError:
                await send_frame(ws, p.error_frame(p.Codes.OUT_OF_ORDER, "no register frame in time"))
                await close_socket(ws, p.CLOSE_PROTOCOL, "register timeout")
                break
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug of ours: log it, drop this socket, keep the server
        log.exception("agent control socket failed")
        await close_socket(ws, 1011, "internal error")
    finally:
        if runner is not None and runner.ws is ws:
            hub.runner_lost(runner, "closed")
    return ws


async def bridge_socket(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    session_id = request.match_info["session_id"]
    ws = web.WebSocketResponse(max_msg_size=p.MAX_FRAME_BYTES, heartbeat=hub.bridge_ping_s)
    await ws.prepare(request)
    bridge: Bridge | None = None
    budget = _Budget(hub)
    try:
        while not ws.closed:
            try:
                frame = await _next_frame(ws, p.BRIDGE_FROM_RUNNER,
                                          hub.bridge_idle_s if bridge else hub.hello_timeout_s)
                if frame is None:
                    break
                hub.counters["frames_in"] += 1
                if bridge is None:
                    bridge = await _hello(hub, ws, frame, session_id)
                    if bridge is None:
                        break
                    continue
                reply = await bridge.on_frame(frame)
                if reply is not None and not await budget.report(ws, reply):
                    break
            except p.ProtocolError as exc:
                if not await budget.report(ws, exc.frame()):
                    break
            except TimeoutError:
                if bridge is not None:  # said hello, then nothing but (at most) pings: as good as gone
                    hub.counters["bridges_idle_closed"] += 1
                    log.warning("bridge %s: no frame from the runner for %g s (pings do not count); closing "
                                "with %d, it may redial", session_id, hub.bridge_idle_s, p.CLOSE_HEARTBEAT)
                    bridge.detach(ws, closing=True)  # its redial grace starts now, not after the close
                    await close_socket(ws, p.CLOSE_HEARTBEAT, f"no frame for {hub.bridge_idle_s:g} s")
                    break
                await send_frame(ws, p.error_frame(p.Codes.OUT_OF_ORDER, "no hello frame in time"))
                await close_socket(ws, p.CLOSE_PROTOCOL, "hello timeout")
                break
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("agent bridge socket for %s failed", session_id)
        await close_socket(ws, 1011, "internal error")
    finally:
        if bridge is not None:
            bridge.detach(ws)
    return ws


async def _hello(hub: AgentHub, ws: web.WebSocketResponse, frame: dict[str, Any],
                 session_id: str) -> Bridge | None:
    """Check the first bridge frame; the attached bridge, or None after refusing (socket closed)."""
    if frame["type"] != p.HELLO:
        raise p.ProtocolError(p.Codes.OUT_OF_ORDER, f"send hello before {frame['type']}")
    if frame["protocol"] != p.PROTOCOL_VERSION:
        await send_frame(ws, p.error_frame(p.Codes.PROTOCOL_UNSUPPORTED,
                                      f"protocol {frame['protocol']} unsupported; this server speaks "
                                      f"{p.PROTOCOL_VERSION}"))
        await close_socket(ws, p.CLOSE_PROTOCOL, "protocol unsupported")
        return None
    bridge = hub.bridge_for(frame["call_token"], session_id)
    if bridge is None or bridge.over:
        hub.counters["bad_tokens"] += 1
        await send_frame(ws, p.error_frame(p.Codes.BAD_TOKEN, "this call token is not valid for this session "
                                      "(unknown, expired, or the call is over)"))
        await close_socket(ws, p.CLOSE_CALL_OVER, "bad call token")
        return None
    if not await bridge.attach(ws, frame):
        bridge.fail("resume_failed")
        await close_socket(ws, p.CLOSE_CALL_OVER, "cannot resume")
        return None
    return bridge
