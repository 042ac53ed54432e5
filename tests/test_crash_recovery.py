"""Chaos: SIGKILL `serve` and its SIP media worker in the middle of live calls, restart, and lose nothing.

Inside a private network namespace: a real `speechpipe serve` (one SIP worker), a real runner process, four
web sessions (raw WebSockets streaming audio, two answered turns each) and one phone call (baresip, PCMU,
one answered turn). The worker and serve are SIGKILLed; serve is started again on the same data dir and
database. Then, as a user would look: every finished turn is in SQL, every session has an end reason
(`server_crashed` for the web sessions, which the restarted serve ends from its journal; `worker_crashed`
for the call, which the restarted worker ends from its own), and every recording is registered, playable
and downloads through the REST API with the stored sha256. On SQLite (the embedded default) and on
PostgreSQL (reached over its Unix socket, which crosses the namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psycopg
import pytest

from speechpipe.errors import NotFoundError
from speechpipe.storage import Store
from tests.fixtures_db import pg_admin_url
from tests.fixtures_serve import AGENT_SCRIPT, SPEECHPIPE, Gateway, Proc, clean_env, cli, wait_sip_ready
from tests.fixtures_sip import ANSWER, NetNS, baresip_call, read_jsonl, wait_for
from tests.speech import silence, synth, wer, write_wav

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

AGENT_ID = "crash-desk"
EXTENSION = "2000"
SIP_PORT = 5580
SERVE_PORT = 8790
QUESTION = "What time does the library open tomorrow?"
WEB_SESSIONS = 4
FRAME = np.zeros(320, np.int16).tobytes()  # 20 ms of silence at 16 kHz: the web clients' microphone


def _pg_schema() -> str:
    schema = f"sp_crash_{os.urandom(5).hex()}"
    with psycopg.connect(pg_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def _drop_schema(schema: str) -> None:
    with psycopg.connect(pg_admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class WebCall:
    """One raw WebSocket session through the gateway: streams silence, types turns, records events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._talk())]

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for m in self.ws:
                if m.type is aiohttp.WSMsgType.TEXT:
                    self.events.append(json.loads(m.data))

    async def _talk(self) -> None:
        with contextlib.suppress(Exception):
            while not self.ws.closed:
                await self.ws.send_bytes(FRAME)
                await asyncio.sleep(0.02)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.ws.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_sigkill_serve_and_worker_mid_calls_then_restart_loses_nothing(
        backend: str, netns: NetNS, tmp_path: Path, short_tmp: Path, procs: list[Proc]) -> None:
    data_dir = tmp_path / "data"
    schema = _pg_schema() if backend == "postgresql" else None
    # The test process reaches PostgreSQL on 127.0.0.1; processes in the namespace through its Unix socket.
    outside, inside = {}, {}
    if schema:
        search_path = f"options=-csearch_path%3D{schema}"
        outside = {"SPEECHPIPE_DATABASE_URL": f"{pg_admin_url()}?{search_path}"}
        inside = {"SPEECHPIPE_DATABASE_URL": f"postgresql://postgres@/test?host=/var/run/postgresql&{search_path}"}
    try:
        await _chaos(data_dir, outside, inside, netns, tmp_path, short_tmp, procs)
    finally:
        for p in reversed(procs):
            await asyncio.to_thread(p.stop)
        procs.clear()
        if schema:
            _drop_schema(schema)


async def _chaos(data_dir: Path, outside: dict[str, str], inside: dict[str, str], netns: NetNS,
                 tmp_path: Path, short_tmp: Path, procs: list[Proc]) -> None:
    key = cli(data_dir, "keys", "create", "--name", "crash-test", env=outside)["secret"]
    pipe = cli(data_dir, "pipes", "create", "--config",
               json.dumps({"agent_id": AGENT_ID, "sip_extension": EXTENSION}), env=outside)["id"]
    auth = {"Authorization": f"Bearer {key}"}
    serve_env = clean_env(SPEECHPIPE_DATA_DIR=str(data_dir), SPEECHPIPE_SIP_WORKERS="1",
                          SPEECHPIPE_SIP_PORT_BASE=str(SIP_PORT), SPEECHPIPE_SIP_HOST="127.0.0.1",
                          OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **inside)

    async def start_serve(name: str) -> tuple[Proc, str, Gateway]:
        # A fixed port (the namespace is private): runners redial the address they know, as in production.
        serve = Proc([*netns.prefix(), SPEECHPIPE, "serve", "--port", str(SERVE_PORT)], serve_env,
                     tmp_path / f"{name}.log")
        procs.append(serve)

        def listening() -> str | None:
            assert serve.proc.poll() is None, f"{name} exited early\n" + serve.tail()
            lines = [ln for ln in serve.text().splitlines() if "listening on" in ln]
            return lines[0].split("listening on", 1)[1].strip() if lines else None

        base = await wait_for(listening, 90, f"{name} to listen", serve.tail)
        gateway = await Gateway(netns, int(base.rsplit(":", 1)[1]), short_tmp / f"{name}.sock").start()
        return serve, base, gateway

    serve, base, gateway = await start_serve("serve")
    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    agent_log = tmp_path / "agent.jsonl"
    runner = Proc([*netns.prefix(), sys.executable, str(script), AGENT_ID], clean_env(
        SPEECHPIPE_URL=base, SPEECHPIPE_API_KEY=key, AGENT_LOG=str(agent_log), AGENT_REPLY=ANSWER,
        AGENT_CAPACITY="8",
        PYTHONUNBUFFERED="1"), tmp_path / "runner.log")
    procs.append(runner)

    def tails() -> str:
        return "\n".join([serve.tail(40), runner.tail(20)])

    await wait_for(lambda: [e for e in read_jsonl(agent_log) if e["event"] == "registered"], 30,
                   "the runner to register", tails)
    http = gateway.http()
    calls: list[WebCall] = []
    store = Store(outside.get("SPEECHPIPE_DATABASE_URL") or f"sqlite:///{data_dir / 'speechpipe.db'}")
    try:
        # ---- one phone call: the worker must be up first (it loads its models after serve listens).
        health = await wait_sip_ready(http, base, serve, tail=tails)
        worker_pid = health["sip"]["workers"][0]["pid"]
        question = np.concatenate([silence(400, 8000), synth(QUESTION, rate=8000), silence(30000, 8000)])
        write_wav(tmp_path / "question.wav", question, 8000)
        caller = baresip_call(netns, tmp_path / "baresip", f"sip:{EXTENSION}@127.0.0.1:{SIP_PORT}",
                              tmp_path / "question.wav", codecs="PCMU/8000/1", seconds=60, user="5550100")

        # ---- four web sessions, two answered turns each.
        for _ in range(WEB_SESSIONS):
            async with http.post(f"{base}/v1/sessions/tokens", json={"pipe_id": pipe}, headers=auth) as r:
                assert r.status == 201, await r.text()
                token = (await r.json())["token"]
            ws = await http.ws_connect(f"{base}/v1/pipes/{pipe}/connect?token={token}", max_msg_size=0)
            await ws.send_json({"type": "start", "sample_rate": 16000})
            calls.append(WebCall(ws))
        for turn in ("first question", "second question"):
            for c in calls:
                await c.ws.send_json({"type": "text", "text": f"{turn} please"})
            for c in calls:
                await wait_for(lambda c=c, turn=turn: [e for e in c.of("agent.speech_done")
                                                       if e["text"] == ANSWER and not e["interrupted"]]
                               and len(c.of("agent.speech_done")) >= (1 if turn.startswith("first") else 2),
                               60, f"the answer to the {turn}", tails)
        web_ids = [c.of("session.started")[0]["session_id"] for c in calls]

        # The call's turn answered and stored: the last thing that must survive.
        def phone_session() -> str | None:
            rows = [e for e in read_jsonl(agent_log)
                    if e["event"] == "call" and e["direction"] == "inbound_phone"]
            return rows[0]["session_id"] if rows else None

        phone_id = await wait_for(phone_session, 60, "the phone call to reach the runner",
                                  lambda: caller.log_tail() + tails())
        await wait_for(lambda: [t.role for t in store.list_turns(phone_id)][:2] == ["user", "agent"], 60,
                       "the phone turn to be answered and stored", tails)
        await asyncio.sleep(2.0)  # more audio reaches the WAVs (the recorder writes every second)
        before = {sid: [(t.role, t.text) for t in store.list_turns(sid)] for sid in [*web_ids, phone_id]}
        for sid in web_ids:
            assert before[sid][:4] == [("user", "first question please"), ("agent", ANSWER),
                                       ("user", "second question please"), ("agent", ANSWER)], before[sid]
        assert wer(QUESTION, before[phone_id][0][1]) <= 0.25, before[phone_id]
        assert all(store.get_session(sid).ended_at is None for sid in before)

        # ---- the crash.
        os.kill(worker_pid, signal.SIGKILL)
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(10)
        caller.proc.kill()
        caller.proc.wait(10)
        for c in calls:
            await c.close()
        await http.close()
        await gateway.close()
        assert all(store.get_session(sid).ended_at is None for sid in before), "ended before the restart?"

        # ---- the restart, same data dir, same database.
        serve, base, gateway = await start_serve("serve-restarted")
        http = gateway.http()

        def all_ended() -> bool:
            return all(store.get_session(sid).ended_at is not None for sid in before)

        await wait_for(all_ended, 120, "every session to be ended by the restarted processes", tails)
        assert "recovered 4 session(s) a crashed process left open (server_crashed)" in serve.text(), tails()
        for sid in web_ids:
            assert store.get_session(sid).end_reason == "server_crashed"
        assert store.get_session(phone_id).end_reason == "worker_crashed"
        for sid, turns in before.items():
            assert [(t.role, t.text) for t in store.list_turns(sid)][:len(turns)] == turns, sid

        for sid in before:
            try:
                rec = store.get_recording(sid)
            except NotFoundError:
                raise AssertionError(f"session {sid} has no recording row\n{tails()}") from None
            data = await asyncio.to_thread(Path(rec.path).read_bytes)
            assert (len(data), hashlib.sha256(data).hexdigest()) == (rec.size_bytes, rec.sha256), sid
            with wave.open(io.BytesIO(data)) as w:  # a header whose sizes match the file: it plays
                assert (w.getnchannels(), w.getframerate()) == (2, 16000)
                assert w.getnframes() * 4 + 44 == len(data)
                assert w.getnframes() / 16000 == pytest.approx(rec.duration_s, abs=0.05)
            assert rec.duration_s > 2.0, (sid, rec.duration_s)
            async with http.get(f"{base}/v1/sessions/{sid}/recording", headers=auth) as r:
                assert r.status == 200, await r.text()
                assert hashlib.sha256(await r.read()).hexdigest() == rec.sha256
    finally:
        for c in calls:
            await c.close()
        await http.close()
        await gateway.close()
        store.close()
