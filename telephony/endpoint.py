"""pjsua2 in one thread: the SIP user agent of a media worker, and the calls it holds.

pjlib is not Python-friendly: objects must be created and freed on threads pjlib knows, callbacks arrive
on pjlib's threads, and a Python exception escaping a SWIG director callback aborts the process. So:

- one dedicated thread ("pjlib") creates the `Endpoint` (`threadCnt=0`: no pjsua worker threads) and loops
  `libHandleEvents`, running commands other threads queue with `submit()`; every `Call` lives in a dict
  owned by that thread and is dropped there, after the callback that ended it has returned;
- SIP events go to the asyncio loop as plain values (`IncomingCall`, keys, codes) through
  `call_soon_threadsafe`; no pj object ever leaves the pjlib thread;
- audio runs on pjmedia's clock thread through `media.PcmPort` (pooled: never freed, see media.py);
- every callback catches everything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pjsua2 as pj

from . import sipmsg
from .config import SipConfig
from .media import FrameBridge, PcmPort, PortPool
from .pbx_check import HUNT_HEADER

log = logging.getLogger(__name__)
pjlog = logging.getLogger("speechpipe.telephony.pjsip")

# Codecs the workers speak, best first. Everything else pjsua ships (speex, iLBC, GSM, L16) is disabled.
CODECS = ("G722/16000/1", "PCMU/8000/1", "PCMA/8000/1")
WIDEBAND = {"G722"}


@dataclass(frozen=True)
class IncomingCall:
    key: int  # this worker's call handle (pjsua call ids are slots and get reused)
    sip_call_id: str
    dialled: str | None  # user part of the Request-URI
    caller: str | None  # the caller's number (P-Asserted-Identity or From user part)
    caller_name: str | None
    remote_uri: str
    source: str  # transport address the INVITE came from
    hunt: str | None = None  # X-SpeechPipe-Hunt "<index>/<workers>" from our Asterisk dialplan (pbx_check.py)


@dataclass(frozen=True)
class MediaUp:
    key: int
    codec: str  # e.g. "PCMU", "PCMA", "G722"
    rate: int  # 16000 for wideband codecs, 8000 otherwise: the session's input and output rate


class Events(Protocol):
    """What the endpoint tells the worker; every method runs on the worker's asyncio loop."""

    def incoming(self, call: IncomingCall) -> None: ...
    def media_up(self, media: MediaUp) -> None: ...
    def disconnected(self, key: int, code: int, reason: str) -> None: ...
    def dtmf(self, key: int, digit: str) -> None: ...
    def transfer_status(self, key: int, code: int, reason: str, final: bool) -> None: ...
    def registration(self, code: int, reason: str, active: bool) -> None: ...


BridgeFactory = Callable[[int], FrameBridge]  # rate -> bridge; runs on the pjlib thread


class _LogWriter(pj.LogWriter):
    def write(self, entry: pj.LogEntry) -> None:
        try:
            level = (logging.ERROR if entry.level <= 1 else logging.WARNING if entry.level == 2
                     else logging.DEBUG)
            pjlog.log(level, "%s", entry.msg.rstrip())
        except Exception:  # never let an exception into pjlib
            pass


class _Account(pj.Account):
    def __init__(self, owner: SipEndpoint) -> None:
        super().__init__()
        self.owner = owner

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        try:
            self.owner._on_incoming(self, prm)
        except Exception:
            log.exception("onIncomingCall failed")

    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        try:
            active = bool(self.getInfo().regIsActive)
            self.owner._emit("registration", int(prm.code), str(prm.reason), active)
        except Exception:
            log.exception("onRegState failed")


class _Call(pj.Call):
    def __init__(self, owner: SipEndpoint, acc: _Account, call_id: int, key: int) -> None:
        super().__init__(acc, call_id)
        self.owner = owner
        self.key = key
        self.port: PcmPort | None = None
        self.conf_slot: int | None = None
        self.audio: pj.AudioMedia | None = None
        self.bridge_factory: BridgeFactory | None = None
        self.media_reported = False
        self.gone = False

    # ---- callbacks (pjlib thread) ----
    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        try:
            info = self.getInfo()
            if info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.gone:
                self.gone = True
                # pjsua has already destroyed the call's stream (pjsua_media_channel_deinit runs before
                # this callback, for a BYE from either side) and queued the removal of its bridge slot,
                # which takes our port's connections with it: disconnecting them again here raced that
                # removal and logged "pjsua_conf_disconnect(...) PJ_EINVAL" twice when it lost.
                self.owner._detach_media(self, disconnect=False)
                self.owner._emit("disconnected", self.key, int(info.lastStatusCode), str(info.lastReason))
                self.owner._forget(self.key)
        except Exception:
            log.exception("onCallState failed")

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        try:
            self.owner._on_media(self)
        except Exception:
            log.exception("onCallMediaState failed")

    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:
        try:
            self.owner._emit("dtmf", self.key, str(prm.digit))
        except Exception:
            log.exception("onDtmfDigit failed")

    def onCallTransferStatus(self, prm: pj.OnCallTransferStatusParam) -> None:
        try:
            self.owner._emit("transfer_status", self.key, int(prm.statusCode), str(prm.reason),
                             bool(prm.finalNotify))
        except Exception:
            log.exception("onCallTransferStatus failed")

    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        # A caller's REFER would make this worker dial out on its behalf: never.
        try:
            prm.statusCode = 603
        except Exception:
            log.exception("onCallTransferRequest failed")

    def onCallReplaceRequest(self, prm: Any) -> None:
        try:
            prm.statusCode = 603
        except Exception:
            log.exception("onCallReplaceRequest failed")


class SipEndpoint:
    """The worker's SIP user agent. `start()` from any thread; everything pj runs on the pjlib thread."""

    def __init__(self, config: SipConfig, loop: asyncio.AbstractEventLoop, events: Events, *,
                 log_level: int = 2) -> None:
        self.config = config
        self.loop = loop
        self.events = events
        self.log_level = log_level
        self.max_calls = 0  # effective limit, known once started
        self.build_max_calls = 0  # the pjsua build's PJSUA_MAX_CALLS (what pjsua itself clamps to)
        self.version = ""
        self._cmds: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                            concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._calls: dict[int, _Call] = {}
        self._dead: list[int] = []
        self._next_key = 0
        self._running = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"pjlib:{config.port}", daemon=True)
        self.rejected_busy = 0
        self.ports = PortPool()

    # ---- public, any thread ----
    def start(self, timeout: float = 15.0) -> None:
        self._running = True
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("pjsua did not start in time")
        if self._error is not None:
            raise RuntimeError(f"pjsua failed to start: {self._error}") from self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run `fn(*args)` on the pjlib thread; the future holds its result or exception."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if not self._running:
            fut.set_exception(RuntimeError("the SIP endpoint is stopped"))
        else:
            self._cmds.put((fn, args, fut))
        return fut

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    @property
    def active_calls(self) -> int:
        return len(self._calls)

    def stop(self, timeout: float = 3.0) -> None:
        """Hang up every call (BYE / final responses), give pjsip a moment to send them, stop the thread.

        The library is not destroyed: `libDestroy` with bridge ports alive hits the same teardown bugs the
        port pool avoids, and the worker process exits right after.
        """
        if not self._running:
            return
        with contextlib.suppress(Exception):
            self.submit(self._hangup_all).result(timeout)
        deadline = time.monotonic() + timeout
        while self._calls and time.monotonic() < deadline:
            time.sleep(0.05)
        self._running = False
        self._thread.join(timeout)

    # ---- commands (pjlib thread) ----
    def answer(self, key: int, code: int, bridge_factory: BridgeFactory | None = None,
               reason: str = "") -> bool:
        call = self._calls.get(key)
        if call is None or call.gone:
            return False
        if bridge_factory is not None:
            call.bridge_factory = bridge_factory
        prm = pj.CallOpParam(True)
        prm.statusCode = code
        if reason:
            prm.reason = reason
        call.answer(prm)
        if code < 300:
            self._on_media(call)  # media may already be up if the offer was answered early
        return True

    def hangup(self, key: int, code: int = 0, reason: str = "") -> bool:
        """End a call: BYE once answered, else a final response (`code`, default 603)."""
        call = self._calls.get(key)
        if call is None or call.gone:
            return False
        # Unhook our port while the stream's bridge slot still exists; pjsua destroys the stream inside
        # call.hangup(), and the DISCONNECTED callback it fires then has nothing left to disconnect.
        self._detach_media(call)
        prm = pj.CallOpParam(True)
        prm.statusCode = code or 603
        if reason:
            prm.reason = reason
        try:
            call.hangup(prm)
        except pj.Error as exc:
            log.warning("hangup of call %d failed: %s", key, exc.info())
            return False
        return True

    def transfer(self, key: int, uri: str) -> bool:
        """Blind transfer: send REFER (Refer-To `uri`); the outcome arrives as `transfer_status` events."""
        call = self._calls.get(key)
        if call is None or call.gone:
            return False
        call.xfer(uri, pj.CallOpParam(True))
        return True

    def _hangup_all(self) -> None:
        for key in list(self._calls):
            with contextlib.suppress(Exception):
                self.hangup(key, 503, "Service Unavailable")

    # ---- the pjlib thread ----
    def _main(self) -> None:
        try:
            self._init()
        except BaseException as exc:  # report to start(), which raises in the caller's thread
            self._error = exc
            self._running = False
            self._ready.set()
            return
        self._ready.set()
        while self._running:
            try:
                self.ep.libHandleEvents(10)
                self._drain()
            except Exception:
                log.exception("pjlib loop iteration failed")

    def _drain(self) -> None:
        while True:
            try:
                fn, args, fut = self._cmds.get_nowait()
            except queue.Empty:
                break
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)
        # Calls are dropped here, outside the callback that ended them, on this (registered) thread.
        while self._dead:
            key = self._dead.pop()
            self._calls.pop(key, None)

    def _init(self) -> None:
        cfg = self.config
        self.ep = ep = pj.Endpoint()
        ep.libCreate()
        ep_cfg = pj.EpConfig()
        ua = ep_cfg.uaConfig
        ua.threadCnt = 0
        ua.mainThreadOnly = False
        ua.maxCalls = 10000  # pjsua clamps this to its build's PJSUA_MAX_CALLS; read back below
        ua.userAgent = "SpeechPipe"
        self._log_writer = _LogWriter()
        lc = ep_cfg.logConfig
        lc.level = self.log_level
        lc.consoleLevel = self.log_level
        lc.msgLogging = 1 if self.log_level >= 4 else 0
        lc.writer = self._log_writer
        lc.decor = 0
        med = ep_cfg.medConfig
        med.clockRate = 16000  # the bridge mixes at 16 kHz so G.722 stays wideband end to end
        med.sndClockRate = 16000
        med.channelCount = 1
        med.audioFramePtime = 20
        med.ptime = 20
        med.noVad = True  # keep RTP flowing in silence: no comfort-noise gaps in the caller's recording
        med.ecTailLen = 0  # no echo canceller: there is no loudspeaker, only CPU to lose
        med.threadCnt = 1
        med.quality = 8  # large-filter resampling: the bridge takes 8 kHz calls to 16 kHz and back
        ep.libInit(ep_cfg)
        lib = ctypes.CDLL(pj._pjsua2.__file__)
        self.build_max_calls = int(lib.pjsua_call_get_max_count())
        self.max_calls = min(cfg.max_calls or self.build_max_calls, self.build_max_calls)
        ep.audDevManager().setNullDev()

        tcfg = pj.TransportConfig()
        tcfg.port = cfg.port
        tcfg.boundAddress = "" if cfg.host in ("0.0.0.0", "") else cfg.host
        if cfg.public_addr:
            tcfg.publicAddress = cfg.public_addr
        ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)

        for codec in ep.codecEnum2():
            ep.codecSetPriority(codec.codecId, 0)
        for prio, codec in zip((250, 240, 230), CODECS, strict=True):
            ep.codecSetPriority(codec, prio)
        ep.libStart()
        self.version = ep.libVersion().full

        acfg = pj.AccountConfig()
        host = cfg.public_addr or (cfg.host if cfg.host not in ("0.0.0.0", "") else "127.0.0.1")
        acfg.idUri = f"sip:{cfg.user}@{host}:{cfg.port}"
        mt = acfg.mediaConfig.transportConfig
        mt.port = cfg.rtp_port
        mt.portRange = cfg.rtp_ports
        if cfg.host not in ("0.0.0.0", ""):
            mt.boundAddress = cfg.host
        if cfg.public_addr:
            mt.publicAddress = cfg.public_addr
        if cfg.registrar:
            acfg.idUri = f"sip:{cfg.username}@{cfg.registrar.split(':', 1)[-1]}"
            acfg.regConfig.registrarUri = cfg.registrar
            acfg.regConfig.registerOnAdd = True
            acfg.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", cfg.realm, cfg.username or "", 0, cfg.password or ""))
        else:
            acfg.regConfig.registerOnAdd = False
        self.account = _Account(self)
        self.account.create(acfg, True)
        log.info("pjsua %s listening on %s:%d/udp (max %d calls, build limit %d)", self.version,
                 cfg.host, cfg.port, self.max_calls, self.build_max_calls)

    def _emit(self, name: str, *args: Any) -> None:
        handler = getattr(self.events, name)
        self.loop.call_soon_threadsafe(handler, *args)

    def _forget(self, key: int) -> None:
        self._dead.append(key)

    def _on_incoming(self, acc: _Account, prm: pj.OnIncomingCallParam) -> None:
        self._next_key += 1
        key = self._next_key
        call = _Call(self, acc, prm.callId, key)
        self._calls[key] = call
        live = sum(1 for c in self._calls.values() if not c.gone)
        if live > self.max_calls:
            self.rejected_busy += 1
            self.hangup(key, 486, "Busy Here")
            return
        info = call.getInfo()
        message = str(prm.rdata.wholeMsg)
        caller, caller_name = sipmsg.caller_identity(message, str(info.remoteUri))
        incoming = IncomingCall(
            key=key, sip_call_id=sipmsg._clean(str(info.callIdString)) or "",
            dialled=sipmsg.dialled_user(message, str(info.localUri)), caller=caller,
            caller_name=caller_name, remote_uri=sipmsg._clean(str(info.remoteUri)) or "",
            source=str(prm.rdata.srcAddress), hunt=sipmsg.header(message, HUNT_HEADER))
        ring = pj.CallOpParam(True)
        ring.statusCode = 180
        call.answer(ring)
        self._emit("incoming", incoming)

    def _on_media(self, call: _Call) -> None:
        if call.gone or call.bridge_factory is None:
            return
        info = call.getInfo()
        for mi in info.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            audio = call.getAudioMedia(mi.index)
            slot = audio.getPortId()
            if call.port is not None and call.conf_slot == slot:
                return  # same stream as before (e.g. a re-INVITE that changed nothing)
            si = call.getStreamInfo(mi.index)
            codec = str(si.codecName)
            rate = 16000 if codec.upper() in WIDEBAND else 8000
            if call.port is None:
                call.port = self.ports.acquire(rate)
                call.port.bridge = call.bridge_factory(rate)
            elif call.audio is not None:
                with contextlib.suppress(pj.Error):
                    call.audio.stopTransmit(call.port)
                    call.port.stopTransmit(call.audio)
            audio.startTransmit(call.port)
            call.port.startTransmit(audio)
            call.audio, call.conf_slot = audio, slot
            if not call.media_reported:
                call.media_reported = True
                log.info("call %d: media up, %s at %d Hz (port %d Hz)", call.key, codec,
                         int(si.codecClockRate), call.port.rate)
                self._emit("media_up", MediaUp(call.key, codec, rate))
            return

    def _detach_media(self, call: _Call, disconnect: bool = True) -> None:
        """Take our port off the call and back to the pool; with `disconnect`, first undo the two bridge
        connections (only while the call's stream still has its slot: before pjsua destroys it)."""
        port, audio = call.port, call.audio
        call.port = call.audio = None
        call.conf_slot = None
        if port is None:
            return
        port.bridge = None
        if audio is not None and disconnect:
            with contextlib.suppress(pj.Error):
                audio.stopTransmit(port)
            with contextlib.suppress(pj.Error):
                port.stopTransmit(audio)
        self.ports.release(port)
