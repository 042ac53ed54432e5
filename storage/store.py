"""`Store`: every query the product runs, as thread-safe synchronous methods over one SQLAlchemy engine.

Each method is one short transaction and returns plain records (`speechpipe.storage.records`), never
ORM objects. Writes that read first take SQLite's write lock up front (`BEGIN IMMEDIATE`) or a row lock on
PostgreSQL. Failures raise `speechpipe.errors` types with stable codes. Async code uses `AsyncStore`
(`speechpipe.storage.async_store`), which runs these methods on a bounded thread pool.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Final

import pydantic
from sqlalchemy import Connection, and_, exists, func, insert, or_, select, text, update
from sqlalchemy.engine import URL

from speechpipe.errors import (
    AuthenticationError,
    Code,
    ConflictError,
    NotFoundError,
    TokenError,
    ValidationError,
)
from speechpipe.pipe_config import PipeConfig
from speechpipe.protocol import DIRECTIONS
from speechpipe.storage import credentials as cred
from speechpipe.storage.engine import display_url, make_engine, normalize_url
from speechpipe.storage.migrate import upgrade as run_upgrade
from speechpipe.storage.models import (
    ApiKeyRow,
    PipeRow,
    RecordingRow,
    SessionEventRow,
    SessionRow,
    SessionTokenRow,
    TurnRow,
    WorkspaceRow,
    utcnow,
)
from speechpipe.storage.records import (
    ApiKey,
    MintedToken,
    NewApiKey,
    Page,
    Pipe,
    Recording,
    SessionEvent,
    SessionRecord,
    TokenGrant,
    Turn,
    Workspace,
)

WORKSPACES = WorkspaceRow.__table__
API_KEYS = ApiKeyRow.__table__
PIPES = PipeRow.__table__
TOKENS = SessionTokenRow.__table__
SESSIONS = SessionRow.__table__
TURNS = TurnRow.__table__
RECORDINGS = RecordingRow.__table__
SESSION_EVENTS = SessionEventRow.__table__

ROLES: Final = ("user", "agent")
TURN_KINDS: Final = ("turn", "backchannel", "noise")  # see TurnRow.kind
REDACTED: Final = "[redacted]"  # the stored text of a turn said while the recording was paused
SESSION_EVENT_KINDS: Final = ("recording_paused", "recording_resumed")  # see SessionEventRow
MAX_METADATA_BYTES: Final = 16 * 1024
MAX_PAGE: Final = 200
DEFAULT_WORKSPACE: Final = "default"  # made by migration 0004; holds what existed before workspaces
WORKSPACE_NOT_FOUND: Final = "workspace_not_found"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


class Store:
    """Synchronous, thread-safe storage API. Create one per process and share it."""

    def __init__(self, url: str | URL, *, pool_size: int = 10, max_overflow: int = 20,
                 token_ttl_s: float = 60.0) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, pool_size=pool_size, max_overflow=max_overflow)
        # Same pool; on SQLite its transactions start with BEGIN IMMEDIATE (see storage.engine).
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self.token_ttl_s = token_ttl_s
        self._default_workspace_id: str | None = None

    @classmethod
    def from_settings(cls, settings: Any, *, upgrade: bool = False) -> Store:
        """A store on `settings.db_url` (a `speechpipe.settings.Settings`); optionally migrated."""
        settings.ensure_dirs()
        store = cls(settings.db_url, token_ttl_s=settings.token_ttl_s)
        if upgrade:
            store.upgrade()
        return store

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def display_url(self) -> str:
        return display_url(self.url)

    def upgrade(self) -> str | None:
        """Runs pending migrations; returns the revision the database is at."""
        return run_upgrade(self.engine)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_engine.begin() as conn:
            yield conn

    # ---------------------------------------------------------------- workspaces
    #
    # Scoping: methods that read or change a pipe, token, session, turn or recording take `workspace_id`,
    # the caller's workspace (the API key's). An object of another workspace answers NotFoundError with the
    # same code as a missing one, so its existence is never revealed. `workspace_id=None` is the system
    # acting (the pipeline writing turns, telephony finding a pipe by extension, the CLI): no scope.
    # Sessions belong to their pipe's workspace: the scope joins through `sessions.pipe_id`.

    def create_workspace(self, name: str) -> Workspace:
        _check_text("name", name, 200, required=True)
        ws = Workspace(id=cred.new_id("ws"), name=name, created_at=utcnow())
        with self._write() as conn:
            if conn.execute(select(WORKSPACES.c.id).where(WORKSPACES.c.name == name)).first() is not None:
                raise ConflictError(f"a workspace named {name!r} already exists")
            conn.execute(insert(WORKSPACES).values(id=ws.id, name=ws.name, created_at=ws.created_at))
        return ws

    def list_workspaces(self) -> list[Workspace]:
        with self._read() as conn:
            rows = conn.execute(select(WORKSPACES).order_by(WORKSPACES.c.created_at, WORKSPACES.c.id))
            return [_workspace(r) for r in rows.mappings()]

    def get_workspace(self, name_or_id: str) -> Workspace:
        """A workspace by name (or by `ws_...` id); NotFoundError(`workspace_not_found`)."""
        with self._read() as conn:
            row = self._workspace_row(conn, name_or_id)
        return _workspace(row)

    def default_workspace_id(self) -> str:
        if self._default_workspace_id is None:
            self._default_workspace_id = self.get_workspace(DEFAULT_WORKSPACE).id
        return self._default_workspace_id

    def _workspace_row(self, conn: Connection, name_or_id: str) -> Mapping[str, Any]:
        if not isinstance(name_or_id, str):
            raise ValidationError("workspace must be a string")
        col = WORKSPACES.c.id if cred.is_id_shaped(name_or_id, "ws") else WORKSPACES.c.name
        row = conn.execute(select(WORKSPACES).where(col == name_or_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no workspace {name_or_id[:200]!r}", code=WORKSPACE_NOT_FOUND)
        return row

    def pipe_workspace(self, pipe_id: str) -> str:
        """The workspace id of a pipe, deleted or not (its sessions may outlive it): for the system only."""
        with self._read() as conn:
            ws = conn.execute(select(PIPES.c.workspace_id).where(PIPES.c.id == pipe_id)).scalar()
        if ws is None:
            raise NotFoundError(f"no pipe {pipe_id!r}", code=Code.PIPE_NOT_FOUND)
        return str(ws)

    # ---------------------------------------------------------------- API keys

    def create_api_key(self, name: str | None = None, *, workspace: str = DEFAULT_WORKSPACE) -> NewApiKey:
        """A new key in `workspace` (its name, or its `ws_...` id); the secret exists only in the result."""
        _check_text("name", name, 200)
        secret = cred.new_api_key()
        with self._write() as conn:
            ws_id = self._workspace_row(conn, workspace)["id"]
            key = ApiKey(id=cred.new_id("key"), name=name, prefix=secret[: cred.DISPLAY_PREFIX_LEN],
                         created_at=utcnow(), revoked_at=None, workspace_id=ws_id)
            conn.execute(insert(API_KEYS).values(
                id=key.id, name=key.name, prefix=key.prefix, secret_hash=cred.hash_secret(secret),
                created_at=key.created_at, revoked_at=None, workspace_id=ws_id))
        return NewApiKey(key=key, secret=secret)

    def list_api_keys(self, *, include_revoked: bool = True, workspace_id: str | None = None) -> list[ApiKey]:
        q = select(API_KEYS).order_by(API_KEYS.c.created_at, API_KEYS.c.id)
        if not include_revoked:
            q = q.where(API_KEYS.c.revoked_at.is_(None))
        if workspace_id is not None:
            q = q.where(API_KEYS.c.workspace_id == workspace_id)
        with self._read() as conn:
            return [_api_key(r) for r in conn.execute(q).mappings()]

    def get_api_key(self, key_id: str) -> ApiKey:
        with self._read() as conn:
            row = conn.execute(select(API_KEYS).where(API_KEYS.c.id == key_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}", code=Code.API_KEY_NOT_FOUND)
        return _api_key(row)

    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Revokes a key (idempotent: revoking twice keeps the first time). Its unused tokens die too."""
        with self._write() as conn:
            conn.execute(update(API_KEYS).where(API_KEYS.c.id == key_id, API_KEYS.c.revoked_at.is_(None))
                         .values(revoked_at=utcnow()))
            row = conn.execute(select(API_KEYS).where(API_KEYS.c.id == key_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no API key {key_id!r}", code=Code.API_KEY_NOT_FOUND)
        return _api_key(row)

    def verify_api_key(self, secret: str) -> ApiKey:
        """The key for a presented secret; raises AuthenticationError (`unauthorized`/`api_key_revoked`)."""
        if not isinstance(secret, str) or not cred.is_api_key_shaped(secret):
            raise AuthenticationError("invalid API key", code=Code.UNAUTHORIZED)
        with self._read() as conn:
            row = conn.execute(select(API_KEYS).where(API_KEYS.c.secret_hash == cred.hash_secret(secret))
                               ).mappings().first()
        if row is None:
            raise AuthenticationError("invalid API key", code=Code.UNAUTHORIZED)
        key = _api_key(row)
        if key.revoked:
            raise AuthenticationError("this API key has been revoked", code=Code.API_KEY_REVOKED)
        return key

    # ---------------------------------------------------------------- pipes

    def create_pipe(self, config: PipeConfig | Mapping[str, Any], name: str | None = None, *,
                    workspace_id: str | None = None) -> Pipe:
        """A pipe in `workspace_id` (the creating key's; None: the default workspace)."""
        cfg = validate_pipe_config(config)
        _check_text("name", name, 200)
        ws_id = workspace_id if workspace_id is not None else self.default_workspace_id()
        now = utcnow()
        pipe = Pipe(id=cred.new_id("pipe"), name=name, agent_id=cfg.agent_id,
                    config=cfg.model_dump(mode="json"), created_at=now, updated_at=now, workspace_id=ws_id)
        with self._write() as conn:
            conn.execute(insert(PIPES).values(
                id=pipe.id, name=pipe.name, agent_id=pipe.agent_id, config=pipe.config,
                created_at=now, updated_at=now, deleted_at=None, workspace_id=ws_id))
        return pipe

    def get_pipe(self, pipe_id: str, *, workspace_id: str | None = None) -> Pipe:
        """A live (not deleted) pipe of the workspace; raises NotFoundError(`pipe_not_found`)."""
        with self._read() as conn:
            row = self._pipe_row(conn, pipe_id, workspace_id=workspace_id)
        return _pipe(row)

    def list_pipes(self, *, limit: int = 50, cursor: str | None = None,
                   agent_id: str | None = None, workspace_id: str | None = None) -> Page[Pipe]:
        limit = _check_limit(limit)
        q = select(PIPES).where(PIPES.c.deleted_at.is_(None))
        if workspace_id is not None:
            q = q.where(PIPES.c.workspace_id == workspace_id)
        if agent_id is not None:
            q = q.where(PIPES.c.agent_id == agent_id)
        if cursor is not None:
            ts, last_id = decode_cursor(cursor)
            q = q.where(or_(PIPES.c.created_at < ts, and_(PIPES.c.created_at == ts, PIPES.c.id < last_id)))
        q = q.order_by(PIPES.c.created_at.desc(), PIPES.c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = list(conn.execute(q).mappings())
        items = [_pipe(r) for r in rows[:limit]]
        nxt = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        return Page(items=items, next_cursor=nxt)

    def update_pipe(self, pipe_id: str, *, name: str | _Unset | None = UNSET,
                    config: PipeConfig | Mapping[str, Any] | None = None,
                    config_patch: Mapping[str, Any] | None = None, workspace_id: str | None = None) -> Pipe:
        """Replaces `config`, or merges `config_patch` into it (JSON merge patch: null resets to default)."""
        if not isinstance(name, _Unset):
            _check_text("name", name, 200)
        with self._write() as conn:
            row = self._pipe_row(conn, pipe_id, for_update=True, workspace_id=workspace_id)
            new_config: dict[str, Any] = dict(row["config"])
            if config is not None:
                new_config = validate_pipe_config(config).model_dump(mode="json")
            if config_patch is not None:
                merged = merge_patch(new_config, config_patch)
                new_config = validate_pipe_config(merged).model_dump(mode="json")
            values: dict[str, Any] = {"config": new_config, "agent_id": new_config["agent_id"],
                                      "updated_at": utcnow()}
            if not isinstance(name, _Unset):
                values["name"] = name
            conn.execute(update(PIPES).where(PIPES.c.id == pipe_id).values(**values))
            row = self._pipe_row(conn, pipe_id)
        return _pipe(row)

    def delete_pipe(self, pipe_id: str, *, workspace_id: str | None = None) -> None:
        """Deletes a pipe: gone from the API, its unused tokens stop working; its sessions stay."""
        q = update(PIPES).where(PIPES.c.id == pipe_id, PIPES.c.deleted_at.is_(None))
        if workspace_id is not None:
            q = q.where(PIPES.c.workspace_id == workspace_id)
        with self._write() as conn:
            res = conn.execute(q.values(deleted_at=utcnow()))
        if res.rowcount != 1:
            raise NotFoundError(f"no pipe {pipe_id!r}", code=Code.PIPE_NOT_FOUND)

    def _pipe_row(self, conn: Connection, pipe_id: str, *, for_update: bool = False,
                  workspace_id: str | None = None) -> Mapping[str, Any]:
        q = select(PIPES).where(PIPES.c.id == pipe_id, PIPES.c.deleted_at.is_(None))
        if workspace_id is not None:
            q = q.where(PIPES.c.workspace_id == workspace_id)
        if for_update and conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).mappings().first()
        if row is None:
            raise NotFoundError(f"no pipe {pipe_id!r}", code=Code.PIPE_NOT_FOUND)
        return row

    # ---------------------------------------------------------------- session tokens

    def mint_token(self, pipe_id: str, *, api_key_id: str | None = None,
                   metadata: Mapping[str, Any] | None = None, ttl_s: float | None = None,
                   workspace_id: str | None = None) -> MintedToken:
        """A single-use token for one session on `pipe_id` (a pipe of `workspace_id`); only its hash is
        stored."""
        meta = _check_metadata(metadata)
        ttl = self.token_ttl_s if ttl_s is None else ttl_s
        token = cred.new_token()
        now = utcnow()
        expires_at = now + timedelta(seconds=ttl)
        with self._write() as conn:
            self._pipe_row(conn, pipe_id, workspace_id=workspace_id)
            conn.execute(insert(TOKENS).values(
                token_hash=cred.hash_secret(token), pipe_id=pipe_id, api_key_id=api_key_id,
                metadata=meta, created_at=now, expires_at=expires_at, used_at=None))
        return MintedToken(token=token, pipe_id=pipe_id, expires_at=expires_at)

    def redeem_token(self, token: str, pipe_id: str) -> TokenGrant:
        """Consumes a token for `pipe_id` in one atomic UPDATE; raises TokenError/AuthenticationError/
        NotFoundError with the reason when it cannot (a token for another pipe is left unused)."""
        if not isinstance(token, str) or not cred.is_token_shaped(token):
            raise TokenError("malformed session token", code=Code.TOKEN_MALFORMED)
        token_hash = cred.hash_secret(token)
        now = utcnow()  # one instant for both statements, so the classification below is consistent
        key_active = or_(TOKENS.c.api_key_id.is_(None), exists().where(
            API_KEYS.c.id == TOKENS.c.api_key_id, API_KEYS.c.revoked_at.is_(None)))
        pipe_live = exists().where(PIPES.c.id == TOKENS.c.pipe_id, PIPES.c.deleted_at.is_(None))
        stmt = (update(TOKENS)
                .where(TOKENS.c.token_hash == token_hash, TOKENS.c.pipe_id == pipe_id,
                       TOKENS.c.used_at.is_(None), TOKENS.c.expires_at > now, key_active, pipe_live)
                .values(used_at=now)
                .returning(TOKENS.c.pipe_id, TOKENS.c.metadata, TOKENS.c.api_key_id))
        with self._write() as conn:
            won = conn.execute(stmt).mappings().first()
        if won is not None:
            return TokenGrant(pipe_id=won["pipe_id"], metadata=dict(won["metadata"] or {}),
                              api_key_id=won["api_key_id"])
        raise self._why_refused(token_hash, pipe_id, now)

    def _why_refused(self, token_hash: str, pipe_id: str, now: datetime) -> Exception:
        q = (select(TOKENS.c.pipe_id, TOKENS.c.used_at, TOKENS.c.expires_at,
                    API_KEYS.c.revoked_at, PIPES.c.deleted_at)
             .select_from(TOKENS.outerjoin(API_KEYS, API_KEYS.c.id == TOKENS.c.api_key_id)
                          .outerjoin(PIPES, PIPES.c.id == TOKENS.c.pipe_id))
             .where(TOKENS.c.token_hash == token_hash))
        with self._read() as conn:
            row = conn.execute(q).mappings().first()
        if row is None:
            return TokenError("unknown session token", code=Code.TOKEN_UNKNOWN)
        if row["pipe_id"] != pipe_id:
            return TokenError("this session token is for another pipe", code=Code.TOKEN_WRONG_PIPE)
        if row["used_at"] is not None:
            return TokenError("this session token has already been used", code=Code.TOKEN_USED)
        if row["expires_at"] <= now:
            return TokenError("this session token has expired", code=Code.TOKEN_EXPIRED)
        if row["revoked_at"] is not None:
            return AuthenticationError("the API key that minted this token has been revoked",
                                       code=Code.API_KEY_REVOKED)
        if row["deleted_at"] is not None:
            return NotFoundError(f"pipe {pipe_id!r} has been deleted", code=Code.PIPE_NOT_FOUND)
        # Unreachable while used_at only moves NULL → set; kept as the safe answer.
        return TokenError("this session token has already been used", code=Code.TOKEN_USED)

    # ---------------------------------------------------------------- sessions

    def create_session(self, pipe_id: str, agent_id: str, direction: str, caller: str | None = None,
                       caller_name: str | None = None, metadata: Mapping[str, Any] | None = None) -> str:
        if direction not in DIRECTIONS:
            raise ValidationError(f"direction must be one of {', '.join(DIRECTIONS)}")
        _check_text("agent_id", agent_id, 128, required=True)
        _check_text("caller", caller, 256)
        _check_text("caller_name", caller_name, 256)
        meta = _check_metadata(metadata)
        session_id = cred.new_id("sess")
        with self._write() as conn:
            if conn.execute(select(PIPES.c.id).where(PIPES.c.id == pipe_id)).first() is None:
                raise NotFoundError(f"no pipe {pipe_id!r}", code=Code.PIPE_NOT_FOUND)
            conn.execute(insert(SESSIONS).values(
                id=session_id, pipe_id=pipe_id, agent_id=agent_id, direction=direction, caller=caller,
                caller_name=caller_name, metadata=meta, started_at=utcnow(), ended_at=None,
                end_reason=None, metrics=None))
        return session_id

    def end_session(self, session_id: str, reason: str, metrics: Mapping[str, Any] | None = None) -> bool:
        """Ends a session; True if this call ended it, False if it had already ended (first end wins)."""
        _check_text("reason", reason, 64, required=True)
        values: dict[str, Any] = {"ended_at": utcnow(), "end_reason": reason}
        if metrics is not None:
            values["metrics"] = _check_json("metrics", dict(metrics), 256 * 1024)
        with self._write() as conn:
            res = conn.execute(update(SESSIONS)
                               .where(SESSIONS.c.id == session_id, SESSIONS.c.ended_at.is_(None))
                               .values(**values))
            if res.rowcount == 1:
                return True
            if conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == session_id)).first() is None:
                raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
            return False

    def update_session_metrics(self, session_id: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Merges `metrics` (top-level keys) into the session's metrics; returns the result."""
        with self._write() as conn:
            q = select(SESSIONS.c.metrics).where(SESSIONS.c.id == session_id)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update()
            row = conn.execute(q).first()
            if row is None:
                raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
            merged = {**(row[0] or {}), **dict(metrics)}
            _check_json("metrics", merged, 256 * 1024)
            conn.execute(update(SESSIONS).where(SESSIONS.c.id == session_id).values(metrics=merged))
        return merged

    def _session_q(self, session_id: str, workspace_id: str | None, *cols: Any) -> Any:
        """The session's row (or `cols`), only if it belongs to `workspace_id` (through its pipe)."""
        q = select(*cols) if cols else select(SESSIONS)
        q = q.where(SESSIONS.c.id == session_id)
        if workspace_id is not None:
            q = q.where(_sessions_of(workspace_id))
        return q

    def _check_session(self, conn: Connection, session_id: str, workspace_id: str | None) -> None:
        if conn.execute(self._session_q(session_id, workspace_id, SESSIONS.c.id)).first() is None:
            raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)

    def get_session(self, session_id: str, *, workspace_id: str | None = None) -> SessionRecord:
        with self._read() as conn:
            row = conn.execute(self._session_q(session_id, workspace_id)).mappings().first()
            if row is None:
                raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
            turns = conn.execute(select(func.count()).select_from(TURNS)
                                 .where(TURNS.c.session_id == session_id)).scalar_one()
            rec = self._latest_recording(conn, session_id)
        return _session(row, turn_count=turns, recording=rec)

    def list_sessions(self, *, pipe_id: str | None = None, agent_id: str | None = None,
                      direction: str | None = None, since: datetime | None = None,
                      until: datetime | None = None, limit: int = 50,
                      cursor: str | None = None, workspace_id: str | None = None) -> Page[SessionRecord]:
        """Sessions newest first; `since` (inclusive) / `until` (exclusive) bound `started_at`."""
        limit = _check_limit(limit)
        q = select(SESSIONS)
        if workspace_id is not None:
            q = q.where(_sessions_of(workspace_id))
        if pipe_id is not None:
            q = q.where(SESSIONS.c.pipe_id == pipe_id)
        if agent_id is not None:
            q = q.where(SESSIONS.c.agent_id == agent_id)
        if direction is not None:
            q = q.where(SESSIONS.c.direction == direction)
        if since is not None:
            q = q.where(SESSIONS.c.started_at >= _aware("since", since))
        if until is not None:
            q = q.where(SESSIONS.c.started_at < _aware("until", until))
        if cursor is not None:
            ts, last_id = decode_cursor(cursor)
            q = q.where(or_(SESSIONS.c.started_at < ts,
                            and_(SESSIONS.c.started_at == ts, SESSIONS.c.id < last_id)))
        q = q.order_by(SESSIONS.c.started_at.desc(), SESSIONS.c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = list(conn.execute(q).mappings())
            page = rows[:limit]
            counts: dict[str, int] = {}
            if page:
                ids = [r["id"] for r in page]
                counts = dict(conn.execute(select(TURNS.c.session_id, func.count())
                                           .where(TURNS.c.session_id.in_(ids))
                                           .group_by(TURNS.c.session_id)).all())
        items = [_session(r, turn_count=counts.get(r["id"], 0)) for r in page]
        nxt = encode_cursor(items[-1].started_at, items[-1].id) if len(rows) > limit else None
        return Page(items=items, next_cursor=nxt)

    # ---------------------------------------------------------------- turns

    def add_turn(self, session_id: str, seq: int, role: str, text: str, start_ms: int | None,
                 end_ms: int | None, interrupted: bool = False, heard_text: str | None = None,
                 kind: str = "turn", redacted: bool = False) -> Turn:
        """Store one turn. `redacted`: it was said while the recording was paused, so its text (and heard
        text) are stored as REDACTED whatever is passed."""
        if redacted:
            text, heard_text = REDACTED, (REDACTED if heard_text else heard_text)
        if role not in ROLES:
            raise ValidationError("role must be 'user' or 'agent'")
        if kind not in TURN_KINDS:
            raise ValidationError(f"kind must be one of {', '.join(TURN_KINDS)}")
        _check_text("text", text, 1_000_000, required=True, allow_empty=True)
        _check_text("heard_text", heard_text, 1_000_000, allow_empty=True)
        for name, v in (("seq", seq), ("start_ms", start_ms), ("end_ms", end_ms)):
            if v is not None and not (isinstance(v, int) and 0 <= v < 2**31):
                raise ValidationError(f"{name} must be a non-negative 32-bit integer")
        now = utcnow()
        with self._write() as conn:
            if conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == session_id)).first() is None:
                raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
            if conn.execute(select(TURNS.c.id).where(TURNS.c.session_id == session_id,
                                                     TURNS.c.seq == seq)).first() is not None:
                raise ConflictError(f"session {session_id} already has turn {seq}")
            turn_id = conn.execute(insert(TURNS).values(
                session_id=session_id, seq=seq, role=role, text=text, start_ms=start_ms, end_ms=end_ms,
                interrupted=bool(interrupted), heard_text=heard_text, created_at=now, kind=kind,
                redacted=bool(redacted),
            ).returning(TURNS.c.id)).scalar_one()
        return Turn(id=turn_id, session_id=session_id, seq=seq, role=role, text=text, start_ms=start_ms,
                    end_ms=end_ms, interrupted=bool(interrupted), heard_text=heard_text, created_at=now,
                    kind=kind, redacted=bool(redacted))

    def list_turns(self, session_id: str, *, workspace_id: str | None = None) -> list[Turn]:
        """The session's turns in `seq` order; raises NotFoundError for an unknown session."""
        with self._read() as conn:
            self._check_session(conn, session_id, workspace_id)
            rows = conn.execute(select(TURNS).where(TURNS.c.session_id == session_id)
                                .order_by(TURNS.c.seq)).mappings()
            return [Turn(**{k: r[k] for k in Turn.__dataclass_fields__}) for r in rows]

    # ---------------------------------------------------------------- session events

    def add_session_event(self, session_id: str, kind: str, at_ms: int | None) -> SessionEvent:
        if kind not in SESSION_EVENT_KINDS:
            raise ValidationError(f"kind must be one of {', '.join(SESSION_EVENT_KINDS)}")
        if at_ms is not None and not (isinstance(at_ms, int) and 0 <= at_ms < 2**31):
            raise ValidationError("at_ms must be a non-negative 32-bit integer")
        now = utcnow()
        with self._write() as conn:
            if conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == session_id)).first() is None:
                raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
            event_id = conn.execute(insert(SESSION_EVENTS).values(
                session_id=session_id, kind=kind, at_ms=at_ms, created_at=now,
            ).returning(SESSION_EVENTS.c.id)).scalar_one()
        return SessionEvent(id=event_id, session_id=session_id, kind=kind, at_ms=at_ms, created_at=now)

    def list_session_events(self, session_id: str, *, workspace_id: str | None = None) -> list[SessionEvent]:
        """The session's events in the order they were stored; NotFoundError for an unknown session."""
        with self._read() as conn:
            self._check_session(conn, session_id, workspace_id)
            rows = conn.execute(select(SESSION_EVENTS).where(SESSION_EVENTS.c.session_id == session_id)
                                .order_by(SESSION_EVENTS.c.id)).mappings()
            return [SessionEvent(**{k: r[k] for k in SessionEvent.__dataclass_fields__}) for r in rows]

    # ---------------------------------------------------------------- recordings

    def add_recording(self, session_id: str, path: str, format: str, sample_rate: int, channels: int,
                      duration_s: float, size_bytes: int, sha256: str) -> Recording:
        _check_text("path", path, 4096, required=True)
        _check_text("format", format, 16, required=True)
        _check_text("sha256", sha256, 64, required=True)
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValidationError("duration_s must be a finite non-negative number")
        rec = Recording(id=cred.new_id("rec"), session_id=session_id, path=str(path), format=format,
                        sample_rate=int(sample_rate), channels=int(channels), duration_s=float(duration_s),
                        size_bytes=int(size_bytes), sha256=sha256, created_at=utcnow())
        with self._write() as conn:
            if conn.execute(select(SESSIONS.c.id).where(SESSIONS.c.id == session_id)).first() is None:
                raise NotFoundError(f"no session {session_id!r}", code=Code.SESSION_NOT_FOUND)
            conn.execute(insert(RECORDINGS).values(**dataclasses.asdict(rec)))
        return rec

    def get_recording(self, session_id: str, *, workspace_id: str | None = None) -> Recording:
        """The session's latest recording; NotFoundError(`session_not_found`/`recording_not_found`)."""
        with self._read() as conn:
            self._check_session(conn, session_id, workspace_id)
            rec = self._latest_recording(conn, session_id)
        if rec is None:
            raise NotFoundError(f"session {session_id} has no recording", code=Code.RECORDING_NOT_FOUND)
        return rec

    def _latest_recording(self, conn: Connection, session_id: str) -> Recording | None:
        row = conn.execute(select(RECORDINGS).where(RECORDINGS.c.session_id == session_id)
                           .order_by(RECORDINGS.c.created_at.desc(), RECORDINGS.c.id.desc()).limit(1)
                           ).mappings().first()
        return Recording(**dict(row)) if row is not None else None


# -------------------------------------------------------------------- helpers


def validate_pipe_config(config: PipeConfig | Mapping[str, Any]) -> PipeConfig:
    if isinstance(config, PipeConfig):
        config = config.model_dump(mode="json")
    if not isinstance(config, Mapping):
        raise ValidationError("config must be an object")
    _check_json("config", dict(config), 256 * 1024)
    try:
        return PipeConfig.model_validate(dict(config), strict=True)  # JSON types exactly: 0 is not false
    except pydantic.ValidationError as exc:
        raise ValidationError("invalid pipe config", details=pydantic_details(exc, ("config",))) from None


def pydantic_details(exc: pydantic.ValidationError,
                     prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """A pydantic error list as JSON-safe dicts: [{"loc": [...], "msg": ..., "type": ...}]."""
    return [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, null deletes a key, anything else replaces."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def encode_cursor(ts: datetime, last_id: str) -> str:
    raw = json.dumps([ts.isoformat(), last_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts_s, last_id = json.loads(raw)
        ts = datetime.fromisoformat(ts_s)
        if ts.tzinfo is None or not isinstance(last_id, str) or not cred.ID_RE.fullmatch(last_id):
            raise ValueError
        return ts, last_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise ValidationError("invalid cursor (pass back next_cursor exactly as received)") from None


def _check_limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit must be an integer between 1 and {MAX_PAGE}")
    return limit


def _aware(name: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValidationError(f"{name} must carry a timezone (e.g. 2025-01-31T12:00:00Z)")
    return value


def _check_text(name: str, value: str | None, max_len: int, *, required: bool = False,
                allow_empty: bool = False) -> None:
    """Strings must be storable on every backend: no NUL (PostgreSQL refuses it), valid UTF-8."""
    if value is None:
        if required:
            raise ValidationError(f"{name} is required")
        return
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string")
    if not value and not allow_empty:
        raise ValidationError(f"{name} must not be empty")
    if len(value) > max_len:
        raise ValidationError(f"{name} is longer than {max_len} characters")
    if not is_storable_text(value):
        raise ValidationError(f"{name} contains a NUL character or invalid Unicode")


def is_storable_text(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def check_storable(value: Any, name: str = "value", max_depth: int = 32) -> None:
    """Every string in a JSON value (keys too) must be storable on every backend; depth is bounded.

    PostgreSQL refuses NUL even as an escaped `\\u0000` inside jsonb, and lone surrogates cannot be
    encoded as UTF-8 at all, so both are refused here instead of failing inside the driver."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ValidationError(f"{name} is nested deeper than {max_depth} levels")
        if isinstance(item, str):
            if not is_storable_text(item):
                raise ValidationError(f"{name} contains a NUL character or invalid Unicode")
        elif isinstance(item, Mapping):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)


def _check_json(name: str, value: Any, max_bytes: int) -> Any:
    """JSON values must serialise strictly (no NaN/Infinity), hold only storable strings, fit `max_bytes`."""
    check_storable(value, name)
    try:
        encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValidationError(f"{name} is not valid JSON: {exc}") from None
    if len(encoded.encode("utf-8")) > max_bytes:
        raise ValidationError(f"{name} is larger than {max_bytes} bytes of JSON")
    return value


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValidationError("metadata must be an object")
    return _check_json("metadata", dict(metadata), MAX_METADATA_BYTES)


def _sessions_of(workspace_id: str) -> Any:
    """Sessions belong to their pipe's workspace (a pipe never changes workspace)."""
    return SESSIONS.c.pipe_id.in_(select(PIPES.c.id).where(PIPES.c.workspace_id == workspace_id))


def _workspace(r: Mapping[str, Any]) -> Workspace:
    return Workspace(id=r["id"], name=r["name"], created_at=r["created_at"])


def _api_key(r: Mapping[str, Any]) -> ApiKey:
    return ApiKey(id=r["id"], name=r["name"], prefix=r["prefix"], created_at=r["created_at"],
                  revoked_at=r["revoked_at"], workspace_id=r["workspace_id"])


def _pipe(r: Mapping[str, Any]) -> Pipe:
    return Pipe(id=r["id"], name=r["name"], agent_id=r["agent_id"], config=dict(r["config"]),
                created_at=r["created_at"], updated_at=r["updated_at"], workspace_id=r["workspace_id"])


def _session(r: Mapping[str, Any], *, turn_count: int = 0,
             recording: Recording | None = None) -> SessionRecord:
    return SessionRecord(
        id=r["id"], pipe_id=r["pipe_id"], agent_id=r["agent_id"], direction=r["direction"],
        caller=r["caller"], caller_name=r["caller_name"], metadata=dict(r["metadata"] or {}),
        started_at=r["started_at"], ended_at=r["ended_at"], end_reason=r["end_reason"],
        metrics=r["metrics"], turn_count=turn_count, recording=recording)
