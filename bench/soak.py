"""Soak: N web sessions kept going on two `serve` nodes for a bounded time, loopback only.

    .venv/bin/python -m bench.soak                          # 4 sessions, 3 minutes
    .venv/bin/python -m bench.soak --sessions 6 --minutes 5 --turns 4

Starts two real nodes (A, B) on loopback against the machine's PostgreSQL (a fresh schema, dropped after)
and Redis (a cluster name of its own), one echo runner connected to each node, then N raw WebSocket clients,
alternately on A and B. Each client loops until the time is up: open a session (token from the node's REST
API), say `--turns` espeak-ng sentences at real time and wait for each answer, stop. With runners on both
nodes, dispatch picks the least-loaded runner cluster-wide, so sessions cross nodes.

Reports:
- sessions completed (closed 1000 by a client stop) and failed,
- turns lost: user turns the clients saw answered but SQL does not hold, plus sentences never answered
  (must be 0),
- memory growth per node: RSS after the first round (models loaded) vs at the end, in MiB and MiB/minute,
- response latency p50/p95 (the server's `metric` events: end of the user's speech → first agent frame),
- how many sessions each node gave to a runner of the other node (its /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from tests.nodes import Cluster, Talker, hub_events
from tests.speech import synth

SENTENCES = ("What time does the shop open tomorrow?", "Please send me the invoice by email.",
             "I would like to book a table for two.", "Can you check the status of my order?",
             "The delivery was supposed to arrive on Tuesday.")


class Stats:
    def __init__(self) -> None:
        self.completed = 0
        self.failed: list[str] = []
        self.unanswered = 0
        self.answered = 0
        self.latencies_ms: list[float] = []
        self.sessions: list[tuple[str, int]] = []  # (session_id, turns the client saw answered)
        self.by_node: dict[str, int] = {}


async def client_loop(http: aiohttp.ClientSession, cluster: Cluster, node: str, turns: int, until: float,
                      speech: list[np.ndarray], stats: Stats, first_round: asyncio.Event) -> None:
    while time.monotonic() < until:
        talker = Talker(http, cluster.nodes[node], cluster.api_key, cluster.pipe_id)
        answered = 0
        try:
            await talker.open()
            for i in range(turns):
                heard, answer = await talker.say(SENTENCES[i % len(SENTENCES)], speech[i % len(speech)])
                if answer == f"You said: {heard}":
                    answered += 1
                else:
                    stats.unanswered += 1
            stats.latencies_ms += talker.latencies_ms
            code, reason = await talker.close()
            if code != 1000:
                raise RuntimeError(f"closed {code} {reason}")
            stats.completed += 1
            stats.by_node[node] = stats.by_node.get(node, 0) + 1
            stats.sessions.append((talker.session_id, answered))
        except Exception as exc:  # a failure is a result: count it, go on
            stats.failed.append(f"{node} {talker.session_id}: {type(exc).__name__}: {exc}"[:300])
            stats.unanswered += turns - answered
        stats.answered += answered
        first_round.set()


async def soak(n: int, minutes: float, turns: int, tmp: Path) -> None:
    cluster = Cluster(tmp)
    try:
        nodes = await cluster.start_nodes("A", "B")
        await cluster.start_runner("ra", "A", capacity=n)
        await cluster.start_runner("rb", "B", capacity=n)
        speech = [synth(s) for s in SENTENCES]
        stats = Stats()
        first_round = asyncio.Event()
        until = time.monotonic() + minutes * 60
        async with aiohttp.ClientSession() as http:
            clients = [asyncio.ensure_future(client_loop(http, cluster, "AB"[i % 2], turns, until, speech,
                                                         stats, first_round)) for i in range(n)]
            await first_round.wait()
            rss0 = {node.name: node.rss_kib() for node in nodes}
            t0 = time.monotonic()
            await asyncio.gather(*clients)
            rss1 = {node.name: node.rss_kib() for node in nodes}
            span_min = (time.monotonic() - t0) / 60
            crossed = {node.name: (await hub_events(http, node.base)).get("jobs_accepted_by_peers", 0)
                       for node in nodes}
        lost = 0
        for session_id, answered in stats.sessions:
            rows = cluster.store.list_turns(session_id)
            pairs = sum(1 for t in rows if t.role == "user")
            lost += max(0, answered - pairs)
        lat = np.array(stats.latencies_ms) if stats.latencies_ms else np.array([np.nan])
        print(f"\nsoak: {n} sessions on 2 nodes for {minutes:g} min, {turns} turns per session")
        print(f"  sessions completed: {stats.completed} (A {stats.by_node.get('A', 0)}, "
              f"B {stats.by_node.get('B', 0)}); failed: {len(stats.failed)}")
        print(f"  turns answered: {stats.answered}; turns lost: {lost + stats.unanswered} "
              f"(missing in SQL {lost}, never answered {stats.unanswered})")
        print(f"  response latency: p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms "
              f"over {len(stats.latencies_ms)} turns")
        print("  sessions answered by a runner of the other node: "
              + ", ".join(f"held by {n} {c}" for n, c in crossed.items()))
        for name in rss0:
            growth = (rss1[name] - rss0[name]) / 1024
            print(f"  node {name} RSS: {rss0[name] / 1024:.0f} → {rss1[name] / 1024:.0f} MiB "
                  f"({growth:+.1f} MiB, {growth / max(span_min, 1e-9):+.2f} MiB/min)")
        for line in stats.failed[:10]:
            print(f"  failure: {line}")
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="speechpipe-soak-") as tmp:
        asyncio.run(soak(args.sessions, args.minutes, args.turns, Path(tmp)))


if __name__ == "__main__":
    main()
