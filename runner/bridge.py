"""The runner's end of one call's bridge socket: hello, numbered frames, and redial after a drop.

`BridgeClient.connect()` dials `bridge_url`, says `hello` with the call token, and starts reading. If the
socket drops while the call is live (and the server did not close it for good), it redials with the same
token, with backoff, for up to `grace_s`; the `hello` names the last platform frame it got and the
`hello.ack` names the last of ours the platform got, so each side replays exactly what the other missed.
Frames are delivered to `on_frame` in order and once.

With `keepalive_s` (the runner passes its heartbeat interval), a bridge that sent nothing for about that long
sends an `ack`: the platform closes a bridge that carries no frame for a few heartbeat intervals (close 4408;
WebSocket pings do not count), and a quiet call (a caller on hold) must not look dead. A bridge closed that
way is redialled like any drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from speechpipe import protocol as p

log = logging.getLogger(__name__)

SDK = "speechpipe-python/0.1"


class BridgeFailed(Exception):
    """The bridge could not be (re)established; `code` says why (bad_token, resume_failed, bridge_lost...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class BridgeClient:
    def __init__(self, http: aiohttp.ClientSession, url: str, token: str, *,
                 on_frame: Callable[[dict[str, Any]], None], on_lost: Callable[[str], None],
                 stats: dict[str, Any], grace_s: float = 10.0, hello_timeout_s: float = 5.0,
                 keepalive_s: float | None = None) -> None:
        self.http = http
        self.url = url
        self.token = token
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.stats = stats
        self.grace_s = grace_s
        self.hello_timeout_s = hello_timeout_s
        self.keepalive_s = keepalive_s
        self._last_sent = time.monotonic()
        self.outbox = p.Outbox()
        self.inbox = p.Inbox()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session_id: str | None = None
        self.server_verbs: frozenset[str] = frozenset(p.AGENT_VERBS)
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.closed = False

    async def connect(self) -> None:
        """First dial. Raises BridgeFailed if the platform refuses us."""
        await self._dial(resume=False)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop(), name=f"bridge:{self.url}")
        if self.keepalive_s:
            self._keepalive = loop.create_task(self._keepalives(self.keepalive_s),
                                               name=f"bridge-keepalive:{self.url}")

    async def _dial(self, *, resume: bool) -> None:
        ws = await self.http.ws_connect(self.url, max_msg_size=p.MAX_FRAME_BYTES, autoping=True,
                                        timeout=aiohttp.ClientWSTimeout(ws_close=2.0))
        try:
            await ws.send_str(p.encode({"type": p.HELLO, "protocol": p.PROTOCOL_VERSION,
                                        "call_token": self.token, "last_seq": self.inbox.last_seq,
                                        "events": list(p.PLATFORM_EVENTS), "verbs": list(p.AGENT_VERBS),
                                        "sdk": SDK}))
            msg = await asyncio.wait_for(ws.receive(), self.hello_timeout_s)
            if msg.type != aiohttp.WSMsgType.TEXT:
                code = p.Codes.BAD_TOKEN if ws.close_code == p.CLOSE_CALL_OVER else "bridge_closed"
                raise BridgeFailed(code, f"bridge closed during hello (code {ws.close_code})")
            frame = p.parse(msg.data, p.BRIDGE_FROM_SERVER)
            if frame["type"] == p.ERROR:
                raise BridgeFailed(frame["code"], frame["message"])
            if frame["type"] != p.HELLO_ACK:
                raise BridgeFailed(p.Codes.OUT_OF_ORDER, f"expected hello.ack, got {frame['type']}")
            self.session_id = frame["session_id"]
            if "verbs" in frame:
                self.server_verbs = frozenset(p.names(frame["verbs"]))
            async with self._lock:
                replay = self.outbox.replay_after(frame["last_seq"])
                if replay is None:
                    raise BridgeFailed(p.Codes.RESUME_FAILED, "our unacknowledged frames were dropped")
                for out in replay:
                    await ws.send_str(p.encode({**out, "ack": self.inbox.last_seq}))
                self.ws = ws
                self._last_sent = time.monotonic()
            if resume:
                self.stats["bridge_redials"] += 1
                log.info("bridge %s resumed; %d frames replayed", self.session_id, len(replay))
        except BaseException:
            await ws.close()
            raise

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one verb. While the bridge is down it is kept and sent after the redial."""
        if self.closed:
            return
        if frame["type"] == p.AGENT_ERROR and p.AGENT_ERROR not in self.server_verbs:
            return  # a platform older than agent.error would only answer unknown_type
        async with self._lock:
            stamped = self.outbox.stamp(frame)
            ws = self.ws
            if ws is None or ws.closed:
                return
            self.inbox.sent_ack()
            try:
                await ws.send_str(p.encode({**stamped, "ack": self.inbox.last_seq}))
                self._last_sent = time.monotonic()
                self.stats["frames_out"] += 1
            except (ConnectionError, RuntimeError):
                pass  # the read loop sees the drop and redials; the frame is in the outbox

    async def _read_loop(self) -> None:
        reason = "bridge_closed"
        try:
            while not self.closed:
                ws = self.ws
                assert ws is not None
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.stats["protocol_errors"] += 1
                    continue
                if self.closed:
                    return
                code = ws.close_code
                self.ws = None
                if code in p.NO_REDIAL_CLOSES:
                    reason = "bridge_closed_by_platform"
                    return
                log.warning("bridge %s dropped (code %s); redialling", self.session_id, code)
                try:
                    await self._redial()
                except BridgeFailed as exc:
                    reason = exc.code
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bridge %s read loop failed", self.session_id)
            reason = "bridge_error"
        finally:
            if not self.closed:
                self.on_lost(reason)

    async def _on_text(self, data: str) -> None:
        try:
            frame = p.parse(data, p.BRIDGE_FROM_SERVER)
        except p.ProtocolError as exc:
            self.stats["protocol_errors"] += 1
            log.warning("bridge %s: bad frame from the platform: %s", self.session_id, exc)
            return
        self.stats["frames_in"] += 1
        if "ack" in frame:
            self.outbox.ack(frame["ack"])
        if not self.inbox.accept(frame) or frame["type"] in (p.ACK, p.HELLO_ACK):
            return
        if self.inbox.ack_due:
            await self._send_ack()
        self.on_frame({k: v for k, v in frame.items() if k not in ("seq", "ack")})

    async def _send_ack(self) -> None:
        ws = self.ws
        if ws is not None and not ws.closed:
            self.inbox.sent_ack()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(p.encode({"type": p.ACK, "ack": self.inbox.last_seq}))
                self._last_sent = time.monotonic()

    async def _keepalives(self, every_s: float) -> None:
        """An `ack` when nothing went out lately, so the gap between our frames stays under about `every_s`
        (a third of the platform's idle limit): a quiet call still shows a live runner."""
        while not self.closed and self._reader is not None and not self._reader.done():
            await asyncio.sleep(every_s / 3)
            ws = self.ws
            if ws is not None and not ws.closed and time.monotonic() - self._last_sent >= every_s * 2 / 3:
                await self._send_ack()
                self.stats["bridge_keepalives"] += 1

    async def _redial(self) -> None:
        deadline = time.monotonic() + self.grace_s
        delay = 0.05
        last = "no answer"
        while not self.closed and time.monotonic() < deadline:
            try:
                await self._dial(resume=True)
                return
            except BridgeFailed as exc:
                if exc.code in (p.Codes.BAD_TOKEN, p.Codes.RESUME_FAILED, p.Codes.CALL_ENDED,
                                p.Codes.PROTOCOL_UNSUPPORTED):
                    raise
                last = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError, p.ProtocolError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())) * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 1.0)
        raise BridgeFailed("bridge_lost", f"could not redial within {self.grace_s:g} s ({last})")

    async def close(self) -> None:
        self.closed = True
        ws, self.ws = self.ws, None
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
