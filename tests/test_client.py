"""The Python client (async and blocking) against the live server, on both databases."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from speechpipe.client import AsyncClient, Client
from speechpipe.errors import (
    APIConnectionError,
    AuthenticationError,
    NotFoundError,
    SpeechPipeError,
    ValidationError,
)
from speechpipe.pipeline.config import PipeConfig
from tests.fixtures_db import LiveServer


async def test_async_client_end_to_end(live_server: LiveServer, speech_wav: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The seed's usage, with the env-var fallbacks for key and URL.
    monkeypatch.setenv("SPEECHPIPE_API_KEY", live_server.api_key)
    monkeypatch.setenv("SPEECHPIPE_URL", live_server.url)
    async with AsyncClient() as client:
        assert (await client.health()).status == "ok"
        pipe = await client.pipes.create(agent_id="client-bot", name="web support",
                                         config={"endpointing": {"silence_ms": 600}})
        assert isinstance(pipe.config, PipeConfig) and pipe.config.endpointing.silence_ms == 600
        assert (await client.pipes.get(pipe.id)).name == "web support"
        renamed = await client.pipes.update(pipe.id, name="renamed", config={"barge_in": {"enabled": False}})
        assert renamed.name == "renamed" and renamed.config.barge_in.enabled is False
        listed = await client.pipes.list(agent_id="client-bot")
        assert pipe.id in [p.id for p in listed.data]

        token = await client.sessions.create_token(pipe_id=pipe.id, metadata={"user_id": "u1"})
        assert token.token.startswith("spt_") and isinstance(token.expires_at, datetime)
        assert timedelta(seconds=55) < token.expires_at - datetime.now(UTC) <= timedelta(seconds=60)
        assert live_server.store.redeem_token(token.token, pipe.id).metadata == {"user_id": "u1"}

        # A session the pipeline would write, read back through the client.
        store = live_server.store
        sid = store.create_session(pipe.id, "client-bot", "web", metadata={"user_id": "u1"})
        store.add_turn(sid, 0, "user", "hello", 0, 800)
        store.add_turn(sid, 1, "agent", "hi there", 1000, 1900)
        data = await asyncio.to_thread(speech_wav.read_bytes)
        store.add_recording(sid, str(speech_wav), "wav", 22050, 1, 2.1, len(data),
                            hashlib.sha256(data).hexdigest())
        store.end_session(sid, "client_closed")

        sessions = await client.sessions.list(pipe_id=pipe.id, since=datetime.now(UTC) - timedelta(minutes=5))
        assert [s.id for s in sessions.data] == [sid]
        session = await client.sessions.get(sid)
        assert session.end_reason == "client_closed" and session.recording is not None
        transcript = await client.transcripts.get(sid)
        assert [(t.role, t.text) for t in transcript.turns] == [("user", "hello"), ("agent", "hi there")]
        out = await client.recordings.download(sid, tmp_path / "call.wav")
        assert hashlib.sha256(out.read_bytes()).hexdigest() == session.recording.sha256

        await client.pipes.delete(pipe.id)
        with pytest.raises(NotFoundError) as gone:
            await client.pipes.get(pipe.id)
        assert (gone.value.code, gone.value.status) == ("pipe_not_found", 404)


async def test_async_client_errors_carry_code_and_status(live_server: LiveServer) -> None:
    async with AsyncClient(api_key=live_server.api_key, base_url=live_server.url) as client:
        with pytest.raises(ValidationError) as bad:
            await client.pipes.create(config={"agent_id": "x", "vad": {"aggressiveness": 11}})
        assert (bad.value.code, bad.value.status) == ("validation_error", 422)
        assert bad.value.details[0]["loc"] == ["config", "vad", "aggressiveness"]
        with pytest.raises(NotFoundError) as nf:
            await client.sessions.create_token(pipe_id="pipe_000000000000000000000000")
        assert nf.value.code == "pipe_not_found"
        with pytest.raises(NotFoundError) as ns:
            await client.transcripts.get("sess_000000000000000000000000")
        assert ns.value.code == "session_not_found"
    async with AsyncClient(api_key="spk_" + "x" * 43, base_url=live_server.url) as client:
        with pytest.raises(AuthenticationError) as auth:
            await client.pipes.list()
        assert (auth.value.code, auth.value.status) == ("unauthorized", 401)


async def test_unreachable_server_raises_connection_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncClient(api_key="spk_x", base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(APIConnectionError) as exc:
            await client.pipes.list()
    assert exc.value.code == "connection_error"


def test_blocking_client_twin(live_server: LiveServer, tmp_path: Path) -> None:
    with Client(api_key=live_server.api_key, base_url=live_server.url) as client:
        assert client.health().status == "ok"
        pipe = client.pipes.create(PipeConfig(agent_id="sync-bot"), name="sync")
        token = client.sessions.create_token(pipe_id=pipe.id, metadata={"k": "v"})
        assert isinstance(token.expires_at, datetime) and token.pipe_id == pipe.id
        assert [p.id for p in client.pipes.list(agent_id="sync-bot").data] == [pipe.id]
        assert client.sessions.list(pipe_id=pipe.id).data == []
        with pytest.raises(SpeechPipeError) as exc:
            client.sessions.get("sess_000000000000000000000000")
        assert exc.value.code == "session_not_found"
        with pytest.raises(NotFoundError):
            client.recordings.download("sess_000000000000000000000000", tmp_path / "x.wav")
        assert not (tmp_path / "x.wav").exists() and not (tmp_path / "x.wav.part").exists()
        client.pipes.delete(pipe.id)
