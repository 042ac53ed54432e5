"""A SIP media worker: one process, one SIP port, up to its call limit of phone calls on the pipeline.

`python -m speechpipe.telephony.worker --index N` (what the supervisor runs): listens on
`sip_port_base + N`, maps each INVITE's dialled user part to a pipe (`PipeConfig.sip_extension`, or the
pipe id itself), answers, and runs a `PipelineSession` (direction `inbound_phone`, the caller's number and
name) at the negotiated codec's rate: 16 kHz for G.722, 8 kHz for G.711. The agent comes from
`agent_factory(session)`; None means no agent (the session apologises and ends).

Crash safety: every live call has an entry in the worker's `SessionJournal` (`pipeline.journal`); a worker
that starts after a crash repairs those calls' recordings, adds their `recordings` rows and ends their
sessions (`worker_crashed`). Turns are written as they finish, so they are already in SQL.

Status for the supervisor: JSON lines on the file descriptor in `SPEECHPIPE_SIP_STATUS_FD` (`ready`,
then `stats` every second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speechpipe import logs
from speechpipe.errors import NotFoundError
from speechpipe.pipe_config import PipeConfig
from speechpipe.pipeline.call import AgentFactory, CallStartFailed, connect_agent, start_call
from speechpipe.pipeline.journal import WORKER_CRASHED, SessionJournal
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo
from speechpipe.settings import Settings
from speechpipe.storage import AsyncStore, Store
from speechpipe.storage.records import Pipe

from .config import SipConfig
from .endpoint import IncomingCall, MediaUp, SipEndpoint
from .media import FrameBridge, LoopInbox
from .pbx_check import HUNT_HEADER, hunt_mismatch
from .relay_client import TelemetryForwarder

log = logging.getLogger(__name__)

TRANSFER_TIMEOUT_S = 10.0
PIPE_CACHE_S = 5.0
EARLY_AUDIO_FRAMES = 250  # caller audio kept while the session starts (5 s); more means something is stuck


async def _no_agent(session: PipelineSession) -> None:
    """The factory of a worker started without one: every call gets the apology."""
    return None


def load_agent_factory(spec: str | None) -> AgentFactory | None:
    """`module:attr` → the factory it names (None for no spec)."""
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"agent factory must look like 'module:function', got {spec!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class PipeDirectory:
    """Dialled user part → pipe, from `PipeConfig.sip_extension` (or the pipe id); cached briefly."""

    def __init__(self, store: AsyncStore) -> None:
        self.store = store
        self._by_ext: dict[str, Pipe] = {}
        self._loaded = 0.0
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        by_ext: dict[str, Pipe] = {}
        cursor = None
        while True:
            page = await self.store.list_pipes(limit=100, cursor=cursor)
            for pipe in page.items:
                ext = (pipe.config or {}).get("sip_extension")
                if ext and ext not in by_ext:  # newest pipe wins a duplicated extension
                    by_ext[ext] = pipe
            cursor = page.next_cursor
            if not cursor:
                break
        self._by_ext = by_ext
        self._loaded = time.monotonic()

    async def lookup(self, user: str | None) -> Pipe | None:
        if not user:
            return None
        async with self._lock:
            age = time.monotonic() - self._loaded
            # Refresh when stale, or on a miss at most once a second (an INVITE flood must not hammer SQL).
            if age > PIPE_CACHE_S or (user not in self._by_ext and age > 1.0):
                await self._refresh()
        pipe = self._by_ext.get(user)
        if pipe is None and user.startswith("pipe_"):
            with contextlib.suppress(NotFoundError):
                pipe = await self.store.get_pipe(user)
        return pipe


@dataclass
class CallState:
    incoming: IncomingCall
    pipe: Pipe
    config: PipeConfig
    session: PipelineSession | None = None
    gone: bool = False  # the SIP dialog is over (BYE either way, CANCEL, error)
    rate: int = 0
    early: list[bytes] = field(default_factory=list)
    transfer: asyncio.Future[int] | None = None
    bridge: FrameBridge | None = None

    @property
    def key(self) -> int:
        return self.incoming.key

    # Runs on the loop: caller audio into the session (held until the session has started).
    def on_audio(self, pcm: bytes) -> None:
        session = self.session
        if session is not None:
            session.push_audio(pcm)
        elif len(self.early) < EARLY_AUDIO_FRAMES:
            self.early.append(pcm)

    # Runs on pjmedia's clock thread: the next 20 ms of agent audio (PipelineSession.pull_frame is
    # thread-safe by contract).
    def pull(self) -> bytes | None:
        session = self.session
        return session.pull_frame() if session is not None and not self.gone else None


class Worker:
    def __init__(self, settings: Settings, sip: SipConfig, store: AsyncStore, *,
                 agent_factory: AgentFactory | None = None, engines: Engines | None = None,
                 status_fd: int | None = None) -> None:
        self.settings = settings
        self.sip = sip
        self.store = store
        self.agent_factory = agent_factory
        self.engines = engines or Engines()
        self.status_fd = status_fd
        self.directory = PipeDirectory(store)
        self.calls: dict[int, CallState] = {}
        self.journal = SessionJournal(settings.data_dir / "telephony" / f"worker-{sip.port}",
                                      WORKER_CRASHED)
        self.recordings_dir = settings.recordings_dir
        self.stopping = False
        self.stats: dict[str, Any] = {"answered": 0, "rejected_no_pipe": 0, "ended": 0, "late_out": 0,
                                      "late_in": 0, "frames_out": 0, "recovered": 0}
        self.reg_state: dict[str, Any] | None = None
        self.index = sip.port - settings.sip_port_base  # what the PBX's X-SpeechPipe-Hunt must name
        self.pbx_mismatch: str | None = None
        self.telemetry = TelemetryForwarder.from_env()  # started by serve: its /metrics counts our sessions
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.inbox = LoopInbox(self.loop)
        await self.recover()
        # Load models before taking calls: a first call must not stall the media clock on a model load.
        await self.loop.run_in_executor(None, self.warm_up)
        self.endpoint = SipEndpoint(self.sip, self.loop, self, log_level=_pj_log_level())
        await self.loop.run_in_executor(None, self.endpoint.start)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, self._stop.set)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            self.loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)  # `kill -USR2 <pid>`: asyncio tasks
        self._status("ready", version=self.endpoint.version)
        reporter = self.loop.create_task(self._report())
        try:
            await self._stop.wait()
        finally:
            reporter.cancel()
            await self.shutdown()

    def warm_up(self) -> None:
        from speechpipe.pipeline.vad import make_vad

        config = PipeConfig(agent_id="warmup")
        self.engines.warm_up(config)
        for rate in (8000, 16000):  # G.711 legs run the VAD's 8 kHz branch, G.722 legs the 16 kHz one
            make_vad(config.vad, rate).speech_prob(np.zeros(rate // 50, np.int16))

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        """End every session (their rows and recordings close properly), then hang up and stop pjsua."""
        self.stopping = True
        live = [s.session for s in list(self.calls.values()) if s.session is not None]
        await asyncio.gather(*(end_session(session, "shutdown") for session in live),
                             return_exceptions=True)
        if self.telemetry is not None:
            await self.telemetry.close()  # their session.ended events reach serve first
        await self.loop.run_in_executor(None, self.endpoint.stop)
        self._status("stopped")

    # ---- crash recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """Close what a killed predecessor on this port left: repair recordings, end sessions."""
        self.stats["recovered"] += len(await self.journal.recover(self.store))

    # ---- endpoint events (on the loop) ---------------------------------------------------------------
    def incoming(self, call: IncomingCall) -> None:
        self._spawn(self._incoming(call))

    async def _incoming(self, call: IncomingCall) -> None:
        problem = hunt_mismatch(call.hunt, self.index, self.settings.sip_workers)
        if problem is not None and problem != self.pbx_mismatch:
            log.error("PBX and Speech Pipe disagree on the media workers: %s (%s: %s)", problem,
                      HUNT_HEADER, call.hunt)
        if call.hunt is not None:  # /healthz says so until a call from the PBX agrees again
            self.pbx_mismatch = problem
        if self.stopping:
            await self.endpoint.run(self.endpoint.hangup, call.key, 503, "Service Unavailable")
            return
        try:
            pipe = await self.directory.lookup(call.dialled)
        except Exception:
            log.exception("pipe lookup for %r failed", call.dialled)
            await self.endpoint.run(self.endpoint.hangup, call.key, 500, "Server Error")
            return
        if pipe is None:
            self.stats["rejected_no_pipe"] += 1
            log.info("call %d: no pipe for %r; 404", call.key, call.dialled)
            await self.endpoint.run(self.endpoint.hangup, call.key, 404, "Not Found")
            return
        state = CallState(call, pipe, PipeConfig.model_validate(pipe.config))
        logs.bind(pipe_id=pipe.id, direction="inbound_phone", agent_id=state.config.agent_id)  # call's task
        self.calls[call.key] = state

        def bridge_factory(rate: int) -> FrameBridge:  # pjlib thread
            state.rate = rate
            state.bridge = FrameBridge(self.inbox, state.on_audio, state.pull, rate // 50 * 2)
            return state.bridge

        try:
            answered = await self.endpoint.run(self.endpoint.answer, call.key, 200, bridge_factory)
        except Exception as exc:  # pj.Error: the call went away or its SDP could not be answered
            log.warning("call %d: answering failed: %s", call.key, _pj_reason(exc))
            answered = False
        if not answered:
            self.calls.pop(call.key, None)
            return
        self.stats["answered"] += 1
        log.info("call %d answered: %r → pipe %s (from %s %r via %s)", call.key, call.dialled, pipe.id,
                 call.caller, call.caller_name, call.source)

    def media_up(self, media: MediaUp) -> None:
        state = self.calls.get(media.key)
        if state is not None and state.session is None:
            self._spawn(self._start_session(state, media))

    async def _start_session(self, state: CallState, media: MediaUp) -> None:
        call = state.incoming
        info = SessionInfo(
            pipe_id=state.pipe.id, agent_id=state.config.agent_id, direction="inbound_phone",
            caller=call.caller, caller_name=call.caller_name,
            metadata={"sip": {"call_id": call.sip_call_id, "dialled": call.dialled, "codec": media.codec,
                              "rate": media.rate, "worker_port": self.sip.port}})

        async def on_end(reason: str) -> None:
            await self._session_ended(state, reason)

        async def on_transfer(target: str, mode: str) -> str | None:
            return await self._transfer(state, target, mode)

        def prepare(session: PipelineSession) -> None:
            if self.telemetry is not None:
                self.telemetry.observe(session)

        try:
            # This task is the call's: start_call binds its log fields here, and the session's tasks
            # inherit them.
            session = await start_call(info, state.config, self.engines, input_rate=media.rate,
                                       output_rate=media.rate, store=self.store,
                                       recordings_dir=self.recordings_dir, on_end=on_end,
                                       on_transfer=on_transfer, prepare=prepare, early_audio=state.early,
                                       journal=self.journal,
                                       journal_note={"sip_call_id": state.incoming.sip_call_id})
        except CallStartFailed:
            log.error("call %d: the session could not start; hanging up", call.key)
            await self.endpoint.run(self.endpoint.hangup, call.key)
            self.calls.pop(call.key, None)
            return
        state.early.clear()
        state.session = session
        if state.gone:
            await end_session(session, "caller_hangup")
            return
        await connect_agent(session, self.agent_factory or _no_agent)

    def disconnected(self, key: int, code: int, reason: str) -> None:
        state = self.calls.get(key)
        if state is None:
            return
        state.gone = True
        log.info("call %d disconnected (%d %s)", key, code, reason)
        if state.transfer is not None and not state.transfer.done():
            state.transfer.set_result(code if code >= 300 else 487)
        if state.session is not None and not state.session.ended.is_set():
            self._spawn(end_session(state.session, "caller_hangup"))
        elif state.session is None and state.rate == 0:
            self.calls.pop(key, None)  # never got media: nothing to end

    def dtmf(self, key: int, digit: str) -> None:
        state = self.calls.get(key)
        if state is not None and state.session is not None and not state.session.ended.is_set():
            log.info("call %d: DTMF %s", key, digit)
            state.session.dtmf(digit)

    def transfer_status(self, key: int, code: int, reason: str, final: bool) -> None:
        state = self.calls.get(key)
        log.info("call %d: transfer status %d %s%s", key, code, reason, " (final)" if final else "")
        if state is not None and state.transfer is not None and not state.transfer.done():
            state.transfer.set_result(code)

    def registration(self, code: int, reason: str, active: bool) -> None:
        self.reg_state = {"code": code, "reason": reason, "active": active}
        log.info("registration: %d %s (active=%s)", code, reason, active)

    # ---- session hooks -----------------------------------------------------------------------------
    async def _session_ended(self, state: CallState, reason: str) -> None:
        if not state.gone:
            state.gone = True
            try:
                await self.endpoint.run(self.endpoint.hangup, state.key)  # BYE
            except Exception:
                log.exception("call %d: hangup failed", state.key)
        self.calls.pop(state.key, None)
        self.stats["ended"] += 1
        if state.bridge is not None and state.session is not None:
            media = state.bridge.stats.snapshot()
            for k in ("late_out", "late_in", "frames_out"):
                self.stats[k] += media[k]
            log.info("call %d ended (%s): media %s", state.key, reason, media)
            with contextlib.suppress(Exception):
                await self.store.update_session_metrics(state.session.session_id, {"media": media})

    async def _transfer(self, state: CallState, target: str, mode: str) -> str | None:
        uri = refer_uri(target, state.config.transfer_targets, state.incoming.source)
        if uri is None:
            log.info("call %d: transfer to %r refused (not in the pipe's transfer_targets)", state.key,
                     target)
            return "transfer_target_not_allowed"
        if mode not in ("blind", ""):
            return "transfer_mode_unsupported"
        if state.gone:
            return "call_ended"
        state.transfer = self.loop.create_future()
        sent = await self.endpoint.run(self.endpoint.transfer, state.key, uri)
        if not sent:
            return "call_ended"
        log.info("call %d: REFER to %s", state.key, uri)
        try:
            code = await asyncio.wait_for(state.transfer, TRANSFER_TIMEOUT_S)
        except TimeoutError:
            return "transfer_timeout"
        finally:
            state.transfer = None
        # pjsua reports the REFER's 2xx as "100 Accepted", then the NOTIFYs' sipfrag codes: anything below 300
        # means the peer took the transfer; a rejected REFER (403, 405, 501...) or a failed one is >= 300.
        return None if code < 300 else "transfer_failed"

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task failed", exc_info=task.exception())

    def snapshot(self) -> dict[str, Any]:
        ep = getattr(self, "endpoint", None)
        return {"pid": os.getpid(), "port": self.sip.port, "calls": len(self.calls),
                "sip_calls": ep.active_calls if ep else 0, "max_calls": ep.max_calls if ep else 0,
                "build_max_calls": ep.build_max_calls if ep else 0,
                "rejected_busy": ep.rejected_busy if ep else 0, "registration": self.reg_state,
                "pbx_mismatch": self.pbx_mismatch,
                **self.stats}

    def _status(self, event: str, **extra: Any) -> None:
        if self.status_fd is None:
            return
        line = json.dumps({"event": event, "t": time.time(), **self.snapshot(), **extra}) + "\n"
        try:
            os.write(self.status_fd, line.encode())
        except OSError:  # the supervisor is gone: so are we
            log.error("status pipe closed; stopping")
            self.status_fd = None
            self._stop.set()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._status("stats")


async def end_session(session: PipelineSession, reason: str) -> None:
    """End a session from outside its own tasks (the caller hung up, shutdown)."""
    await session.end(reason)


def refer_uri(target: str, allowed: list[str], source: str) -> str | None:
    """The Refer-To URI for `target` if the pipe allows it (exact entry match), else None.

    A bare user part ("1002") is sent to the host the call came from (the PBX); a full URI as given.
    """
    target = target.strip()
    if not target or target not in allowed or any(c in target for c in "<>\r\n\" "):
        return None
    if target.lower().startswith(("sip:", "sips:", "tel:")):
        return target
    host = source.rsplit(":", 1)[0] if source.count(":") == 1 else source
    port = source.rsplit(":", 1)[1] if source.count(":") == 1 else ""
    return f"sip:{target}@{host}" + (f":{port}" if port else "")


def _pj_reason(exc: BaseException) -> str:
    info = getattr(exc, "info", None)  # pj.Error.info() is the readable form
    try:
        return str(info()) if callable(info) else str(exc)
    except Exception:
        return repr(exc)


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


def _pj_log_level() -> int:
    try:
        return int(os.environ.get("SPEECHPIPE_SIP_LOG_LEVEL", "2"))
    except ValueError:
        return 2


def _set_parent_death_signal() -> None:
    """Linux: die with the supervisor, so a crashed `serve` never leaves workers holding SIP ports."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def amain(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    sip = SipConfig.from_env(args.index, settings.sip_port_base,
                             **({"port": args.port} if args.port else {}),
                             **({"agent_factory": args.agent_factory} if args.agent_factory else {}))
    factory = load_agent_factory(sip.agent_factory)
    store = Store.from_settings(settings, upgrade=args.migrate)
    astore = AsyncStore(store, max_workers=4)
    fd = os.environ.get("SPEECHPIPE_SIP_STATUS_FD")
    status_fd = int(fd) if fd else None
    worker = Worker(settings, sip, astore, agent_factory=factory, status_fd=status_fd)
    try:
        await worker.run()
    finally:
        astore.close(wait=True)
        store.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m speechpipe.telephony.worker",
                                description="Speech Pipe SIP media worker (normally started by `serve`).")
    p.add_argument("--index", type=int, default=0, help="worker number: SIP port = sip_port_base + index")
    p.add_argument("--port", type=int, help="SIP port (overrides sip_port_base + index)")
    p.add_argument("--agent-factory", help="module:function giving each session its agent")
    p.add_argument("--migrate", action="store_true", help="apply database migrations first (standalone use)")
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack
    # The conference clock thread needs the GIL twice per call every 20 ms; when STT and the event loop
    # keep it busy, a waiting thread gets it after at most the switch interval (default 5 ms). 2 ms keeps
    # several calls' callbacks inside one 20 ms tick.
    sys.setswitchinterval(0.002)
    if os.environ.get("SPEECHPIPE_SIP_STATUS_FD"):
        _set_parent_death_signal()
    # The supervisor passes serve's SPEECHPIPE_LOG_FORMAT: JSON there means JSON here.
    logs.configure_logging(os.environ.get("SPEECHPIPE_LOG_FORMAT", "text").strip() or "text",
                           level=os.environ.get("SPEECHPIPE_LOG_LEVEL", "INFO"),
                           process=f"worker:{args.port or args.index}")
    code = 0
    try:
        asyncio.run(amain(args))
    except Exception:
        log.exception("worker failed")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: pj objects must not be destroyed by the GC on this (unregistered) thread.
    os._exit(code)


if __name__ == "__main__":
    main()
