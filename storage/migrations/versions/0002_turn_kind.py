"""turns.kind: user speech that was not a turn (a backchannel over the agent, noise) is kept and marked.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a CHECK constraint to an existing table in place.
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="turn"))
        batch.create_check_constraint(op.f("ck_turns_kind"), "kind IN ('turn', 'backchannel', 'noise')")


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_constraint(op.f("ck_turns_kind"), type_="check")
        batch.drop_column("kind")
