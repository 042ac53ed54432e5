"""Plain, immutable records the Store returns (never live ORM objects, so they cross threads freely)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Workspace:
    """Who owns keys, pipes and (through their pipe) sessions; a key acts inside its own workspace only."""

    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    workspace_id: str

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class NewApiKey:
    """A freshly created key: `secret` exists only here, it is stored as a hash."""

    key: ApiKey
    secret: str


@dataclass(frozen=True)
class Pipe:
    id: str
    name: str | None
    agent_id: str
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    workspace_id: str


@dataclass(frozen=True)
class MintedToken:
    token: str
    pipe_id: str
    expires_at: datetime


@dataclass(frozen=True)
class TokenGrant:
    """What a redeemed session token authorises: one session on `pipe_id`."""

    pipe_id: str
    metadata: dict[str, Any]
    api_key_id: str | None


@dataclass(frozen=True)
class Recording:
    id: str
    session_id: str
    path: str
    format: str
    sample_rate: int
    channels: int
    duration_s: float
    size_bytes: int
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class SessionRecord:
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
    metrics: dict[str, Any] | None
    turn_count: int = 0
    recording: Recording | None = None


@dataclass(frozen=True)
class Turn:
    id: int
    session_id: str
    seq: int
    role: str
    text: str
    start_ms: int | None
    end_ms: int | None
    interrupted: bool
    heard_text: str | None
    created_at: datetime
    kind: str = "turn"  # TURN_KINDS
    redacted: bool = False  # said while the recording was paused: text is REDACTED


@dataclass(frozen=True)
class SessionEvent:
    id: int
    session_id: str
    kind: str  # SESSION_EVENT_KINDS
    at_ms: int | None
    created_at: datetime


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a keyset-paginated listing; pass `next_cursor` back to get the next page."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None
