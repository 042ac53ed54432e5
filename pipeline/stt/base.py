"""The contract every speech-to-text engine meets.

An engine holds the loaded model (once per process, shared by all sessions); a stream holds one
utterance's decoder state. Stream methods are synchronous and may burn CPU: the pipeline runs them in its
STT executor, never on the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transcript:
    text: str
    # Seconds of audio this text covers (the audio accepted when it was produced).
    audio_s: float
    # Wall-clock seconds the engine spent producing it.
    compute_s: float
    # How sure the engine was of the words that end the text (None: it does not say): the last word's
    # probability and, when the text ends on a sentence mark, that mark's. A turn detector reads them: a
    # half-heard last word ("... a subscription net.") is how a cut-off sentence passes for a finished one.
    last_word_prob: float | None = None
    end_mark_prob: float | None = None


class STTStream(ABC):
    """One utterance. Feed 16 kHz PCM16 with accept(); ask for text with partial()/final()."""

    @abstractmethod
    def accept(self, pcm16: np.ndarray) -> None:
        """Append int16 mono samples at the engine's sample_rate."""

    @abstractmethod
    def partial(self) -> str | None:
        """Text so far, for engines that stream (None when there is nothing new or the engine cannot)."""

    @abstractmethod
    def final(self) -> Transcript:
        """Text for all audio accepted so far. Calling it twice with no new audio returns the cached result,
        which is how the pipeline decodes speculatively when a pause begins and reuses it at the endpoint."""

    @abstractmethod
    def reset(self) -> None:
        """Drop all audio and decoder state; the stream is ready for the next utterance."""

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract
        """Give pooled decoder state back to the engine when the session ends (idempotent; the stream must
        not be used afterwards). Engines without pooled state need nothing here."""


class STTEngine(ABC):
    name: str
    sample_rate: int = 16000
    streaming: bool = False

    @abstractmethod
    def new_stream(self, language: str | None = None) -> STTStream: ...
