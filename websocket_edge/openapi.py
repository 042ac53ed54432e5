"""The REST API's wire models (pydantic) and the OpenAPI 3.1 document generated from them.

The same models validate requests on the server (`websocket_edge.rest`) and parse responses in the
Python client (`speechpipe.client`), so the document, the server and the client cannot drift apart.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from speechpipe.pipeline.config import PipeConfig

API_VERSION = "0.1.0"
ID_PATTERN = {"pipe": r"^pipe_[0-9a-f]{24}$", "sess": r"^sess_[0-9a-f]{24}$"}
AGENT_ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
Direction = Literal["web", "inbound_phone", "outbound_phone"]


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    """Query strings must be RFC 3339 date-times with an offset (not unix numbers, not bare dates)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with offset, e.g. 2025-01-31T12:00:00Z")
    return value


def _utc(value: datetime) -> datetime:
    """Aware datetimes are converted to UTC (naive ones, from Python callers, are read as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime out of range") from None


UTCDatetime = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_utc)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the client tolerates fields added by newer servers


class ErrorBody(_Out):
    code: str = Field(description="Stable machine-readable error code, e.g. `pipe_not_found`.")
    message: str
    details: Any = None


class ErrorResponse(_Out):
    error: ErrorBody


class PipeCreate(_In):
    name: Name | None = None
    config: PipeConfig


class PipeUpdate(_In):
    """Only the fields present change. `config` is a JSON merge patch (RFC 7396) onto the current
    config: objects merge, `null` resets a setting to its default."""

    name: Name | None = None
    config: dict[str, Any] | None = Field(None, description="JSON merge patch onto the pipe's config.")


class Pipe(_Out):
    id: str
    name: str | None
    agent_id: str
    config: PipeConfig
    created_at: datetime
    updated_at: datetime


class PipeList(_Out):
    data: list[Pipe]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last.")


class TokenCreate(_In):
    pipe_id: str = Field(min_length=1, max_length=64)
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="Copied onto the session; at most 16 KiB of JSON.")


class SessionToken(_Out):
    token: str = Field(description="Single-use; pass to the client WebSocket as `?token=`.")
    pipe_id: str
    expires_at: datetime
    connect_url: str | None = Field(None, description="Path of the WebSocket this token opens.")


class RecordingInfo(_Out):
    id: str
    format: str
    sample_rate: int
    channels: int
    duration_s: float
    size_bytes: int
    sha256: str
    created_at: datetime
    url: str = Field(description="Path that downloads the file (same API key).")


class Session(_Out):
    id: str
    pipe_id: str
    agent_id: str
    direction: str
    caller: str | None
    caller_name: str | None
    metadata: dict[str, Any]
    started_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    duration_s: float | None
    turn_count: int
    metrics: dict[str, Any] | None = Field(description=(
        "Stored when the session ends: `user_turns`, `agent_turns`, `interruptions`, `false_barge_ins`, "
        "`turn_latencies_ms` (each answered turn's response latency, in order, at most 500), and "
        "`{count, p50, p95, max}` summaries in ms: `response_ms`, `barge_in_ms`, `stt_ms`, `final_ms`. "
        "Phone sessions add `media`."))
    recording: RecordingInfo | None = None


class SessionList(_Out):
    data: list[Session]
    next_cursor: str | None


class Turn(_Out):
    seq: int
    role: Literal["user", "agent"]
    text: str
    start_ms: int | None = Field(description="Offset of the turn's start in the recording, ms.")
    end_ms: int | None
    interrupted: bool
    heard_text: str | None = Field(description="For an interrupted agent turn: what the user heard.")
    kind: Literal["turn", "backchannel", "noise"] = Field(
        "turn", description="'turn' for a conversation turn; user speech that was not one is kept and "
        "marked: 'backchannel' (only \"mm-hm\", \"okay\"… over the agent, which carried on) or 'noise'.")
    created_at: datetime


class Transcript(_Out):
    session_id: str
    turns: list[Turn]


class Health(_Out):
    status: Literal["ok", "error"]
    version: str
    database: str
    # SIP media workers (when serve supervises any): per-worker state, live calls and capacity.
    sip: dict[str, Any] | None = None


class ListPipesQuery(_In):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=512)
    agent_id: str | None = Field(None, min_length=1, max_length=128, pattern=AGENT_ID_PATTERN)


class ListSessionsQuery(_In):
    model_config = ConfigDict(extra="ignore")
    pipe_id: str | None = Field(None, pattern=ID_PATTERN["pipe"])
    agent_id: str | None = Field(None, min_length=1, max_length=128, pattern=AGENT_ID_PATTERN)
    direction: Direction | None = None
    since: UTCDatetime | None = Field(None, description="Sessions started at or after (RFC 3339).")
    until: UTCDatetime | None = Field(None, description="Sessions started before (RFC 3339).")
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=512)


# ------------------------------------------------------------------------------- the document

_ERRORS = {
    400: "Malformed request (body is not JSON, …): `invalid_json`.",
    401: "Missing, unknown or revoked API key: `unauthorized`, `api_key_revoked`.",
    404: "Unknown id: `pipe_not_found`, `session_not_found`, `recording_not_found`.",
    413: "Request body larger than the server's limit: `payload_too_large`.",
    422: "Well-formed JSON that does not fit the schema: `validation_error` (details list the fields).",
    429: "Too many requests: `rate_limited`.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _op(op_id: str, summary: str, ok: tuple[int, str, dict[str, Any] | None], *, errors: tuple[int, ...],
        body: str | None = None, params: list[dict[str, Any]] | None = None, auth: bool = True,
        tag: str = "") -> dict[str, Any]:
    status, desc, content = ok
    ok_response: dict[str, Any] = {"description": desc, **({"content": content} if content else {})}
    responses: dict[str, Any] = {str(status): ok_response}
    codes = set(errors) | ({401} if auth else set()) | ({400, 413, 422} if body else set())
    for code in sorted(codes):
        responses[str(code)] = {"description": _ERRORS[code], "content": _json(_ref("ErrorResponse"))}
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if tag:
        op["tags"] = [tag]
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    op["security"] = [{"bearerAuth": []}] if auth else []
    return op


def _link(op_id: str, param: str, pointer: str) -> dict[str, Any]:
    return {"operationId": op_id, "parameters": {param: f"$response.body#{pointer}"}}


def _add_links(op: dict[str, Any], status: int, links: dict[str, dict[str, Any]]) -> dict[str, Any]:
    op["responses"][str(status)]["links"] = links
    return op


def _path_param(name: str, kind: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "pattern": ID_PATTERN[kind]}}


def _query_params(model: type[BaseModel], defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.get("$defs", {}))
    out = []
    for name, prop in schema["properties"].items():
        prop = {k: v for k, v in prop.items() if k not in ("title",)}
        desc = prop.pop("description", None)
        # Query strings carry no null: drop the `anyOf [..., null]` wrapper pydantic emits for Optional.
        if "anyOf" in prop:
            alts = [a for a in prop.pop("anyOf") if a.get("type") != "null"]
            prop = {**alts[0], **prop} if len(alts) == 1 else {"anyOf": alts, **prop}
        if "default" in prop and prop["default"] is None:
            del prop["default"]
        param = {"name": name, "in": "query", "required": False, "schema": prop}
        if desc:
            param["description"] = desc
        out.append(param)
    return out


def build_openapi(*, demo: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the REST API (with the demo route only when demo mode is on)."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorResponse, "serialization"), (PipeCreate, "validation"), (PipeUpdate, "validation"),
        (Pipe, "serialization"), (PipeList, "serialization"), (TokenCreate, "validation"),
        (SessionToken, "serialization"), (Session, "serialization"), (SessionList, "serialization"),
        (Transcript, "serialization"), (Health, "serialization"),
    ]
    keys, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    name = {m: keys[(m, mode)]["$ref"].rsplit("/", 1)[-1] for m, mode in models}
    pipe_id = _path_param("pipe_id", "pipe")
    session_id = _path_param("session_id", "sess")
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("health", "Liveness and database check", (200, "Healthy", _json(
            _ref(name[Health]))), errors=(), auth=False, tag="meta")},
        "/v1/openapi.json": {"get": _op("openapi", "This document", (200, "OpenAPI 3.1 document", _json(
            {"type": "object"})), errors=(), auth=False, tag="meta")},
        "/v1/pipes": {
            "post": _add_links(_op("createPipe", "Create a pipe", (201, "The new pipe", _json(
                _ref(name[Pipe]))), errors=(), body=name[PipeCreate], tag="pipes"), 201, {
                "GetPipe": _link("getPipe", "pipe_id", "/id"),
                "UpdatePipe": _link("updatePipe", "pipe_id", "/id"),
                "DeletePipe": _link("deletePipe", "pipe_id", "/id"),
                "ListPipeSessions": _link("listSessions", "pipe_id", "/id"),
            }),
            "get": _op("listPipes", "List pipes, newest first", (200, "A page of pipes", _json(
                _ref(name[PipeList]))), errors=(422,), params=_query_params(ListPipesQuery, schemas),
                tag="pipes"),
        },
        "/v1/pipes/{pipe_id}": {
            "parameters": [pipe_id],
            "get": _op("getPipe", "Get a pipe", (200, "The pipe", _json(_ref(name[Pipe]))), errors=(404,),
                       tag="pipes"),
            "patch": _op("updatePipe", "Update a pipe (config is a JSON merge patch)", (200, "The pipe",
                         _json(_ref(name[Pipe]))), errors=(404,), body=name[PipeUpdate], tag="pipes"),
            "delete": _op("deletePipe", "Delete a pipe (its sessions stay)", (204, "Deleted", None),
                          errors=(404,), tag="pipes"),
        },
        "/v1/sessions/tokens": {
            "post": _op("createSessionToken", "Mint a single-use session token for a pipe", (
                201, "The token", _json(_ref(name[SessionToken]))), errors=(404,), body=name[TokenCreate],
                tag="sessions"),
        },
        "/v1/sessions": {
            "get": _add_links(_op("listSessions", "List sessions, newest first", (
                200, "A page of sessions", _json(_ref(name[SessionList]))), errors=(422,),
                params=_query_params(ListSessionsQuery, schemas), tag="sessions"), 200, {
                "GetSession": _link("getSession", "session_id", "/data/0/id"),
                "GetTranscript": _link("getTranscript", "session_id", "/data/0/id"),
                "DownloadRecording": _link("downloadRecording", "session_id", "/data/0/id"),
            }),
        },
        "/v1/sessions/{session_id}": {
            "parameters": [session_id],
            "get": _op("getSession", "Get a session", (200, "The session", _json(_ref(name[Session]))),
                       errors=(404,), tag="sessions"),
        },
        "/v1/sessions/{session_id}/transcript": {
            "parameters": [session_id],
            "get": _op("getTranscript", "A session's turns in order", (200, "The transcript", _json(
                _ref(name[Transcript]))), errors=(404,), tag="sessions"),
        },
        "/v1/sessions/{session_id}/recording": {
            "parameters": [session_id],
            "get": _op("downloadRecording", "Download a session's recording", (200, "The audio file", {
                "audio/wav": {"schema": {"type": "string", "contentMediaType": "audio/wav"}},
                "application/octet-stream": {"schema": {"type": "string"}}}), errors=(404,),
                tag="sessions"),
        },
    }
    if demo:
        paths["/v1/demo/token"] = {"post": _op(
            "createDemoToken", "Demo mode only: a session token for the demo pipe, no API key",
            (201, "The token", _json(_ref(name[SessionToken]))), errors=(429,), auth=False, tag="demo")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Speech Pipe API", "version": API_VERSION,
                 "description": "Pipes, session tokens, sessions, transcripts and recordings. Errors are "
                                "`{\"error\": {\"code\", \"message\"}}` with a stable `code`."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "An API key (`spk_…`)."}},
        },
    }
