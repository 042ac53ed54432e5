"""PCM16 helpers on the per-frame hot path: frame sizes, streaming resampling, G.711, level, re-framing.

Everything here is mono int16 (native-endian numpy arrays; the wire is little-endian PCM16, which is the same
bytes on every platform we run on). Functions allocate at most their output array, because each live
session calls them fifty times a second per direction.

Measured on this machine (2 shared cores; `tests/test_audio.py` re-checks the quality figures):
- `Resampler` (soxr ResampleStream, quality "HQ", float32 inside) costs 15-30 µs per 20 ms frame. soxr
  filters in DFT blocks, so output comes in bursts: audio is time-aligned (no added delay after `flush()`)
  but a live stream holds back, on average / at worst, 8k→16k 64/115 ms, 16k→8k 64/115 ms, 48k→16k
  21/37 ms, 22.05k→8k 47/80 ms, 22.05k→16k 23/40 ms, 22.05k→48k 23/42 ms. "MQ" has the same lag;
  "LQ" halves it but cuts the phone band (-7.9 dB at 3.4 kHz); "QQ" has no lag and no anti-alias filter
  (a 10 kHz tone at 48k→16k aliases at 0 dB); vr=True lowers the lag but its round trip is only 18 dB
  SNR. HQ round trip 16k→48k→16k on speech: 43 dB SNR; alias/image rejection ≈ 82 dB.
- `ulaw_*`/`alaw_*`: table look-ups, bit-exact with sox for all 65536 inputs and all 256 codes.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

FRAME_MS = 20
# rms_dbfs() of digital silence; a floor instead of -inf so levels stay valid JSON numbers.
SILENCE_DBFS = -120.0
_FULL_SCALE = 32768.0


def samples_per_frame(rate: int) -> int:
    """Samples in one FRAME_MS frame at `rate` Hz (8000 → 160, 16000 → 320, 22050 → 441, 48000 → 960)."""
    if rate <= 0 or (rate * FRAME_MS) % 1000:
        raise ValueError(f"{rate} Hz has no whole number of samples in {FRAME_MS} ms")
    return rate * FRAME_MS // 1000


def pcm16_from_bytes(data: bytes | bytearray | memoryview) -> np.ndarray:
    """View little-endian PCM16 bytes as an int16 array (no copy; read-only if `data` is bytes)."""
    if len(data) % 2:
        raise ValueError("PCM16 data must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2")


# --- Resampling --------------------------------------------------------------------------------------------


def _to_int16(x: np.ndarray) -> np.ndarray:
    np.rint(x, out=x)
    np.clip(x, -32768, 32767, out=x)
    return x.astype(np.int16)


class Resampler:
    """Streaming int16 resampler for one direction of one session; the identity when the rates match.

    `process()` returns what soxr has ready (possibly nothing: see the lag figures in the module docstring);
    `flush()` drains the tail at the end of an utterance and leaves the stream ready for the next one.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError("sample rates must be positive")
        self.in_rate = in_rate
        self.out_rate = out_rate
        # float32 inside, not soxr's int16 mode: that mode adds TPDF dither, so digital silence comes out
        # as ±1 noise and the same input never gives the same output twice.
        self._stream = (
            None if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        )

    @property
    def identity(self) -> bool:
        return self._stream is None

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return np.asarray(pcm, dtype=np.int16)
        return _to_int16(self._stream.resample_chunk(np.asarray(pcm, dtype=np.float32)))

    def flush(self) -> np.ndarray:
        """Everything still buffered, then reset (the next process() starts a fresh signal)."""
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out = _to_int16(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self._stream.clear()
        return out

    def reset(self) -> None:
        """Drop buffered audio without emitting it (e.g. agent audio cut off by a barge-in)."""
        if self._stream is not None:
            self._stream.clear()


# --- G.711 -------------------------------------------------------------------------------------------------
# G.711 defines μ-law on 14-bit and A-law on 13-bit linear samples. The 16 → 14/13-bit step rounds to
# nearest (sox does the same; the Sun/G.191 code truncates, which differs only below G.711's resolution).
# Encoding is one look-up per sample in a 64 Ki table indexed by the sample's bit pattern.

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _build_ulaw_encoder() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32)
    v = np.minimum((x + 2) >> 2, 0x1FFF)  # round to 14 bits; +32767 would round past the top
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + 33  # clip, then add the μ-law bias (0x84 >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag)  # first segment whose end >= mag
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F))
    table = np.empty(65536, dtype=np.uint8)
    table[x.astype(np.int16).view(np.uint16)] = (code ^ mask).astype(np.uint8)
    return table


def _build_alaw_encoder() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32)
    v = np.minimum((x + 4) >> 3, 0x0FFF)  # round to 13 bits
    mask = np.where(v >= 0, 0xD5, 0x55)
    mag = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag)
    mant = np.where(seg < 2, mag >> 1, mag >> np.minimum(seg, 7)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | mant)
    table = np.empty(65536, dtype=np.uint8)
    table[x.astype(np.int16).view(np.uint16)] = (code ^ mask).astype(np.uint8)
    return table


def _build_ulaw_decoder() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    mag = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)) - 0x84
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def _build_alaw_decoder() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a >> 4) & 0x07
    t = (a & 0x0F) << 4
    mag = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, mag, -mag).astype(np.int16)


_ULAW_ENC = _build_ulaw_encoder()
_ALAW_ENC = _build_alaw_encoder()
_ULAW_DEC = _build_ulaw_decoder()
_ALAW_DEC = _build_alaw_decoder()


def _codes(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(np.uint8, copy=False)
    return np.frombuffer(data, dtype=np.uint8)


def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples → μ-law codes (uint8 array; `.tobytes()` is the RTP payload)."""
    return _ULAW_ENC[np.asarray(pcm, dtype=np.int16).view(np.uint16)]


def ulaw_decode(codes: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """μ-law codes (bytes or uint8 array) → int16 samples."""
    return _ULAW_DEC[_codes(codes)]


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples → A-law codes (uint8 array)."""
    return _ALAW_ENC[np.asarray(pcm, dtype=np.int16).view(np.uint16)]


def alaw_decode(codes: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """A-law codes (bytes or uint8 array) → int16 samples."""
    return _ALAW_DEC[_codes(codes)]


# --- Level -------------------------------------------------------------------------------------------------


def rms_dbfs(pcm: np.ndarray) -> float:
    """RMS level in dB relative to full scale (0 dBFS = RMS 32768, so a full-scale sine reads -3.01).

    Empty input and digital silence read SILENCE_DBFS.
    """
    if pcm.size == 0:
        return SILENCE_DBFS
    x = pcm.astype(np.float64)
    energy = float(np.dot(x, x))
    if energy <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 10.0 * math.log10(energy / pcm.size) - 20.0 * math.log10(_FULL_SCALE))


# --- Re-framing --------------------------------------------------------------------------------------------


class FrameChunker:
    """Turns chunks of any size (int16 arrays, or PCM16LE bytes of any length) into exact 20 ms frames.

    The remainder (and an odd trailing byte) carries over to the next push(). Returned frames are new
    arrays the caller may keep; they never alias the caller's input.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.frame_samples = samples_per_frame(rate)
        self._rest = np.zeros(self.frame_samples, dtype=np.int16)
        self._fill = 0
        self._odd = b""

    @property
    def pending(self) -> int:
        """Samples held back, waiting for the rest of their frame."""
        return self._fill

    def push(self, chunk: np.ndarray | bytes | bytearray | memoryview) -> list[np.ndarray]:
        if isinstance(chunk, np.ndarray):
            pcm = np.asarray(chunk, dtype=np.int16).ravel()
        else:
            data = bytes(chunk)
            if self._odd:
                data, self._odd = self._odd + data, b""
            if len(data) % 2:
                data, self._odd = data[:-1], data[-1:]
            pcm = np.frombuffer(data, dtype="<i2")
        n = self.frame_samples
        frames: list[np.ndarray] = []
        start = 0
        if self._fill:
            take = min(n - self._fill, pcm.size)
            self._rest[self._fill : self._fill + take] = pcm[:take]
            self._fill += take
            start = take
            if self._fill < n:
                return frames
            frames.append(self._rest.copy())
            self._fill = 0
        whole = (pcm.size - start) // n
        if whole:
            # One copy for all whole frames; the rows are views into it.
            block = pcm[start : start + whole * n].astype(np.int16, copy=True).reshape(whole, n)
            frames.extend(block)
            start += whole * n
        tail = pcm.size - start
        if tail:
            self._rest[:tail] = pcm[start:]
            self._fill = tail
        return frames

    def flush(self) -> np.ndarray | None:
        """The held-back samples zero-padded to one frame (None if nothing is held); then empty."""
        self._odd = b""
        if not self._fill:
            return None
        frame = np.zeros(self.frame_samples, dtype=np.int16)
        frame[: self._fill] = self._rest[: self._fill]
        self._fill = 0
        return frame

    def reset(self) -> None:
        self._fill = 0
        self._odd = b""
