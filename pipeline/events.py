"""Typed events a pipeline session emits, Pipecat-style: one dataclass per kind, with its wire name.

Transports forward them (the web edge as JSON, the agent channel as text events); tests and benchmarks read
them to measure. Offsets (`*_ms`) are positions in the session's recording timeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

# What a client event (and the stored turn) carries instead of words said while the agent had paused the
# recording (`recording.pause`): the same string storage writes (`storage.store.REDACTED`).
REDACTED = "[redacted]"


@dataclass
class Event:
    type: ClassVar[str] = "event"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass
class SessionStarted(Event):
    type: ClassVar[str] = "session.started"
    session_id: str
    input_sample_rate: int
    output_sample_rate: int
    direction: str


@dataclass
class UserSpeechStarted(Event):
    type: ClassVar[str] = "user.speech_started"
    at_ms: int


@dataclass
class UserPartial(Event):
    """`redacted`: said while the recording was paused; `text` is then REDACTED (the agent gets the words)."""

    type: ClassVar[str] = "user_partial"
    text: str
    redacted: bool = False


@dataclass
class UserTurn(Event):
    """`redacted`: said (or typed) while the recording was paused; `text` is then REDACTED, as in SQL, and
    only the agent got the words."""

    type: ClassVar[str] = "user_turn"
    seq: int
    text: str
    start_ms: int
    end_ms: int
    typed: bool = False
    redacted: bool = False


@dataclass
class UserNonTurn(Event):
    """User speech that did not become a turn, kept so no word vanishes: `kind` is 'backchannel' (only
    "mm-hm", "okay"… over the agent, which carried on) or 'noise' (no meaningful words; `text` may be "").
    `redacted`: said while the recording was paused; `text` is then REDACTED."""

    type: ClassVar[str] = "user.non_turn"
    kind: str
    text: str
    start_ms: int
    end_ms: int
    redacted: bool = False


@dataclass
class RecordingPaused(Event):
    """The agent paused the recording (`recording.pause`) at `at_ms` (session clock, as turns' offsets):
    until `recording.resumed`, the recording holds silence and user words reach only the agent."""

    type: ClassVar[str] = "recording.paused"
    at_ms: int


@dataclass
class RecordingResumed(Event):
    type: ClassVar[str] = "recording.resumed"
    at_ms: int


@dataclass
class AgentReply(Event):
    """The agent's full text for one reply, sent once it is complete (or cut by barge-in)."""

    type: ClassVar[str] = "agent_reply"
    seq: int
    text: str


@dataclass
class AgentSpeechStarted(Event):
    type: ClassVar[str] = "agent.speech_started"
    seq: int
    at_ms: int


@dataclass
class AgentSpeechDone(Event):
    type: ClassVar[str] = "agent.speech_done"
    seq: int
    text: str
    interrupted: bool
    heard_text: str
    start_ms: int
    end_ms: int


@dataclass
class BargeIn(Event):
    type: ClassVar[str] = "barge_in"
    seq: int
    heard_text: str
    user_text: str


@dataclass
class Clear(Event):
    """Drop every buffered agent sample now (sent with barge-in)."""

    type: ClassVar[str] = "clear"


@dataclass
class Metric(Event):
    type: ClassVar[str] = "metric"
    name: str
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class SessionEnded(Event):
    """`metrics`: what the session stored in `sessions.metrics` (see PipelineSession.metrics_summary)."""

    type: ClassVar[str] = "session.ended"
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Error(Event):
    type: ClassVar[str] = "error"
    code: str
    message: str


@dataclass
class AgentError(Error):
    """An `error` with code `agent_error`: the agent failed on its side. `agent_code` is the agent's own
    code (`hook_failed`, `reply_failed`, `dialog_failed`, `entrypoint_failed`…), `seq` the user turn it
    concerns (None: not one turn). The agent's own message is logged, not sent to the client."""

    seq: int | None = None
    agent_code: str = ""


# The events /metrics counts; a media worker forwards exactly these to serve (telephony.relay_client).
METERED = (SessionStarted, UserTurn, UserNonTurn, AgentSpeechDone, BargeIn, Metric, SessionEnded)
