"""Alembic environment: runs migrations on the connection `speechpipe.storage.migrate` hands over.

Run through `speechpipe db upgrade` (or `serve`, which upgrades on start). On PostgreSQL the upgrade holds
an advisory lock, so several `serve` nodes starting at once migrate one after another, not together.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from speechpipe.storage.engine import make_engine
from speechpipe.storage.models import Base

# An arbitrary constant: the advisory lock id that serialises concurrent upgrades on one PostgreSQL.
_PG_MIGRATION_LOCK = 0x5350_4950  # "SPIP"

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs table rebuilds for ALTER
        compare_type=True,
        transactional_ddl=True,  # both SQLite and PostgreSQL roll back a failed migration entirely
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"), pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; use `speechpipe db upgrade`")
run_migrations_online()
