"""Schema migrations, driven from code: `upgrade(engine)` brings any database to the newest revision.

Alembic is configured programmatically (no alembic.ini): the scripts live in `storage/migrations`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x5350_6970  # "SPip": the advisory lock that serialises migrations on PostgreSQL


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Upgrades the database behind `engine` to `revision`; returns the revision it ends at.

    On SQLite, foreign-key enforcement is off while migrations run (SQLite's own recipe for table rebuilds:
    a batch migration drops and renames tables others point at, and a DROP with enforcement on would
    cascade into, or refuse because of, the referencing rows); every foreign key is checked before the
    commit instead, and enforcement is back on before the connection returns to the pool."""
    cfg = alembic_config()
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.dbapi_connection if sqlite else None
        if raw is not None:  # outside any transaction: inside one, SQLite ignores this pragma
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            if conn.dialect.name == "postgresql":
                # Several nodes starting at once on one database: one migrates, the others wait, then find
                # nothing left to do. Held until the commit below.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            if sqlite:
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    conn.rollback()
                    raise RuntimeError(f"migration left rows with broken foreign keys: {broken[:5]}")
            conn.commit()
        finally:
            if raw is not None:
                if conn.in_transaction():  # failed midway: roll back first, so the pragma takes effect
                    conn.rollback()
                raw.execute("PRAGMA foreign_keys=ON")
    return current_revision(engine)
