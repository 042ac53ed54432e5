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
import ctypes
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.fixtures_sip import ANSWER, NetNS, baresip_call, read_jsonl, wait_for
from tests.speech import read_wav, resample, silence, synth, wer, write_wav

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SPEECHPIPE = str(Path(sys.executable).parent / "speechpipe")
AGENT_ID = "front-desk"
EXTENSION = "2000"
SIP_PORT = 5480
CALLER, CALLER_NAME = "5551234", "Alice Caller"
QUESTION = "What time does the library open tomorrow?"
WEB_TEXT = "Hello from the browser."
CLONE_NEWNET = 0x40000000

AGENT_SCRIPT = '''"""Test agent: logs calls and user turns to $AGENT_LOG, answers each with $AGENT_REPLY."""
import asyncio, json, os, sys, time

from speechpipe import AgentRunner, CallContext


def log(event, **fields):
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields}, default=str)
    with open(os.environ["AGENT_LOG"], "a", encoding="utf-8") as f:
        f.write(line + "\\n")


async def handle_call(ctx: CallContext) -> None:
    log("call", session_id=ctx.session_id, direction=ctx.direction, caller=ctx.caller, pipe_id=ctx.pipe_id,
        agent_id=ctx.agent_id)

    @ctx.session.on("user_turn")
    def answer(turn):
        log("user_turn", session_id=ctx.session_id, direction=ctx.direction, text=turn.text)
        return os.environ["AGENT_REPLY"]

    ctx.session.on("call_end", lambda reason: log("call_end", session_id=ctx.session_id, reason=reason))
    await ctx.session.run()


async def main() -> None:
    runner = AgentRunner(handle_call, agent_id=sys.argv[1], capacity=4, reconnect_min_s=0.2,
                         reconnect_max_s=1.0)
    await runner.start(timeout_s=30)
    log("registered", worker_id=runner.worker_id)
    await runner.run()


asyncio.run(main())
'''


# ------------------------------------------------------------------------------------------ netns gateway


def _connect_in(ns: NetNS, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` inside `ns`. setns() moves only the calling thread, so a fresh
    thread joins the namespace, connects, and exits: no pooled thread is left inside it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            out["sock"] = sock
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    t = threading.Thread(target=run, name="netns-connect")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


class Gateway:
    """A Unix socket in the test process that forwards each connection to serve's TCP port in the netns."""

    def __init__(self, ns: NetNS, port: int, path: Path) -> None:
        self.ns, self.port, self.path = ns, port, path
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Gateway:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = await asyncio.to_thread(_connect_in, self.ns, self.port)
        up_reader, up_writer = await asyncio.open_connection(sock=sock)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def http(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(self.path)))

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            self._server.close()


# ------------------------------------------------------------------------------------------ processes


class Proc:
    """A subprocess inside the netns whose stdout+stderr go to a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=log.parent)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 80) -> str:
        return f"--- {self.log.name}:\n" + "\n".join(self.text().splitlines()[-n:])

    def stop(self, timeout_s: float = 30) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _cli(data_dir: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHPIPE_")}
    done = subprocess.run([SPEECHPIPE, "--data-dir", str(data_dir), *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"speechpipe {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # A Unix socket path must stay under ~107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sp-phone-") as d:
        yield Path(d)


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):  # the runner first, then serve (which stops its SIP worker)
        await asyncio.to_thread(p.stop)


# ------------------------------------------------------------------------------------------ the test


async def test_one_runner_answers_a_phone_call_and_a_web_session_through_serve(
        netns: NetNS, tmp_path: Path, short_tmp: Path, procs: list[Proc], whisper_engine: Any) -> None:
    t0 = time.monotonic()
    data_dir = tmp_path / "data"
    key = _cli(data_dir, "keys", "create", "--name", "phone-agent-test")
    pipe = _cli(data_dir, "pipes", "create", "--config",
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
        health: dict[str, Any] = {}
        deadline = time.monotonic() + 120  # the worker loads its models after serve listens
        while not health.get("sip", {}).get("ok"):
            up = serve.proc.poll() is None and time.monotonic() < deadline
            assert up, f"no SIP worker up: {health}\n{serve.tail()}"
            await asyncio.sleep(0.2)
            async with http.get(f"{base}/healthz") as r:
                health = await r.json()
        assert r.status == 200 and health["sip"]["workers"][0]["port"] == SIP_PORT, health
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
