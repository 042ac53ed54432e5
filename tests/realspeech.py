"""Real human speech for tests and benchmarks: the development set, its telephone and noisy versions.

Source: Debian 12's `asterisk-core-sounds-en-g722` and `asterisk-core-sounds-en` packages (Asterisk's core
prompts, recorded by Allison Smith, CC-BY-SA-3.0; transcripts in `core-sounds-en.txt`). The G.722 files are
the wideband (16 kHz) originals; every other version is derived from them here, so each leg hears the same
performance. `docs/test-speech.md` lists the sources, the licence and how the set is chosen.

Selection is a rule, not a hand pick (see `_eligible`): whole sentences of 5-25 words, no digits (a
reference says "1" where a speaker says "one"), no bracketed sound descriptions, no trailing "..." (cut-off
prompts), no URLs, one recording per sentence. `SET_SIZE` prompts evenly spaced over the eligible ones in
name order form the set, so it spans every prompt family (agents, conferences, voicemail, queues …).

Versions (all int16 mono):
- `wideband(u)`: 16 kHz, G.722-decoded (what a browser or a G.722 phone delivers);
- `telephone(u)`: 8 kHz, 300-3400 Hz band-pass (sox), μ-law round trip (what a PCMU call delivers);
- `noisy(pcm, rate, snr_db)`: low-tilted noise added at a given SNR over the voiced part.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechpipe.pipeline.audio import ulaw_decode, ulaw_encode

SOUNDS = Path(os.environ.get("SPEECHPIPE_TEST_SOUNDS", "/usr/share/asterisk/sounds/en_US_f_Allison"))
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SET_SIZE = 40
PACKAGES = "asterisk-core-sounds-en asterisk-core-sounds-en-g722"


@dataclass(frozen=True)
class Utterance:
    name: str  # the prompt's file name without extension, e.g. "conf-onlyperson"
    text: str  # the reference transcript

    @property
    def words(self) -> int:
        return len(self.text.split())


def missing() -> str | None:
    """Why the set cannot be loaded here (None when it can)."""
    if not TRANSCRIPTS.exists() or not SOUNDS.is_dir():
        return f"the real-speech set needs the Debian packages {PACKAGES} (scripts/install.sh --dev)"
    try:
        import G722  # noqa: F401
    except ImportError:
        return "the real-speech set needs the PyPI package g722 (the dev extra)"
    return None


def _eligible(name: str, text: str) -> bool:
    words = text.split()
    return (
        5 <= len(words) <= 25
        and not re.search(r"\d|\[|\]|\.\.\.|\(|\)|\w\.\w", text)  # digits, tags, cut-offs, URLs
        and text.rstrip()[-1:] in (".", "?", "!")
        and (SOUNDS / f"{name}.g722").exists()
    )


@functools.cache
def _transcripts() -> dict[str, str]:
    with gzip.open(TRANSCRIPTS, "rt", encoding="utf-8", errors="replace") as f:
        rows = [line.split(":", 1) for line in f if ":" in line and not line.startswith(";")]
    return {name.strip(): " ".join(text.split()) for name, text in rows}


def prompt(name: str) -> Utterance:
    """Any prompt by name, e.g. "call-waiting" or "digits/4" (short ones the dev set leaves out)."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    return Utterance(name, _transcripts()[name])


@functools.cache
def single_sentences() -> tuple[Utterance, ...]:
    """Every eligible prompt that is one sentence (no inner punctuation), in name order: for turn-taking,
    where a pause between two sentences rightly ends a turn."""
    return tuple(u for u in _eligible_prompts() if not re.search(r"[.?!,;:]\s", u.text))


def _eligible_prompts() -> list[Utterance]:
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    chosen: list[Utterance] = []
    seen: set[str] = set()
    for name, text in sorted(_transcripts().items()):
        if "/" not in name and text.lower() not in seen and _eligible(name, text):
            seen.add(text.lower())  # one recording per sentence ("invalid" and "pbx-invalid" say the same)
            chosen.append(Utterance(name, text))
    return chosen


@functools.cache
def devset(size: int = SET_SIZE) -> tuple[Utterance, ...]:
    """`size` eligible prompts, evenly spaced in name order (deterministic)."""
    chosen = _eligible_prompts()
    if len(chosen) < size:
        raise RuntimeError(f"only {len(chosen)} eligible prompts in {TRANSCRIPTS}, {size} wanted")
    step = len(chosen) / size
    return tuple(chosen[int(i * step)] for i in range(size))


@functools.cache
def wideband(u: Utterance) -> np.ndarray:
    """16 kHz int16: the G.722 prompt decoded (the wideband original)."""
    import G722

    data = (SOUNDS / f"{u.name}.g722").read_bytes()
    out = np.asarray(G722.G722(16000, 64000).decode(data), dtype=np.int16)
    out.setflags(write=False)
    return out


@functools.cache
def telephone(u: Utterance) -> np.ndarray:
    """8 kHz int16 as a PCMU call carries it: sox band-pass 300-3400 Hz and resampling, then μ-law."""
    raw = wideband(u).astype("<i2").tobytes()
    fmt = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1"]
    # -D: no dither. sox dithers 16-bit output with a random seed, so each process heard other audio.
    argv = ["sox", "-D", *fmt, "-r", "16000", "-", *fmt, "-r", "8000", "-",
            "sinc", "300-3400", "rate", "-v", "8000"]
    pcm = np.frombuffer(subprocess.run(argv, input=raw, capture_output=True, check=True).stdout, "<i2")
    out = ulaw_decode(ulaw_encode(pcm.astype(np.int16)))
    out.setflags(write=False)
    return out


def noisy(pcm: np.ndarray, rate: int, snr_db: float, seed: int = 0) -> np.ndarray:
    """`pcm` with low-tilted noise at `snr_db` below the speech level (RMS of frames within 30 dB of peak)."""
    x = np.asarray(pcm, dtype=np.float64)
    frame = rate // 50
    n = len(x) // frame
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))
    speech_rms = float(np.sqrt(np.mean(rms[rms >= rms.max() * 10 ** (-30 / 20)] ** 2)))
    # White noise through a 4-tap moving average: more energy low than high, like room and line noise.
    white = np.random.default_rng(seed).normal(0, 1, len(x))
    noise = np.convolve(white, np.ones(4) / 4, mode="same")
    noise *= speech_rms * 10 ** (-snr_db / 20) / max(float(np.sqrt(np.mean(noise**2))), 1e-9)
    return np.clip(np.round(x + noise), -32768, 32767).astype(np.int16)
