"""Storage on SQLite and PostgreSQL through the same code: migrations, CRUD, turn order, idempotent end."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from speechpipe.errors import Code, ConflictError, NotFoundError, SpeechPipeError, ValidationError
from speechpipe.storage import AsyncStore, Store
from speechpipe.storage.migrate import current_revision, head_revision
from speechpipe.storage.models import Base
from tests.fixtures_db import DbFactory

TABLES = {"workspaces", "api_keys", "pipes", "session_tokens", "sessions", "turns", "recordings",
          "session_events"}


def test_migrations_upgrade_an_empty_database_to_exactly_the_models(db_factory: DbFactory) -> None:
    store = Store(db_factory.new_url())
    try:
        assert current_revision(store.engine) is None
        assert not TABLES & set(inspect(store.engine).get_table_names())
        assert store.upgrade() == head_revision()
        assert TABLES | {"alembic_version"} == set(inspect(store.engine).get_table_names())
        # The hand-written migration and the models describe the same schema (columns, types, indexes).
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == []
        assert store.upgrade() == head_revision()  # a second upgrade is a no-op
    finally:
        store.close()


def test_turn_kind_migration_keeps_existing_turns_and_marks_them_turns(db_factory: DbFactory) -> None:
    """0001 → 0002 on a database with a stored turn: the row survives as kind 'turn', new rows may be
    marked, an unknown kind is refused by the database itself, and the role check still holds."""
    from speechpipe.storage.migrate import upgrade

    store = Store(db_factory.new_url())
    try:
        upgrade(store.engine, "0001")
        sid = "sess_" + "1" * 24
        with store.engine.begin() as conn:  # as the code of that revision wrote them (no workspaces yet)
            _insert_old_pipe_and_session(conn, "pipe_" + "1" * 24, sid)
            conn.execute(text("INSERT INTO turns (session_id, seq, role, text, interrupted, created_at) "
                              "VALUES (:s, 0, 'user', 'said before the upgrade', false, :t)"),
                         {"s": sid, "t": datetime.now(UTC)})
        assert store.upgrade() == head_revision()
        store.add_turn(sid, 1, "user", "mm-hm", 900, 1200, kind="backchannel")
        assert [(t.text, t.kind) for t in store.list_turns(sid)] == [
            ("said before the upgrade", "turn"), ("mm-hm", "backchannel")]
        with pytest.raises(ValidationError):
            store.add_turn(sid, 2, "user", "x", None, None, kind="whisper")
        for kind, role in (("whisper", "user"), ("turn", "system")):
            with pytest.raises(Exception, match=r"(?i)check|constraint"), store.engine.begin() as conn:
                conn.execute(text("INSERT INTO turns (session_id, seq, role, text, interrupted, created_at, "
                                  "kind) VALUES (:s, 3, :r, 'x', false, :t, :k)"),
                             {"s": sid, "t": datetime.now(UTC), "k": kind, "r": role})
    finally:
        store.close()


def _insert_old_pipe_and_session(conn, pipe_id: str, session_id: str) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    conn.execute(text("INSERT INTO pipes (id, name, agent_id, config, created_at, updated_at) "
                      "VALUES (:p, 'old', 'a', :c, :t, :t)"),
                 {"p": pipe_id, "c": '{"agent_id": "a"}', "t": now})
    conn.execute(text("INSERT INTO sessions (id, pipe_id, agent_id, direction, metadata, started_at) "
                      "VALUES (:s, :p, 'a', 'web', '{}', :t)"), {"s": session_id, "p": pipe_id, "t": now})


def test_workspaces_migration_puts_existing_keys_pipes_and_sessions_in_default(db_factory: DbFactory) -> None:
    """0003 → 0004 on a database with a key, a pipe (with a session token), a session and a turn: all
    survive (SQLite rebuilds the tables: nothing may cascade), in the `default` workspace."""
    from speechpipe.storage.migrate import upgrade

    store = Store(db_factory.new_url())
    try:
        upgrade(store.engine, "0003")
        pipe_id, sid, now = "pipe_" + "2" * 24, "sess_" + "2" * 24, datetime.now(UTC)
        secret = "spk_" + "B" * 43
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, prefix, secret_hash, created_at) "
                              "VALUES (:i, 'old-key', 'spk_BBBBBBBB', :h, :t)"),
                         {"i": "key_" + "2" * 24, "h": hashlib.sha256(secret.encode()).hexdigest(), "t": now})
            _insert_old_pipe_and_session(conn, pipe_id, sid)
            conn.execute(text("INSERT INTO session_tokens (token_hash, pipe_id, api_key_id, metadata, "
                              "created_at, expires_at) VALUES ('h', :p, :k, '{}', :t, :t)"),
                         {"p": pipe_id, "k": "key_" + "2" * 24, "t": now})
            conn.execute(text("INSERT INTO turns (session_id, seq, role, text, interrupted, created_at) "
                              "VALUES (:s, 0, 'user', 'before workspaces', false, :t)"), {"s": sid, "t": now})
        assert store.upgrade() == head_revision() == "0004"

        default = store.get_workspace("default")
        assert default.id.startswith("ws_") and [w.name for w in store.list_workspaces()] == ["default"]
        key = store.verify_api_key(secret)
        assert key.workspace_id == default.id
        assert store.get_pipe(pipe_id, workspace_id=default.id).workspace_id == default.id
        assert store.get_session(sid, workspace_id=default.id).turn_count == 1
        assert [t.text for t in store.list_turns(sid, workspace_id=default.id)] == ["before workspaces"]
        with store.engine.connect() as conn:
            token = conn.execute(text("SELECT pipe_id, api_key_id FROM session_tokens")).one()
        assert tuple(token) == (pipe_id, "key_" + "2" * 24)  # the table rebuilds cascaded nowhere

        other = store.create_workspace("other")
        with pytest.raises(NotFoundError):
            store.get_session(sid, workspace_id=other.id)
        # The column is required and must name a workspace, enforced by the database itself.
        for ws in (None, "ws_" + "0" * 24):
            with pytest.raises(Exception, match=r"(?i)null|foreign|constraint"), store.engine.begin() as conn:
                conn.execute(text("INSERT INTO pipes (id, agent_id, config, created_at, updated_at, "
                                  "workspace_id) VALUES (:p, 'a', '{}', :t, :t, :w)"),
                             {"p": "pipe_" + "3" * 24, "t": now, "w": ws})
        if store.dialect == "sqlite":
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on after migrating
    finally:
        store.close()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'speechpipe.db'}")
    try:
        store.upgrade()
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    finally:
        store.close()


def test_api_keys_are_stored_hashed_and_revocable(store: Store) -> None:
    new = store.create_api_key("ops")
    assert new.secret.startswith("spk_") and len(new.secret) == 47
    assert new.key.prefix == new.secret[:12] and new.key.revoked_at is None
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys WHERE id = :i"), {"i": new.key.id}).mappings().one()
    assert new.secret not in {str(v) for v in row.values()}
    assert row["secret_hash"] == hashlib.sha256(new.secret.encode()).hexdigest()

    assert store.verify_api_key(new.secret).id == new.key.id
    assert new.key.id in {k.id for k in store.list_api_keys()}
    with pytest.raises(SpeechPipeError) as bad:
        store.verify_api_key("spk_" + "A" * 43)
    assert bad.value.code == Code.UNAUTHORIZED
    with pytest.raises(SpeechPipeError) as garbage:
        store.verify_api_key("not a key")
    assert garbage.value.code == Code.UNAUTHORIZED

    first = store.revoke_api_key(new.key.id)
    assert first.revoked_at is not None
    assert store.revoke_api_key(new.key.id).revoked_at == first.revoked_at  # idempotent, first wins
    with pytest.raises(SpeechPipeError) as revoked:
        store.verify_api_key(new.secret)
    assert revoked.value.code == Code.API_KEY_REVOKED
    assert new.key.id not in {k.id for k in store.list_api_keys(include_revoked=False)}
    with pytest.raises(NotFoundError) as missing:
        store.revoke_api_key("key_000000000000000000000000")
    assert missing.value.code == Code.API_KEY_NOT_FOUND


def test_pipe_crud_merge_patch_and_soft_delete(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "crud-bot", "endpointing": {"silence_ms": 800}}, name="support")
    assert pipe.id.startswith("pipe_") and pipe.agent_id == "crud-bot"
    assert pipe.config["endpointing"]["silence_ms"] == 800
    assert pipe.config["tts"]["engine"] == "espeak-ng"  # defaults are filled in and stored
    assert pipe.created_at.tzinfo is not None and pipe.created_at.utcoffset() == timedelta(0)
    assert store.get_pipe(pipe.id) == pipe

    patched = store.update_pipe(pipe.id, config_patch={"endpointing": {"min_speech_ms": 150},
                                                       "barge_in": {"enabled": False}})
    assert patched.config["endpointing"] == {**pipe.config["endpointing"], "min_speech_ms": 150}
    assert patched.config["barge_in"]["enabled"] is False and patched.updated_at > pipe.updated_at
    reset = store.update_pipe(pipe.id, config_patch={"endpointing": {"silence_ms": None}}, name=None)
    assert reset.config["endpointing"]["silence_ms"] == 500 and reset.name is None  # null → default
    moved = store.update_pipe(pipe.id, config_patch={"agent_id": "other-bot"})
    assert moved.agent_id == "other-bot"  # the agent_id column follows the config
    with pytest.raises(ValidationError) as bad:
        store.update_pipe(pipe.id, config_patch={"vad": {"aggressiveness": 7}})
    assert bad.value.details[0]["loc"] == ["config", "vad", "aggressiveness"]
    assert store.get_pipe(pipe.id) == moved  # a refused update changes nothing

    store.delete_pipe(pipe.id)
    for call in (lambda: store.get_pipe(pipe.id), lambda: store.delete_pipe(pipe.id),
                 lambda: store.update_pipe(pipe.id, name="x"), lambda: store.mint_token(pipe.id)):
        with pytest.raises(NotFoundError) as nf:
            call()
        assert nf.value.code == Code.PIPE_NOT_FOUND
    assert pipe.id not in {p.id for p in store.list_pipes(limit=200).items}


def test_pipe_listing_pages_newest_first_without_gaps(store: Store) -> None:
    agent = f"pager-{time.monotonic_ns()}"
    ids = [store.create_pipe({"agent_id": agent}).id for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list_pipes(limit=2, cursor=cursor, agent_id=agent)
        seen += [p.id for p in page.items]
        pages += 1
        if not (cursor := page.next_cursor):
            break
    assert pages == 3 and seen == list(reversed(ids))
    with pytest.raises(ValidationError):
        store.list_pipes(cursor="garbage")
    with pytest.raises(ValidationError):
        store.list_pipes(limit=0)


def test_pipe_config_is_validated(store: Store) -> None:
    for bad in ({}, {"agent_id": ""}, {"agent_id": "a b"}, {"agent_id": "x", "unknown": 1},
                {"agent_id": "x", "stt": {"engine": "nope"}}, {"agent_id": "x", "stt": {"model": "a\x00b"}}):
        with pytest.raises(ValidationError):
            store.create_pipe(bad)
    with pytest.raises(ValidationError):
        store.create_pipe({"agent_id": "x"}, name="n" * 201)


def test_turns_come_back_in_seq_order_and_seq_is_unique(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "turn-bot"})
    sid = store.create_session(pipe.id, "turn-bot", "web", metadata={"user_id": "u1"})
    # Written out of order (as a slow STT result can be), read back by seq.
    store.add_turn(sid, 2, "user", "and the weather", 4100, 5200)
    store.add_turn(sid, 0, "user", "hello there", 0, 900)
    store.add_turn(sid, 1, "agent", "Hi! How can I help you today?", 1400, 3900, interrupted=True,
                   heard_text="Hi! How can")
    turns = store.list_turns(sid)
    assert [t.seq for t in turns] == [0, 1, 2]
    assert [t.role for t in turns] == ["user", "agent", "user"]
    assert turns[1].interrupted is True and turns[1].heard_text == "Hi! How can"
    assert turns[0].interrupted is False and turns[0].start_ms == 0 and turns[0].end_ms == 900
    with pytest.raises(ConflictError):
        store.add_turn(sid, 1, "agent", "duplicate", None, None)
    with pytest.raises(ValidationError):
        store.add_turn(sid, 3, "system", "bad role", None, None)
    with pytest.raises(NotFoundError) as nf:
        store.add_turn("sess_000000000000000000000000", 0, "user", "x", None, None)
    assert nf.value.code == Code.SESSION_NOT_FOUND
    assert store.get_session(sid).turn_count == 3
    # The users' plain-SQL view: the same order with ORDER BY seq.
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, role, text FROM turns WHERE session_id = :s ORDER BY seq"),
                            {"s": sid}).all()
    assert [r[2] for r in rows] == ["hello there", "Hi! How can I help you today?", "and the weather"]


def test_end_session_is_idempotent_first_end_wins(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "end-bot"})
    sid = store.create_session(pipe.id, "end-bot", "inbound_phone", caller="+15550100", caller_name="Ada")
    s = store.get_session(sid)
    assert s.ended_at is None and s.caller == "+15550100" and s.direction == "inbound_phone"
    assert store.end_session(sid, "caller_hangup", metrics={"turns": 3, "p50_ms": 640.5}) is True
    first = store.get_session(sid)
    assert store.end_session(sid, "agent_end", metrics={"turns": 99}) is False
    again = store.get_session(sid)
    assert (again.end_reason, again.ended_at, again.metrics) == ("caller_hangup", first.ended_at,
                                                               {"turns": 3, "p50_ms": 640.5})
    merged = store.update_session_metrics(sid, {"barge_ins": 1})
    assert merged == {"turns": 3, "p50_ms": 640.5, "barge_ins": 1}
    with pytest.raises(NotFoundError):
        store.end_session("sess_000000000000000000000000", "x")


def test_concurrent_ends_have_exactly_one_winner(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "race-bot"})
    sid = store.create_session(pipe.id, "race-bot", "web")
    barrier = threading.Barrier(16)
    results: dict[str, bool] = {}

    def end(i: int) -> None:
        barrier.wait()
        results[f"reason-{i}"] = store.end_session(sid, f"reason-{i}")

    threads = [threading.Thread(target=end, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, won in results.items() if won]
    assert len(results) == 16 and len(winners) == 1
    assert store.get_session(sid).end_reason == winners[0]


def test_session_listing_filters(store: Store) -> None:
    a = store.create_pipe({"agent_id": "filter-a"})
    b = store.create_pipe({"agent_id": "filter-b"})
    before = datetime.now(UTC)
    s1 = store.create_session(a.id, "filter-a", "web")
    s2 = store.create_session(a.id, "filter-a", "inbound_phone")
    s3 = store.create_session(b.id, "filter-b", "web")
    after = datetime.now(UTC)
    assert [s.id for s in store.list_sessions(pipe_id=a.id).items] == [s2, s1]
    assert [s.id for s in store.list_sessions(agent_id="filter-b").items] == [s3]
    assert [s.id for s in store.list_sessions(pipe_id=a.id, direction="web").items] == [s1]
    window = store.list_sessions(since=before, until=after, limit=200).items
    assert {s1, s2, s3} <= {s.id for s in window}
    assert not store.list_sessions(pipe_id=a.id, since=after).items
    page1 = store.list_sessions(pipe_id=a.id, limit=1)
    page2 = store.list_sessions(pipe_id=a.id, limit=1, cursor=page1.next_cursor)
    assert [page1.items[0].id, page2.items[0].id] == [s2, s1] and page2.next_cursor is None
    with pytest.raises(ValidationError):
        store.create_session(a.id, "filter-a", "carrier_pigeon")
    with pytest.raises(NotFoundError):
        store.create_session("pipe_000000000000000000000000", "x", "web")


def test_recordings(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "rec-bot"})
    sid = store.create_session(pipe.id, "rec-bot", "web")
    with pytest.raises(NotFoundError) as none_yet:
        store.get_recording(sid)
    assert none_yet.value.code == Code.RECORDING_NOT_FOUND
    rec = store.add_recording(sid, "/var/rec/a.wav", "wav", 16000, 2, 12.5, 800_044, "ab" * 32)
    assert store.get_recording(sid) == rec
    assert store.get_session(sid).recording == rec
    with pytest.raises(ValidationError):
        store.add_recording(sid, "/x.wav", "wav", 16000, 1, float("nan"), 1, "00")


def test_timestamps_are_utc_on_both_backends(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "tz-bot"})
    sid = store.create_session(pipe.id, "tz-bot", "web")
    started = store.get_session(sid).started_at
    assert started.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - started).total_seconds()) < 60
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT started_at FROM sessions WHERE id = :s"), {"s": sid}).scalar_one()
    if store.dialect == "sqlite":  # plain-SQL users see ISO-8601 UTC text
        assert isinstance(raw, str) and raw.startswith(started.strftime("%Y-%m-%d %H:%M:%S"))
    else:
        assert raw == started


def test_unstorable_strings_are_refused_not_crashed(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "nul-bot"})
    for call in (lambda: store.create_pipe({"agent_id": "x"}, name="a\x00b"),
                 lambda: store.create_session(pipe.id, "nul-bot", "web", caller="\ud800"),
                 lambda: store.mint_token(pipe.id, metadata={"k": "v\x00"}),
                 lambda: store.mint_token(pipe.id, metadata={"k": float("inf")}),
                 lambda: store.mint_token(pipe.id, metadata={"k": "x" * 20_000})):
        with pytest.raises(ValidationError):
            call()


async def test_async_store_runs_the_same_queries(store: Store) -> None:
    astore = AsyncStore(store, max_workers=4)
    try:
        pipe = await astore.create_pipe({"agent_id": "async-bot"})
        sid = await astore.create_session(pipe.id, "async-bot", "web")
        import asyncio

        await asyncio.gather(*(astore.add_turn(sid, i, ("user", "agent")[i % 2], f"turn {i}", None, None)
                               for i in range(10)))
        assert [t.seq for t in await astore.list_turns(sid)] == list(range(10))
        assert await astore.end_session(sid, "done") is True
        assert await astore.end_session(sid, "again") is False
        assert (await astore.get_pipe(pipe.id)).agent_id == "async-bot"
    finally:
        astore.close()


def test_redacted_turns_and_session_events(store: Store) -> None:
    pipe = store.create_pipe({"agent_id": "redaction"})
    sid = store.create_session(pipe.id, "redaction", "web")
    store.add_turn(sid, 1, "user", "my card number is 4111", 0, 900)
    store.add_session_event(sid, "recording_paused", 1000)
    paused = store.add_turn(sid, 2, "user", "4111 1111 1111 1111", 1200, 3000, redacted=True)
    store.add_session_event(sid, "recording_resumed", 3500)
    assert (paused.text, paused.redacted) == ("[redacted]", True)
    turns = store.list_turns(sid)
    assert [(t.text, t.redacted) for t in turns] == [("my card number is 4111", False), ("[redacted]", True)]
    assert [(e.kind, e.at_ms) for e in store.list_session_events(sid)] == [
        ("recording_paused", 1000), ("recording_resumed", 3500)]
    with pytest.raises(ValidationError):
        store.add_session_event(sid, "dance", 0)
    with pytest.raises(NotFoundError):
        store.list_session_events("sess_nope")
