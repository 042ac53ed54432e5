"""Streaming text-to-speech: the `TTSEngine` contract the speaker depends on, and `EspeakTTS`, espeak-ng
with one short-lived `espeak-ng --stdout` process per utterance.

`EspeakTTS.stream()` yields PCM16 chunks (mono, 22050 Hz, espeak-ng's native rate, checked against the
WAV header of every stream) while espeak-ng is still synthesising. The text goes in on stdin, never on
the command line (so it cannot become an option, and other local users cannot read it in `ps`), with
control characters, markup tags and espeak's `[[phoneme]]` escape removed.

Measured here (p50 of 15 runs, asyncio, this 2-core machine; tests/test_tts.py asserts the ordering):
a 98 s paragraph streams in ~220 ms and its first chunk reaches the consumer after ~16 ms, while
espeak-ng is still running; a short sentence also gives its first chunk at ~15 ms (whole stream ~24 ms).
Those ~15 ms are start-up: the asyncio spawn of a trivial binary costs ~4 ms, espeak-ng then loads its
voice and dictionary. A pre-spawned espeak-ng (voice loaded, waiting on stdin) gives its first byte 0.4 ms
after the text is written, so warming would save ~15 ms once per reply (later sentences are synthesised
while earlier ones play). Not done: espeak-ng reads stdin to EOF before it speaks, so a warm process
serves one utterance and must be keyed by voice/rate/pitch; 15 ms is small against the STT and agent.

Stopping: when the generator is closed (`aclose()`, leaving an `async with contextlib.aclosing(...)`
block) or cancelled inside it, the process is killed and reaped before the close returns. When the
consuming task ends (cancelled while awaiting something else, say) the process is killed in that task's
done-callback, and asyncio's child watcher reaps it within milliseconds. A consumer that merely `break`s
out of `async for` and lives on leaves the closing to garbage collection, which CPython does at once when
nothing else holds the generator; use `aclosing` to be certain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import struct
import subprocess
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator

import numpy as np

ESPEAK = "espeak-ng"
SAMPLE_RATE = 22050
_VOICE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*(\+[A-Za-z0-9_\-]+)?$")
# Tags (SSML, HTML) an agent may emit for some other TTS: without -m espeak-ng would read them out.
_TAG_RE = re.compile(r"</?[A-Za-z][\w:.\-]*(\s[^<>]*)?/?>")
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
MAX_TEXT_CHARS = 20000


class TTSError(RuntimeError):
    """espeak-ng failed (bad voice, crash, unexpected output)."""


def clean_text(text: str) -> str:
    """The text espeak-ng should read: no control or format characters (espeak-ng treats \\x01 as an
    embedded-command escape), no markup tags, no `[[` phoneme escapes; whitespace collapsed."""
    text = _TAG_RE.sub(" ", text)
    text = "".join(" " if unicodedata.category(c) in _DROP_CATEGORIES else c for c in text)
    text = text.replace("[[", "[ [").replace("]]", "] ]")
    return " ".join(text.split())


@functools.cache
def installed_voices() -> tuple[frozenset[str], frozenset[str]]:
    """(voices, variants) espeak-ng knows, lower-cased: language codes and voice names; variant files."""
    def table(arg: str) -> list[list[str]]:
        out = subprocess.run([ESPEAK, arg], capture_output=True, text=True, check=True).stdout
        return [line.split() for line in out.splitlines()[1:] if line.strip()]

    voices: set[str] = set()
    for cols in table("--voices"):
        if len(cols) >= 5:
            voices.update({cols[1].lower(), cols[3].lower(), cols[4].rsplit("/", 1)[-1].lower()})
            voices.update(c.strip("(").lower() for c in cols[5::2])
    variants = {cols[4].rsplit("/", 1)[-1].lower() for cols in table("--voices=variant") if len(cols) >= 5}
    return frozenset(voices), frozenset(variants)


def validate(voice: str, rate_wpm: int, pitch: int) -> None:
    """Raise ValueError unless espeak-ng can speak with these settings (voice as `lang[+variant]`)."""
    if not isinstance(voice, str) or not _VOICE_RE.match(voice):
        raise ValueError(f"voice {voice!r} is not of the form 'en-us' or 'en-us+f3'")
    base, _, variant = voice.lower().partition("+")
    voices, variants = installed_voices()
    if base not in voices:
        raise ValueError(f"espeak-ng has no voice {base!r}")
    if variant and variant not in variants:
        raise ValueError(f"espeak-ng has no voice variant {variant!r}")
    if not (isinstance(rate_wpm, int) and 80 <= rate_wpm <= 450):
        raise ValueError("rate_wpm must be an integer in 80..450")
    if not (isinstance(pitch, int) and 0 <= pitch <= 99):
        raise ValueError("pitch must be an integer in 0..99")


def _parse_wav_header(data: bytes) -> tuple[int, int] | None:
    """(sample_rate, offset of the first sample) once `data` holds the whole header, else None."""
    if len(data) < 12:
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TTSError("espeak-ng did not write a WAV stream")
    pos, rate = 12, None
    while True:
        if len(data) < pos + 8:
            return None
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"data":
            if rate is None:
                raise TTSError("WAV data before its fmt chunk")
            return rate, pos + 8
        if len(data) < pos + 8 + size:
            return None
        if cid == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, pos + 8)
            if fmt != 1 or channels != 1 or bits != 16:
                raise TTSError(f"expected mono PCM16, got format {fmt}, {channels} channel(s), {bits} bits")
        pos += 8 + size + (size & 1)


class TTSEngine(ABC):
    """A streaming TTS engine, loaded once per process and shared by every session (like `STTEngine`)."""

    name: str
    sample_rate: int  # of the PCM16 mono chunks `stream()` yields

    @abstractmethod
    def stream(self, text: str, *, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50
               ) -> AsyncGenerator[np.ndarray, None]:
        """Speak `text`: an async generator of int16 chunks as they are made. Closing it (`aclose()`) or
        cancelling its consumer stops the synthesis at once; text with nothing to say yields nothing."""


class EspeakTTS(TTSEngine):
    """espeak-ng as a streaming TTS engine. Stateless: one instance serves every session."""

    name = "espeak-ng"
    sample_rate = SAMPLE_RATE

    def __init__(self, *, chunk_ms: int = 20, binary: str = ESPEAK) -> None:
        if not 5 <= chunk_ms <= 200:
            raise ValueError("chunk_ms must be in 5..200")
        self.chunk_samples = self.sample_rate * chunk_ms // 1000
        self.binary = binary
        installed_voices()  # list the voices now (one blocking call), not inside the first stream()

    async def stream(self, text: str, *, voice: str = "en-us", rate_wpm: int = 175, pitch: int = 50
                     ) -> AsyncGenerator[np.ndarray, None]:
        """Speak `text`: yields int16 arrays of chunk_ms (the last may be shorter) as espeak-ng makes them.

        Yields nothing for text with nothing to say. Raises ValueError for bad settings, TTSError if
        espeak-ng fails.
        """
        validate(voice, rate_wpm, pitch)
        text = clean_text(text)
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text longer than {MAX_TEXT_CHARS} characters; split it into sentences")
        if not text:
            return
        proc = await asyncio.create_subprocess_exec(
            self.binary, "--stdout", "--stdin", "-b", "1", "-v", voice, "-s", str(rate_wpm), "-p", str(pitch),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        # If the consuming task is cancelled while it is busy elsewhere (not inside this generator), nothing
        # runs our `finally` until the generator is garbage-collected, and a cancelled task's traceback keeps
        # it alive. So kill the process as soon as that task is done; the child watcher reaps it.
        task = asyncio.current_task()

        def kill_on_task_end(_: object) -> None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

        if task is not None:
            task.add_done_callback(kill_on_task_end)
        try:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            # write() only buffers and close() flushes in the background, so a text larger than the pipe
            # cannot deadlock against espeak-ng filling stdout.
            proc.stdin.write(text.encode("utf-8") + b"\n")
            proc.stdin.close()
            chunk_bytes = 2 * self.chunk_samples
            pending = b""
            header_done = False
            while True:
                block = await proc.stdout.read(65536)
                if not block:
                    break
                pending += block
                if not header_done:
                    parsed = _parse_wav_header(pending)
                    if parsed is None:
                        continue
                    rate, offset = parsed
                    if rate != self.sample_rate:
                        raise TTSError(f"espeak-ng speaks at {rate} Hz, expected {self.sample_rate}")
                    pending, header_done = pending[offset:], True
                usable = len(pending) // chunk_bytes * chunk_bytes
                if usable:
                    pcm = np.frombuffer(bytearray(pending[:usable]), dtype="<i2")
                    pending = pending[usable:]
                    for i in range(0, len(pcm), self.chunk_samples):
                        yield pcm[i : i + self.chunk_samples]
            code = await proc.wait()
            if code != 0 or not header_done:
                err = (await proc.stderr.read()).decode("utf-8", "replace").strip()
                raise TTSError(f"espeak-ng exited with {code}: {err or 'no audio'}")
            tail = len(pending) // 2 * 2
            if tail:
                yield np.frombuffer(bytearray(pending[:tail]), dtype="<i2")
        finally:
            if task is not None:
                task.remove_done_callback(kill_on_task_end)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            # Drain what a killed process left in its pipes: asyncio closes the subprocess transport only
            # once it has seen EOF on every pipe, and a paused, never-drained stdout would leak it.
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None and not pipe.at_eof():
                    await pipe.read()
            # Reap now; if this is itself cancelled, the child watcher still reaps the killed process.
            await proc.wait()
