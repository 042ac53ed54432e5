"""Initial schema: api_keys, pipes, session_tokens, sessions, turns, recordings.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from speechpipe.storage.models import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types as of this revision (models may change; migrations must not).
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("secret_hash", name="uq_api_keys_secret_hash"),
    )
    op.create_table(
        "pipes",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("config", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("deleted_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_pipes"),
    )
    op.create_index("ix_pipes_agent_id", "pipes", ["agent_id"])
    op.create_index("ix_pipes_created_at_id", "pipes", ["created_at", "id"])
    op.create_table(
        "session_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("pipe_id", sa.String(40), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=True),
        sa.Column("metadata", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["pipe_id"], ["pipes.id"], name="fk_session_tokens_pipe_id_pipes",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name="fk_session_tokens_api_key_id_api_keys",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("token_hash", name="pk_session_tokens"),
    )
    op.create_index("ix_session_tokens_pipe_id", "session_tokens", ["pipe_id"])
    op.create_index("ix_session_tokens_api_key_id", "session_tokens", ["api_key_id"])
    op.create_index("ix_session_tokens_expires_at", "session_tokens", ["expires_at"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("pipe_id", sa.String(40), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("direction", sa.String(32), nullable=False),
        sa.Column("caller", sa.String(256), nullable=True),
        sa.Column("caller_name", sa.String(256), nullable=True),
        sa.Column("metadata", JSONType, nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
        sa.Column("metrics", JSONType, nullable=True),
        sa.ForeignKeyConstraint(["pipe_id"], ["pipes.id"], name="fk_sessions_pipe_id_pipes"),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_started_at_id", "sessions", ["started_at", "id"])
    op.create_index("ix_sessions_pipe_id_started_at", "sessions", ["pipe_id", "started_at"])
    op.create_index("ix_sessions_agent_id_started_at", "sessions", ["agent_id", "started_at"])
    op.create_index("ix_sessions_direction", "sessions", ["direction"])
    op.create_table(
        "turns",
        sa.Column("id", BigIntId, autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("start_ms", sa.Integer(), nullable=True),
        sa.Column("end_ms", sa.Integer(), nullable=True),
        sa.Column("interrupted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("heard_text", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("role IN ('user', 'agent')", name=op.f("ck_turns_role")),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_turns_session_id_sessions",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_turns"),
        sa.UniqueConstraint("session_id", "seq", name="uq_turns_session_id_seq"),
    )
    op.create_table(
        "recordings",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_recordings_session_id_sessions",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_recordings"),
    )
    op.create_index("ix_recordings_session_id", "recordings", ["session_id"])


def downgrade() -> None:
    for table in ("recordings", "turns", "sessions", "session_tokens", "pipes", "api_keys"):
        op.drop_table(table)
