"""Barge-in decisions: when user speech over the agent pauses it, cuts it, or lets it resume.

Pure logic on plain values (speech ms, recognised text), no audio and no clock, so tests drive it
directly. The session does what the returned `Action` says: pause or unpause the speaker, ask the STT
for words, cut the live replies. Also owns what counts as a meaningful word (`meaningful`) and a
filler-only blip (`fillers_only`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from .config import BargeInConfig

_WORD = re.compile(r"[\w']+(?:-[\w']+)*")  # any script: Korean words count as words too
_HUM = re.compile(r"[mh]+|u?h?m+|u+h+")  # folded hums and fillers: "mmm", "hmm", "mhm", "uhm", "um", "uh"
CHECK_EVERY_MS = 200  # speech between two word checks of one candidate


def _fold(word: str) -> str:
    """Spelling-proof form of a word: letters only, runs collapsed ("Mm-hmm" → "mhm", "okay" stays)."""
    return re.sub(r"(.)\1+", r"\1", re.sub(r"[\W_]", "", word))


def fillers_only(text: str) -> bool:
    """Nothing but hums, fillers and stray letters ("Hmm.", "Uh, m")."""
    words = [_fold(w) for w in _WORD.findall(text.lower())]
    return all(_HUM.fullmatch(w) or (len(w) == 1 and w not in "ia" and not w.isdigit()) for w in words)


def meaningful(text: str, config: BargeInConfig) -> set[str]:
    """The words that may cut the agent off: none if there are too few words, or only backchannels
    ("mm-hmm", "okay") and stray letters."""
    words = [_fold(w) for w in _WORD.findall(text.lower())]
    if len(words) < max(config.min_words, 1):
        return set()
    backchannel = {_fold(w) for w in config.backchannel_words}
    return {w for w in words  # a lone digit is a word ("7 8 9" dictated over the agent), a letter not
            if (len(w) > 1 or w == "i" or w.isdigit()) and w not in backchannel and not _HUM.fullmatch(w)}


class Action(enum.Enum):
    NONE = "none"  # nothing to do
    PAUSE = "pause"  # stop sending agent audio: words decide later whether this is a cut
    CHECK = "check"  # ask the STT for the words so far, then call `checked()`
    CUT = "cut"  # a barge-in: cut every live reply
    RESUME = "resume"  # not an interruption: agent audio carries on


@dataclass
class Candidate:
    """User speech over interruptible agent speech, not yet judged."""

    onset_wall: float  # monotonic time the speech began (for the reaction metric)
    checking: bool = False  # a word check is in flight
    next_check_ms: int = 0  # speech ms from which the next check may start
    words: set[str] = field(default_factory=set)  # meaningful words of the last check


class BargeIn:
    """One session's barge-in state: at most one `Candidate` at a time.

    `streaming`: the STT streams (its partials are trusted as they come); otherwise Whisper's decodes of
    a fraction of a word can invent one, so a cut needs the same meaningful word in two checks.
    """

    def __init__(self, config: BargeInConfig, *, streaming: bool) -> None:
        self.config = config
        self.streaming = streaming
        self.candidate: Candidate | None = None

    @property
    def active(self) -> bool:
        return self.candidate is not None

    def meaningful(self, text: str) -> set[str]:
        return meaningful(text, self.config)

    def onset(self, onset_wall: float, *, interruptible: bool, playing: bool) -> Action:
        """Speech began. `interruptible`: an interruptible reply is live (queued or playing); `playing`:
        the user already hears it. Nothing is heard yet: it is watched, not paused."""
        if not interruptible or not self.config.enabled:
            return Action.NONE
        self.candidate = Candidate(onset_wall)
        return Action.PAUSE if playing else Action.NONE

    def due(self, speech_ms: int) -> Action:
        """Per speech frame of the utterance: is it time to check the words (or, with min_words 0, cut)?"""
        c = self.candidate
        if c is None or c.checking or speech_ms < max(self.config.min_speech_ms, c.next_check_ms):
            return Action.NONE
        if self.config.min_words == 0:
            return Action.CUT
        c.checking = True
        c.next_check_ms = speech_ms + CHECK_EVERY_MS
        return Action.CHECK

    def checked(self, text: str | None) -> Action:
        """A word check came back (`None`: the STT failed). Whisper on a fraction of a word can invent one
        ("mhm" → "M. A."); a real interruption says the same word in two checks 200 ms apart, a
        hallucination rarely does."""
        c = self.candidate
        if c is None:
            return Action.NONE
        c.checking = False
        if text is None:
            return Action.NONE
        words = self.meaningful(text)
        cut = bool(words) and bool(words & c.words or self.streaming)
        c.words = words
        return Action.CUT if cut else Action.NONE

    def utterance_end(self, text: str) -> Action:
        """The user spoke over the agent and has finished. Cut only if the words hold up (the same
        meaningful word as the last check, or a streaming engine's text); Whisper on a cough can invent a
        word, a real interruption says it twice. NONE when there was no candidate."""
        c = self.candidate
        if c is None:
            return Action.NONE
        words = self.meaningful(text)
        agreed = bool(words & c.words) or self.streaming
        return Action.CUT if words and (agreed or self.config.min_words == 0) else Action.RESUME

    def take(self) -> Candidate | None:
        """End the candidate (cut, resumed or dropped) and return it."""
        c, self.candidate = self.candidate, None
        return c
