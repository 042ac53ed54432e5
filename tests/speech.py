"""Real speech for tests: espeak-ng synthesis, a G.711 codec round trip, WAV I/O, silence, and WER.

Every test that needs a voice gets it here, so the whole suite hears the same audio. Synthesis is cached on
disk (keyed by text, voice, rate, speed and the espeak-ng version) because espeak + resampling costs tens
of milliseconds per sentence and the suite asks for the same sentences many times.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import subprocess
import tempfile
import threading
import wave
from pathlib import Path

import jiwer
import numpy as np
import soxr

ESPEAK = "espeak-ng"


@functools.cache
def _espeak_version() -> str:
    out = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip()


def _cache_dir() -> Path:
    root = os.environ.get("SPEECHPIPE_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "speechpipe-tts")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _decode_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    # espeak-ng --stdout writes a RIFF header whose data size is 0x7ffffffff-ish (streaming); the wave
    # module copes because it reads frames until EOF, but be explicit about the format we expect.
    with wave.open(io.BytesIO(data), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"espeak-ng gave {w.getnchannels()} channels of {w.getsampwidth()}-byte samples")
        rate = w.getframerate()
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.int16), rate


def resample(pcm16: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample int16 mono audio with soxr (VHQ), clipping back into int16."""
    if from_rate == to_rate:
        return np.asarray(pcm16, dtype=np.int16)
    out = soxr.resample(np.asarray(pcm16, dtype=np.float32), from_rate, to_rate, quality="VHQ")
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def synth(text: str, *, rate: int = 16000, voice: str = "en-us", wpm: int = 175,
          ssml: bool = False) -> np.ndarray:
    """Speak `text` with espeak-ng and return int16 mono samples at `rate` (cached on disk). `ssml`: the
    text is SSML (`<speak>… <break time="700ms"/> …</speak>`: a pause inside one sentence's intonation)."""
    key_parts = (text, rate, voice, wpm, _espeak_version(), *(("ssml",) if ssml else ()))
    key = hashlib.sha256(repr(key_parts).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a torn write from a killed run: synthesise again
    # Text on stdin, so a sentence starting with "-" is never read as an option.
    argv = [ESPEAK, "-v", voice, "-s", str(wpm), "--stdout", *(["-m"] if ssml else [])]
    proc = subprocess.run(argv, input=text.encode(), capture_output=True, check=True)
    pcm, native_rate = _decode_wav_bytes(proc.stdout)
    pcm = resample(pcm, native_rate, rate)
    # Write then rename so concurrent tests (threads or processes) never read half a file.
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npy")
    np.save(tmp, pcm)
    os.replace(tmp, path)
    return pcm


def silence(ms: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(round(rate * ms / 1000.0), dtype=np.int16)


# --- G.711 (ITU-T), the segment-based companding that telephone networks carry ------------------------------

_ULAW_BIAS = 0x84


def ulaw_encode(pcm16: np.ndarray) -> np.ndarray:
    # The ITU/Sun reference on 14-bit samples: shift first, then fold the sign (so -1 and 0 differ).
    v = np.asarray(pcm16, dtype=np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + (_ULAW_BIAS >> 2)
    seg = np.maximum(np.floor(np.log2(mag)).astype(np.int32) - 5, 0)
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    u = ~np.asarray(codes, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _ULAW_BIAS) << exponent) - _ULAW_BIAS
    return np.where(sign != 0, -mag, mag).astype(np.int16)


def alaw_encode(pcm16: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm16, dtype=np.int32) >> 3  # A-law works on 13-bit magnitudes
    sign = np.where(x >= 0, 0x80, 0x00)
    mag = np.where(x >= 0, x, -x - 1)
    mag = np.minimum(mag, 0x0FFF)
    exponent = np.where(mag < 32, 0, np.floor(np.log2(np.maximum(mag, 1))).astype(np.int32) - 4)
    exponent = np.clip(exponent, 0, 7)
    mantissa = np.where(exponent == 0, mag >> 1, mag >> exponent) & 0x0F
    return ((sign | (exponent << 4) | mantissa) ^ 0x55).astype(np.uint8)


def alaw_decode(codes: np.ndarray) -> np.ndarray:
    a = np.asarray(codes, dtype=np.int32) ^ 0x55
    sign = a & 0x80
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    shifted = ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    mag = np.where(exponent == 0, (mantissa << 4) + 8, shifted)
    return np.where(sign != 0, mag, -mag).astype(np.int16)


def g711_roundtrip(pcm16_8k: np.ndarray, law: str = "ulaw") -> np.ndarray:
    """Encode 8 kHz PCM16 to G.711 and decode it back: what a phone call does to the caller's voice."""
    if law == "ulaw":
        return ulaw_decode(ulaw_encode(pcm16_8k))
    if law == "alaw":
        return alaw_decode(alaw_encode(pcm16_8k))
    raise ValueError(f"law must be 'ulaw' or 'alaw', not {law!r}")


def phone_speech(
    text: str, *, law: str = "ulaw", rate: int = 16000, voice: str = "en-us", wpm: int = 175
) -> np.ndarray:
    """Speech as a phone call delivers it: synthesised at 8 kHz, G.711 round-tripped, resampled to `rate`."""
    return resample(g711_roundtrip(synth(text, rate=8000, voice=voice, wpm=wpm), law), 8000, rate)


# --- WAV files ----------------------------------------------------------------------------------------------


def write_wav(path: str | os.PathLike[str], pcm: np.ndarray, rate: int) -> None:
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Return (int16 mono samples, sample rate)."""
    with wave.open(os.fspath(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit samples, got {8 * w.getsampwidth()}-bit")
        channels, rate = w.getnchannels(), w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
    if channels > 1:
        pcm = pcm.reshape(-1, channels)[:, 0].copy()
    return pcm, rate


# --- Word error rate ----------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s']|_")


def normalise_text(text: str) -> str:
    """Lowercase, drop punctuation (keeping apostrophes inside words), collapse whitespace."""
    text = _PUNCT.sub(" ", text.lower())
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def wer(ref: str, hyp: str) -> float:
    """Word error rate of `hyp` against `ref` after normalise_text(); an empty reference scores 0 or 1."""
    r, h = normalise_text(ref), normalise_text(hyp)
    if not r:
        return 0.0 if not h else 1.0
    return float(jiwer.wer(r, h or ""))
