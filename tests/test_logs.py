"""Structured logs: `speechpipe serve` with SPEECHPIPE_LOG_FORMAT=json writes only JSON lines, and every line
about a session carries its `session_id` and `pipe_id`, whichever task or layer logged it.

One real web session (espeak-ng speech over a raw WebSocket, whisper, a real AgentRunner over the agent
channel) runs against a `serve` subprocess. The runner lives in this test's process, as a customer's would
in theirs, so the server's output holds the server's lines only. Also: the binding itself, in-process.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from speechpipe import logs
from speechpipe.runner import AgentRunner, CallContext
from speechpipe.storage import Store

from .fixtures_web import RawClient
from .procs import stop_process
from .speech import silence, synth, wer
from .test_cli import SPEECHPIPE, cli_env, wait_healthy

SENTENCE = "Can you tell me when the pharmacy opens tomorrow?"
AGENT_ID = "logs-echo"


class JsonServe:
    """`speechpipe serve --port 0` with JSON logs; keeps every output line (stdout and stderr)."""

    def __init__(self, data_dir: Path) -> None:
        env = cli_env(data_dir, SPEECHPIPE_LOG_FORMAT="json")
        self.proc = subprocess.Popen([SPEECHPIPE, "serve", "--port", "0"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)

    def base_url(self, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, "serve exited early:\n" + "".join(self.lines)
                continue
            message = json.loads(line)["message"]  # the banner is a JSON line too
            if "listening on " in message:
                return message.split("listening on ", 1)[1].split()[0]
        raise AssertionError("serve never said where it listens:\n" + "".join(self.lines))

    def stop(self) -> int | None:
        return stop_process(self.proc)


async def echo_call(ctx: CallContext) -> None:
    @ctx.session.on("user_turn")
    def echo(turn):  # type: ignore[no-untyped-def]
        return f"You said: {turn.text}"

    await ctx.session.run()


def make_key_and_pipe(data_dir: Path) -> tuple[str, str, Store]:
    store = Store(f"sqlite:///{data_dir / 'speechpipe.db'}")
    store.upgrade()
    key = store.create_api_key("logs-test").secret
    pipe_id = store.create_pipe({"agent_id": AGENT_ID}, name="logs").id
    return key, pipe_id, store


async def test_serve_json_logs_carry_the_session_on_every_line_about_it(tmp_path: Path) -> None:
    key, pipe_id, store = make_key_and_pipe(tmp_path)
    server = JsonServe(tmp_path)
    runner: AgentRunner | None = None
    try:
        base = await asyncio.to_thread(server.base_url)
        await asyncio.to_thread(wait_healthy, base)
        runner = AgentRunner(echo_call, agent_id=AGENT_ID, capacity=2, url=base, api_key=key,
                             worker_id="logs-test")
        await runner.start(timeout_s=10)
        token = store.mint_token(pipe_id).token
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"ws{base[4:]}/v1/pipes/{pipe_id}/connect?token={token}")
            client = RawClient(ws)
            client.start_reading()
            await client.send_json({"type": "start", "sample_rate": 16000})
            (started,) = await client.wait_for("session.started")
            session_id = started["session_id"]
            await client.stream(np.concatenate([silence(300), synth(SENTENCE), silence(700)]), 16000)
            (turn,) = await client.wait_for("user_turn")
            assert wer(SENTENCE, turn["text"]) <= 0.15, turn["text"]
            await client.wait_for("agent.speech_done", timeout_s=20)
            await client.send_json({"type": "stop"})
            assert await client.closed() == (1000, "normal: client_stop")
        ended = client.of("session.ended")[-1]
        assert ended["reason"] == "client_stop" and ended["metrics"]["user_turns"] == 1
    finally:
        if runner is not None:
            await runner.shutdown(timeout_s=5)
        code = await asyncio.to_thread(server.stop)
        store.close()
    assert code == 0, "".join(server.lines)

    records, not_json = [], []
    for line in server.lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            not_json.append(line)
    assert not not_json, f"{len(not_json)} output lines are not JSON:\n" + "".join(not_json[:20])
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert all(r["ts"].endswith("Z") and len(r["ts"]) == len("2025-01-01T00:00:00.000Z") for r in records)

    about = [r for r in records if session_id in r["message"]]
    unbound = [r for r in about if (r.get("session_id"), r.get("pipe_id")) != (session_id, pipe_id)]
    assert not unbound, "lines about the session without its ids:\n" + "\n".join(map(json.dumps, unbound))
    bound = [r for r in records if r.get("session_id") == session_id]
    assert all(r["pipe_id"] == pipe_id and r["direction"] == "web" and r["agent_id"] == AGENT_ID
               for r in bound)
    layers = {r["logger"] for r in bound}
    assert "speechpipe.pipeline.session" in layers, layers  # the pipeline
    assert "speechpipe.websocket_edge.client_ws" in layers, layers  # the web edge
    assert "speechpipe.websocket_edge.agent_bridge" in layers, layers  # the agent side of the server
    # Lines of other tasks than the session's own: the bridge socket's handler, and aiohttp's access log
    # of the runner's bridge request (its path names the session).
    assert any(r["logger"] == "aiohttp.access" and f"/v1/agents/bridge/{session_id}" in r["message"]
               for r in bound), layers
    assert not [r for r in records if r.get("session_id") not in (None, session_id)]
    # The single-use session token never reaches a log line (the access log masks it).
    assert token not in "".join(server.lines)
    assert any(r["logger"] == "aiohttp.access" and "/connect?token=***" in r["message"] for r in records)
    print(f"\n{len(records)} JSON lines, {len(bound)} bound to {session_id}; loggers: {sorted(layers)}")


# ------------------------------------------------------------------------------------ in-process binding


def _capture(log_format: str) -> io.StringIO:
    """`configure_logging`'s handler, writing to a buffer instead of stderr."""
    root = logging.getLogger()
    saved = root.handlers[:]
    logs.configure_logging(log_format)
    handler = root.handlers[0]
    buf = io.StringIO()
    handler.setStream(buf)  # type: ignore[attr-defined]
    root.handlers[:] = [*saved, handler]  # pytest's capture keeps working
    return buf


async def test_bound_ids_reach_child_tasks_threads_and_extra_fields(restore_logging: None) -> None:
    buf = _capture("json")
    log = logging.getLogger("speechpipe.test")

    async def child() -> None:
        log.info("child task line")

    def in_thread() -> None:
        log.info("executor line")

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        async def session_task() -> None:
            logs.bind(session_id="sess_a", pipe_id="pipe_a", direction="web")
            await loop.create_task(child())
            await loop.run_in_executor(pool, contextvars.copy_context().run, in_thread)
            await loop.run_in_executor(pool, in_thread)  # no context carried: no ids
            log.info("with extra", extra={"turn": 3})
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")

        await loop.create_task(session_task())
    log.info("outside")  # the binding stayed in the session's task
    with logs.bound(session_id="sess_b"):
        log.warning("block line", extra={"session_id": "sess_given"})  # an explicit extra= wins
    out = [json.loads(line) for line in buf.getvalue().splitlines()]
    by = {r["message"]: r for r in out}
    assert by["child task line"]["session_id"] == "sess_a" and by["child task line"]["pipe_id"] == "pipe_a"
    assert [r.get("session_id") for r in out if r["message"] == "executor line"] == ["sess_a", None]
    assert by["with extra"]["turn"] == 3 and by["with extra"]["direction"] == "web"
    assert "ValueError: boom" in by["failed"]["exc"]
    assert "session_id" not in by["outside"]
    assert by["block line"]["session_id"] == "sess_given"
    assert logs.current() == {}


async def test_text_format_shows_the_session_in_brackets(restore_logging: None) -> None:
    buf = _capture("text")
    log = logging.getLogger("speechpipe.test")
    with logs.bound(session_id="sess_t", pipe_id="pipe_t"):
        log.info("hello %s", "there")
    log.info("no session")
    first, second = buf.getvalue().splitlines()
    assert first.endswith("INFO speechpipe.test: [sess_t] hello there"), first
    assert second.endswith("INFO speechpipe.test: no session"), second


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Undo `configure_logging`: the root handlers and level, warnings capture, the excepthook."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(logs, "_json_mode", logs._json_mode)
    yield
    root.handlers[:] = saved
    root.setLevel(level)
    logging.captureWarnings(False)
