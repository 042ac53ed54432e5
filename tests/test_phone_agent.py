"""One agent for both entry points, through the real product: `speechpipe serve` with a SIP media worker.

Inside a private network namespace (loopback only) this starts a real `speechpipe serve` subprocess
(SQLite data dir, `SPEECHPIPE_SIP_WORKERS=1`) and a real runner process (a small AgentRunner script written
to the test's tmp dir that logs every call and user turn it gets). A baresip caller dials the pipe's
`sip_extension`: its session lives in the worker and reaches the runner through the agent relay in serve.
A raw WebSocket client opens a web session on the same pipe in the same serve: the same runner answers it.

The test process is outside the namespace; it reaches serve through a Unix-socket gateway whose TCP
connections are made from a short-lived thread that joined the namespace (`setns`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.fixtures_serve import AGENT_SCRIPT, SPEECHPIPE, Gateway, Proc, cli, wait_sip_ready
from tests.fixtures_sip import ANSWER, NetNS, baresip_call, read_jsonl, wait_for
from tests.speech import read_wav, resample, silence, synth, wer, write_wav

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

AGENT_ID = "front-desk"
EXTENSION = "2000"
SIP_PORT = 5480
CALLER, CALLER_NAME = "5551234", "Alice Caller"
QUESTION = "What time does the library open tomorrow?"
WEB_TEXT = "Hello from the browser."



# ------------------------------------------------------------------------------------------ the test


async def test_one_runner_answers_a_phone_call_and_a_web_session_through_serve(
        netns: NetNS, tmp_path: Path, short_tmp: Path, procs: list[Proc], whisper_engine: Any) -> None:
    t0 = time.monotonic()
    data_dir = tmp_path / "data"
    key = cli(data_dir, "keys", "create", "--name", "phone-agent-test")
    pipe = cli(data_dir, "pipes", "create", "--config",
                json.dumps({"agent_id": AGENT_ID, "sip_extension": EXTENSION}))
    assert pipe["agent_id"] == AGENT_ID

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHPIPE_")}
    serve = Proc([*netns.prefix(), SPEECHPIPE, "serve", "--port", "0"], {
        **env, "SPEECHPIPE_DATA_DIR": str(data_dir), "SPEECHPIPE_SIP_WORKERS": "1",
        "SPEECHPIPE_SIP_PORT_BASE": str(SIP_PORT), "SPEECHPIPE_SIP_HOST": "127.0.0.1",
        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, tmp_path / "serve.log")
    procs.append(serve)

    def listening() -> str | None:
        assert serve.proc.poll() is None, "serve exited early\n" + serve.tail()
        lines = [ln for ln in serve.text().splitlines() if "listening on" in ln]
        return lines[0].split("listening on", 1)[1].strip() if lines else None

    base = await wait_for(listening, 60, "serve to listen", serve.tail)
    port = int(base.rsplit(":", 1)[1])

    script = tmp_path / "front_desk_agent.py"
    script.write_text(AGENT_SCRIPT)
    agent_log = tmp_path / "agent.jsonl"
    runner = Proc([*netns.prefix(), sys.executable, str(script), AGENT_ID], {
        **env, "SPEECHPIPE_URL": base, "SPEECHPIPE_API_KEY": key["secret"], "AGENT_LOG": str(agent_log),
        "AGENT_REPLY": ANSWER, "PYTHONUNBUFFERED": "1"}, tmp_path / "runner.log")
    procs.append(runner)

    def tails() -> str:
        return "\n".join([serve.tail(), runner.tail(30)])

    def events(kind: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in read_jsonl(agent_log)
                if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]

    await wait_for(lambda: events("registered"), 30, "the runner to register", tails)
    (registered,) = events("registered")

    gateway = await Gateway(netns, port, short_tmp / "serve.sock").start()
    http = gateway.http()
    try:
        # ---- the web session: same serve, same pipe, same runner; hub dispatch in-process.
        auth = {"Authorization": f"Bearer {key['secret']}"}
        async with http.post(f"{base}/v1/sessions/tokens", json={"pipe_id": pipe["id"]}, headers=auth) as r:
            assert r.status == 201, await r.text()
            token = (await r.json())["token"]
        ws = await http.ws_connect(f"{base}/v1/pipes/{pipe['id']}/connect?token={token}", max_msg_size=0)
        web_events: list[dict[str, Any]] = []

        async def read_web() -> None:
            async for m in ws:
                if m.type is aiohttp.WSMsgType.TEXT:
                    web_events.append(json.loads(m.data))

        reader = asyncio.ensure_future(read_web())

        def web_of(kind: str) -> list[dict[str, Any]]:
            return [e for e in web_events if e["type"] == kind]

        await ws.send_json({"type": "start", "sample_rate": 16000})
        (started,) = await wait_for(lambda: web_of("session.started"), 15, "session.started", tails)
        web_sid = started["session_id"]
        await ws.send_json({"type": "text", "text": WEB_TEXT})
        (done,) = await wait_for(lambda: web_of("agent.speech_done"), 30, "the web reply",
                                 lambda: f"web events: {[e['type'] for e in web_events]}\n{tails()}")
        assert done["text"] == ANSWER and not done["interrupted"]
        await ws.send_json({"type": "stop"})
        await asyncio.wait_for(reader, 15)
        assert ws.close_code == 1000

        # ---- the phone call: baresip → SIP worker → relay → hub → the same runner.
        health = await wait_sip_ready(http, base, serve)
        assert health["sip"]["workers"][0]["port"] == SIP_PORT, health
        question = np.concatenate([silence(400, 8000), synth(QUESTION, rate=8000), silence(8000, 8000)])
        write_wav(tmp_path / "question.wav", question, 8000)
        call = baresip_call(netns, tmp_path / "baresip", f"sip:{EXTENSION}@127.0.0.1:{SIP_PORT}",
                            tmp_path / "question.wav", codecs="PCMU/8000/1", seconds=10, user=CALLER,
                            display=CALLER_NAME)
        await wait_for(lambda: call.proc.poll() is not None, 40, "baresip to finish",
                       lambda: call.log_tail() + "\n" + tails())
    finally:
        await http.close()
        await gateway.close()

    # (1) the runner saw the call: inbound_phone, the caller's number, the question as user text.
    (phone,) = await wait_for(lambda: events("call", direction="inbound_phone"), 10, "the phone call", tails)
    phone_sid = phone["session_id"]
    assert (phone["caller"], phone["agent_id"], phone["pipe_id"]) == (CALLER, AGENT_ID, pipe["id"])
    said = [e["text"] for e in events("user_turn", session_id=phone_sid)]
    assert said and wer(QUESTION, said[0]) <= 0.2, said

    # ... and the web session, answered by the very same runner process.
    (web,) = events("call", direction="web")
    assert web["session_id"] == web_sid and web["pipe_id"] == pipe["id"]
    assert [e["text"] for e in events("user_turn", session_id=web_sid)] == [WEB_TEXT]
    assert phone["pid"] == web["pid"] == registered["pid"] == runner.proc.pid

    # (2) what the caller heard transcribes back to the agent's reply.
    heard, rate = read_wav(call.heard())
    transcript, _ = whisper_engine.transcribe(resample(heard, rate, 16000))
    assert wer(ANSWER, transcript) <= 0.2, (transcript, call.log_tail())

    # (3) SQL, as a user would read it: both sessions, their turns, the call's recording.
    db = data_dir / "speechpipe.db"

    def query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as con:
            return con.execute(sql, args).fetchall()

    def ended(sid: str) -> Any:
        return query("SELECT 1 FROM sessions WHERE id = ? AND ended_at IS NOT NULL", sid)

    await wait_for(lambda: ended(phone_sid) and ended(web_sid), 30, "both sessions to end", tails)
    await wait_for(lambda: events("call_end", session_id=phone_sid), 10, "the runner's call_end", tails)
    sessions = dict((sid, rest) for sid, *rest in query(
        "SELECT id, pipe_id, agent_id, direction, caller, caller_name, end_reason FROM sessions"))
    assert sessions == {
        phone_sid: [pipe["id"], AGENT_ID, "inbound_phone", CALLER, CALLER_NAME, "caller_hangup"],
        web_sid: [pipe["id"], AGENT_ID, "web", None, None, "client_stop"],
    }
    phone_turns = query("SELECT role, text FROM turns WHERE session_id = ? ORDER BY seq", phone_sid)
    assert [r for r, _ in phone_turns][:2] == ["user", "agent"], phone_turns
    assert phone_turns[0][1] == said[0] and phone_turns[1][1] == ANSWER
    assert query("SELECT role, text FROM turns WHERE session_id = ? ORDER BY seq", web_sid) == \
        [("user", WEB_TEXT), ("agent", ANSWER)]
    ((path, fmt, duration_s, size),) = query(
        "SELECT path, format, duration_s, size_bytes FROM recordings WHERE session_id = ?", phone_sid)
    assert fmt == "wav" and 6 < duration_s < 12 and await asyncio.to_thread(os.path.getsize, path) == size
    # The call took the relay (worker → serve → hub), not some agent inside the worker.
    assert f"relay: session {phone_sid} (inbound_phone) dispatched to agent {AGENT_ID}" in serve.text()
    print(f"\nphone + web through serve: {time.monotonic() - t0:.1f} s; heard {transcript!r}")
