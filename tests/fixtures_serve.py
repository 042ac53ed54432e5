"""A real `speechpipe serve` in a private network namespace, for tests that drive the whole product:
the subprocess wrapper, a gateway from the test process into the namespace, the CLI, and a small runner
script that logs every call and turn it gets (tests/test_phone_agent.py, tests/test_crash_recovery.py).
Fixtures: `short_tmp`, `procs`, `cluster` (several nodes, tests/nodes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fixtures_sip import NetNS
from tests.nodes import Cluster
from tests.procs import splice

SPEECHPIPE = str(Path(sys.executable).parent / "speechpipe")
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
    capacity = int(os.environ.get("AGENT_CAPACITY", "4"))
    runner = AgentRunner(handle_call, agent_id=sys.argv[1], capacity=capacity, reconnect_min_s=0.2,
                         reconnect_max_s=1.0)
    await runner.start(timeout_s=30)
    log("registered", worker_id=runner.worker_id)
    await runner.run()


asyncio.run(main())
'''


# ------------------------------------------------------------------------------------------ netns gateway


def connect_in(ns: NetNS, port: int) -> socket.socket:
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
        sock = await asyncio.to_thread(connect_in, self.ns, self.port)
        up_reader, up_writer = await asyncio.open_connection(sock=sock)
        self._writers += [writer, up_writer]
        await splice((reader, writer), (up_reader, up_writer))

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


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SPEECHPIPE_* settings, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SPEECHPIPE_")}, **extra}


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`speechpipe --data-dir DIR ARGS --json`, its JSON answer (`env`: extra SPEECHPIPE_* settings)."""
    done = subprocess.run([SPEECHPIPE, "--data-dir", str(data_dir), *args, "--json"],
                          env=clean_env(**(env or {})), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"speechpipe {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # A Unix socket path must stay under ~107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sp-phone-") as d:
        yield Path(d)


@pytest.fixture
async def procs() -> AsyncIterator[list[Proc]]:
    """Processes a test starts; stopped (SIGTERM, then SIGKILL) in reverse order when it ends."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):  # the runner first, then serve (which stops its SIP workers)
        await asyncio.to_thread(p.stop)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Real `serve` nodes on PostgreSQL + Redis (tests/nodes.py), all stopped after the test."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await asyncio.get_running_loop().run_in_executor(None, c.close)


async def wait_sip_ready(http: aiohttp.ClientSession, base: str, serve: Proc, within_s: float = 120,
                         tail: Any = None) -> dict[str, Any]:
    """Poll serve's /healthz until its SIP workers are up (they load their models after serve listens);
    returns the health document."""
    health: dict[str, Any] = {}
    deadline = time.monotonic() + within_s
    while not health.get("sip", {}).get("ok"):
        up = serve.proc.poll() is None and time.monotonic() < deadline
        assert up, f"no SIP worker up: {health}\n{(tail or serve.tail)()}"
        await asyncio.sleep(0.2)
        async with http.get(f"{base}/healthz") as r:
            assert r.status in (200, 503), await r.text()
            health = await r.json()
    return health
