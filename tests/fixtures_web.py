"""Web-session fixtures: the real app with the client WebSocket and the test page, plus raw-client helpers.

`web_server` (session-scoped) serves `create_app` on a free loopback port in its own thread and event loop,
with the client WebSocket and test page mounted, demo mode on, SQLite storage and an in-process example
agent per pipe (`echo` repeats the user, `long-talker` answers with LONG_REPLY). Tests talk to it over
real sockets: `aiohttp` for raw clients, Chromium for the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from speechpipe.pipeline.agent import AgentLink, AgentUnavailable, CallbackAgent, echo_reply
from speechpipe.pipeline.session import Engines, PipelineSession
from speechpipe.settings import Settings
from speechpipe.storage import Store
from speechpipe.storage.records import SessionRecord, Turn
from speechpipe.websocket_edge.app import create_app, default_route_groups
from speechpipe.websocket_edge.client_ws import (
    CLIENT_EDGE_KEY,
    ClientEdge,
    EdgeLimits,
    setup_client_ws,
)
from speechpipe.websocket_edge.static_routes import setup_test_page

from .fixtures_db import serve_in_thread

LONG_REPLY = ("Thank you for calling. Our opening hours are from nine in the morning until six in the "
              "evening on weekdays, and from ten until four on Saturdays. We are closed on Sundays and "
              "on public holidays. You can also reach us by email at any time.")
REPLIES = {"long-talker": lambda text: LONG_REPLY}


async def example_agents(session: PipelineSession) -> AgentLink:
    """The example agent of each test pipe, by the pipe's agent_id (default: echo; `absent`: none)."""
    if session.info.agent_id == "absent":
        raise AgentUnavailable("no_runner")  # as AgentHub's NoAgentAvailable does
    return CallbackAgent(REPLIES.get(session.info.agent_id, echo_reply))


def web_route_groups() -> list[Any]:
    """`serve`'s route groups, plus the web edge and test page if `create_app` does not mount them yet."""
    groups = default_route_groups()
    names = {getattr(g, "__name__", "") for g in groups}
    out: list[Any] = list(groups)
    if "setup_client_ws" not in names:
        out.append(setup_client_ws)
    if "setup_test_page" not in names:
        out.append(setup_test_page)
    return out


@dataclass
class WebServer:
    url: str
    settings: Settings
    store: Store
    app: web.Application
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _runner: web.AppRunner = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _pipes: dict[str, str] = field(default_factory=dict)

    @property
    def edge(self) -> ClientEdge:
        return self.app[CLIENT_EDGE_KEY]

    def ws_url(self, pipe_id: str, token: str | None = None) -> str:
        url = self.url.replace("http://", "ws://") + f"/v1/pipes/{pipe_id}/connect"
        return f"{url}?token={token}" if token is not None else url

    def pipe(self, agent_id: str = "echo") -> str:
        """A pipe whose agent is `agent_id` (one per agent id, made on first use)."""
        if agent_id not in self._pipes:
            self._pipes[agent_id] = self.store.create_pipe({"agent_id": agent_id}, name=f"test-{agent_id}").id
        return self._pipes[agent_id]

    def token(self, pipe_id: str, **kwargs: Any) -> str:
        return self.store.mint_token(pipe_id, **kwargs).token

    @contextlib.contextmanager
    def limits(self, **changes: Any) -> Iterator[EdgeLimits]:
        """Per-connection limits for connections opened inside the block."""
        before = self.edge.limits
        self.edge.limits = dataclasses.replace(before, **changes)
        try:
            yield self.edge.limits
        finally:
            self.edge.limits = before

    def session_count(self) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM sessions").scalar_one())

    def session(self, session_id: str) -> SessionRecord:
        return self.store.get_session(session_id)

    def turns(self, session_id: str) -> list[Turn]:
        return self.store.list_turns(session_id)

    async def ended(self, session_id: str, timeout_s: float = 20) -> SessionRecord:
        """The session's row once it has ended (polls SQL, as a user would)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rec = await asyncio.to_thread(self.store.get_session, session_id)
            if rec.ended_at is not None or time.monotonic() > deadline:
                return rec
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def start_web_server(settings: Settings, store: Store, engines: Engines) -> WebServer:
    def make_app() -> web.Application:
        app = create_app(settings, store, route_groups=web_route_groups())
        # The test's engines (loaded once per run) and example agents, whatever `serve` wires by default.
        app[CLIENT_EDGE_KEY].use(engines=engines, agent_factory=example_agents)
        return app

    srv = serve_in_thread(make_app, name="web-server", start_timeout_s=60, shutdown_timeout_s=10)
    return WebServer(url=f"http://127.0.0.1:{srv.port}", settings=settings, store=store, app=srv.app,
                     _loop=srv.loop, _runner=srv.runner, _thread=srv.thread)


@pytest.fixture(scope="session")
def web_server(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    data = tmp_path_factory.mktemp("web")
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data / 'speechpipe.db'}", demo=True)
    settings.ensure_dirs()
    store = Store(settings.db_url)
    store.upgrade()
    server = start_web_server(settings, store, engines)
    yield server
    server.stop()
    store.close()


# ------------------------------------------------------------------------------------------ raw clients


@dataclass
class RawClient:
    """One raw WebSocket client: every event and audio frame it received, with arrival times."""

    ws: aiohttp.ClientWebSocketResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    audio: list[tuple[float, bytes]] = field(default_factory=list)
    close_reason: str = ""
    closed_at: float | None = None
    _reader: asyncio.Task[None] | None = None

    def start_reading(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.ws.receive()
            now = time.monotonic()
            if msg.type is aiohttp.WSMsgType.BINARY:
                self.audio.append((now, msg.data))
            elif msg.type is aiohttp.WSMsgType.TEXT:
                self.events.append({"_t": now, **json.loads(msg.data)})
            else:
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    self.close_reason = str(msg.extra or "")
                self.closed_at = now
                return

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout_s: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}× {kind!r} within {timeout_s} s; got {self.types()}")
            if self._reader is not None and self._reader.done():
                raise AssertionError(f"closed ({self.ws.close_code}) before {kind!r}; got {self.types()}")
            await asyncio.sleep(0.02)
        return self.of(kind)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def send_json(self, data: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(data))

    async def stream(self, pcm: np.ndarray, rate: int, frame_ms: int = 20) -> None:
        """Send int16 `pcm` in real time, `frame_ms` per frame, on an absolute schedule."""
        n = rate * frame_ms // 1000
        t0 = time.monotonic()
        for i in range(0, len(pcm), n):
            chunk = pcm[i:i + n]
            if len(chunk) < n:
                chunk = np.pad(chunk, (0, n - len(chunk)))
            await self.ws.send_bytes(chunk.astype("<i2").tobytes())
            delay = t0 + (i // n + 1) * frame_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def closed(self, timeout_s: float = 20) -> tuple[int | None, str]:
        """Wait for the server to close; returns (close code, reason)."""
        if self._reader is None:
            self.start_reading()
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        return self.ws.close_code, self.close_reason


@pytest.fixture
async def raw_connect():
    """`await raw_connect(url)` opens a raw client (reading in the background); all are closed after."""
    http = aiohttp.ClientSession()
    clients: list[RawClient] = []

    async def connect(url: str, *, read: bool = True, headers: dict[str, str] | None = None) -> RawClient:
        ws = await http.ws_connect(url, headers=headers, autoclose=True, max_msg_size=0)
        client = RawClient(ws)
        if read:
            client.start_reading()
        clients.append(client)
        return client

    yield connect
    for c in clients:
        await c.ws.close()
        if c._reader is not None:
            c._reader.cancel()
    await http.close()


def chromium_args(wav: Path) -> list[str]:
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"]


ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
