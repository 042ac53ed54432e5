"""What the agent channel adds to every turn, and how many concurrent sessions one runner process holds.

    .venv/bin/python -m bench.agent_channel            # full run (~2 min)
    .venv/bin/python -m bench.agent_channel --quick    # smaller ramp

Set-up, all on loopback: the real aiohttp app with `setup_agent_channel` and an `AgentHub` (SQLite store,
real API key) in this process; ONE runner subprocess, `examples/echo_agent.py`, answering each user turn
instantly with one text delta. Sessions here are the platform's side of the channel only: each one is
dispatched through the hub like a real session and sends `user.text` on its `BridgeLink`.

Added latency per turn = from `link.send(user.text)` until `link.recv()` returns the agent's first
`agent.text.delta` for that turn: the JSON encode, the server's bridge socket, the runner's parse, its
hooks and reply, and the way back. This is what the channel adds to response latency (with an agent that
thinks for zero time); an in-process `CallbackAgent` is measured the same way for reference.

Capacity: N sessions each say something every `--pace` seconds (random phase, like a room of callers)
for `--hold` seconds; the ramp doubles N until a step drops a turn or its p95 passes `--budget-ms`. The
runner's CPU share and resident memory come from /proc. The benchmark process (server + sessions) shares
the machine's cores with the runner, so on a loaded 2-core host these are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from speechpipe.pipeline.agent import AgentLink, CallbackAgent, echo_reply
from speechpipe.pipeline.session import SessionInfo
from speechpipe.storage import AsyncStore, Store
from speechpipe.websocket_edge.agent_channel import AgentHub, NoAgentAvailable, setup_agent_channel

ROOT = Path(__file__).resolve().parent.parent
AGENT = "bench-echo"


@dataclass
class BenchSession:
    """The attributes of a PipelineSession the hub reads."""

    info: SessionInfo
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def session_id(self) -> str | None:
        return self.info.session_id


async def turn(link: AgentLink, turn_id: int, text: str = "hello there") -> float:
    """Seconds from sending the user's text to the agent's first delta (then drains to its end)."""
    t0 = time.perf_counter()
    await link.send({"type": "user.text", "turn_id": turn_id, "text": text})
    first = None
    while True:
        m = await link.recv()
        if m.get("turn_id") != turn_id:
            continue  # e.g. the greeting's agent.say
        if m["type"] == "agent.text.delta" and first is None:
            first = time.perf_counter() - t0
        elif m["type"] == "agent.text.end":
            assert first is not None, "text.end before any delta"
            return first


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {"n": len(a), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spawn_runner(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        argv = [sys.executable, str(ROOT / "examples" / "echo_agent.py"), "--agent-id", AGENT, "--capacity",
                "100000"]
        return subprocess.Popen(argv, env=env, stderr=err, stdout=subprocess.DEVNULL)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-agent-channel-"))
        self.store = Store(f"sqlite:///{self.tmp / 'bench.db'}")
        self.store.upgrade()
        self.astore = AsyncStore(self.store)
        self.key = self.store.create_api_key("bench")
        self.hub = AgentHub(self.astore, heartbeat_interval_s=5.0, ack_timeout_s=5.0, dispatch_timeout_s=30.0)
        self.n = 0

    async def start(self) -> None:
        app = web.Application()
        setup_agent_channel(app, self.hub)
        self.web = web.AppRunner(app, handle_signals=False)
        await self.web.setup()
        await web.TCPSite(self.web, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{self.web.addresses[0][1]}"
        env = {**os.environ, "SPEECHPIPE_URL": url, "SPEECHPIPE_API_KEY": self.key.secret}
        self.runner = spawn_runner(env, self.tmp / "runner.log")
        while not self.hub.runners(AGENT):
            if self.runner.poll() is not None:
                raise SystemExit(f"runner exited: see {self.tmp / 'runner.log'}")
            await asyncio.sleep(0.05)

    async def session(self) -> tuple[BenchSession, AgentLink]:
        self.n += 1
        s = BenchSession(SessionInfo(pipe_id="pipe_bench", agent_id=AGENT, direction="web",
                                     session_id=f"sess_bench{self.n:08d}"))
        link = await self.hub.dispatch(s)
        await link.send({"type": "call.started", "session_id": s.session_id, "direction": "web",
                         "pipe_id": "pipe_bench", "agent_id": AGENT, "caller": None, "metadata": {}})
        return s, link

    async def close(self, s: BenchSession, link: AgentLink) -> None:
        s.ended.set()
        await link.send({"type": "call.ended", "reason": "bench_over"})
        await link.close("bench_over")

    async def stop(self) -> None:
        self.runner.terminate()
        try:
            self.runner.wait(15)
        except subprocess.TimeoutExpired:
            self.runner.kill()
        await self.web.cleanup()
        self.astore.close()
        self.store.close()

    # ---- measurements -------------------------------------------------------------------------------------
    async def sequential(self, turns: int) -> tuple[dict[str, float], dict[str, float]]:
        s, link = await self.session()
        for i in range(20):  # warm-up
            await turn(link, 10_000 + i)
        channel = [await turn(link, i + 1) for i in range(turns)]
        await self.close(s, link)
        local = CallbackAgent(echo_reply)
        inproc = [await turn(local, i + 1) for i in range(turns)]
        return pct(channel), pct(inproc)

    async def hold(self, n: int, pace: float, hold_s: float) -> dict[str, Any]:
        t_open = time.perf_counter()
        gate = asyncio.Semaphore(100)  # callers arrive fast, not all in the same millisecond

        async def open_one() -> tuple[BenchSession, AgentLink] | None:
            async with gate:
                try:
                    return await self.session()
                except NoAgentAvailable:
                    return None

        opened = await asyncio.gather(*[open_one() for _ in range(n)])
        sessions = [s for s in opened if s is not None]
        open_s = time.perf_counter() - t_open
        latencies: list[float] = []
        failures = 0
        cpu0, t0 = proc_cpu_s(self.runner.pid), time.perf_counter()

        async def talk(link: AgentLink) -> None:
            nonlocal failures
            await asyncio.sleep(random.uniform(0, pace))
            k = 0
            while time.perf_counter() - t0 < hold_s:
                k += 1
                try:
                    latencies.append(await asyncio.wait_for(turn(link, k), 10))
                except Exception:
                    failures += 1
                    return
                await asyncio.sleep(pace)

        await asyncio.gather(*[talk(link) for _, link in sessions])
        cpu = (proc_cpu_s(self.runner.pid) - cpu0) / (time.perf_counter() - t0)
        rss = proc_rss_mb(self.runner.pid)
        await asyncio.gather(*[self.close(s, link) for s, link in sessions])
        for _ in range(200):  # the runner lets go of every call before the next step
            if not self.hub.stats()["live_calls"]:
                break
            await asyncio.sleep(0.05)
        failures += n - len(sessions)  # sessions that got no agent
        return {"sessions": n, "open_s": open_s, "turns": len(latencies), "failures": failures,
                "turns_per_s": len(latencies) / hold_s, "runner_cpu": cpu, "runner_rss_mb": rss,
                **({f"lat_{k}": v for k, v in pct(latencies).items()} if latencies else {})}


async def main(args: argparse.Namespace) -> None:
    bench = Bench(args)
    await bench.start()
    try:
        channel, inproc = await bench.sequential(args.turns)
        print(f"# Added latency per turn (one session, {args.turns} sequential turns, echo runner, loopback)")
        print(f"{'path':<28}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
        for name, s in (("agent channel (runner proc)", channel), ("in-process CallbackAgent", inproc)):
            print(f"{name:<28}{s['p50']:>9.2f}{s['p95']:>9.2f}{s['p99']:>9.2f}{s['max']:>9.2f}")
        print(f"\n# Concurrent sessions on one runner process (a turn every {args.pace:g} s per session, "
              f"{args.hold:g} s per step, budget p95 < {args.budget_ms:g} ms)")
        print(f"{'sessions':>9}{'open s':>8}{'turns':>7}{'fail':>6}{'turn/s':>8}{'p50 ms':>8}{'p95 ms':>8}"
              f"{'p99 ms':>8}{'runner CPU':>11}{'RSS MB':>8}")
        held = 0
        under_5ms = 0
        for n in args.ramp:
            r = await bench.hold(n, args.pace, args.hold)
            nan = float("nan")
            print(f"{r['sessions']:>9}{r['open_s']:>8.2f}{r['turns']:>7}{r['failures']:>6}"
                  f"{r['turns_per_s']:>8.1f}{r.get('lat_p50', nan):>8.2f}{r.get('lat_p95', nan):>8.2f}"
                  f"{r.get('lat_p99', nan):>8.2f}{r['runner_cpu']:>10.0%} {r['runner_rss_mb']:>7.0f}",
                  flush=True)
            ok = r["failures"] == 0 and r.get("lat_p95", float("inf")) < args.budget_ms
            if r["failures"] == 0 and r.get("lat_p95", float("inf")) < 5.0:
                under_5ms = n
            if not ok:
                break
            held = n
        print(f"\nheld: {held} concurrent sessions within p95 < {args.budget_ms:g} ms "
              f"({under_5ms} within p95 < 5 ms); added latency p50 {channel['p50']:.2f} ms, "
              f"p95 {channel['p95']:.2f} ms")
        print(f"hub counters: {bench.hub.stats()['counters']}")
    finally:
        await bench.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--pace", type=float, default=3.0, help="seconds between one session's turns")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds per ramp step")
    parser.add_argument("--budget-ms", type=float, default=50.0)
    parser.add_argument("--ramp", type=lambda s: [int(x) for x in s.split(",")],
                        default=[50, 100, 200, 400, 800, 1600, 3200])
    parser.add_argument("--quick", action="store_true", help="200 turns; ramp 50,200,800; 6 s steps")
    args = parser.parse_args()
    if args.quick:
        args.turns, args.hold, args.ramp = 200, 6.0, [50, 200, 800]
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
