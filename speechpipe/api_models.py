"""The REST API's wire models (pydantic): what requests carry and responses return.

Core vocabulary: the server validates requests with them (`websocket_edge.rest`), the Python client
(`speechpipe.client`) parses responses with them, and `websocket_edge.openapi` builds the OpenAPI document
from them, so the three cannot drift apart.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from speechpipe.pipe_config import PipeConfig
from speechpipe.protocol import Direction

API_VERSION = "0.1.0"
ID_PATTERN = {"pipe": r"^pipe_[0-9a-f]{24}$", "sess": r"^sess_[0-9a-f]{24}$"}
AGENT_ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    """Query strings must be RFC 3339 date-times with an offset (not unix numbers, not bare dates)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with offset, e.g. 2025-01-31T12:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    """Aware datetimes are converted to UTC (naive ones, from Python callers, are read as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime out of range") from None


UTCDatetime = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_utc)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the client tolerates fields added by newer servers


class ErrorBody(_Out):
    code: str = Field(description="Stable machine-readable error code, e.g. `pipe_not_found`.")
    message: str
    details: Any = None


class ErrorResponse(_Out):
    error: ErrorBody


class PipeCreate(_In):
    name: Name | None = None
    config: PipeConfig


class PipeUpdate(_In):
    """Only the fields present change. `config` is a JSON merge patch (RFC 7396) onto the current
    config: objects merge, `null` resets a setting to its default."""

    name: Name | None = None
    config: dict[str, Any] | None = Field(None, description="JSON merge patch onto the pipe's config.")


class Pipe(_Out):
    id: str
    name: str | None
    agent_id: str
    config: PipeConfig
    created_at: datetime
    updated_at: datetime


class PipeList(_Out):
    data: list[Pipe]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last.")


class TokenCreate(_In):
    pipe_id: str = Field(min_length=1, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="Copied onto the session; at most 16 KiB of JSON.")


class SessionToken(_Out):
    token: str = Field(description="Single-use; pass to the client WebSocket as `?token=`.")
    pipe_id: str
    expires_at: datetime
    connect_url: str | None = Field(None, description="Path of the WebSocket this token opens.")


class RecordingInfo(_Out):
    id: str
    format: str
    sample_rate: int
    channels: int
    duration_s: float
    size_bytes: int
    sha256: str
    created_at: datetime
    url: str = Field(description="Path that downloads the file (same API key).")


class Session(_Out):
    id: str
    pipe_id: str
    agent_id: str
    direction: str
    caller: str | None
    caller_name: str | None
    metadata: dict[str, Any]
    started_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    duration_s: float | None
    turn_count: int
    metrics: dict[str, Any] | None = Field(description=(
        "Stored when the session ends: `user_turns`, `agent_turns`, `interruptions`, `false_barge_ins`, "
        "`turn_latencies_ms` (each answered turn's response latency, in order, at most 500), and "
        "`{count, p50, p95, max}` summaries in ms: `response_ms`, `barge_in_ms`, `stt_ms`, `final_ms`. "
        "Phone sessions add `media`."))
    recording: RecordingInfo | None = None


class SessionList(_Out):
    data: list[Session]
    next_cursor: str | None


class Turn(_Out):
    seq: int
    role: Literal["user", "agent"]
    text: str
    start_ms: int | None = Field(description="Offset of the turn's start in the recording, ms.")
    end_ms: int | None
    interrupted: bool
    heard_text: str | None = Field(description="For an interrupted agent turn: what the user heard.")
    kind: Literal["turn", "backchannel", "noise"] = Field(
        "turn", description="'turn' for a conversation turn; user speech that was not one is kept and "
        "marked: 'backchannel' (only \"mm-hm\", \"okay\"… over the agent, which carried on) or 'noise'.")
    redacted: bool = Field(False, description="Said while the agent had paused the recording: `text` is "
                           "\"[redacted]\" (the agent got the words; they were never stored).")
    created_at: datetime


class SessionEvent(_Out):
    kind: Literal["recording_paused", "recording_resumed"]
    at_ms: int | None = Field(description="Offset into the recording, ms.")
    created_at: datetime


class Transcript(_Out):
    session_id: str
    turns: list[Turn]
    events: list[SessionEvent] = Field(
        default_factory=list, description="What happened besides turns, in order: the spans in which the "
        "recording was paused (their user turns are redacted).")


class Health(_Out):
    status: Literal["ok", "error"]
    version: str
    database: str
    # SIP media workers (when serve supervises any): per-worker state, live calls and capacity.
    sip: dict[str, Any] | None = None


class ListPipesQuery(_In):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=512)
    agent_id: str | None = Field(None, min_length=1, max_length=128, pattern=AGENT_ID_PATTERN)


class ListSessionsQuery(_In):
    model_config = ConfigDict(extra="ignore")
    pipe_id: str | None = Field(None, pattern=ID_PATTERN["pipe"])
    agent_id: str | None = Field(None, min_length=1, max_length=128, pattern=AGENT_ID_PATTERN)
    direction: Direction | None = None
    since: UTCDatetime | None = Field(None, description="Sessions started at or after (RFC 3339).")
    until: UTCDatetime | None = Field(None, description="Sessions started before (RFC 3339).")
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=512)
