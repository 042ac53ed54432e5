"""Engine construction: URL normalisation, SQLite pragmas and transaction modes, PostgreSQL via psycopg3.

SQLite runs in WAL mode (readers never block the writer) with a busy timeout and foreign keys on. The
stdlib driver's own transaction handling is switched off so SQLAlchemy's BEGIN is real; a connection with
the execution option `sqlite_begin="IMMEDIATE"` takes the write lock up front, which is what a
read-then-write transaction needs so that a concurrent writer cannot invalidate its snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from speechpipe.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 15_000


def normalize_url(url: str | URL) -> URL:
    """`postgresql://` / `postgres://` → psycopg3; `sqlite:///rel` stays as given."""
    try:
        u = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with a useful message
        raise ConfigError(f"invalid database URL {display_url(url)!r}: {exc}") from None
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"unsupported database {u.get_backend_name()!r}: use sqlite or postgresql")
    return u


def display_url(url: str | URL) -> str:
    """The URL with any password masked, for logs and CLI output."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL (None for PostgreSQL or in-memory SQLite)."""
    u = normalize_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def make_engine(url: str | URL, *, pool_size: int = 10, max_overflow: int = 20, echo: bool = False) -> Engine:
    u = normalize_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if u.get_backend_name() == "sqlite":
        path = sqlite_path(u)
        if path is None:
            raise ConfigError("in-memory SQLite is not supported: give a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs.update(
            pool_size=pool_size, max_overflow=max_overflow, pool_timeout=60,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        engine = create_engine(u, **kwargs)
        _setup_sqlite(engine)
        return engine
    kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True, pool_timeout=60)
    return create_engine(u, **kwargs)


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # autocommit at driver level; SQLAlchemy issues BEGIN below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"bad sqlite_begin mode {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")
