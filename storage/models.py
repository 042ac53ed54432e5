"""The SQL schema as SQLAlchemy 2.x models: the tables users query with plain SQL.

The Alembic migrations in `storage/migrations/versions` create exactly this schema (a test compares the
two on SQLite and PostgreSQL). Timestamps are timezone-aware UTC in Python; SQLite stores them as
ISO-8601 text in UTC ("2025-01-31 12:00:00.000000"), PostgreSQL as `timestamptz`. JSON columns are
`JSON` text on SQLite (query with `json_extract`) and `jsonb` on PostgreSQL (query with `->>`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no timezone type: store naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: storage only accepts timezone-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSON text on SQLite, jsonb on PostgreSQL (indexable, `->>` works).
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")
# Autoincrementing 64-bit ids; SQLite only autoincrements a column declared exactly INTEGER.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class WorkspaceRow(Base):
    """Who owns what: every API key and pipe belongs to one workspace, sessions through their pipe. A key
    sees and acts on its own workspace's objects only; `default` holds everything made before workspaces."""

    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # The first characters of the secret, safe to display ("spk_Ab3dE...").
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class PipeRow(Base):
    __tablename__ = "pipes"
    __table_args__ = (Index(None, "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The workspace of the key that created it; its sessions belong there too (joined through pipe_id).
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # Copied from config["agent_id"] so it can be filtered and joined on.
    agent_id: Mapped[str] = mapped_column(String(128), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Deleted pipes stay (their sessions still point at them) but are invisible to the API.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SessionTokenRow(Base):
    __tablename__ = "session_tokens"

    # sha256 of the token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    pipe_id: Mapped[str] = mapped_column(ForeignKey("pipes.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), index=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (
        Index(None, "started_at", "id"),
        Index(None, "pipe_id", "started_at"),
        Index(None, "agent_id", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    pipe_id: Mapped[str] = mapped_column(ForeignKey("pipes.id"))
    agent_id: Mapped[str] = mapped_column(String(128))
    # speechpipe.protocol.Direction: 'web' | 'inbound_phone' | 'outbound_phone'
    direction: Mapped[str] = mapped_column(String(32), index=True)
    caller: Mapped[str | None] = mapped_column(String(256))
    caller_name: Mapped[str | None] = mapped_column(String(256))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    end_reason: Mapped[str | None] = mapped_column(String(64))
    # Per-session figures the pipeline reports (latencies, counts); free-form JSON.
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class TurnRow(Base):
    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("session_id", "seq"),
        CheckConstraint("role IN ('user', 'agent')", name="role"),
        CheckConstraint("kind IN ('turn', 'backchannel', 'noise')", name="kind"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(8))
    text: Mapped[str] = mapped_column(Text)
    # Offsets into the session's recording, in milliseconds.
    start_ms: Mapped[int | None] = mapped_column(Integer)
    end_ms: Mapped[int | None] = mapped_column(Integer)
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # For an interrupted agent turn: the part of `text` the user actually heard.
    heard_text: Mapped[str | None] = mapped_column(Text)
    # 'turn': a turn of the conversation. User speech that was not one is kept too, marked: 'backchannel'
    # (only "mm-hm", "okay"…, said over the agent, which carried on) or 'noise' (no meaningful words).
    kind: Mapped[str] = mapped_column(String(16), default="turn", server_default="turn")
    # Said while the agent had paused the recording: `text` is "[redacted]" (the agent got the words).
    redacted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SessionEventRow(Base):
    """What happened to a session besides its turns, in order: `recording_paused`, `recording_resumed`.
    `at_ms` is the offset into the recording, like a turn's `start_ms`."""

    __tablename__ = "session_events"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    at_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RecordingRow(Base):
    __tablename__ = "recordings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    sample_rate: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
