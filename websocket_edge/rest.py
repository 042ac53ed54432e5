"""REST API under `/v1`: pipes, session tokens, sessions, transcripts, recordings; `/healthz`; the
OpenAPI document; and, in demo mode only, `POST /v1/demo/token`.

Handlers authenticate first (`authenticate`), then parse input strictly (`read_json`, `read_query`) into
the pydantic models of `websocket_edge.openapi`, then call the `AsyncStore`. They raise
`speechpipe.errors` types; the app's error middleware renders them as JSON.

Every handler acts inside the authenticated key's workspace: it passes `key.workspace_id` to each store
call, and the store answers another workspace's pipe or session exactly like a missing one (404, same
code), so a key can neither touch nor detect what other workspaces hold.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from speechpipe.errors import (
    AuthenticationError,
    BadRequestError,
    Code,
    NotFoundError,
    RateLimitError,
    ValidationError,
)
from speechpipe.pipe_config import PipeConfig
from speechpipe.pipeline.config_check import config_problems
from speechpipe.storage import records
from speechpipe.storage.credentials import is_id_shaped
from speechpipe.storage.store import UNSET, check_storable, merge_patch, pydantic_details
from speechpipe.websocket_edge import openapi as api
from speechpipe.websocket_edge.keys import DEMO_KEY, SETTINGS_KEY, SIP_HEALTH_KEY, STORE_KEY

M = TypeVar("M", bound=pydantic.BaseModel)
MAX_JSON_DEPTH = 32
OPENAPI_KEY = web.AppKey("speechpipe.openapi", dict)


def setup_rest(app: web.Application) -> None:
    """Mounts the REST routes (and the demo token route when settings.demo is on)."""
    demo = app[SETTINGS_KEY].demo
    app[OPENAPI_KEY] = api.build_openapi(demo=demo)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/openapi.json", openapi_document)
    app.router.add_post("/v1/pipes", create_pipe)
    app.router.add_get("/v1/pipes", list_pipes)
    app.router.add_get("/v1/pipes/{pipe_id}", get_pipe)
    app.router.add_patch("/v1/pipes/{pipe_id}", update_pipe)
    app.router.add_delete("/v1/pipes/{pipe_id}", delete_pipe)
    app.router.add_post("/v1/sessions/tokens", create_token)
    app.router.add_get("/v1/sessions", list_sessions)
    # `tokens` is not a session id: keeps /v1/sessions/tokens answering (and advertising) POST only.
    session = "/v1/sessions/{session_id:(?!tokens$)[^/]+}"
    app.router.add_get(session, get_session)
    app.router.add_get(session + "/transcript", get_transcript)
    app.router.add_get(session + "/recording", download_recording)
    if demo:
        app[DEMO_LIMITER_KEY] = RateLimiter(per_minute=30)
        app.router.add_post("/v1/demo/token", demo_token)


# ------------------------------------------------------------------------------------ helpers


async def authenticate(request: web.Request) -> records.ApiKey:
    """The API key of an `Authorization: Bearer <key>` header; raises AuthenticationError."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationError("missing `Authorization: Bearer <api key>` header")
    return await request.app[STORE_KEY].verify_api_key(secret.strip())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


async def read_json(request: web.Request, model: type[M]) -> M:
    """The request body parsed strictly as JSON (no NaN/Infinity) and validated against `model`."""
    body = await request.read()  # raises a 413 past client_max_size
    if not body.strip():
        raise BadRequestError("request body must be a JSON object")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadRequestError(f"request body is not valid JSON: {str(exc)[:200]}") from None
    check_storable(data, "request", MAX_JSON_DEPTH)
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object")
    try:
        # Strict: JSON types must match the schema exactly (0 is not false, "5" is not 5).
        return model.model_validate(data, strict=True)
    except pydantic.ValidationError as exc:
        raise ValidationError("request body does not match the schema",
                              details=pydantic_details(exc)) from None


def read_query(request: web.Request, model: type[M]) -> M:
    data = {k: request.query.get(k) for k in request.query}
    check_storable(data, "request", MAX_JSON_DEPTH)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError("invalid query parameters", details=pydantic_details(exc)) from None


def _path_id(request: web.Request, name: str, prefix: str, code: str) -> str:
    value = request.match_info[name]
    if not is_id_shaped(value, prefix):
        raise NotFoundError(f"no {prefix} {value[:80]!r}", code=code)
    return value


def _json(model: pydantic.BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


def _pipe_out(p: records.Pipe) -> api.Pipe:
    return api.Pipe(id=p.id, name=p.name, agent_id=p.agent_id, config=p.config, created_at=p.created_at,
                    updated_at=p.updated_at)


def _session_out(s: records.SessionRecord) -> api.Session:
    rec = None
    if s.recording is not None:
        r = s.recording
        rec = api.RecordingInfo(id=r.id, format=r.format, sample_rate=r.sample_rate, channels=r.channels,
                                duration_s=r.duration_s, size_bytes=r.size_bytes, sha256=r.sha256,
                                created_at=r.created_at, url=f"/v1/sessions/{s.id}/recording")
    duration = (s.ended_at - s.started_at).total_seconds() if s.ended_at else None
    return api.Session(id=s.id, pipe_id=s.pipe_id, agent_id=s.agent_id, direction=s.direction,
                       caller=s.caller, caller_name=s.caller_name, metadata=s.metadata,
                       started_at=s.started_at, ended_at=s.ended_at, end_reason=s.end_reason,
                       duration_s=duration, turn_count=s.turn_count, metrics=s.metrics, recording=rec)


def _token_out(t: records.MintedToken) -> api.SessionToken:
    return api.SessionToken(token=t.token, pipe_id=t.pipe_id, expires_at=t.expires_at,
                            connect_url=f"/v1/pipes/{t.pipe_id}/connect")


class RateLimiter:
    """A sliding one-minute window per client address (for the unauthenticated demo route)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = {}

    def check(self, client: str) -> None:
        now = time.monotonic()
        if len(self._hits) > 10_000:  # forget idle clients so the table cannot grow without bound
            self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - 60}
        hits = self._hits.setdefault(client, deque())
        while hits and hits[0] <= now - 60:
            hits.popleft()
        if len(hits) >= self.per_minute:
            raise RateLimitError("too many demo tokens; try again in a minute")
        hits.append(now)


DEMO_LIMITER_KEY = web.AppKey("speechpipe.demo_limiter", RateLimiter)


# ------------------------------------------------------------------------------------ handlers


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE_KEY].ping()
    except Exception as exc:  # any driver error means "not healthy", reported, not raised
        body = api.Health(status="error", version=api.API_VERSION, database=type(exc).__name__)
        return _json(body, status=503)
    sip = request.app.get(SIP_HEALTH_KEY)
    sip_health = sip() if sip is not None else None
    status = "ok" if sip_health is None or sip_health.get("ok") else "error"
    return _json(api.Health(status=status, version=api.API_VERSION, database="ok", sip=sip_health),
                 status=200 if status == "ok" else 503)


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_KEY])


async def _check_runnable(config: PipeConfig) -> None:
    """422 naming each setting this machine cannot run (unknown STT model, voice espeak-ng lacks), so a
    pipe is refused when it is written, not at its first session."""
    problems = await asyncio.get_running_loop().run_in_executor(None, config_problems, config)
    if problems:
        fields = ", ".join(".".join(map(str, p["loc"])) for p in problems)
        raise ValidationError(f"this server cannot run {fields}", details=problems)


async def create_pipe(request: web.Request) -> web.Response:
    key = await authenticate(request)
    body = await read_json(request, api.PipeCreate)
    await _check_runnable(body.config)
    pipe = await request.app[STORE_KEY].create_pipe(body.config, name=body.name,
                                                    workspace_id=key.workspace_id)
    return _json(_pipe_out(pipe), status=201)


async def list_pipes(request: web.Request) -> web.Response:
    key = await authenticate(request)
    q = read_query(request, api.ListPipesQuery)
    page = await request.app[STORE_KEY].list_pipes(limit=q.limit, cursor=q.cursor, agent_id=q.agent_id,
                                                   workspace_id=key.workspace_id)
    return _json(api.PipeList(data=[_pipe_out(p) for p in page.items], next_cursor=page.next_cursor))


async def get_pipe(request: web.Request) -> web.Response:
    key = await authenticate(request)
    pipe_id = _path_id(request, "pipe_id", "pipe", Code.PIPE_NOT_FOUND)
    return _json(_pipe_out(await request.app[STORE_KEY].get_pipe(pipe_id, workspace_id=key.workspace_id)))


async def update_pipe(request: web.Request) -> web.Response:
    key = await authenticate(request)
    ws = key.workspace_id
    pipe_id = _path_id(request, "pipe_id", "pipe", Code.PIPE_NOT_FOUND)
    body = await read_json(request, api.PipeUpdate)
    store = request.app[STORE_KEY]
    fields = body.model_fields_set
    if not fields & {"name", "config"}:
        return _json(_pipe_out(await store.get_pipe(pipe_id, workspace_id=ws)))
    if body.config is not None:
        merged = merge_patch((await store.get_pipe(pipe_id, workspace_id=ws)).config, body.config)
        try:
            config = PipeConfig.model_validate(merged)
        except pydantic.ValidationError:
            pass  # the store's own validation answers with the schema's errors
        else:
            await _check_runnable(config)
    pipe = await store.update_pipe(pipe_id, name=body.name if "name" in fields else UNSET,
                                   config_patch=body.config if "config" in fields else None,
                                   workspace_id=ws)
    return _json(_pipe_out(pipe))


async def delete_pipe(request: web.Request) -> web.Response:
    key = await authenticate(request)
    pipe_id = _path_id(request, "pipe_id", "pipe", Code.PIPE_NOT_FOUND)
    await request.app[STORE_KEY].delete_pipe(pipe_id, workspace_id=key.workspace_id)
    return web.Response(status=204)


async def create_token(request: web.Request) -> web.Response:
    key = await authenticate(request)
    body = await read_json(request, api.TokenCreate)
    if not is_id_shaped(body.pipe_id, "pipe"):
        raise NotFoundError(f"no pipe {body.pipe_id[:80]!r}", code=Code.PIPE_NOT_FOUND)
    token = await request.app[STORE_KEY].mint_token(body.pipe_id, api_key_id=key.id, metadata=body.metadata,
                                                    workspace_id=key.workspace_id)
    return _json(_token_out(token), status=201)


async def list_sessions(request: web.Request) -> web.Response:
    key = await authenticate(request)
    q = read_query(request, api.ListSessionsQuery)
    page = await request.app[STORE_KEY].list_sessions(
        pipe_id=q.pipe_id, agent_id=q.agent_id, direction=q.direction, since=q.since, until=q.until,
        limit=q.limit, cursor=q.cursor, workspace_id=key.workspace_id)
    return _json(api.SessionList(data=[_session_out(s) for s in page.items], next_cursor=page.next_cursor))


async def get_session(request: web.Request) -> web.Response:
    key = await authenticate(request)
    session_id = _path_id(request, "session_id", "sess", Code.SESSION_NOT_FOUND)
    return _json(_session_out(await request.app[STORE_KEY].get_session(session_id,
                                                                       workspace_id=key.workspace_id)))


async def get_transcript(request: web.Request) -> web.Response:
    key = await authenticate(request)
    session_id = _path_id(request, "session_id", "sess", Code.SESSION_NOT_FOUND)
    store = request.app[STORE_KEY]
    turns = await store.list_turns(session_id, workspace_id=key.workspace_id)
    events = await store.list_session_events(session_id, workspace_id=key.workspace_id)
    out = [api.Turn(seq=t.seq, role=t.role, text=t.text, start_ms=t.start_ms,  # type: ignore[arg-type]
                    end_ms=t.end_ms, interrupted=t.interrupted, heard_text=t.heard_text,
                    kind=t.kind, redacted=t.redacted, created_at=t.created_at)  # type: ignore[arg-type]
           for t in turns]
    marks = [api.SessionEvent(kind=e.kind, at_ms=e.at_ms, created_at=e.created_at)  # type: ignore[arg-type]
             for e in events]
    return _json(api.Transcript(session_id=session_id, turns=out, events=marks))


_MEDIA_TYPES = {"wav": "audio/wav"}


async def download_recording(request: web.Request) -> web.StreamResponse:
    key = await authenticate(request)
    session_id = _path_id(request, "session_id", "sess", Code.SESSION_NOT_FOUND)
    rec = await request.app[STORE_KEY].get_recording(session_id, workspace_id=key.workspace_id)
    path = Path(rec.path)
    if not path.is_absolute():  # the pipeline may store paths relative to the recordings directory
        path = request.app[SETTINGS_KEY].recordings_dir / path
    if not path.is_file():
        raise NotFoundError(f"the recording file of session {session_id} is missing",
                            code=Code.RECORDING_NOT_FOUND)
    ext = re.sub(r"[^a-z0-9]", "", rec.format.lower()) or "bin"
    media_type = _MEDIA_TYPES.get(ext, "application/octet-stream")
    return web.FileResponse(path, headers={
        "Content-Type": media_type,
        "Content-Disposition": f'attachment; filename="{session_id}.{ext}"',
    })


async def demo_token(request: web.Request) -> web.Response:
    demo = request.app[DEMO_KEY]
    request.app[DEMO_LIMITER_KEY].check(request.remote or "unknown")
    token = await request.app[STORE_KEY].mint_token(demo.pipe_id, api_key_id=demo.api_key_id,
                                                    metadata={"source": "demo"})
    return _json(_token_out(token), status=201)
