"""workspaces: every API key and pipe belongs to one (sessions through their pipe); what existed before
lands in a `default` workspace.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08

On SQLite the batch rebuild of `api_keys` and `pipes` drops and renames tables other tables point at;
`speechpipe.storage.migrate.upgrade` runs migrations there with foreign-key enforcement off (so the drop
cascades nowhere: session tokens and sessions keep their rows) and checks every foreign key before the
commit.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from speechpipe.storage.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_WORKSPACE = "default"
OWNED = ("api_keys", "pipes")


def upgrade() -> None:
    workspaces = op.create_table(
        "workspaces",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_workspaces"),
        sa.UniqueConstraint("name", name="uq_workspaces_name"),
    )
    default_id = f"ws_{secrets.token_hex(12)}"  # the id style of storage.credentials.new_id
    op.bulk_insert(workspaces, [{"id": default_id, "name": DEFAULT_WORKSPACE,
                                 "created_at": datetime.now(UTC)}])
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("workspace_id", sa.String(40), nullable=True))
        op.execute(sa.table(table, sa.column("workspace_id")).update().values(workspace_id=default_id))
        with op.batch_alter_table(table) as batch:
            batch.alter_column("workspace_id", existing_type=sa.String(40), nullable=False)
            batch.create_foreign_key(f"fk_{table}_workspace_id_workspaces", "workspaces", ["workspace_id"],
                                     ["id"])
            batch.create_index(f"ix_{table}_workspace_id", ["workspace_id"])


def downgrade() -> None:
    for table in reversed(OWNED):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_workspace_id")
            batch.drop_constraint(f"fk_{table}_workspace_id_workspaces", type_="foreignkey")
            batch.drop_column("workspace_id")
    op.drop_table("workspaces")
