"""A pipe's configuration: every knob of the speech pipeline, validated, with measured defaults. Core
vocabulary, shared by the server, storage and the REST client.

The REST API stores this as the pipe's JSON config; the pipeline reads it when a session starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VADConfig(_Strict):
    engine: Literal["webrtc", "silero"] = "silero"
    # webrtcvad aggressiveness (0 = least, 3 = most eager to call audio non-speech).
    aggressiveness: int = Field(2, ge=0, le=3)
    # Silero speech probability at which speech starts, and below which it ends again (hysteresis);
    # None = threshold - 0.15, as Silero's own VADIterator.
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    # The same on 8 kHz legs (G.711 calls), where Silero's 8 kHz branch runs. Chosen on real narrowband
    # speech in noise (python -m bench.accuracy): at 0.3 the fewest turns split or start late, and no
    # false speech on 420 s of line noise, hum, coughs and clicks.
    narrowband_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    neg_threshold: float | None = Field(None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _neg_below_threshold(self) -> VADConfig:
        if self.neg_threshold is not None and self.neg_threshold > self.threshold:
            raise ValueError("vad.neg_threshold must not exceed vad.threshold")
        return self


class STTConfig(_Strict):
    engine: Literal["whisper", "vosk"] = "whisper"
    # A model directory, or a name the engine's loader knows (see pipeline.models); None = engine default.
    model: str | None = Field(None, max_length=512)
    language: str = Field("en", min_length=2, max_length=16)
    # Partial transcripts while the user speaks (`user_partial` to the client, `user.partial` to the agent).
    # A streaming engine (Vosk) gives them as it decodes. Whisper does not stream: the session decodes the
    # audio so far about every `partial_interval_s` of new speech, and only when the server's STT has
    # nothing better to do: with a final decode queued or running in any session, or another partial
    # decoding, the partial is skipped (shed first under load, counted in the session's metrics), so finals
    # never wait behind partials. The server's SPEECHPIPE_WHISPER_PARTIAL_S overrides both for Whisper.
    partials: bool = True
    partial_interval_s: float = Field(0.5, ge=0.2, le=10.0)


class EndpointingConfig(_Strict):
    # How the end of a turn is judged. "heuristic": a pause is decoded at once and the words so far, their
    # punctuation, the voice's final pitch and energy, and the speaking rate say how finished the turn
    # sounds; a finished one ends after `min_silence_ms`, an unfinished one ("I'd like to order the", a
    # number being dictated) waits up to `max_silence_ms`, an undecided one `silence_ms`.
    # "silence": every turn ends after `silence_ms` of silence, whatever was said.
    turn_detector: Literal["heuristic", "silence"] = "heuristic"
    # Silence after speech that ends the user's turn ("silence"), or an undecided one ("heuristic").
    silence_ms: int = Field(500, ge=100, le=5000)
    # The shortest silence that ends a finished-sounding turn, and the longest an unfinished one waits
    # (`silence_ms` outside this range widens it).
    min_silence_ms: int = Field(200, ge=100, le=5000)
    max_silence_ms: int = Field(1500, ge=100, le=10000)
    # Speech shorter than this is not a turn (clicks, breaths).
    min_speech_ms: int = Field(200, ge=20, le=5000)
    # A turn that runs this long is cut and sent as is.
    max_turn_s: float = Field(30.0, ge=1.0, le=300.0)

    @property
    def silence_range_ms(self) -> tuple[int, int, int]:
        """(finished, undecided, unfinished) silences; `silence_ms` widens the range rather than
        contradicting it, so a pipe that only sets silence_ms (say 2000) keeps its meaning."""
        return (min(self.min_silence_ms, self.silence_ms), self.silence_ms,
                max(self.max_silence_ms, self.silence_ms))


class BargeInConfig(_Strict):
    enabled: bool = True
    # User speech during agent playback must last this long before it may interrupt.
    min_speech_ms: int = Field(300, ge=20, le=5000)
    # Require the STT to hear at least this many words before cutting the agent off (0 = VAD alone).
    min_words: int = Field(1, ge=0, le=10)
    # Words that never interrupt on their own ("mm-hm", "yeah"): backchannels.
    backchannel_words: list[str] = Field(
        default_factory=lambda: ["mm", "mhm", "mm-hm", "hmm", "uh-huh", "uh", "um", "yeah", "yes", "ok",
                                 "okay", "right", "sure", "ah", "oh"],
        max_length=100,
    )


class TTSConfig(_Strict):
    engine: Literal["espeak-ng"] = "espeak-ng"
    voice: str = Field("en-us", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+\-]+$")
    rate_wpm: int = Field(175, ge=80, le=450)
    pitch: int = Field(50, ge=0, le=99)


class RecordingConfig(_Strict):
    enabled: bool = True


class PipeConfig(_Strict):
    agent_id: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    vad: VADConfig = Field(default_factory=VADConfig)
    stt: STTConfig = Field(default_factory=STTConfig)
    endpointing: EndpointingConfig = Field(default_factory=EndpointingConfig)
    barge_in: BargeInConfig = Field(default_factory=BargeInConfig)
    tts: TTSConfig = Field(default_factory=TTSConfig)
    recording: RecordingConfig = Field(default_factory=RecordingConfig)
    # Spoken when no runner can take the session, or the runner dies mid-call; then the session ends.
    no_agent_message: str = Field(
        "Sorry, no agent is available right now. Please try again later.", max_length=1000
    )
    # Spoken when the agent reports a failure on its side (`agent.error`: a hook raised, its LLM is down),
    # at most once per user turn; the call goes on. "" = say nothing (the client still gets an `error`).
    agent_error_message: str = Field(
        "Sorry, something went wrong on my side. Could you say that again?", max_length=1000
    )
    # Tell the agent (`silence` event) when neither side has spoken for this long; None = never.
    silence_timeout_s: float | None = Field(None, ge=0.5, le=3600)
    # SIP transfer targets the agent may REFER a phone caller to (exact URIs or user parts).
    transfer_targets: list[str] = Field(default_factory=list, max_length=100)
    # Phone: the dialled user part (Request-URI) that reaches this pipe, e.g. "2000".
    sip_extension: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_+.\-*#]+$")
