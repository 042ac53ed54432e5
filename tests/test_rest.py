"""The REST API over real HTTP on both databases: happy paths, and bad input → 4xx JSON, never a 500."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from speechpipe.settings import Settings
from speechpipe.storage import Store
from tests.fixtures_db import LiveServer, start_live_server

# The `http` fixture lives on the session loop (the project's fixture loop scope), so the tests must too.
pytestmark = pytest.mark.asyncio(loop_scope="session")

UNKNOWN_PIPE = "pipe_000000000000000000000000"
UNKNOWN_SESSION = "sess_000000000000000000000000"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(http: aiohttp.ClientSession, server: LiveServer, method: str, path: str, *,
               auth: bool = True, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {**(server.auth if auth else {}), **kw.pop("headers", {})}
    async with http.request(method, server.url + path, headers=headers, **kw) as resp:
        raw = await resp.read()
        body = json.loads(raw) if resp.content_type == "application/json" else raw
        return resp.status, body, resp


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert (status, body["error"]["code"]) == (expected_status, code), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_pipe_lifecycle(http: aiohttp.ClientSession, live_server: LiveServer) -> None:
    status, pipe, _ = await call(http, live_server, "POST", "/v1/pipes",
                                 json={"name": "support", "config": {"agent_id": "rest-bot"}})
    assert status == 201 and pipe["agent_id"] == "rest-bot" and pipe["config"]["vad"]["engine"] == "silero"
    pid = pipe["id"]
    status, got, _ = await call(http, live_server, "GET", f"/v1/pipes/{pid}")
    assert status == 200 and got == pipe
    status, patched, _ = await call(http, live_server, "PATCH", f"/v1/pipes/{pid}",
                                    json={"config": {"endpointing": {"silence_ms": 700}}})
    assert status == 200 and patched["config"]["endpointing"]["silence_ms"] == 700
    assert patched["config"]["endpointing"]["min_speech_ms"] == pipe["config"]["endpointing"]["min_speech_ms"]
    status, listing, _ = await call(http, live_server, "GET", "/v1/pipes", params={"agent_id": "rest-bot"})
    assert status == 200 and pid in [p["id"] for p in listing["data"]]
    status, _, _ = await call(http, live_server, "DELETE", f"/v1/pipes/{pid}")
    assert status == 204
    status, body, _ = await call(http, live_server, "GET", f"/v1/pipes/{pid}")
    assert_error(status, body, 404, "pipe_not_found")


@pytest.mark.parametrize(("config", "field"), [
    ({"stt": {"model": "no-such-model"}}, ["config", "stt", "model"]),
    ({"stt": {"engine": "whisper", "model": "/nonexistent/whisper-model"}}, ["config", "stt", "model"]),
    ({"tts": {"voice": "zz-nonexist"}}, ["config", "tts", "voice"]),
    ({"tts": {"voice": "en-us+nosuchvariant"}}, ["config", "tts", "voice"]),
], ids=["stt-name", "stt-dir", "tts-voice", "tts-variant"])
async def test_a_config_this_server_cannot_run_is_refused_422_naming_the_field(
        http: aiohttp.ClientSession, live_server: LiveServer, config: dict[str, Any],
        field: list[str]) -> None:
    """On create and on update: a pipe that would only fail (or go mute) at its first session is refused
    when it is written, with the setting named; the stored pipe is unchanged."""
    status, body, _ = await call(http, live_server, "POST", "/v1/pipes",
                                 json={"config": {"agent_id": "cannot-run", **config}})
    assert_error(status, body, 422, "validation_error")
    assert [d["loc"] for d in body["error"]["details"]] == [field], body
    assert ".".join(field) in body["error"]["message"]

    status, pipe, _ = await call(http, live_server, "POST", "/v1/pipes",
                                 json={"config": {"agent_id": "can-run"}})
    assert status == 201
    status, body, _ = await call(http, live_server, "PATCH", f"/v1/pipes/{pipe['id']}",
                                 json={"config": config})
    assert_error(status, body, 422, "validation_error")
    assert [d["loc"] for d in body["error"]["details"]] == [field], body
    status, got, _ = await call(http, live_server, "GET", f"/v1/pipes/{pipe['id']}")
    assert got["config"] == pipe["config"]
    # What this machine has is accepted: another installed voice, the packaged model by name.
    status, ok, _ = await call(http, live_server, "PATCH", f"/v1/pipes/{pipe['id']}",
                               json={"config": {"tts": {"voice": "en-gb+f3"}, "stt": {"model": "tiny.en"}}})
    assert status == 200 and ok["config"]["tts"]["voice"] == "en-gb+f3", ok


async def test_token_minting(http: aiohttp.ClientSession, live_server: LiveServer) -> None:
    pid = live_server.store.create_pipe({"agent_id": "rest-bot"}).id
    status, tok, _ = await call(http, live_server, "POST", "/v1/sessions/tokens",
                                json={"pipe_id": pid, "metadata": {"user_id": "u-42"}})
    assert status == 201 and tok["token"].startswith("spt_") and tok["pipe_id"] == pid
    ttl = (datetime.fromisoformat(tok["expires_at"]) - datetime.now(UTC)).total_seconds()
    assert 55 < ttl <= 60
    assert tok["connect_url"] == f"/v1/pipes/{pid}/connect"
    grant = live_server.store.redeem_token(tok["token"], pid)  # what the WebSocket edge will do
    assert grant.metadata == {"user_id": "u-42"} and grant.api_key_id == live_server.api_key_id


async def test_sessions_transcript_and_recording(http: aiohttp.ClientSession, live_server: LiveServer,
                                                 speech_wav: Path) -> None:
    store = live_server.store
    pid = store.create_pipe({"agent_id": "rest-bot"}).id
    sid = store.create_session(pid, "rest-bot", "web", metadata={"user_id": "u-7"})
    store.add_turn(sid, 0, "user", "what time is it", 0, 1200)
    store.add_turn(sid, 1, "agent", "It is noon.", 1500, 2600)
    data = await asyncio.to_thread(speech_wav.read_bytes)
    store.add_recording(sid, str(speech_wav), "wav", 22050, 1, 2.0, len(data),
                        hashlib.sha256(data).hexdigest())
    store.end_session(sid, "client_closed", metrics={"turns": 2})

    status, listing, _ = await call(http, live_server, "GET", "/v1/sessions", params={"pipe_id": pid})
    assert status == 200 and [s["id"] for s in listing["data"]] == [sid]
    status, sess, _ = await call(http, live_server, "GET", f"/v1/sessions/{sid}")
    assert status == 200 and sess["end_reason"] == "client_closed" and sess["turn_count"] == 2
    assert sess["metadata"] == {"user_id": "u-7"} and sess["duration_s"] >= 0
    assert sess["recording"]["url"] == f"/v1/sessions/{sid}/recording"
    status, transcript, _ = await call(http, live_server, "GET", f"/v1/sessions/{sid}/transcript")
    assert status == 200 and [t["text"] for t in transcript["turns"]] == ["what time is it", "It is noon."]
    status, audio, resp = await call(http, live_server, "GET", f"/v1/sessions/{sid}/recording")
    assert status == 200 and resp.content_type == "audio/wav" and audio == data and audio[:4] == b"RIFF"

    bare = store.create_session(pid, "rest-bot", "web")
    status, body, _ = await call(http, live_server, "GET", f"/v1/sessions/{bare}/recording")
    assert_error(status, body, 404, "recording_not_found")


async def test_authentication(http: aiohttp.ClientSession, live_server: LiveServer) -> None:
    status, body, resp = await call(http, live_server, "GET", "/v1/pipes", auth=False)
    assert_error(status, body, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    bad_headers = ("Basic abc", "Bearer", "Bearer spk_nope", "Bearer spk_" + "x" * 43, live_server.api_key)
    for header in bad_headers:
        status, body, _ = await call(http, live_server, "GET", "/v1/pipes", auth=False,
                                     headers={"Authorization": header})
        assert_error(status, body, 401, "unauthorized")
    revoked = live_server.store.create_api_key("soon-revoked")
    live_server.store.revoke_api_key(revoked.key.id)
    status, body, _ = await call(http, live_server, "GET", "/v1/pipes", auth=False,
                                 headers={"Authorization": f"Bearer {revoked.secret}"})
    assert_error(status, body, 401, "api_key_revoked")
    # Public routes need no key.
    status, health, _ = await call(http, live_server, "GET", "/healthz", auth=False)
    assert status == 200 and health["status"] == "ok" and health["database"] == "ok"
    status, doc, _ = await call(http, live_server, "GET", "/v1/openapi.json", auth=False)
    assert status == 200 and doc["openapi"].startswith("3.1")


BIG = b'{"config": {"agent_id": "x"}, "name": "' + b"a" * (2 * 1024 * 1024) + b'"}'

# (method, path, request kwargs, expected status, expected code). {pipe} = an existing pipe's id.
BAD_INPUT: list[tuple[str, str, dict[str, Any], int, str]] = [
    # bad JSON
    ("POST", "/v1/pipes", {"data": b"{not json"}, 400, "invalid_json"),
    ("POST", "/v1/pipes", {"data": b""}, 400, "invalid_json"),
    ("POST", "/v1/pipes", {"data": b"\xff\xfe{}"}, 400, "invalid_json"),
    ("POST", "/v1/pipes", {"data": b'{"config": {"agent_id": "x", "vad": {"threshold": NaN}}}'}, 400,
     "invalid_json"),
    ("POST", "/v1/pipes", {"data": b'{"config": {"agent_id": "x"}, "n": 1e999}'}, 400, "invalid_json"),
    ("POST", "/v1/pipes", {"data": b"[" * 100_000 + b"]" * 100_000}, 400, "invalid_json"),
    ("PATCH", "/v1/pipes/{pipe}", {"data": b"{,}"}, 400, "invalid_json"),
    ("POST", "/v1/sessions/tokens", {"data": b"null"}, 422, "validation_error"),
    # oversized bodies
    ("POST", "/v1/pipes", {"data": BIG}, 413, "payload_too_large"),
    ("PATCH", "/v1/pipes/{pipe}", {"data": BIG}, 413, "payload_too_large"),
    ("POST", "/v1/sessions/tokens", {"data": BIG}, 413, "payload_too_large"),
    # missing fields / wrong types / unknown fields / values out of range
    ("POST", "/v1/pipes", {"json": {}}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": {}}}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"json": [1, 2]}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": "agent"}}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": {"agent_id": 5}}}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": {"agent_id": "x"}, "colour": "red"}}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": {"agent_id": "x", "tts": {"rate_wpm": 10_000}}}}, 422,
     "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": {"agent_id": "x"}, "name": "a\x00b"}}, 422, "validation_error"),
    ("POST", "/v1/pipes", {"data": b'{"config": {"agent_id": "x"}, "name": "\\ud800"}'}, 422,
     "validation_error"),
    ("POST", "/v1/pipes", {"json": {"config": {"agent_id": "x"}, "name": ""}}, 422, "validation_error"),
    ("PATCH", "/v1/pipes/{pipe}", {"json": {"config": {"vad": {"aggressiveness": "high"}}}}, 422,
     "validation_error"),
    ("PATCH", "/v1/pipes/{pipe}", {"json": {"config": {"agent_id": None}}}, 422, "validation_error"),
    ("PATCH", "/v1/pipes/{pipe}", {"json": {"config": [1]}}, 422, "validation_error"),
    ("PATCH", "/v1/pipes/{pipe}", {"json": {"name": 12}}, 422, "validation_error"),
    ("POST", "/v1/sessions/tokens", {"json": {}}, 422, "validation_error"),
    ("POST", "/v1/sessions/tokens", {"json": {"pipe_id": 7}}, 422, "validation_error"),
    ("POST", "/v1/sessions/tokens", {"json": {"pipe_id": "{pipe}", "metadata": "x"}}, 422,
     "validation_error"),
    ("POST", "/v1/sessions/tokens", {"json": {"pipe_id": "{pipe}", "metadata": {"k": "\x00"}}}, 422,
     "validation_error"),
    ("POST", "/v1/sessions/tokens", {"json": {"pipe_id": "{pipe}", "metadata": {"k": "v" * 20_000}}}, 422,
     "validation_error"),
    ("POST", "/v1/sessions/tokens",
     {"data": b'{"pipe_id": "x", "metadata": ' + b'{"a":' * 40 + b"1" + b"}" * 41}, 422, "validation_error"),
    ("GET", "/v1/pipes", {"params": {"limit": "abc"}}, 422, "validation_error"),
    ("GET", "/v1/pipes", {"params": {"limit": "0"}}, 422, "validation_error"),
    ("GET", "/v1/pipes", {"params": {"cursor": "!!!"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"limit": "100000000000000000000000"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"direction": "sideways"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"since": "yesterday"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"until": "0001-01-01T00:00:00+05:00"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"pipe_id": "x\x00"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"agent_id": "a b"}}, 422, "validation_error"),
    ("GET", "/v1/sessions", {"params": {"cursor": "eyJ4Ijp9"}}, 422, "validation_error"),
    # unknown ids
    ("POST", "/v1/sessions/tokens", {"json": {"pipe_id": UNKNOWN_PIPE}}, 404, "pipe_not_found"),
    ("POST", "/v1/sessions/tokens", {"json": {"pipe_id": "'; DROP TABLE pipes; --"}}, 404, "pipe_not_found"),
    ("GET", f"/v1/pipes/{UNKNOWN_PIPE}", {}, 404, "pipe_not_found"),
    ("GET", "/v1/pipes/%00", {}, 404, "pipe_not_found"),
    ("PATCH", f"/v1/pipes/{UNKNOWN_PIPE}", {"json": {"name": "x"}}, 404, "pipe_not_found"),
    ("DELETE", f"/v1/pipes/{UNKNOWN_PIPE}", {}, 404, "pipe_not_found"),
    ("GET", f"/v1/sessions/{UNKNOWN_SESSION}", {}, 404, "session_not_found"),
    ("GET", "/v1/sessions/sess_%F0%9F%98%80", {}, 404, "session_not_found"),
    ("GET", f"/v1/sessions/{UNKNOWN_SESSION}/transcript", {}, 404, "session_not_found"),
    ("GET", f"/v1/sessions/{UNKNOWN_SESSION}/recording", {}, 404, "session_not_found"),
    ("GET", "/v1/nothing-here", {}, 404, "not_found"),
    # wrong method
    ("PUT", "/v1/pipes", {"json": {}}, 405, "method_not_allowed"),
    ("POST", "/v1/sessions/{pipe}", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BAD_INPUT,
                         ids=[f"{m} {p} {c} #{i}" for i, (m, p, _, _, c) in enumerate(BAD_INPUT)])
async def test_bad_input_gets_a_4xx_json_error(http: aiohttp.ClientSession, live_server: LiveServer,
                                               method: str, path: str, kwargs: dict[str, Any], status: int,
                                               code: str) -> None:
    pid = _shared_pipe(live_server)
    kwargs = json.loads(json.dumps(kwargs).replace("{pipe}", pid)) if "json" in kwargs else dict(kwargs)
    got_status, body, resp = await call(http, live_server, method, path.replace("{pipe}", pid), **kwargs)
    assert resp.content_type == "application/json"
    assert_error(got_status, body, status, code)
    if status == 405:
        assert resp.headers.get("Allow")
    # The server is still healthy and the shared pipe untouched after every bad request.
    assert live_server.store.get_pipe(pid).name == "shared"


_SHARED: dict[str, str] = {}


def _shared_pipe(server: LiveServer) -> str:
    key = server.url
    if key not in _SHARED:
        _SHARED[key] = server.store.create_pipe({"agent_id": "shared-bot"}, name="shared").id
    return _SHARED[key]


async def test_demo_route_exists_only_in_demo_mode(http: aiohttp.ClientSession, live_server: LiveServer,
                                                   sqlite_store: Store, tmp_path: Path) -> None:
    status, body, _ = await call(http, live_server, "POST", "/v1/demo/token", auth=False)
    assert_error(status, body, 404, "not_found")
    status, doc, _ = await call(http, live_server, "GET", "/v1/openapi.json", auth=False)
    assert "/v1/demo/token" not in doc["paths"]

    settings = Settings(data_dir=tmp_path, database_url=str(sqlite_store.url), demo=True)
    demo = start_live_server(settings, sqlite_store)
    try:
        demo_info = json.loads((tmp_path / "demo.json").read_text())
        status, tok, _ = await call(http, demo, "POST", "/v1/demo/token", auth=False)
        assert status == 201 and tok["pipe_id"] == demo_info["pipe_id"]
        assert sqlite_store.redeem_token(tok["token"], demo_info["pipe_id"]).metadata == {"source": "demo"}
        status, doc, _ = await call(http, demo, "GET", "/v1/openapi.json", auth=False)
        assert "/v1/demo/token" in doc["paths"]
        # Unauthenticated, so rate limited per client address.
        statuses = [(await call(http, demo, "POST", "/v1/demo/token", auth=False))[0] for _ in range(40)]
        assert statuses.count(201) == 29 and statuses[-1] == 429
    finally:
        demo.stop()
