"""Burst: N web sessions start at once against ONE runner with spare capacity, loopback only.

    .venv/bin/python -m bench.burst                        # 100 sessions, runner capacity 200
    .venv/bin/python -m bench.burst --cpus 0 --load 2      # the same on one core shared with 2 busy loops
    .venv/bin/python -m bench.burst --mode hub             # 100 dispatches at once, no session start

`--mode web` (default): a real `speechpipe serve --port 0` (SQLite in a temporary data dir, or with
`--postgres` a fresh schema of the machine's PostgreSQL, dropped after) and one real runner process
(`examples/echo_agent.py`, capacity `--capacity`). N session tokens are minted and N client WebSockets
opened; then all of them send `start` in the same moment, each followed by a quiet line (20 ms of silence
every 20 ms, like an idle microphone; `--no-mic` to leave it out). A session counts as dispatched when its
client sees the echo agent's greeting (`agent_reply`), as failed when it sees the no-agent apology or ends
first (its `session.ended` reason). Time to dispatch: from sending `start` to that greeting (session start,
dispatch, bridge hello, call.started and the runner's entrypoint; no audio is waited for).

`--mode hub`: the server's agent channel (`setup_agent_channel`, an AgentHub with serve's defaults) on a
real aiohttp app in this process, the same runner process, and N sessions handed to `hub.dispatch` in the
same moment, the way N sessions that started together reach it (session start itself is left out, so the
offers really are simultaneous). Time to dispatch: until `dispatch` returns (offer, ack, bridge hello).

Prints dispatched / failed (by reason), the hub's counters (jobs offered, acks_timed_out, acks_slow,
acks_late) and time to dispatch p50/p95/max. `--load K` runs K busy-looping processes during the burst
and `--cpus 0` pins the server, the runner and those processes to the listed CPUs: the same burst on a
busier or smaller machine. Bounded: every wait has a deadline (`--within` for the burst itself), and every
process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from speechpipe.pipeline.config import PipeConfig
from speechpipe.settings import Settings
from speechpipe.storage import Store

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ECHO_AGENT = ROOT / "examples" / "echo_agent.py"
AGENT = "burst-echo"
RATE = 16000
APOLOGY = PipeConfig(agent_id="x").no_agent_message
COUNTERS = ("jobs_offered", "jobs_accepted", "acks_timed_out", "acks_slow", "acks_late", "dispatched")


@dataclass
class Options:
    sessions: int = 100
    capacity: int = 200
    within_s: float = 60.0
    load: int = 0
    cpus: set[int] | None = None
    mic: bool = True
    database_url: str | None = None


# ---- processes ---------------------------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHPIPE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def spawn(argv: list[str], log: Path | None, env: dict[str, str] | None = None,
          cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    with open(log or os.devnull, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)


async def busy_loops(opts: Options) -> list[subprocess.Popen[bytes]]:
    """`--load` busy-looping processes, given a second to be up and spinning before the burst."""
    argv = [sys.executable, "-c", "while True: pass"]
    procs = [spawn(argv, None, None, opts.cpus) for _ in range(opts.load)]
    if procs:
        await asyncio.sleep(1.0)
    return procs


def output(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def stop(proc: subprocess.Popen[bytes], within_s: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(within_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait(10)


async def wait_output(proc: subprocess.Popen[bytes], log: Path, pattern: str,
                      within_s: float) -> re.Match[str]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        text = output(log)
        if m := re.search(pattern, text):
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited ({proc.returncode}):\n{text[-3000:]}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{pattern!r} not seen in {log} within {within_s} s")


def start_runner(opts: Options, base: str, api_key: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(ECHO_AGENT), "--agent-id", AGENT, "--capacity", str(opts.capacity)]
    env = clean_env(SPEECHPIPE_URL=base, SPEECHPIPE_API_KEY=api_key, SPEECHPIPE_WORKER_ID="burst-runner")
    return spawn(argv, log, env, opts.cpus)


def new_store(opts: Options, tmp: Path) -> tuple[Settings, str, str]:
    """A migrated database with an API key and a pipe for the echo agent: (settings, key, pipe id)."""
    settings = Settings(data_dir=tmp / "data", database_url=opts.database_url)
    store = Store.from_settings(settings, upgrade=True)
    try:
        return (settings, store.create_api_key("burst").secret,
                store.create_pipe(PipeConfig(agent_id=AGENT, vad={"engine": "webrtc"})).id)
    finally:
        store.close()


async def all_set(events: list[asyncio.Event], within_s: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=within_s)
    finally:
        for w in waits:
            w.cancel()


# ---- web mode: real clients on a real serve ----------------------------------------------------------------
class Outcome:
    def __init__(self) -> None:
        self.t_start = 0.0
        self.t_agent: float | None = None
        self.failed: str | None = None
        self.connected = asyncio.Event()  # the WebSocket is open (or failed to open)
        self.decided = asyncio.Event()  # dispatched or failed


async def one_session(http: aiohttp.ClientSession, url: str, opts: Options, go: asyncio.Event, out: Outcome,
                      hold: asyncio.Event) -> None:
    try:
        async with http.ws_connect(url, max_msg_size=0) as ws:
            out.connected.set()
            await go.wait()  # every client is connected: all send `start` in the same moment
            out.t_start = time.monotonic()
            await ws.send_str(json.dumps({"type": "start", "sample_rate": RATE, "output_sample_rate": RATE}))
            sender = asyncio.ensure_future(mic(ws)) if opts.mic else None
            try:
                await until_agent(ws, out, out.t_start + opts.within_s)
                out.decided.set()
                if out.failed is None:  # hold the session until every other one is decided
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(hold.wait(), opts.within_s)
            finally:
                if sender is not None:
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await ws.send_str(json.dumps({"type": "stop"}))
    except TimeoutError:
        out.failed = out.failed or "bench_timeout"
    except (aiohttp.ClientError, OSError) as exc:
        out.failed = out.failed or f"connect:{type(exc).__name__}"
    finally:
        out.connected.set()
        out.decided.set()


async def mic(ws: aiohttp.ClientWebSocketResponse) -> None:
    quiet = bytes(2 * RATE // 50)
    with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
        t0 = time.monotonic()
        i = 0
        while not ws.closed:
            await ws.send_bytes(quiet)
            i += 1
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))


async def until_agent(ws: aiohttp.ClientWebSocketResponse, out: Outcome, until: float) -> None:
    """Read events until the agent's greeting (t_agent) or a failure (failed: the end reason)."""
    while out.t_agent is None:
        left = until - time.monotonic()
        if left <= 0:
            out.failed = out.failed or "bench_timeout"
            return
        msg = await ws.receive(timeout=left)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            out.failed = out.failed or f"closed:{ws.close_code}"
            return
        if msg.type is not aiohttp.WSMsgType.TEXT:
            continue
        event = json.loads(msg.data)
        if event["type"] == "agent_reply" and out.failed is None:
            if event.get("text") == APOLOGY:
                out.failed = "no_agent"  # the end reason follows in session.ended
            else:
                out.t_agent = time.monotonic()
        elif event["type"] == "session.ended":
            out.failed = str(event.get("reason"))
            return


async def hub_counters(http: aiohttp.ClientSession, base: str) -> tuple[dict[str, int], dict[str, int]]:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    events: dict[str, int] = {}
    failures: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "speechpipe_agent_hub_events_total":
                events[s.labels["event"]] = int(s.value)
            elif s.name == "speechpipe_dispatch_failures_total":
                failures[s.labels["reason"]] = int(s.value)
    return events, failures


async def web_burst(opts: Options, tmp: Path) -> dict[str, Any]:
    settings, api_key, pipe_id = new_store(opts, tmp)
    procs: list[subprocess.Popen[bytes]] = []
    load: list[subprocess.Popen[bytes]] = []
    server_log, runner_log = tmp / "serve.log", tmp / "runner.log"
    env = {"SPEECHPIPE_DATA_DIR": str(settings.data_dir)}
    if opts.database_url:
        env["SPEECHPIPE_DATABASE_URL"] = opts.database_url
    try:
        procs.append(server := spawn([str(BIN / "speechpipe"), "serve", "--port", "0"], server_log,
                                     clean_env(**env), opts.cpus))
        base = (await wait_output(server, server_log, r"listening on (http://\S+)", 120)).group(1)
        procs.append(runner := start_runner(opts, base, api_key, runner_log))
        await wait_output(runner, runner_log, r"registered as run_", 30)
        connector = aiohttp.TCPConnector(limit=0)  # one connection per session, no pool limit
        timeout = aiohttp.ClientTimeout(total=opts.within_s)  # bounds each request and WebSocket handshake
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            tokens = []
            for _ in range(opts.sessions):
                async with http.post(f"{base}/v1/sessions/tokens", json={"pipe_id": pipe_id},
                                     headers={"Authorization": f"Bearer {api_key}"}) as resp:
                    assert resp.status == 201, await resp.text()
                    tokens.append((await resp.json())["token"])
            before, _ = await hub_counters(http, base)
            load = await busy_loops(opts)
            go, hold = asyncio.Event(), asyncio.Event()
            outcomes = [Outcome() for _ in range(opts.sessions)]
            ws_base = "ws" + base[4:]
            url = f"{ws_base}/v1/pipes/{pipe_id}/connect?token="
            tasks = [asyncio.ensure_future(one_session(http, url + t, opts, go, out, hold))
                     for t, out in zip(tokens, outcomes, strict=True)]
            await all_set([o.connected for o in outcomes], opts.within_s)
            t0 = time.monotonic()
            go.set()
            await all_set([o.decided for o in outcomes], opts.within_s + 1)
            decided_s = time.monotonic() - t0
            hold.set()
            await asyncio.wait(tasks, timeout=30)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            kill_all(load)
            after, failures = await hub_counters(http, base)
    finally:
        kill_all([p for p in load if p.poll() is None])
        for p in reversed(procs):
            stop(p)
    times = [o.t_agent - o.t_start for o in outcomes if o.t_agent is not None]
    failed = Counter(o.failed or "undecided" for o in outcomes if o.t_agent is None)
    return result(opts, times, dict(failed), {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS},
                  decided_s) | {"dispatch_failures": failures}


# ---- hub mode: simultaneous dispatches on the server's agent channel ---------------------------------------
async def hub_burst(opts: Options, tmp: Path) -> dict[str, Any]:
    from aiohttp import web

    from bench.agent_channel import BenchSession
    from speechpipe.pipeline.session import SessionInfo
    from speechpipe.storage import AsyncStore
    from speechpipe.websocket_edge.agent_channel import AgentHub, NoAgentAvailable, setup_agent_channel

    settings, api_key, _ = new_store(opts, tmp)
    store = Store.from_settings(settings)
    astore = AsyncStore(store)
    hub = AgentHub(astore)  # serve's defaults: 2 s ack deadline, 10 s dispatch deadline
    app = web.Application()
    setup_agent_channel(app, hub)
    site_runner = web.AppRunner(app, handle_signals=False)
    await site_runner.setup()
    await web.TCPSite(site_runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{site_runner.addresses[0][1]}"
    if opts.cpus:  # this process is the server here: it shares the pinned CPUs too
        os.sched_setaffinity(0, opts.cpus)
    load: list[subprocess.Popen[bytes]] = []
    runner = start_runner(opts, base, api_key, tmp / "runner.log")
    links: list[Any] = []
    try:
        await wait_output(runner, tmp / "runner.log", r"registered as run_", 30)
        load = await busy_loops(opts)
        sessions = [BenchSession(SessionInfo(pipe_id="p", agent_id=AGENT, direction="web",
                                             session_id=f"sess_burst{i:04d}")) for i in range(opts.sessions)]
        times: list[float] = []
        failed: Counter[str] = Counter()
        t0 = time.monotonic()

        async def one(session: BenchSession) -> None:
            try:
                links.append(await hub.dispatch(session))
                times.append(time.monotonic() - t0)
            except NoAgentAvailable as exc:
                failed[exc.reason] += 1

        await asyncio.wait([asyncio.ensure_future(one(s)) for s in sessions], timeout=opts.within_s)
        decided_s = time.monotonic() - t0
        kill_all(load)
        counters = {k: hub.counters.get(k, 0) for k in COUNTERS}
        for s, link in zip(sessions, links, strict=False):
            s.ended.set()
            with contextlib.suppress(Exception):
                await link.close("done")
    finally:
        kill_all([p for p in load if p.poll() is None])
        stop(runner)
        await site_runner.cleanup()
        astore.close(wait=False)
        store.close()
    failed["undecided"] = opts.sessions - len(times) - sum(failed.values())
    return result(opts, times, {k: v for k, v in failed.items() if v}, counters, decided_s)


def result(opts: Options, times: list[float], failed: dict[str, int], counters: dict[str, int],
           decided_s: float) -> dict[str, Any]:
    ms = np.array(times) * 1000
    return {"sessions": opts.sessions, "dispatched": len(times), "failed": failed, "counters": counters,
            "decided_s": decided_s,
            "dispatch_ms": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
                            "max": float(ms.max())} if times else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("web", "hub"), default="web")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--capacity", type=int, default=200, help="the runner's capacity (spare: > sessions)")
    parser.add_argument("--within", type=float, default=60.0, help="deadline for the burst, seconds")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes during the burst")
    parser.add_argument("--cpus", default="", help="pin server, runner and load to these CPUs, e.g. 0 or 0,1")
    parser.add_argument("--no-mic", action="store_true", help="web mode: clients send no audio")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL (fresh schema), not SQLite")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    args = parser.parse_args()
    opts = Options(sessions=args.sessions, capacity=args.capacity, within_s=args.within, load=args.load,
                   cpus={int(c) for c in args.cpus.split(",") if c.strip()} or None, mic=not args.no_mic)
    with tempfile.TemporaryDirectory(prefix="burst-") as tmp:
        db = None
        if args.postgres:
            from tests.fixtures_db import DbFactory

            db = DbFactory("postgresql", Path(tmp))
            opts.database_url = db.new_url()
        try:
            run = web_burst if args.mode == "web" else hub_burst
            r = asyncio.run(run(opts, Path(tmp)))
        finally:
            if db is not None:
                db.cleanup()
    c, d = r["counters"], r["dispatch_ms"]
    where = f"pinned to CPU {args.cpus}" if args.cpus else f"{os.cpu_count()} cores"
    print(f"burst ({args.mode}): {r['sessions']} sessions at once, one runner (capacity {args.capacity}), "
          f"{args.load} busy processes, {where}, {'PostgreSQL' if args.postgres else 'SQLite'}"
          + (", no mic" if args.no_mic and args.mode == "web" else ""))
    print(f"  dispatched: {r['dispatched']}   failed: {sum(r['failed'].values())} {r['failed'] or ''}")
    print(f"  hub: jobs offered {c['jobs_offered']}, accepted {c['jobs_accepted']}, ack_timeouts "
          f"{c['acks_timed_out']}, acks past the deadline but waited for {c['acks_slow']}, late acks "
          f"{c['acks_late']}" + (f"; dispatch failures {r['dispatch_failures']}" if r.get("dispatch_failures")
                                 else ""))
    if d:
        what = "start → agent greeting" if args.mode == "web" else "dispatch() → bridge up"
        print(f"  time to dispatch ({what}): p50 {d['p50']:.0f} ms, p95 {d['p95']:.0f} ms, "
              f"max {d['max']:.0f} ms; all decided in {r['decided_s']:.1f} s")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
