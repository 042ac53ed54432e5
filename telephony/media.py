"""The audio bridge between pjsua2's conference bridge and a pipeline session: 20 ms PCM16 frames.

`PcmPort` is an `AudioMediaPort` the conference bridge clocks every 20 ms on pjmedia's clock thread: it
hands each received frame to the asyncio loop and fills each requested frame from the session's
`pull_frame()`. Two costs matter on that thread, and both are avoided:

- per-byte copies: SWIG's `bytes(frame.buf)` walks the `std::vector<unsigned char>` element by element
  (~0.3-0.4 ms a frame). Here the vector's data pointer is read and copied with one memcpy each way.
- GIL hand-offs: this SWIG build releases the GIL around every wrapped C++ call (getters included), and
  ctypes' CDLL functions release it too; getting it back waits for whatever the event loop is running, up
  to the 5 ms switch interval, per call. So the callbacks make no SWIG call at all: `pj::MediaFrame`'s
  fields (`type`, `buf`, `size`) are read and written in place through ctypes, and memory moves through
  functions loaded with `PyDLL` (which keep the GIL). A requested frame's empty vector gets a buffer from
  the same `operator new` the vector's destructor frees with. An import-time self-test checks the layout
  against SWIG's own accessors; if it ever disagrees, the SWIG path is used instead.
- received frames reach the loop through one `LoopInbox` per worker: one wakeup per clock tick for all
  calls, not one `call_soon_threadsafe` (a socket write, another GIL release) per frame.

pjproject < 2.16 frees an `AudioMediaPort` while the (asynchronous) conference bridge may still clock it
(pjproject PR #4200), so ports are never destroyed: `PortPool` keeps them for the next call.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pjsua2 as pj

log = logging.getLogger(__name__)

# A frame more than this behind the 20 ms schedule counts as late (capacity: docs/architecture.md § Timing
# definitions).
LATE_S = 0.040
_AUDIO = pj.PJMEDIA_FRAME_TYPE_AUDIO
_NONE = pj.PJMEDIA_FRAME_TYPE_NONE

# pj::MediaFrame is { pjmedia_frame_type type; ByteVector buf; unsigned size; } (pjsua2/media.hpp).
_OFF_TYPE, _OFF_BUF, _OFF_SIZE = 0, 8, 32
_lib = ctypes.PyDLL(pj._pjsua2.__file__)  # symbols as the module resolves them; calls keep the GIL
_new = _lib._Znwm  # ::operator new(size_t): what std::allocator<unsigned char> allocates with
_new.argtypes, _new.restype = (ctypes.c_size_t,), ctypes.c_void_p
_memcpy = _lib.memcpy
_memcpy.argtypes, _memcpy.restype = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t), ctypes.c_void_p
_to_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_to_bytes.argtypes, _to_bytes.restype = (ctypes.c_void_p, ctypes.c_ssize_t), ctypes.py_object
_Vec = ctypes.c_void_p * 3  # libstdc++ std::vector: begin, end, end of storage


def vector_data(vec: pj.ByteVector) -> int:
    """Address of a SWIG `ByteVector`'s first byte (std::vector's `_M_start`); 0 if empty."""
    return ctypes.c_void_p.from_address(int(vec.this)).value or 0


def _direct_read(frame: pj.MediaFrame) -> bytes | None:
    addr = int(frame.this)
    if ctypes.c_int.from_address(addr + _OFF_TYPE).value != _AUDIO:
        return None
    size = ctypes.c_uint.from_address(addr + _OFF_SIZE).value
    vec = _Vec.from_address(addr + _OFF_BUF)
    if not size or not vec[0] or vec[1] - vec[0] < size:
        return None
    return _to_bytes(vec[0], size)


def _direct_write(frame: pj.MediaFrame, pcm: bytes) -> None:
    addr = int(frame.this)
    vec = _Vec.from_address(addr + _OFF_BUF)
    n = len(pcm)
    if vec[0]:  # not the fresh, empty vector get_frame() hands out: size it the safe way
        _swig_write(frame, pcm)
        return
    ptr = _new(n)
    _memcpy(ptr, pcm, n)
    vec[0], vec[1], vec[2] = ptr, ptr + n, ptr + n
    ctypes.c_uint.from_address(addr + _OFF_SIZE).value = n
    ctypes.c_int.from_address(addr + _OFF_TYPE).value = _AUDIO


def _direct_set_none(frame: pj.MediaFrame) -> None:
    ctypes.c_int.from_address(int(frame.this) + _OFF_TYPE).value = _NONE


def _swig_read(frame: pj.MediaFrame) -> bytes | None:
    if frame.type != _AUDIO or not frame.size:
        return None
    ptr = vector_data(frame.buf)
    return _to_bytes(ptr, frame.size) if ptr else None


def _swig_write(frame: pj.MediaFrame, pcm: bytes) -> None:
    buf = frame.buf
    buf.resize(len(pcm))
    _memcpy(vector_data(buf), pcm, len(pcm))
    frame.size = len(pcm)
    frame.type = _AUDIO


def _swig_set_none(frame: pj.MediaFrame) -> None:
    frame.type = _NONE


def _layout_ok() -> bool:
    """Does pj::MediaFrame look the way the direct path assumes? Checked against SWIG's accessors."""
    try:
        probe = pj.MediaFrame()
        probe.type, probe.size = _AUDIO, 6
        probe.buf.resize(6)
        _memcpy(vector_data(probe.buf), b"abcdef", 6)
        if _direct_read(probe) != b"abcdef":
            return False
        fresh = pj.MediaFrame()
        fresh.size = 4
        _direct_write(fresh, b"wxyz")
        ok = (fresh.buf.size() == 4 and bytes(fresh.buf) == b"wxyz" and fresh.size == 4
              and fresh.type == _AUDIO)
        _direct_set_none(fresh)
        ok = ok and fresh.type == _NONE
        del fresh  # the vector frees our operator-new buffer: must not crash
        return ok
    except Exception:
        log.exception("MediaFrame layout probe failed")
        return False


DIRECT = _layout_ok()
if DIRECT:
    read_frame, write_frame, set_none = _direct_read, _direct_write, _direct_set_none
else:  # pragma: no cover - a pjsua2 build with another layout
    log.warning("pj::MediaFrame layout not as expected: using SWIG accessors (slower, GIL hand-offs)")
    read_frame, write_frame, set_none = _swig_read, _swig_write, _swig_set_none


class LoopInbox:
    """Media thread → event loop, with one wakeup per burst instead of one per frame."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque[tuple[Callable[[bytes, float], None], bytes, float]] = \
            collections.deque()
        self._scheduled = False

    def put(self, fn: Callable[[bytes, float], None], pcm: bytes, stamp: float) -> None:
        self._items.append((fn, pcm, stamp))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False  # first: a frame appended while draining schedules another pass
        items = self._items
        while items:
            fn, pcm, stamp = items.popleft()
            fn(pcm, stamp)


@dataclass
class FrameStats:
    """Per-call timing of the media path, read by the worker for metrics and the benchmark."""

    frames_in: int = 0
    frames_out: int = 0
    silent_out: int = 0
    late_out: int = 0  # requested frames > LATE_S behind the 20 ms schedule (conference clock starved)
    late_in: int = 0  # received frames the event loop handled > LATE_S after the media thread queued them
    max_late_ms: float = 0.0
    max_loop_lag_ms: float = 0.0
    callback_cpu_s: float = 0.0  # CPU time inside both callbacks (thread time): the per-frame bridge cost
    callbacks: int = 0

    def snapshot(self) -> dict[str, float]:
        cost = self.callback_cpu_s / self.callbacks * 1e6 if self.callbacks else 0.0
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "silent_out": self.silent_out,
                "late_out": self.late_out, "late_in": self.late_in, "max_late_ms": round(self.max_late_ms, 1),
                "max_loop_lag_ms": round(self.max_loop_lag_ms, 1), "callback_cpu_us": round(cost, 1)}


@dataclass
class FrameBridge:
    """What one call's port talks to. `sink(pcm)` runs on the inbox's loop; `source()` on the media thread."""

    inbox: LoopInbox
    sink: Callable[[bytes], None]
    source: Callable[[], bytes | None]
    frame_bytes: int
    stats: FrameStats = field(default_factory=FrameStats)
    _t0: float = 0.0
    _n: int = 0

    def __post_init__(self) -> None:
        self.silence = bytes(self.frame_bytes)

    def received(self, pcm: bytes) -> None:
        self.stats.frames_in += 1
        self.inbox.put(self._deliver, pcm, time.monotonic())

    def _deliver(self, pcm: bytes, queued: float) -> None:
        lag = time.monotonic() - queued
        st = self.stats
        if lag > LATE_S:
            st.late_in += 1
        if lag * 1000 > st.max_loop_lag_ms:
            st.max_loop_lag_ms = lag * 1000
        try:
            self.sink(pcm)
        except Exception:
            log.exception("pushing a received frame failed")

    def requested(self) -> bytes | None:
        now = time.monotonic()
        st = self.stats
        if self._n == 0:
            self._t0 = now
        late = now - (self._t0 + self._n * 0.02)
        if late < 0:  # the clock ran a little fast: re-anchor so early frames never hide late ones
            self._t0 += late
            late = 0.0
        self._n += 1
        if late > LATE_S:
            st.late_out += 1
        if late * 1000 > st.max_late_ms:
            st.max_late_ms = late * 1000
        pcm = self.source()
        st.frames_out += 1
        if pcm is None:
            st.silent_out += 1
        return pcm


class PcmPort(pj.AudioMediaPort):
    """A conference-bridge port at `rate` Hz, mono PCM16, 20 ms frames. Create on the pjlib thread."""

    def __init__(self, rate: int, name: str) -> None:
        super().__init__()
        self.rate = rate
        self.frame_bytes = rate // 50 * 2
        self.bridge: FrameBridge | None = None  # swapped atomically; callbacks read it once per frame
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.init(pj.PJMEDIA_FORMAT_PCM, rate, 1, 20000, 16)
        self.createPort(name, fmt)

    # Both callbacks run on pjmedia's clock thread. A Python exception escaping a SWIG director aborts
    # the process, so each one catches everything.
    def onFrameReceived(self, frame: pj.MediaFrame) -> None:
        bridge = self.bridge
        if bridge is None:
            return
        t = time.thread_time()
        try:
            pcm = read_frame(frame)
            if pcm is None or len(pcm) != self.frame_bytes:
                # No audio this tick (jitter buffer empty, or a short frame): keep the session clock going.
                pcm = bridge.silence if not pcm else (pcm + bridge.silence)[: self.frame_bytes]
            bridge.received(pcm)
        except Exception:
            log.exception("onFrameReceived failed")
        bridge.stats.callback_cpu_s += time.thread_time() - t
        bridge.stats.callbacks += 1

    def onFrameRequested(self, frame: pj.MediaFrame) -> None:
        bridge = self.bridge
        try:
            if bridge is None:
                set_none(frame)
                return
            t = time.thread_time()
            pcm = bridge.requested()
            if pcm:
                if len(pcm) != self.frame_bytes:  # the bridge wants whole frames
                    pcm = (pcm + bridge.silence)[: self.frame_bytes]
                write_frame(frame, pcm)
            else:
                set_none(frame)
            bridge.stats.callback_cpu_s += time.thread_time() - t
            bridge.stats.callbacks += 1
        except Exception:
            log.exception("onFrameRequested failed")


class PortPool:
    """Ports are created on demand and reused forever (see the module note on pjproject < 2.16)."""

    def __init__(self) -> None:
        self._free: dict[int, list[PcmPort]] = {}
        self._all: list[PcmPort] = []

    def acquire(self, rate: int) -> PcmPort:
        free = self._free.setdefault(rate, [])
        if free:
            return free.pop()
        port = PcmPort(rate, f"sp{len(self._all)}@{rate}")
        self._all.append(port)
        return port

    def release(self, port: PcmPort) -> None:
        port.bridge = None
        self._free.setdefault(port.rate, []).append(port)

    def __len__(self) -> int:
        return len(self._all)
