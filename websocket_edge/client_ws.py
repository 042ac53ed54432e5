"""The client WebSocket `/v1/pipes/{pipe_id}/connect?token=…`: browsers, apps and raw clients talk to a pipe.

One `Connection` per socket. The origin and the token are checked before anything else exists (a refused
connection never makes a session row); then `start` negotiates the rates and a `PipelineSession` with
direction "web" runs: binary frames in are the user's PCM16, JSON events and paced agent PCM16 go out.
Every way a connection ends has a close code from `CLOSE_CODES` (documented in docs/client-protocol.md)
and a reason text that begins with the code's name, so a client can tell which check failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from speechpipe import logs
from speechpipe.errors import WS_CLOSE_CODE_BY_CODE, Code, SpeechPipeError
from speechpipe.pipe_config import PipeConfig
from speechpipe.pipeline import events as ev
from speechpipe.pipeline.call import (
    START_FAILED,
    AgentFactory,
    CallStartFailed,
    connect_agent,
    echo_agent,
    start_call,
)
from speechpipe.pipeline.journal import SERVER_CRASHED, SessionJournal
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo
from speechpipe.websocket_edge.keys import (
    AGENT_FACTORY_KEY,
    CLIENT_EDGE_KEY,
    ENGINES_KEY,
    SETTINGS_KEY,
    STORE_KEY,
)
from speechpipe.websocket_edge.metrics import count_dispatch_failure, observe
from speechpipe.websocket_edge.pacer import Outbox, Pacer

log = logging.getLogger(__name__)

SUPPORTED_RATES = (8000, 16000, 24000, 44100, 48000)
DEFAULT_RATE = 16000
CODECS = ("pcm16", "pcm_s16le", "linear16")
MAX_TEXT_CHARS = 4000
PLAYBACK_STATES = ("started", "ended", "stopped")
DTMF_DIGITS = frozenset("0123456789*#ABCD")  # RFC 4733's 16 events, as the phone side sends them
MAX_DTMF_DIGITS = 32

# Close codes: 1000-1011 are RFC 6455's, 4400-4500 mirror speechpipe.errors (token and auth refusals),
# the rest are this edge's limits. The close reason always starts with the key ("token_expired: ...").
CLOSE_CODES: dict[str, int] = {
    "normal": 1000,  # client sent `stop`, or the session ended (reason = the session's end reason)
    "server_shutdown": 1001,
    "bad_message": 1007,  # too many invalid text/binary messages (each earlier one got an `error` event)
    "origin_not_allowed": 1008,
    "frame_too_big": 1009,
    **WS_CLOSE_CODE_BY_CODE,  # token_malformed 4400 ... pipe_not_found 4407, internal_error 4500
    "idle_timeout": 4408,
    "slow_consumer": 4410,
    "rate_limited": 4429,
    "unavailable": 4503,  # the edge is at its session limit
}


@dataclass(frozen=True)
class EdgeLimits:
    """Per-connection limits. `from_settings` reads `ws_<name>` attributes when Settings has them."""

    max_frame_bytes: int = 64 * 1024  # binary frames (≈ 0.68 s at 48 kHz)
    max_text_bytes: int = 16 * 1024
    max_messages_per_s: float = 100.0  # sustained; 20 ms audio frames are 50/s
    message_burst: int = 200
    max_audio_ahead_s: float = 10.0  # input audio may run this far ahead of real time
    idle_timeout_s: float = 30.0  # no message at all from the client for this long
    max_bad_messages: int = 5
    ahead_s: float = 0.1  # output pacing: the client is kept at most this far ahead of real time
    max_backlog_s: float = 2.0  # agent audio queued behind a client that does not read
    close_timeout_s: float = 5.0
    # Kernel send buffer of the socket (0 = the OS default, which grows to megabytes): bounds how much
    # audio can hide in the kernel behind a client that stopped reading, and so how soon that is seen.
    socket_send_buffer: int = 64 * 1024
    max_sessions: int = 0  # 0 = no limit

    @classmethod
    def from_settings(cls, settings: Any) -> EdgeLimits:
        values = {f.name: getattr(settings, f"ws_{f.name}") for f in fields(cls)
                  if getattr(settings, f"ws_{f.name}", None) is not None}
        return cls(**values)


class _ClientSocket(web.WebSocketResponse):
    """aiohttp closes a frame past `max_msg_size` itself (1009, no reason) before the edge sees it; this
    gives that close the edge's reason, as a frame between the edge's limit and aiohttp's gets."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = close_reason("frame_too_big", f"a frame over {self._max_msg_size} bytes")
        return await super().close(code=code, message=message, drain=drain)


class Refused(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def close_reason(name: str, detail: str = "") -> bytes:
    text = f"{name}: {detail}" if detail else name
    raw = text.encode()
    return raw[:123] if len(raw) <= 123 else raw[:120].decode(errors="ignore").encode() + b"..."


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """No Origin header: not a browser, the token is the credential. Same origin is always allowed."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    if "*" in allowed or origin in {o.lower() for o in allowed}:
        return True
    host = (request.headers.get("Host") or request.host or "").lower()
    return bool(host) and urlsplit(origin).netloc == host


class ClientEdge:
    """What the connect route needs, shared by all connections; `setup_client_ws` puts one in the app.

    The engines and the agent factory are looked up when the first connection needs them, so route groups
    may register them in any order (`app[ENGINES_KEY]`, `app[AGENT_FACTORY_KEY]`).
    """

    def __init__(self, app: web.Application, *, store: Any = None, engines: Engines | None = None,
                 settings: Any = None, agent_factory: AgentFactory | None = None,
                 limits: EdgeLimits | None = None) -> None:
        self.app = app
        self.store = store if store is not None else app[STORE_KEY]
        self.settings = settings if settings is not None else app[SETTINGS_KEY]
        self._engines = engines
        self._agent_factory = agent_factory
        self.limits = limits or EdgeLimits.from_settings(self.settings)
        self.connections: set[Connection] = set()
        self.closed_by: dict[str, int] = {}  # close-reason name → count (for /metrics)
        self.journal = _journal(self.settings)

    def use(self, *, engines: Engines | None = None, agent_factory: AgentFactory | None = None) -> None:
        """Explicit engines / agent factory for this edge; they win over the app keys (tests, embedding)."""
        if engines is not None:
            self._engines = engines
        if agent_factory is not None:
            self._agent_factory = agent_factory

    @property
    def engines(self) -> Engines:
        if self._engines is None:
            self._engines = self.app.get(ENGINES_KEY) or Engines()
        return self._engines

    @property
    def agent_factory(self) -> AgentFactory:
        return self._agent_factory or self.app.get(AGENT_FACTORY_KEY) or echo_agent

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        conn = Connection(self, request)
        self.connections.add(conn)
        try:
            return await conn.run()
        finally:
            self.connections.discard(conn)
            self.closed_by[conn.close_name] = self.closed_by.get(conn.close_name, 0) + 1

    @property
    def live_sessions(self) -> int:
        return sum(1 for c in self.connections if c.session is not None and not c.session.ended.is_set())

    async def recover(self, app: web.Application | None = None) -> None:
        """On start-up: end the web sessions a crashed `serve` on this port left open (`server_crashed`),
        with their recordings repaired and registered."""
        if self.journal is not None:
            await self.journal.recover(self.store)

    async def shutdown(self, app: web.Application | None = None) -> None:
        await asyncio.gather(*(c.finish("server_shutdown", "the server is shutting down", "server_shutdown")
                               for c in list(self.connections)), return_exceptions=True)


__all__ = ["AGENT_FACTORY_KEY", "CLIENT_EDGE_KEY", "ENGINES_KEY", "AgentFactory", "ClientEdge", "EdgeLimits",
           "setup_client_ws"]


def setup_client_ws(app: web.Application, *, store: Any = None, engines: Engines | None = None,
                    settings: Any = None, agent_factory: AgentFactory | None = None,
                    limits: EdgeLimits | None = None) -> ClientEdge:
    """Adds `GET /v1/pipes/{pipe_id}/connect`. A plain route group: with no arguments, the store and the
    settings come from `create_app`'s keys, the engines and the agent factory from `ENGINES_KEY` /
    `AGENT_FACTORY_KEY` (else one `Engines()` and the echo agent). Live sessions end with 1001 at shutdown."""
    edge = ClientEdge(app, store=store, engines=engines, settings=settings, agent_factory=agent_factory,
                      limits=limits)
    app[CLIENT_EDGE_KEY] = edge
    app.router.add_get("/v1/pipes/{pipe_id}/connect", edge.handle)
    app.on_startup.append(edge.recover)
    app.on_shutdown.append(edge.shutdown)
    return edge


class Connection:
    def __init__(self, edge: ClientEdge, request: web.Request) -> None:
        self.edge = edge
        self.request = request
        self.limits = edge.limits
        lim = self.limits
        self.ws = _ClientSocket(
            compress=False,  # PCM does not deflate; compression would only burn CPU
            max_msg_size=max(4 * max(lim.max_frame_bytes, lim.max_text_bytes), 256 * 1024),
            timeout=lim.close_timeout_s, autoping=True)
        self.session: PipelineSession | None = None
        self.outbox: Outbox | None = None
        self.pacer: Pacer | None = None
        self.close_name = "client_closed"
        self._finish_task: asyncio.Task[None] | None = None
        self._session_over = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._bad = 0
        self._bucket = float(lim.message_burst)
        self._bucket_t = time.monotonic()
        self._audio_s = 0.0
        self._audio_t0 = 0.0
        self.playback: list[dict[str, Any]] = []

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def run(self) -> web.WebSocketResponse:
        await self.ws.prepare(self.request)
        self._transport = self.request.transport
        self._bound_send_buffer()
        try:
            pipe_config = await self._admit()
        except Refused as r:
            log.info("client ws refused: %s (%s)", r.name, r.message)
            self.close_name = r.name
            await self._close(r.name, r.message)
            return self.ws
        # This handler's task serves one session: its lines (and its tasks') carry the pipe, and the session
        # id once `PipelineSession.start` binds it.
        logs.bind(pipe_id=self._pipe_id, direction="web", agent_id=pipe_config.agent_id)
        self.outbox = Outbox(self.ws, max_backlog_bytes=int(self.limits.max_backlog_s * DEFAULT_RATE * 2),
                             on_overflow=self._on_overflow)
        self._tasks.append(asyncio.ensure_future(self.outbox.run()))
        try:
            await self._read_loop(pipe_config)
        except Refused as r:
            self.finish(r.name, r.message, "error")
        except Exception:
            log.exception("client ws failed")
            await self.finish("internal_error", "the server failed", "error")
        if self._finish_task is None:
            await self.finish("client_closed", "", "client_closed")
        else:
            await asyncio.shield(self._finish_task)
        return self.ws

    def _bound_send_buffer(self) -> None:
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is not None and self.limits.socket_send_buffer > 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.socket_send_buffer)

    async def _admit(self) -> PipeConfig:
        """Every check that can refuse the connection; nothing is created before all of them pass."""
        edge, lim = self.edge, self.limits
        if not origin_allowed(self.request, tuple(getattr(edge.settings, "allowed_origins", ()) or ())):
            origin = self.request.headers.get("Origin")
            raise Refused("origin_not_allowed", f"origin {origin!r} is not allowed")
        if lim.max_sessions and edge.live_sessions >= lim.max_sessions:
            raise Refused("unavailable", f"this server holds its limit of {lim.max_sessions} sessions")
        pipe_id = self.request.match_info["pipe_id"]
        token = self.request.query.get("token", "")
        try:
            grant = await edge.store.redeem_token(token, pipe_id)
            pipe = await edge.store.get_pipe(grant.pipe_id)
            config = PipeConfig.model_validate(pipe.config)
        except SpeechPipeError as exc:
            name = exc.code if exc.code in CLOSE_CODES else Code.INTERNAL_ERROR
            raise Refused(name, exc.message) from None
        except Exception as exc:
            log.exception("client ws: admission failed")
            raise Refused(Code.INTERNAL_ERROR, type(exc).__name__) from None
        self._pipe_id, self._metadata = pipe_id, grant.metadata
        return config

    async def _start(self, config: PipeConfig, input_rate: int, output_rate: int) -> None:
        edge = self.edge
        info = SessionInfo(pipe_id=self._pipe_id, agent_id=config.agent_id, direction="web",
                           metadata=dict(self._metadata or {}))

        def prepare(session: PipelineSession) -> None:
            assert self.outbox is not None
            self.outbox.max_backlog_bytes = int(self.limits.max_backlog_s * output_rate * 2)
            self.pacer = Pacer(session.pull_frame, self.outbox, ahead_s=self.limits.ahead_s)
            session.subscribe(self._on_event)
            observe(edge.app, session)  # /metrics
            self.session = session

        try:
            session = await start_call(info, config, edge.engines, input_rate=input_rate,
                                       output_rate=output_rate, store=edge.store,
                                       recordings_dir=_recordings_dir(edge.settings),
                                       on_end=self._on_session_end, prepare=prepare,
                                       journal=edge.journal)
        except CallStartFailed as exc:
            self.session = None
            detail = f"the session could not start: its {exc.stage} failed"
            assert self.outbox is not None
            self.outbox.event({"type": "error", "code": START_FAILED, "stage": exc.stage, "message": detail})
            raise Refused(Code.INTERNAL_ERROR, detail) from None
        assert self.pacer is not None
        self._audio_t0 = time.monotonic()
        self._tasks.append(asyncio.ensure_future(self.pacer.run()))
        self._tasks.append(asyncio.ensure_future(self._attach_agent(session)))

    async def _attach_agent(self, session: PipelineSession) -> None:
        try:
            await connect_agent(session, self.edge.agent_factory,
                                on_unavailable=lambda reason: count_dispatch_failure(self.edge.app, reason))
        except Exception:
            log.exception("session %s: attaching the agent failed", session.session_id)
            self.finish("internal_error", "attaching the agent failed", "error")

    def finish(self, name: str, detail: str, end_reason: str) -> asyncio.Task[None]:
        """End the session (keeping what it stored), flush, close the socket. First caller's reason wins."""
        if self._finish_task is None:
            self._finish_task = asyncio.ensure_future(self._finish(name, detail, end_reason))
        return self._finish_task

    async def _finish(self, name: str, detail: str, end_reason: str) -> None:
        self.close_name = name
        session = self.session
        if session is not None:
            logs.bind(**session.log_ids)  # this task may come from outside the session's (e.g. shutdown)
            try:
                if not session.ended.is_set():
                    await session.end(end_reason)
                await asyncio.wait_for(self._session_over.wait(), 30)  # an end already under way
            except Exception:
                log.exception("session %s: ending it failed", session.session_id)
            if name == "normal" and not detail:
                detail = session.end_reason or ""
        if self.outbox is not None:
            if name not in ("slow_consumer", "server_shutdown"):
                await self.outbox.flush(self.limits.close_timeout_s)
            self.outbox.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close(name, detail)
        log.info("client ws of session %s closed: %d %s", session.session_id if session else "(none)",
                 CLOSE_CODES.get(name, 1000), close_reason(name, detail).decode(errors="replace"))

    async def _close(self, name: str, detail: str) -> None:
        code = CLOSE_CODES.get(name, 1000)
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=close_reason(name, detail)),
                                   self.limits.close_timeout_s)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        # A client that never reads never takes the close frame: give it a while, then drop the socket.
        transport = getattr(self, "_transport", None)
        if transport is not None and not transport.is_closing():
            transport.close()
        if transport is not None:
            asyncio.get_running_loop().call_later(30, transport.abort)

    async def _on_session_end(self, reason: str) -> None:
        self._session_over.set()
        # The session ended on its own (agent hung up, no agent, failure): say goodbye with 1000.
        self.finish("normal", reason, reason)

    def _on_overflow(self) -> None:
        backlog = self.outbox.backlog_bytes if self.outbox else 0
        self.finish("slow_consumer", f"client not reading ({backlog} bytes of audio queued)", "slow_consumer")

    def _on_event(self, event: ev.Event) -> None:
        if self.outbox is None:
            return
        if isinstance(event, ev.Clear) and self.pacer is not None:
            self.pacer.reset()
        self.outbox.event(event.to_json())

    # ---- client → server -------------------------------------------------------------------------------
    async def _read_loop(self, config: PipeConfig) -> None:
        lim = self.limits
        while self._finish_task is None:
            try:
                msg = await self.ws.receive(timeout=lim.idle_timeout_s)
            except TimeoutError:
                self.finish("idle_timeout", f"no message for {lim.idle_timeout_s:g} s", "idle_timeout")
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                self.finish("client_closed", "", "client_closed")
                return
            if msg.type is WSMsgType.ERROR:
                too_big = WSCloseCode.MESSAGE_TOO_BIG in (self.ws.close_code, getattr(msg.data, "code", None))
                name = "frame_too_big" if too_big else "client_closed"
                self.finish(name, str(msg.data or ""), name)
                return
            if not self._take_token():
                self.finish("rate_limited", f"over {lim.max_messages_per_s:g} messages/s", "rate_limited")
                return
            if msg.type is WSMsgType.BINARY:
                if len(msg.data) > lim.max_frame_bytes:
                    self.finish("frame_too_big", f"{len(msg.data)} bytes > {lim.max_frame_bytes}",
                                "frame_too_big")
                    return
                if self.session is None:  # audio before `start`: the documented defaults apply
                    await self._start(config, DEFAULT_RATE, DEFAULT_RATE)
                self._on_audio(msg.data)
            elif msg.type is WSMsgType.TEXT:
                if len(msg.data) > lim.max_text_bytes:
                    self.finish("frame_too_big", f"{len(msg.data)} chars > {lim.max_text_bytes}",
                                "frame_too_big")
                    return
                await self._on_text(msg.data, config)

    def _take_token(self) -> bool:
        now = time.monotonic()
        lim = self.limits
        refill = (now - self._bucket_t) * lim.max_messages_per_s
        self._bucket = min(float(lim.message_burst), self._bucket + refill)
        self._bucket_t = now
        if self._bucket < 1.0:
            return False
        self._bucket -= 1.0
        return True

    def _on_audio(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        if len(data) % 2:
            self._bad_message("bad_audio", f"binary frames are PCM16: {len(data)} bytes is an odd length")
            return
        self._audio_s += len(data) / 2 / session.input_rate
        ahead = self._audio_s - (time.monotonic() - self._audio_t0)
        if ahead > self.limits.max_audio_ahead_s:
            self.finish("rate_limited", f"audio {ahead:.1f} s ahead of real time", "rate_limited")
            return
        session.push_audio(data)

    async def _on_text(self, raw: str, config: PipeConfig) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            self._bad_message("bad_message", "text frames must be JSON objects")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self._bad_message("bad_message", "text frames must be JSON objects with a string `type`")
            return
        kind = msg["type"]
        if kind == "start":
            await self._on_start(msg, config)
        elif kind == "stop":
            self.finish("normal", "client_stop", "client_stop")
        elif self.session is None:
            self._bad_message("not_started", f"{kind!r} before `start`")
        elif kind == "text":
            text = msg.get("text")
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
                self._bad_message("bad_message", f"`text` needs a string of 1-{MAX_TEXT_CHARS} chars")
                return
            self.session.push_text(text)
        elif kind == "playback":
            self._on_playback(msg)
        elif kind == "dtmf":
            self._on_dtmf(msg)
        else:
            self._bad_message("unknown_type", f"unknown message type {kind!r}")

    async def _on_start(self, msg: dict[str, Any], config: PipeConfig) -> None:
        if self.session is not None:
            self._bad_message("already_started", "`start` was already sent (or audio came first)")
            return
        rate = msg.get("sample_rate", DEFAULT_RATE)
        out_rate = msg.get("output_sample_rate", rate)
        codec = msg.get("codec", "pcm16")
        for field, value in (("sample_rate", rate), ("output_sample_rate", out_rate)):
            if isinstance(value, bool) or value not in SUPPORTED_RATES:
                self._bad_message("bad_start", f"{field} must be one of {list(SUPPORTED_RATES)}: {value!r}")
                return
        if codec not in CODECS:
            self._bad_message("bad_start", f"codec must be 'pcm16', got {codec!r}")
            return
        await self._start(config, int(rate), int(out_rate))

    def _on_playback(self, msg: dict[str, Any]) -> None:
        state, seconds, seq = msg.get("state"), msg.get("seconds", 0.0), msg.get("seq")
        if (state not in PLAYBACK_STATES or isinstance(seconds, bool) or not isinstance(seconds, int | float)
                or not 0 <= seconds < 86400 or (seq is not None and not isinstance(seq, int))):
            self._bad_message("bad_message", "`playback` needs state started|ended|stopped and seconds ≥ 0")
            return
        entry = {"state": state, "seconds": float(seconds), "seq": seq, "at": time.monotonic()}
        self.playback.append(entry)
        del self.playback[:-200]
        # The session uses what the client actually played for heard-text accounting, when it can.
        hook = getattr(self.session, "client_playback", None)
        if hook is not None:
            hook(state, float(seconds), seq)

    def _on_dtmf(self, msg: dict[str, Any]) -> None:
        """Keypad digits: each one reaches the agent's `dtmf` hook, in order, as on the phone."""
        digits = msg.get("digits")
        if isinstance(digits, str):
            digits = digits.upper()  # a-d are the same keys as A-D
        if (not isinstance(digits, str) or not 1 <= len(digits) <= MAX_DTMF_DIGITS
                or not set(digits) <= DTMF_DIGITS):
            self._bad_message("bad_message",
                              f"`dtmf` needs `digits`: a string of 1-{MAX_DTMF_DIGITS} of 0-9 * # A-D")
            return
        session = self.session
        assert session is not None
        # Digits may be a PIN: their count at info, the digits themselves only at debug.
        log.info("session %s: DTMF from the client, %d digit(s)", session.session_id, len(digits))
        log.debug("session %s: DTMF digits %s", session.session_id, digits)
        for digit in digits:
            session.dtmf(digit)

    def _bad_message(self, code: str, message: str) -> None:
        self._bad += 1
        if self._bad >= self.limits.max_bad_messages:
            self.finish("bad_message", f"{self._bad} invalid messages; last: {message}", "bad_message")
            return
        assert self.outbox is not None
        self.outbox.event({"type": "error", "code": code, "message": message})


def _journal(settings: Any) -> SessionJournal | None:
    """This server's journal of live web sessions: one directory per port, so two servers sharing a data
    dir never recover each other's sessions (SessionJournal also skips entries of live processes)."""
    data_dir = getattr(settings, "data_dir", None)
    if data_dir is None:
        return None
    return SessionJournal(Path(data_dir) / "sessions" / f"serve-{getattr(settings, 'port', 0)}",
                          SERVER_CRASHED)


def _recordings_dir(settings: Any) -> Any:
    path = getattr(settings, "recordings_dir", None)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path
