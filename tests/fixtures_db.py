"""Database and server fixtures: fresh SQLite and PostgreSQL databases, migrated stores, a live server.

- `db_backend` is parametrised over "sqlite" and "postgresql"; everything built on it (`db_factory`,
  `db_url`, `store`, `live_server`) runs once per backend. Use `sqlite_store` / `sqlite_live_server` when
  one backend is enough.
- PostgreSQL is the machine's server (127.0.0.1:5432, database `test`; override with
  SPEECHPIPE_TEST_PG_URL). Each database is a fresh random schema selected via `search_path`, dropped at
  the end, so parallel and repeated runs never collide. If PostgreSQL is down the tests FAIL and say how
  to start it: a silently skipped backend would hide exactly the bugs these tests exist for.
- `start_live_server(settings, store)` runs the real aiohttp app (`create_app`) on a free loopback port in
  its own thread and event loop, so tests on any loop (or none) can call it over real HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from speechpipe.settings import Settings
from speechpipe.storage import AsyncStore, Store
from speechpipe.websocket_edge.app import create_app

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pg_admin_url() -> str:
    import os

    return os.environ.get("SPEECHPIPE_TEST_PG_URL", PG_ADMIN_URL)


class DbFactory:
    """Makes fresh, empty databases of one backend; drops them all at `cleanup()`."""

    def __init__(self, backend: str, tmp_dir: Path) -> None:
        self.backend = backend
        self.tmp_dir = tmp_dir
        self._schemas: list[str] = []
        if backend == "postgresql":
            self._check_pg()

    def _check_pg(self) -> None:
        url = pg_admin_url()
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            pytest.fail(
                f"PostgreSQL is not reachable at {url}: {str(exc).strip()}\n"
                "The storage tests run on SQLite AND PostgreSQL. Start PostgreSQL (Debian 12: "
                "`sudo service postgresql start` or `sudo pg_ctlcluster 15 main start`), make sure database "
                "`test` exists (`sudo -u postgres createdb test`) and that 127.0.0.1 uses trust auth, "
                "or point SPEECHPIPE_TEST_PG_URL at another server.", pytrace=False)

    def new_url(self) -> str:
        if self.backend == "sqlite":
            path = self.tmp_dir / f"db-{secrets.token_hex(4)}" / "speechpipe.db"
            path.parent.mkdir(parents=True)
            return f"sqlite:///{path}"
        schema = f"sp_test_{secrets.token_hex(6)}"
        with psycopg.connect(pg_admin_url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        self._schemas.append(schema)
        base = pg_admin_url()
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}options=-csearch_path%3D{schema}"

    def cleanup(self) -> None:
        if not self._schemas:
            return
        with psycopg.connect(pg_admin_url(), autocommit=True) as conn:
            for schema in self._schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self._schemas.clear()


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def db_factory(db_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbFactory]:
    factory = DbFactory(db_backend, tmp_path_factory.mktemp(f"db-{db_backend}"))
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def db_url(db_factory: DbFactory) -> str:
    """A migrated database shared by the test session (one per backend)."""
    store = Store(db_factory.new_url())
    try:
        store.upgrade()
    finally:
        store.close()
    return str(store.url.render_as_string(hide_password=False))


@pytest.fixture(scope="session")
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def async_store(store: Store) -> Iterator[AsyncStore]:
    a = AsyncStore(store)
    yield a
    a.close()


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A migrated SQLite store, for tests that need a database but not both backends."""
    s = Store(f"sqlite:///{tmp_path_factory.mktemp('sqlite-store') / 'speechpipe.db'}")
    s.upgrade()
    yield s
    s.close()


# ------------------------------------------------------------------------------------ live server


@dataclass
class LiveServer:
    url: str
    settings: Settings
    store: Store
    api_key: str
    api_key_id: str
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _runner: web.AppRunner = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


@dataclass
class ThreadedApp:
    """An aiohttp app serving on 127.0.0.1:<free port> from its own loop in a daemon thread."""

    app: web.Application
    loop: asyncio.AbstractEventLoop
    runner: web.AppRunner
    port: int
    thread: threading.Thread


def serve_in_thread(make_app: Callable[[], web.Application], *, name: str, start_timeout_s: float = 30,
                    shutdown_timeout_s: float = 60) -> ThreadedApp:
    """Builds the app on the server thread's loop (so its startup hooks run there) and returns once it
    listens; a failure while starting is raised here, in the caller."""
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            app = make_app()
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout_s)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
            box.update(app=app, loop=loop, runner=runner, port=runner.addresses[0][1])
        except BaseException as exc:  # report start-up failures to the waiting test
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not started.wait(start_timeout_s):
        raise RuntimeError(f"{name} did not start within {start_timeout_s} s")
    if "error" in box:
        raise box["error"]
    return ThreadedApp(thread=thread, **box)


def start_live_server(settings: Settings, store: Store) -> LiveServer:
    """Serves `create_app(settings, store)` on 127.0.0.1:<free port> in a thread; returns when listening.

    An API key is created for the caller (`.api_key`, `.auth` headers)."""
    key = store.create_api_key("live-server-tests")
    srv = serve_in_thread(lambda: create_app(settings, store), name="live-server")
    return LiveServer(url=f"http://127.0.0.1:{srv.port}", settings=settings, store=store,
                      api_key=key.secret, api_key_id=key.key.id, _loop=srv.loop, _runner=srv.runner,
                      _thread=srv.thread)


def _server_settings(tmp: Path, db_url: str, **overrides: Any) -> Settings:
    settings = Settings(data_dir=tmp, database_url=db_url, **overrides)
    settings.ensure_dirs()
    return settings


@pytest.fixture(scope="session")
def live_server(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real app on a free port, on each backend."""
    settings = _server_settings(tmp_path_factory.mktemp("live"), str(store.url.render_as_string(False)))
    server = start_live_server(settings, store)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sqlite_live_server(sqlite_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = _server_settings(tmp_path_factory.mktemp("live-sqlite"),
                                str(sqlite_store.url.render_as_string(False)))
    server = start_live_server(settings, sqlite_store)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real WAV recording of synthesised speech (espeak-ng), to stand in for a session's recording."""
    import subprocess

    path = tmp_path_factory.mktemp("wav") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello, this is a Speech Pipe recording."], check=True)
    return path
