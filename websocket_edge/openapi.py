"""The OpenAPI 3.1 document of the REST API, generated from its wire models.

The models themselves live in core (`speechpipe.api_models`) so the Python client can use them without
the server; they are re-exported here, their old home, so `openapi.Pipe` etc. keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from speechpipe.api_models import (  # re-exported: the models' old home
    AGENT_ID_PATTERN,
    API_VERSION,
    ID_PATTERN,
    Direction,
    ErrorBody,
    ErrorResponse,
    Health,
    ListPipesQuery,
    ListSessionsQuery,
    Name,
    Pipe,
    PipeCreate,
    PipeList,
    PipeUpdate,
    RecordingInfo,
    Session,
    SessionEvent,
    SessionList,
    SessionToken,
    TokenCreate,
    Transcript,
    Turn,
    UTCDatetime,
)

__all__ = [
    "AGENT_ID_PATTERN", "API_VERSION", "ID_PATTERN", "Direction", "ErrorBody", "ErrorResponse",
    "Health", "ListPipesQuery", "ListSessionsQuery", "Name", "Pipe", "PipeCreate", "PipeList",
    "PipeUpdate", "RecordingInfo", "Session", "SessionEvent", "SessionList", "SessionToken", "TokenCreate",
    "Transcript", "Turn", "UTCDatetime", "build_openapi"
]

# ------------------------------------------------------------------------------- the document

_ERRORS = {
    400: "Malformed request (body is not JSON, …): `invalid_json`.",
    401: "Missing, unknown or revoked API key: `unauthorized`, `api_key_revoked`.",
    404: "Unknown id, or the id of another workspace's object (the same answer): `pipe_not_found`, "
         "`session_not_found`, `recording_not_found`.",
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
            "get": _op("getTranscript", "A session's turns in order, and when its recording was paused",
                       (200, "The transcript", _json(_ref(name[Transcript]))), errors=(404,), tag="sessions"),
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
                 "description": "Pipes, session tokens, sessions, transcripts and recordings. Everything "
                                "is scoped to the API key's workspace: a key sees only its workspace's "
                                "pipes and sessions. Errors are "
                                "`{\"error\": {\"code\", \"message\"}}` with a stable `code`."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "An API key (`spk_…`); it acts inside "
                                                              "its workspace."}},
        },
    }
