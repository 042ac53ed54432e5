"""Turn taking: where the user's turn ends.

Two parts. `Endpointer` turns a stream of per-frame VAD decisions into utterance boundaries: pure logic (no
audio, no clock), so the session drives it frame by frame and tests drive it with lists of booleans;
hysteresis on both edges keeps VAD flicker from starting or resetting a turn. How much silence ends an
utterance is its `endpoint_ms`, which the session sets for each pause from a `TurnDetector`'s verdict.

A `TurnDetector` judges how finished the user's words sound (`end_probability(cues)`, 0..1) from
`TurnCues`: the speculative transcript at the pause, the voiced time, and the prosody of the last voiced
half second (`prosody()`: pitch slope, energy decay). `endpoint_for(p, config)` maps that to a silence:
finished (p >= 0.8) → `min_silence_ms`, undecided (0.5) → `silence_ms`, unfinished (0) → `max_silence_ms`,
linear in between. `HeuristicTurnDetector` is the default; `SilenceTurnDetector` is plain silence
endpointing. A model-based detector (an ONNX end-of-turn model on the text or the audio) implements the
same protocol: see docs/architecture.md § Turn detection.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import EndpointingConfig


class Signal(enum.Enum):
    SPEECH_START = "speech_start"  # an utterance began (onset frames included in it)
    PAUSE = "pause"  # silence has lasted `speculate_ms`: a good moment to decode speculatively
    RESUME = "resume"  # speech came back inside the utterance, after a PAUSE or before it
    END = "end"  # silence held for the endpoint setting: the user's turn is over
    DISCARD = "discard"  # the utterance ended but was too short to be a turn
    MAX_LENGTH = "max_length"  # the utterance hit max_turn_s and is cut here


class State(enum.Enum):
    IDLE = "idle"
    SPEAKING = "speaking"
    PAUSED = "paused"


@dataclass
class Endpointer:
    config: EndpointingConfig
    frame_ms: int = 20
    # Consecutive voiced frames that start an utterance, and that end a pause inside one.
    onset_frames: int = 2
    resume_frames: int = 2
    # Silence after which a pause is worth decoding (PAUSE): the text is what the turn detector judges, so
    # it must be in before the shortest endpoint. The VAD's own hang-over means 40 ms here is ~150 ms after
    # the voice stopped; silence endpointing has until silence_ms and decodes later (fewer wasted decodes).
    speculate_ms: int = 200
    # The endpoint of a pause before its verdict: None = the config's silence_ms (silence endpointing);
    # a heuristic detector waits for the text, up to the longest silence.
    undecided_ms: int | None = None

    def __post_init__(self) -> None:
        self.endpoint_ms = self.initial_endpoint_ms
        self.state = State.IDLE
        self.frame = 0  # frames seen
        self.voiced_run = 0
        self.silence_run = 0
        self.utterance_start = 0  # frame index of the first onset frame
        self.last_voiced = 0  # frame index of the last voiced frame in the utterance
        self.voiced_frames = 0
        self.paused_signalled = False

    @property
    def initial_endpoint_ms(self) -> int:
        return self.undecided_ms if self.undecided_ms is not None else self.config.silence_ms

    @property
    def in_utterance(self) -> bool:
        return self.state is not State.IDLE

    @property
    def speech_ms(self) -> int:
        return self.voiced_frames * self.frame_ms

    @property
    def silence_ms(self) -> int:
        return self.silence_run * self.frame_ms

    def process(self, voiced: bool) -> list[Signal]:
        """Feed one frame's VAD decision; returns what it means (usually nothing)."""
        out: list[Signal] = []
        f = self.frame
        self.frame += 1
        self.voiced_run = self.voiced_run + 1 if voiced else 0

        if self.state is State.IDLE:
            if self.voiced_run >= self.onset_frames:
                self.state = State.SPEAKING
                self.utterance_start = f - self.onset_frames + 1
                self.voiced_frames = self.onset_frames
                self.last_voiced = f
                self.silence_run = 0
                self.paused_signalled = False
                self.endpoint_ms = self.initial_endpoint_ms
                out.append(Signal.SPEECH_START)
            return out

        if voiced:
            self.voiced_frames += 1
            if self.state is State.PAUSED and self.voiced_run >= self.resume_frames:
                self.state = State.SPEAKING
                self.silence_run = 0
                self.last_voiced = f
                self.paused_signalled = False
                self.endpoint_ms = self.initial_endpoint_ms
                out.append(Signal.RESUME)
            elif self.state is State.SPEAKING:
                self.last_voiced = f
            else:
                self.silence_run += 1  # a lone voiced blip inside a pause does not reset the endpoint timer
        else:
            self.state = State.PAUSED
            self.silence_run += 1

        if self.state is State.PAUSED:
            speculate_at = min(self.speculate_ms, self.endpoint_ms)
            if not self.paused_signalled and self.silence_ms >= speculate_at:
                self.paused_signalled = True
                out.append(Signal.PAUSE)
            if self.silence_ms >= self.endpoint_ms:
                out.append(Signal.END if self.speech_ms >= self.config.min_speech_ms else Signal.DISCARD)
                self.state = State.IDLE
                self.voiced_run = 0
                return out

        if (f - self.utterance_start + 1) * self.frame_ms >= self.config.max_turn_s * 1000:
            out.append(Signal.MAX_LENGTH)
            self.state = State.IDLE
            self.voiced_run = 0
        return out

    def start_ms(self) -> int:
        return self.utterance_start * self.frame_ms

    def end_ms(self) -> int:
        """End of the last voiced frame of the current/last utterance."""
        return (self.last_voiced + 1) * self.frame_ms


# ---- judging the words, the voice and the pace --------------------------------------------------------
# Below this the text's end is not trusted (TurnCues.unsure_end).
UNSURE_END = 0.45
# A finished-reading text with an unsure end waits this long: past a mid-sentence pause (most are under
# 0.8 s) but well short of the longest silence.
UNSURE_END_P = 0.25


@dataclass(frozen=True)
class TurnCues:
    """What a turn detector may look at when a pause begins."""

    text: str  # the speculative transcript of the utterance so far ("" when nothing was recognised)
    voiced_s: float  # voiced time in the utterance
    pitch_slope: float | None = None  # semitones per second over the last voiced ~0.5 s; < 0: falling
    energy_decay_db: float | None = None  # the last 150 ms voiced against the 0.5 s before; > 0: fading
    # The STT's probability of the text's last word and of its sentence mark (None: the engine does not say)
    last_word_prob: float | None = None
    end_mark_prob: float | None = None

    @property
    def end_prob(self) -> float | None:
        """How sure the STT was of the words that make the text read finished: its last word's probability
        times its sentence mark's (None when the engine does not say)."""
        if self.last_word_prob is None:
            return None
        return self.last_word_prob * (1.0 if self.end_mark_prob is None else self.end_mark_prob)

    @property
    def unsure_end(self) -> bool:
        """A misheard last word or a sentence mark barely chosen. On bench/turns.py's sets, the halves of
        paused sentences that read as finished had an end_prob under UNSURE_END in 11 of 13 cases, against
        3 of 77 finished sentences."""
        end = self.end_prob
        return end is not None and end < UNSURE_END

    @property
    def words_per_s(self) -> float | None:
        words = len(self.text.split())
        return words / self.voiced_s if words and self.voiced_s > 0.3 else None


class TurnDetector(Protocol):
    """Judges whether the user's turn is over. `needs_text`: the endpoint waits for the pause's
    speculative transcript before deciding (False: `end_probability` is never asked)."""

    name: str
    needs_text: bool

    def end_probability(self, cues: TurnCues) -> float:
        """0 = surely unfinished, 0.5 = can't tell, 1 = surely finished."""
        ...


class SilenceTurnDetector:
    """Silence alone: every turn ends after the config's `silence_ms`."""

    name = "silence"
    needs_text = False

    def end_probability(self, cues: TurnCues) -> float:
        return 0.5


class HeuristicTurnDetector:
    """The words first (Whisper punctuates what it hears as finished; an open last word or a number being
    dictated is not), then how sure the STT was of them (a finished-reading text whose last word or sentence
    mark it barely chose is usually a half sentence misheard: "I was charged for a subscription that"
    comes out "... a subscription net."), then the voice: a final pitch fall or fading energy makes a
    finished-reading text surer, a level, sustained ending less sure; a slow speaker gets a little longer."""

    name = "heuristic"
    needs_text = True

    def end_probability(self, cues: TurnCues) -> float:
        text = cues.text.strip()
        if not text:
            return 0.5
        if looks_unfinished(text):
            p = 0.15
        elif cues.unsure_end:
            return UNSURE_END_P
        elif text.endswith(("?", "!")):
            p = 0.95
        else:
            p = 0.85
        if cues.pitch_slope is not None:
            if cues.pitch_slope <= -4.0:
                p += 0.05
            elif cues.pitch_slope >= 2.0 and not text.endswith("?"):
                p -= 0.1  # rising without a question: a list or a clause going on
        if cues.energy_decay_db is not None and cues.energy_decay_db < 1.0 and p > 0.5:
            p -= 0.05  # the voice stopped at full strength: cut off rather than finished
        rate = cues.words_per_s
        if rate is not None and rate < 1.5:
            p -= 0.1
        return min(1.0, max(0.0, p))


def make_turn_detector(config: EndpointingConfig) -> TurnDetector:
    return SilenceTurnDetector() if config.turn_detector == "silence" else HeuristicTurnDetector()


def endpoint_for(p: float, config: EndpointingConfig) -> int:
    """The silence (ms) that ends a turn judged `p` finished."""
    finished, undecided, unfinished = config.silence_range_ms
    if p >= 0.8:
        return finished
    if p >= 0.5:
        return round(undecided + (finished - undecided) * (p - 0.5) / 0.3)
    return round(unfinished + (undecided - unfinished) * p / 0.5)


PROSODY_RATE = 16000
_WINDOW = 640  # 40 ms pitch windows
_HOP = 160  # every 10 ms
_MIN_LAG, _MAX_LAG = PROSODY_RATE // 400, PROSODY_RATE // 70  # 70-400 Hz voices


def _pitch(w: np.ndarray, rate: int) -> float | None:
    """The window's f0 (Hz), or None when it is quiet or not clearly periodic. The normalised
    autocorrelation's shortest lag within 10 % of its best peak, so a period's multiples (which correlate
    as well) never halve the estimate."""
    w = w - w.mean()
    n = len(w)
    if float(np.dot(w, w)) < 1e3 * n:  # quieter than ~ -60 dBFS: nothing to read
        return None
    spectrum = np.fft.rfft(w, 2 * n)
    ac = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
    energy = np.cumsum(w * w)
    lags = np.arange(_MIN_LAG, _MAX_LAG + 1)
    head = energy[n - 1 - lags]  # energy of w[:n-lag]
    tail = energy[-1] - energy[lags - 1]  # energy of w[lag:]
    r = ac[lags] / np.sqrt(np.maximum(head * tail, 1e-9))
    best = float(r.max())
    if best < 0.5:
        return None
    peaks = np.nonzero((r[1:-1] >= r[:-2]) & (r[1:-1] >= r[2:]) & (r[1:-1] >= 0.9 * best))[0] + 1
    k = int(peaks[0]) if len(peaks) else int(np.argmax(r))
    return rate / float(lags[k])


def prosody(voiced: np.ndarray, rate: int = PROSODY_RATE) -> tuple[float | None, float | None]:
    """(pitch slope in semitones/s, energy decay in dB) of the last ~0.5 s of voiced int16 audio at 16 kHz.
    Pitch: the normalised autocorrelation peak per 40 ms window, kept where it is clearly periodic (> 0.5),
    a least-squares slope of log-pitch over time (None with fewer than 5 periodic windows). Energy: the
    last 150 ms against the 350 ms before it (None under 0.5 s)."""
    if rate != PROSODY_RATE or len(voiced) < _WINDOW * 2:
        return None, None
    x = voiced[-PROSODY_RATE // 2:].astype(np.float64)
    times, semitones = [], []
    for start in range(0, len(x) - _WINDOW + 1, _HOP):
        f0 = _pitch(x[start:start + _WINDOW], rate)
        if f0 is not None:
            times.append(start / rate)
            semitones.append(12 * math.log2(f0 / 100.0))
    slope = None
    if len(times) >= 5:
        slope = float(np.polyfit(np.asarray(times), np.asarray(semitones), 1)[0])
    decay = None
    if len(x) >= PROSODY_RATE // 2:
        tail, body = x[-int(0.15 * rate):], x[:-int(0.15 * rate)]
        decay = float(10 * math.log10((np.mean(body ** 2) + 1.0) / (np.mean(tail ** 2) + 1.0)))
    return slope, decay


# Words a finished sentence rarely ends on: the user paused mid-thought ("I'd like to", "my number is").
_OPEN_ENDINGS = frozenset(
    "a an the to of for with and or but nor my your our their his her its is are was were am be been being "
    "at in on from by into onto about than that which who whose because if so as um uh er like "
    "i'd i'm i'll i've we're you're can could would should will shall must might may do does did "
    "have has had not every each very".split())
# An auxiliary closes an elliptical answer after a pronoun ("Yes, it is." "I can."), not after a noun.
_AUXILIARIES = frozenset(
    "is are was were am be been do does did have has had can could would should will shall must might may"
    .split())
_PRONOUNS = frozenset("i you he she it we they that there this so".split())
# A preposition that is a verb's particle closes the sentence: "logged on", "hold on", "sign in".
_PARTICLES = frozenset("on in up out off over down back".split())
_PARTICLE_VERBS = frozenset(
    "log sign check hold go come turn switch get give hang sit stand look carry".split())
_TWO_LAST = re.compile(r"([\w']+)\W+([\w']+)\W*$")
# A wh-question strands its preposition at the end: "Which folder should I save this message to?"
_WH_WORDS = frozenset("what which who whom where".split())
_STRANDED = frozenset("to of for with from at in on about into by".split())
_NUMBER_WORDS = frozenset(
    "zero oh one two three four five six seven eight nine ten eleven twelve hundred thousand".split())
_LAST_WORD = re.compile(r"([\w']+)\W*$")


def looks_unfinished(text: str) -> bool:
    """Whether a transcribed turn reads as cut off mid-thought: no sentence end, or it ends on a word a
    sentence rarely ends on, or on a number (digits dictated in groups: "four five six")."""
    text = text.strip()
    if not text:
        return False
    if text.endswith(("...", "…", "-")):  # Whisper's mark for trailing off
        return True
    m = _LAST_WORD.search(text.lower())
    last = m.group(1) if m else ""
    if text[-1] in ".?!" and (last in _AUXILIARIES or last in _PARTICLES):
        pair = _TWO_LAST.search(text.lower())
        before = pair.group(1) if pair else ""
        if last in _AUXILIARIES and before in _PRONOUNS:
            return False
        if last in _PARTICLES and (before in _PARTICLE_VERBS or before.endswith(("ed", "ing"))):
            return False
    if text.endswith("?") and last in _STRANDED and text.lower().split()[0] in _WH_WORDS:
        return False
    if last.isdigit() or last in _NUMBER_WORDS or last in _OPEN_ENDINGS:
        return True
    return text[-1] not in ".?!"
