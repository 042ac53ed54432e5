"""Vosk (Kaldi) streaming speech-to-text: partial text while the user speaks, a cheap final at the endpoint.

One `vosk.Model` per process is shared by every stream; each stream owns a KaldiRecognizer. Recognizers are
pooled and reused across sessions because a fresh one is slow: it composes the decoding graph lazily and
caches it, so its first utterance costs ~1 s of CPU (measured with the small Korean model: RTF 1.1 cold,
0.1–0.35 warm). A warm recognizer holds ~150 MB of that cache, so the pool keeps at most `pool_size` idle.
A stream's close() hands its recognizer back; a stream dropped without close() does too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref

import numpy as np
import vosk

from speechpipe.pipeline.stt.base import STTEngine, STTStream, Transcript

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000

vosk.SetLogLevel(-1)  # Kaldi's per-load LOG lines on stderr; warnings and errors still show


_TEN_MS_SILENCE = bytes(2 * SAMPLE_RATE // 100)


def _clear(rec: vosk.KaldiRecognizer, state: str) -> None:
    """Bring a recognizer back to a fresh utterance: no audio, no CMVN/i-vector history. Vosk's Reset() alone
    keeps the feature pipeline (it is built for one continuous stream); only FinalResult() on a running
    decoder drops it. The decoding graph's lazily built cache stays, which is why recognizers are pooled."""
    if state == "endpoint":
        rec.AcceptWaveform(_TEN_MS_SILENCE)  # FinalResult() acts only on a running decoder
    if state != "fresh":
        rec.FinalResult()
    rec.Reset()


class VoskEngine(STTEngine):
    """One loaded Vosk model; recognizers created from it are used from many threads at once."""

    name = "vosk"
    sample_rate = SAMPLE_RATE
    streaming = True

    def __init__(self, model: vosk.Model, *, model_path: str = "", pool_size: int = 8) -> None:
        self.model = model
        self.model_path = model_path
        self.pool_size = pool_size
        self._pool: list[vosk.KaldiRecognizer] = []
        # Reentrant: a stream collected by the cyclic GC returns its recognizer from whatever thread and frame
        # the collection ran in, possibly one already holding this lock.
        self._lock = threading.RLock()

    @classmethod
    def from_path(cls, model_path: str, **kwargs: int) -> VoskEngine:
        return cls(vosk.Model(model_path), model_path=model_path, **kwargs)

    def new_stream(self, language: str | None = None) -> VoskStream:
        # A Vosk model knows one language; `language` is checked where the model is chosen (pipeline.models).
        with self._lock:
            rec = self._pool.pop() if self._pool else None
        if rec is None:
            rec = vosk.KaldiRecognizer(self.model, float(SAMPLE_RATE))
            rec.SetWords(False)  # word timings cost JSON and CPU; nothing downstream uses them
        return VoskStream(self, rec)

    def idle_recognizers(self) -> int:
        with self._lock:
            return len(self._pool)

    def _give_back(self, rec: vosk.KaldiRecognizer, state: list[str]) -> None:
        _clear(rec, state[0])
        with self._lock:
            if len(self._pool) < self.pool_size:
                self._pool.append(rec)


class VoskStream(STTStream):
    """One utterance on a pooled recognizer. Text = Vosk's own endpointed segments + the live tail."""

    def __init__(self, engine: VoskEngine, rec: vosk.KaldiRecognizer) -> None:
        self._rec = rec
        self._lock = threading.Lock()
        self._segments: list[str] = []
        self._n = 0
        self._cached: Transcript | None = None
        self._cached_n = -1
        self._last_partial = ""
        self._closed = False
        # Where the recognizer is, so reset() clears exactly what is left: "fresh" (nothing since the last
        # FinalResult), "running" (audio in the decoder), "endpoint" (Vosk ended a segment; its feature
        # pipeline - CMVN and i-vector state - lives on). A one-item list so the finalizer sees updates.
        self._state = ["fresh"]
        # Runs once: on close(), or when the stream is collected without one.
        self._release = weakref.finalize(self, engine._give_back, rec, self._state)

    def accept(self, pcm16: np.ndarray) -> None:
        data = np.asarray(pcm16, dtype="<i2").tobytes()
        with self._lock:
            self._check_open()
            self._n += len(data) // 2
            self._state[0] = "running"
            if self._rec.AcceptWaveform(data):
                # Vosk ended a segment on its own (its silence rule); the text must be taken now or the next
                # AcceptWaveform starts over without it.
                self._take(json.loads(self._rec.Result()).get("text", ""))
                self._state[0] = "endpoint"

    def partial(self) -> str | None:
        with self._lock:
            self._check_open()
            live = json.loads(self._rec.PartialResult()).get("partial", "")
            text = " ".join([*self._segments, live]).strip() if live else " ".join(self._segments)
            if not text or text == self._last_partial:
                return None
            self._last_partial = text
            return text

    def final(self) -> Transcript:
        with self._lock:
            self._check_open()
            if self._cached is not None and self._cached_n == self._n:
                return self._cached
            t0 = time.perf_counter()
            # FinalResult flushes the decoder; audio accepted afterwards starts a new segment, so a later
            # final() still covers everything since reset().
            self._take(json.loads(self._rec.FinalResult()).get("text", ""))
            if self._state[0] == "running":
                self._state[0] = "fresh"
            result = Transcript(" ".join(self._segments), self._n / SAMPLE_RATE, time.perf_counter() - t0)
            self._cached, self._cached_n = result, self._n
            return result

    def reset(self) -> None:
        with self._lock:
            self._check_open()
            _clear(self._rec, self._state[0])
            self._state[0] = "fresh"
            self._segments = []
            self._n = 0
            self._cached, self._cached_n = None, -1
            self._last_partial = ""

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    def _take(self, text: str) -> None:
        text = text.strip()
        if text:
            self._segments.append(text)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this STT stream is closed")
