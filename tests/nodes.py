"""Several real `speechpipe serve` nodes on loopback sharing PostgreSQL and Redis, real runner processes, and
a raw web client that speaks to them: the multi-node test and `bench/soak` both drive a cluster with these.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from speechpipe.pipeline.config import PipeConfig
from speechpipe.storage import Store

from .fixtures_db import DbFactory
from .fixtures_web import RawClient
from .procs import stop_process
from .speech import silence, synth

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
ECHO_AGENT = ROOT / "examples" / "echo_agent.py"
REDIS_URL = os.environ.get("SPEECHPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RATE = 16000


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHPIPE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Node:
    """One `speechpipe serve --port 0` subprocess, its output in a file."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = tmp / f"node-{name}.log"
        data_dir = tmp / f"node-{name}"
        data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "speechpipe"), "serve", "--port", "0"], stdout=out, stderr=subprocess.STDOUT,
                env=clean_env(SPEECHPIPE_DATA_DIR=str(data_dir), SPEECHPIPE_NODE_ID=name, **env))
        self.base = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def ready(self, within_s: float = 90) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            text = self.output()
            if "cluster node:" in text:
                self.base = re.search(r"listening on (http://\S+)", text).group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited ({self.proc.returncode}):\n{text[-3000:]}")
            await asyncio.sleep(0.1)
        raise AssertionError(f"node {self.name} not up in {within_s} s:\n{self.output()[-3000:]}")

    @property
    def ws_base(self) -> str:
        return "ws" + self.base[4:]

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def stop(self, sig: int = signal.SIGTERM, within_s: float = 30) -> int | None:
        return stop_process(self.proc, sig, within_s)


class Runner:
    """`examples/echo_agent.py` as a subprocess, connected to one node."""

    def __init__(self, name: str, tmp: Path, url: str, api_key: str, agent_id: str, capacity: int) -> None:
        self.name = name
        self.log = tmp / f"runner-{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ECHO_AGENT), "--agent-id", agent_id, "--capacity", str(capacity)],
                stdout=out, stderr=subprocess.STDOUT,
                env=clean_env(SPEECHPIPE_URL=url, SPEECHPIPE_API_KEY=api_key, SPEECHPIPE_WORKER_ID=name))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, within_s: float = 30) -> int | None:
        return stop_process(self.proc, sig, within_s)


@dataclass
class Cluster:
    """A fresh PostgreSQL schema, a cluster name of its own in Redis, an API key and a pipe; then nodes."""

    tmp: Path
    agent_id: str = field(default_factory=lambda: f"echo-{secrets.token_hex(3)}")
    name: str = field(default_factory=lambda: f"test-{secrets.token_hex(4)}")
    nodes: dict[str, Node] = field(default_factory=dict)
    runners: dict[str, Runner] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.db = DbFactory("postgresql", self.tmp)
        self.db_url = self.db.new_url()
        self.store = Store(self.db_url)
        self.store.upgrade()
        self.api_key = self.store.create_api_key("cluster test").secret  # in the `default` workspace
        self.workspace_id = self.store.default_workspace_id()
        self.pipe_id = self.store.create_pipe(PipeConfig(agent_id=self.agent_id, vad={"engine": "webrtc"})).id
        self.redis = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    async def start_nodes(self, *names: str, **env: str) -> list[Node]:
        for name in names:
            self.nodes[name] = Node(name, self.tmp, {
                "SPEECHPIPE_DATABASE_URL": self.db_url, "SPEECHPIPE_REDIS_URL": REDIS_URL,
                "SPEECHPIPE_CLUSTER": self.name, **env})
        await asyncio.gather(*(self.nodes[n].ready() for n in names))
        return [self.nodes[n] for n in names]

    def advert(self, node: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"speechpipe:{self.name}:node:{node}")
        return json.loads(raw) if raw else None

    def room(self, node: str, workspace_id: str | None = None) -> dict[str, int]:
        """What `node` advertises for the cluster's agent_id in `workspace_id` (default: `default`'s)."""
        advert = self.advert(node) or {}
        pools = (advert.get("workspaces") or {}).get(workspace_id or self.workspace_id) or {}
        return dict(pools.get(self.agent_id) or {})

    def advertised_runners(self, node: str, workspace_id: str | None = None) -> int:
        return int(self.room(node, workspace_id).get("runners", 0))

    async def start_runner(self, name: str, node: str, capacity: int = 8, within_s: float = 30,
                           fallback: tuple[str, ...] = (), *, api_key: str | None = None,
                           workspace_id: str | None = None) -> Runner:
        """A runner connected to `node`; returns once `node` advertises it in Redis. `fallback`: nodes it
        redials, in turn, when its control socket drops (SPEECHPIPE_URL lists them after `node`).
        `api_key` (of `workspace_id`): another key than the cluster's, e.g. of another workspace."""
        urls = ",".join(self.nodes[n].base for n in (node, *fallback))
        runner = Runner(name, self.tmp, urls, api_key or self.api_key, self.agent_id, capacity)
        self.runners[name] = runner
        before = self.advertised_runners(node, workspace_id)
        deadline = time.monotonic() + within_s
        while self.advertised_runners(node, workspace_id) <= before:
            if runner.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"runner {name} did not register with node {node}:\n{runner.output()}")
            await asyncio.sleep(0.1)
        return runner

    async def wait_advertised(self, node: str, runners: int, within_s: float = 30) -> None:
        deadline = time.monotonic() + within_s
        while self.advertised_runners(node) != runners:
            if time.monotonic() > deadline:
                raise AssertionError(f"node {node} advertises {self.advertised_runners(node)} runners, "
                                     f"not {runners}")
            await asyncio.sleep(0.1)

    async def stop_runner(self, name: str, node: str, within_s: float = 30) -> None:
        """SIGTERM (the runner drains and exits); returns once `node` no longer advertises it."""
        runner = self.runners.pop(name)
        before = self.advertised_runners(node)
        await asyncio.get_running_loop().run_in_executor(None, runner.stop)
        deadline = time.monotonic() + within_s
        while self.advertised_runners(node) >= before > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"node {node} still advertises runner {name}")
            await asyncio.sleep(0.1)

    def close(self) -> None:
        for runner in self.runners.values():
            runner.stop(signal.SIGKILL)
        for node in self.nodes.values():
            node.stop()
        with contextlib.suppress(Exception):
            for key in self.redis.scan_iter(f"speechpipe:{self.name}:*"):
                self.redis.delete(key)
        self.redis.close()
        self.store.close()
        self.db.cleanup()


class Talker:
    """One web session on a node: a raw client that says sentences and waits for each answer."""

    def __init__(self, http: aiohttp.ClientSession, node: Node, api_key: str, pipe_id: str) -> None:
        self.http = http
        self.node = node
        self.api_key = api_key
        self.pipe_id = pipe_id
        self.client: RawClient | None = None
        self.session_id = ""
        self.latencies_ms: list[float] = []
        self._quiet: asyncio.Task[None] | None = None

    async def open(self, within_s: float = 20) -> dict[str, Any]:
        """Mint a token on the node's REST API, connect, start; the greeting's speech_done event."""
        async with self.http.post(f"{self.node.base}/v1/sessions/tokens", json={"pipe_id": self.pipe_id},
                                  headers={"Authorization": f"Bearer {self.api_key}"}) as resp:
            assert resp.status == 201, await resp.text()
            token = (await resp.json())["token"]
        ws = await self.http.ws_connect(f"{self.node.ws_base}/v1/pipes/{self.pipe_id}/connect?token={token}",
                                        max_msg_size=0)
        self.client = RawClient(ws)
        self.client.start_reading()
        await self.client.send_json({"type": "start", "sample_rate": RATE, "output_sample_rate": RATE})
        (started,) = await self.client.wait_for("session.started")
        self.session_id = started["session_id"]
        self._quiet = asyncio.ensure_future(self._silence())
        (greeting,) = await self.client.wait_for("agent.speech_done", timeout_s=within_s)
        return greeting

    async def _silence(self) -> None:
        # A quiet line between sentences, as a real microphone sends.
        assert self.client is not None
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            while True:
                await self.client.stream(silence(200), RATE)

    async def say(self, sentence: str, speech: np.ndarray | None = None,
                  within_s: float = 30) -> tuple[str, str]:
        """Speak one sentence; (what the pipeline heard, the agent's spoken answer)."""
        assert self.client is not None and self._quiet is not None
        speech = synth(sentence) if speech is None else speech
        turns_before = len(self.client.of("user_turn"))
        done_before = len(self.client.of("agent.speech_done"))
        self._quiet.cancel()
        await asyncio.gather(self._quiet, return_exceptions=True)
        await self.client.stream(np.concatenate([speech, silence(300)]), RATE)
        self._quiet = asyncio.ensure_future(self._silence())
        turns = await self.client.wait_for("user_turn", turns_before + 1, timeout_s=within_s)
        done = await self.client.wait_for("agent.speech_done", done_before + 1, timeout_s=within_s)
        self.latencies_ms = [m["values"]["response_latency_ms"] for m in self.client.of("metric")
                             if m["name"] == "turn"]
        return turns[-1]["text"], done[-1]["text"]

    async def close(self) -> tuple[int | None, str]:
        assert self.client is not None
        if self._quiet is not None:
            self._quiet.cancel()
            await asyncio.gather(self._quiet, return_exceptions=True)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.client.send_json({"type": "stop"})
        return await self.client.closed()


async def hub_events(http: aiohttp.ClientSession, base: str) -> dict[str, int]:
    """The node's AgentHub counters, read from its /metrics."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return {s.labels["event"]: int(s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "speechpipe_agent_hub_events_total"}
