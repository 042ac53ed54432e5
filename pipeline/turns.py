"""Endpointing: turns a stream of per-frame VAD decisions into utterance boundaries.

Pure logic (no audio, no clock), so the session can drive it frame by frame and tests can drive it with
lists of booleans. Hysteresis on both edges keeps VAD flicker from starting or resetting a turn.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

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
class TurnDetector:
    config: EndpointingConfig
    frame_ms: int = 20
    # Consecutive voiced frames that start an utterance, and that end a pause inside one.
    onset_frames: int = 2
    resume_frames: int = 2
    speculate_ms: int = 200

    def __post_init__(self) -> None:
        self.state = State.IDLE
        self.frame = 0  # frames seen
        self.voiced_run = 0
        self.silence_run = 0
        self.utterance_start = 0  # frame index of the first onset frame
        self.last_voiced = 0  # frame index of the last voiced frame in the utterance
        self.voiced_frames = 0
        self.paused_signalled = False

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
                out.append(Signal.SPEECH_START)
            return out

        if voiced:
            self.voiced_frames += 1
            if self.state is State.PAUSED and self.voiced_run >= self.resume_frames:
                self.state = State.SPEAKING
                self.silence_run = 0
                self.last_voiced = f
                self.paused_signalled = False
                out.append(Signal.RESUME)
            elif self.state is State.SPEAKING:
                self.last_voiced = f
            else:
                self.silence_run += 1  # a lone voiced blip inside a pause does not reset the endpoint timer
        else:
            self.state = State.PAUSED
            self.silence_run += 1

        if self.state is State.PAUSED:
            speculate_at = min(self.speculate_ms, self.config.silence_ms)
            if not self.paused_signalled and self.silence_ms >= speculate_at:
                self.paused_signalled = True
                out.append(Signal.PAUSE)
            if self.silence_ms >= self.config.silence_ms:
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


# Words a finished sentence rarely ends on: the user paused mid-thought ("I'd like to", "my number is").
_OPEN_ENDINGS = frozenset(
    "a an the to of for with and or but my your our is are was were at in on from by than that "
    "because if so um uh".split())
_NUMBER_WORDS = frozenset(
    "zero oh one two three four five six seven eight nine ten eleven twelve hundred thousand".split())
_LAST_WORD = re.compile(r"([\w']+)\W*$")


def looks_unfinished(text: str) -> bool:
    """Whether a transcribed turn reads as cut off mid-thought: no sentence end, or it ends on a word a
    sentence rarely ends on, or on a number (digits dictated in groups: "four five six")."""
    text = text.strip()
    if not text:
        return False
    m = _LAST_WORD.search(text.lower())
    last = m.group(1) if m else ""
    if last.isdigit() or last in _NUMBER_WORDS or last in _OPEN_ENDINGS:
        return True
    return text[-1] not in ".?!…"
