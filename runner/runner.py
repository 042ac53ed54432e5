"""`AgentRunner`: the customer's process. It dials out to Speech Pipe and serves sessions as text.

    runner = AgentRunner(handle_call, agent_id="support", capacity=20)
    asyncio.run(runner.run())          # or runner.run_forever()

It registers on the control socket (API key, `SPEECHPIPE_URL` / `SPEECHPIPE_API_KEY` when not given),
answers `job.assign` with `job.ack` (rejecting when at capacity, draining, or for another agent_id), dials
each accepted job's bridge, waits for `call.started`, and runs `entrypoint(ctx)` then `ctx.session.run()`.
A dropped control socket is redialled with exponential backoff and jitter, trying the next node in turn when
`SPEECHPIPE_URL` lists several (comma-separated); live calls keep their bridges.
`shutdown()` drains: it tells the platform to stop offering jobs, waits for live calls up to
`drain_timeout_s`, then ends the rest cleanly (`agent.end_call`, reason `runner_shutdown`). SIGTERM and
SIGINT start it when `run()` owns the process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from speechpipe import logs
from speechpipe import protocol as p

from .bridge import SDK, BridgeClient, BridgeFailed
from .context import CallContext, Session, describe

log = logging.getLogger(__name__)

Entrypoint = Callable[[CallContext], Awaitable[None]]
JobFilter = Callable[[dict[str, Any]], bool | Awaitable[bool]]
DEFAULT_URL = "http://127.0.0.1:8780"


class RunnerError(Exception):
    """The runner cannot work (refused API key, unsupported protocol, bad configuration)."""


def control_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]` or `ws(s)://...` → the control socket's ws(s) URL."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise RunnerError(f"SPEECHPIPE_URL must be an http(s) or ws(s) URL, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/agents/connect"):
        path += "/v1/agents/connect"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class _Call:
    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.job_id: str = job["job_id"]
        self.session_id: str = job["session_id"]
        self.task: asyncio.Task[None] | None = None
        self.session: Session | None = None
        self.bridge: BridgeClient | None = None
        self.started = time.monotonic()


class AgentRunner:
    def __init__(self, entrypoint: Entrypoint, agent_id: str | None = None, capacity: int | None = None, *,
                 url: str | None = None, api_key: str | None = None, worker_id: str | None = None,
                 drain_timeout_s: float = 30.0, end_timeout_s: float = 10.0, on_job: JobFilter | None = None,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0, bridge_grace_s: float = 10.0,
                 call_start_timeout_s: float = 10.0) -> None:
        env = os.environ
        self.entrypoint = entrypoint
        self.agent_id = agent_id or env.get("SPEECHPIPE_AGENT_ID") or ""
        if not p.AGENT_ID_RE.match(self.agent_id):
            raise RunnerError(f"agent_id must match {p.AGENT_ID_RE.pattern} (or set SPEECHPIPE_AGENT_ID), "
                              f"got {self.agent_id!r}")
        self.capacity = int(capacity if capacity is not None else env.get("SPEECHPIPE_CAPACITY") or 10)
        if self.capacity < 1:
            raise RunnerError("capacity must be at least 1")
        # Several nodes of one deployment, comma-separated: a dropped control socket redials the next one.
        raw = url or env.get("SPEECHPIPE_URL") or DEFAULT_URL
        self.urls = [control_url(u.strip()) for u in raw.split(",") if u.strip()]
        if not self.urls:
            raise RunnerError(f"SPEECHPIPE_URL names no URL: {raw!r}")
        self._url_index = 0
        self.api_key = api_key or env.get("SPEECHPIPE_API_KEY") or ""
        if not self.api_key:
            raise RunnerError("an API key is required: pass api_key= or set SPEECHPIPE_API_KEY")
        self.worker_id = worker_id or env.get("SPEECHPIPE_WORKER_ID") or \
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.drain_timeout_s = drain_timeout_s
        self.end_timeout_s = end_timeout_s
        self.on_job = on_job
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.bridge_grace_s = bridge_grace_s
        self.call_start_timeout_s = call_start_timeout_s
        self.runner_id: str | None = None
        self.heartbeat_interval_s = 5.0
        self.heartbeat_timeout_s = 15.0
        self.calls: dict[str, _Call] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.draining = False
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._control: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._fatal: Exception | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._shutdown: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The control socket URL dialled now (the first of `urls` until a drop moves on)."""
        return self.urls[self._url_index]

    # ---- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, timeout_s: float | None = None) -> None:
        """Connect and register. Returns once registered; raises RunnerError if the platform refuses us."""
        if self._control is None:
            self._started_at = time.monotonic()
            # No connection limit: every live call holds one bridge WebSocket (aiohttp's default caps the
            # session at 100 connections, which would stall the 100th call's dial).
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._control = asyncio.get_running_loop().create_task(self._control_loop(),
                                                                   name="runner-control")
        waiter = asyncio.ensure_future(self._registered.wait())
        done = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([waiter, done], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            done.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not self._registered.is_set():
            raise TimeoutError(f"not registered with {self.url} within {timeout_s} s")

    async def run(self, *, handle_signals: bool = True) -> None:
        """Start, then serve until `shutdown()` (SIGTERM/SIGINT call it when `handle_signals`)."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self._stopped.wait()
            if self._shutdown is not None:
                await self._shutdown
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
            if not self._stopped.is_set():
                await self.shutdown(timeout_s=0)
        if self._fatal is not None:
            raise self._fatal

    def run_forever(self) -> None:
        """Blocking `run()` for a script's `__main__`."""
        asyncio.run(self.run())

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("runner %s: %s received; draining", self.worker_id, sig.name)
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self.shutdown(), name="runner-shutdown")

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Drain: no new jobs; wait for live calls up to `timeout_s` (default drain_timeout_s); end the
        rest cleanly; disconnect."""
        if self._stopping:
            await self._stopped.wait()
            return
        timeout = self.drain_timeout_s if timeout_s is None else timeout_s
        self.draining = True
        await self._control_send({"type": p.DRAIN})
        t0 = time.monotonic()
        live = [c.task for c in self.calls.values() if c.task is not None]
        log.info("runner %s draining: %d live calls, waiting up to %.0f s", self.worker_id, len(live),
                 timeout)
        if live and timeout > 0:
            await asyncio.wait(live, timeout=timeout)
        left = [c for c in self.calls.values() if c.task is not None and not c.task.done()]
        if left:
            self.counters["calls_ended_by_shutdown"] += len(left)
            for call in left:
                if call.session is not None:
                    with contextlib.suppress(Exception):
                        await call.session.end("runner_shutdown")
            await asyncio.wait([c.task for c in left if c.task], timeout=self.end_timeout_s)
            for call in left:
                if call.task is not None and not call.task.done():
                    call.task.cancel()
            await asyncio.gather(*[c.task for c in left if c.task], return_exceptions=True)
        self.counters["drain_ms"] = int((time.monotonic() - t0) * 1000)
        self._stopping = True
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._control
        if self._tasks:  # on_job filters still deciding: no job is taken any more
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self._stopped.set()
        log.info("runner %s stopped", self.worker_id)

    def stats(self) -> dict[str, Any]:
        """Honest counters: every number is incremented where the thing happens."""
        c = self.counters
        rejected = {k.removeprefix("jobs_rejected_"): v for k, v in c.items()
                    if k.startswith("jobs_rejected_")}
        return {
            "agent_id": self.agent_id, "worker_id": self.worker_id, "runner_id": self.runner_id,
            "connected": self._ws is not None and not self._ws.closed and self._registered.is_set(),
            "draining": self.draining, "capacity": self.capacity, "active_calls": len(self.calls),
            "jobs_offered": c["jobs_offered"], "jobs_accepted": c["jobs_accepted"], "jobs_rejected": rejected,
            "jobs_cancelled": c["jobs_cancelled"], "calls_started": c["calls_started"],
            "calls_completed": c["calls_completed"], "calls_failed": c["calls_failed"],
            "calls_ended_by_shutdown": c["calls_ended_by_shutdown"], "hook_errors": c["hook_errors"],
            "reply_errors": c["reply_errors"], "errors_reported": c["errors_reported"],
            "reconnects": c["reconnects"],
            "bridge_redials": c["bridge_redials"], "bridge_keepalives": c["bridge_keepalives"],
            "frames_in": c["frames_in"], "frames_out": c["frames_out"],
            "protocol_errors": c["protocol_errors"], "heartbeats_sent": c["heartbeats_sent"],
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }

    # ---- control socket -----------------------------------------------------------------------------------
    async def _control_loop(self) -> None:
        try:
            await self._dial_control()
        finally:
            if self._fatal is not None and self._http is not None:
                await self._http.close()  # refused for good: nothing else will run
                self._stopped.set()

    async def _dial_control(self) -> None:
        attempt = 0
        assert self._http is not None
        while not self._stopping:
            try:
                headers = {"Authorization": f"Bearer {self.api_key}"}
                async with self._http.ws_connect(self.url, headers=headers, max_msg_size=p.MAX_FRAME_BYTES,
                                                 autoping=True) as ws:
                    await self._serve_control(ws)
                    attempt = 0
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (401, 403):
                    self._fail(RunnerError(f"the platform refused the API key (HTTP {exc.status})"))
                    return
                log.warning("runner %s: control handshake failed: HTTP %s", self.worker_id, exc.status)
            except RunnerError as exc:
                self._fail(exc)
                return
            except (aiohttp.ClientError, OSError, TimeoutError, p.ProtocolError) as exc:
                log.warning("runner %s: control socket: %s: %s", self.worker_id, type(exc).__name__, exc)
            finally:
                self._ws = None
                self._registered.clear()
            if self._stopping:
                return
            delay = min(self.reconnect_max_s, self.reconnect_min_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            self._url_index = (self._url_index + 1) % len(self.urls)
            if self._url_index == 0:  # back off once per round of the nodes, not per node
                attempt = min(attempt + 1, 16)
            self.counters["reconnects"] += 1
            log.info("runner %s: reconnecting in %.2f s", self.worker_id, delay)
            await asyncio.sleep(delay)

    def _fail(self, exc: Exception) -> None:
        log.error("runner %s: %s", self.worker_id, exc)
        self._fatal = exc
        self._stopping = True

    async def _serve_control(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_str(p.encode({"type": p.REGISTER, "agent_id": self.agent_id, "capacity": self.capacity,
                                    "worker_id": self.worker_id, "protocol": p.PROTOCOL_VERSION,
                                    "active": len(self.calls), "sdk": SDK, "pid": os.getpid()}))
        msg = await asyncio.wait_for(ws.receive(), 10.0)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise OSError(f"control socket closed during registration (code {ws.close_code})")
        frame = p.parse(msg.data, p.CONTROL_FROM_SERVER)
        if frame["type"] == p.ERROR:
            raise RunnerError(f"registration refused: {frame['code']}: {frame['message']}")
        if frame["type"] != p.REGISTERED:
            raise p.ProtocolError(p.Codes.OUT_OF_ORDER, f"expected registered, got {frame['type']}")
        self.runner_id = frame["runner_id"]
        self.heartbeat_interval_s = frame["heartbeat_interval_ms"] / 1000
        self.heartbeat_timeout_s = frame["heartbeat_timeout_ms"] / 1000
        self._ws = ws
        self._registered.set()
        log.info("runner %s registered as %s for agent %s (capacity %d)", self.worker_id, self.runner_id,
                 self.agent_id, self.capacity)
        if self.draining:
            await self._control_send({"type": p.DRAIN})
        beats = asyncio.get_running_loop().create_task(self._heartbeats(ws), name="runner-heartbeats")
        try:
            while True:
                # TimeoutError: the server went silent past its own heartbeat timeout; redial.
                # `receive(timeout=)`, not `wait_for(receive())`: no task per frame, so frames already
                # read are handled in this same step. A burst of job.assign is acked back to back, not one
                # ack per pass of the event loop behind every call this runner is setting up.
                msg = await ws.receive(timeout=self.heartbeat_timeout_s)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        self.counters["protocol_errors"] += 1
                        continue
                    log.warning("runner %s: control socket closed (code %s)", self.worker_id, ws.close_code)
                    return
                try:
                    frame = p.parse(msg.data, p.CONTROL_FROM_SERVER)
                except p.ProtocolError as exc:
                    self.counters["protocol_errors"] += 1
                    log.warning("runner %s: bad control frame: %s", self.worker_id, exc)
                    continue
                await self._on_control(frame)
        finally:
            beats.cancel()

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.heartbeat_interval_s)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(p.encode({"type": p.HEARTBEAT, "active": len(self.calls)}))
                self.counters["heartbeats_sent"] += 1

    async def _control_send(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_str(p.encode(frame))
            return True
        except (ConnectionError, RuntimeError):
            return False

    async def _on_control(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == p.JOB_ASSIGN:
            await self._on_job(frame)
        elif kind == p.JOB_CANCEL:
            call = self.calls.get(frame["job_id"])
            if call is not None and call.task is not None:
                self.counters["jobs_cancelled"] += 1
                log.info("runner %s: job %s cancelled by the platform (%s)", self.worker_id, call.job_id,
                         frame.get("reason"))
                call.task.cancel()
        elif kind == p.ERROR:
            log.warning("runner %s: platform error %s: %s", self.worker_id, frame["code"], frame["message"])

    async def _on_job(self, job: dict[str, Any]) -> None:
        """Answer a `job.assign` at once: the platform gives the ack a deadline, and the acks of the offers
        behind this one wait for it. The call itself starts after the ack, in its own task. An `on_job`
        filter that returns an awaitable is awaited in a task of its own, with the slot held meanwhile."""
        self.counters["jobs_offered"] += 1
        reason = None
        if self.draining or self._stopping:
            reason = p.REJECT_DRAINING
        elif job["agent_id"] != self.agent_id:
            reason = p.REJECT_AGENT_MISMATCH
        elif len(self.calls) >= self.capacity:
            reason = p.REJECT_AT_CAPACITY
        if reason is not None:
            await self._answer(job, reason)
            return
        call = _Call(job)
        self.calls[call.job_id] = call  # counts against capacity from now on (also while a filter runs)
        verdict: bool | Awaitable[bool] = True
        if self.on_job is not None:
            try:
                verdict = self.on_job(job)
            except Exception:
                log.exception("runner %s: on_job filter raised; rejecting job %s", self.worker_id,
                              job["job_id"])
                verdict = False
        if inspect.isawaitable(verdict):
            self._spawn(self._filter_then_answer(call, verdict), f"on_job:{call.job_id}")
            return
        await self._accept_or_refuse(call, bool(verdict))

    async def _filter_then_answer(self, call: _Call, verdict: Awaitable[bool]) -> None:
        try:
            ok = bool(await verdict)
        except asyncio.CancelledError:  # shutdown while the filter ran: the slot is free again
            self.calls.pop(call.job_id, None)
            raise
        except Exception:
            log.exception("runner %s: on_job filter raised; rejecting job %s", self.worker_id, call.job_id)
            ok = False
        await self._accept_or_refuse(call, ok)

    async def _accept_or_refuse(self, call: _Call, ok: bool) -> None:
        if not ok or self.draining or self._stopping:
            self.calls.pop(call.job_id, None)
            await self._answer(call.job, p.REJECT_REFUSED if not ok else p.REJECT_DRAINING)
            return
        self.counters["jobs_accepted"] += 1
        await self._answer(call.job, None)
        call.task = asyncio.get_running_loop().create_task(self._serve_call(call),
                                                           name=f"call:{call.session_id}")

    async def _answer(self, job: dict[str, Any], reason: str | None) -> None:
        """The `job.ack`: accepted when `reason` is None, else rejected for `reason`."""
        frame: dict[str, Any] = {"type": p.JOB_ACK, "job_id": job["job_id"], "accepted": reason is None}
        if reason is not None:
            self.counters[f"jobs_rejected_{reason}"] += 1
            frame["reason"] = reason
        await self._control_send(frame)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- one call -----------------------------------------------------------------------------------------
    async def _serve_call(self, call: _Call) -> None:
        assert self._http is not None
        meta = call.job.get("metadata") or {}
        # This task and the handler's tasks log with the call's ids (in JSON logs: fields of every line).
        logs.bind(session_id=call.session_id, pipe_id=meta.get("pipe_id"), direction=meta.get("direction"),
                  agent_id=call.job.get("agent_id"))
        session = Session(lambda frame: bridge.send(frame), stats=self.counters)
        call.session = session
        bridge = BridgeClient(self._http, call.job["bridge_url"], call.job["call_token"],
                              on_frame=session.deliver, on_lost=lambda why: session.deliver(None),
                              stats=self.counters, grace_s=self.bridge_grace_s,
                              keepalive_s=self.heartbeat_interval_s)
        call.bridge = bridge
        outcome = "calls_failed"
        try:
            try:
                await bridge.connect()
            except (BridgeFailed, aiohttp.ClientError, OSError, TimeoutError, p.ProtocolError) as exc:
                log.warning("runner %s: bridge for job %s failed: %s", self.worker_id, call.job_id, exc)
                return
            first = await asyncio.wait_for(session._events.get(), self.call_start_timeout_s)
            if first is None or first["type"] != p.CALL_STARTED:
                log.warning("runner %s: job %s: expected call.started, got %r", self.worker_id, call.job_id,
                            first and first["type"])
                return
            ctx = CallContext.from_call_started(first, session, call.job_id)
            self.counters["calls_started"] += 1
            log.info("runner %s: call %s (%s) started", self.worker_id, ctx.session_id, ctx.direction)
            try:
                await self.entrypoint(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The entrypoint is user code like a hook: log it, tell the platform (the caller hears an
                # apology, not silence); the call goes on with what it set up.
                self.counters["hook_errors"] += 1
                log.exception("runner %s: entrypoint raised for %s; serving the call anyway", self.worker_id,
                              ctx.session_id)
                session.setup_error = describe(exc)
                await session.report_error(p.AgentErrorCodes.ENTRYPOINT_FAILED,
                                           f"handle_call raised {session.setup_error}")
            if not session.ended:
                await session.run()
            outcome = "calls_completed" if session.end_reason != "bridge_lost" else "calls_failed"
        except TimeoutError:
            log.warning("runner %s: job %s: no call.started in time", self.worker_id, call.job_id)
        except asyncio.CancelledError:
            outcome = "calls_cancelled"
        except Exception:
            log.exception("runner %s: call %s failed", self.worker_id, call.session_id)
        finally:
            self.counters[outcome] += 1
            self.calls.pop(call.job_id, None)
            await bridge.close()
