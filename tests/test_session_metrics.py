"""Per-session metrics in `sessions.metrics`: the shape `PipelineSession.metrics_summary` gives, written with
`Store.end_session`, read back with plain SQL on SQLite (json_extract) and PostgreSQL (->>), and by REST.

The README's SQL section shows the same queries.
"""

from __future__ import annotations

import aiohttp
from sqlalchemy import text

from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.session import MAX_TURN_LATENCIES, Engines, PipelineSession, SessionInfo
from speechpipe.storage import Store

from .fixtures_db import LiveServer

# One query per dialect: sessions with an interruption, their counts, first latency and median response.
SQL = {
    "sqlite": """
        SELECT id, end_reason, json_extract(metrics, '$.interruptions'),
               json_extract(metrics, '$.user_turns'), json_extract(metrics, '$.turn_latencies_ms[0]'),
               json_array_length(metrics, '$.turn_latencies_ms'), json_extract(metrics, '$.response_ms.p50')
        FROM sessions WHERE pipe_id = :pipe AND json_extract(metrics, '$.interruptions') >= 1""",
    "postgresql": """
        SELECT id, end_reason, (metrics->>'interruptions')::int, (metrics->>'user_turns')::int,
               (metrics->'turn_latencies_ms'->>0)::int, jsonb_array_length(metrics->'turn_latencies_ms'),
               (metrics->'response_ms'->>'p50')::float
        FROM sessions WHERE pipe_id = :pipe AND (metrics->>'interruptions')::int >= 1""",
}


def summary(engines: Engines, pipe_id: str, latencies: list[float], **counts: int) -> dict:
    """The metrics a session with these figures stores (its real summary code; no call needed)."""
    session = PipelineSession(SessionInfo(pipe_id=pipe_id, agent_id="metrics-bot", direction="web"),
                              PipeConfig(agent_id="metrics-bot"), engines)
    session.metrics["response_ms"].extend(latencies)
    session.counts.update(counts)
    return session.metrics_summary()


async def test_session_metrics_are_queryable_with_plain_sql_and_rest(live_server: LiveServer) -> None:
    store: Store = live_server.store
    engines = Engines(stt_threads=1)
    pipe = store.create_pipe({"agent_id": "metrics-bot"}).id
    talky = store.create_session(pipe, "metrics-bot", "web")
    quiet = store.create_session(pipe, "metrics-bot", "web")
    talky_metrics = summary(engines, pipe, [812.4, 640.6, 1203.7], user_turns=3, agent_turns=4,
                            interruptions=1, false_barge_ins=2)
    assert talky_metrics["turn_latencies_ms"] == [812, 641, 1204]
    assert talky_metrics["response_ms"] == {"count": 3, "p50": 812.4, "p95": 1164.6, "max": 1203.7}
    store.end_session(talky, "client_stop", metrics=talky_metrics)
    store.end_session(quiet, "no_agent", metrics=summary(engines, pipe, []))

    with store.engine.connect() as conn:
        rows = conn.execute(text(SQL[store.engine.dialect.name]), {"pipe": pipe}).all()
    assert [tuple(r) for r in rows] == [(talky, "client_stop", 1, 3, 812, 3, 812.4)]

    # Everything else in the row is plain JSON too: REST returns it as stored.
    async with aiohttp.ClientSession(headers=live_server.auth) as http:
        async with http.get(f"{live_server.url}/v1/sessions/{talky}") as resp:
            assert resp.status == 200
            body = await resp.json()
        async with http.get(f"{live_server.url}/v1/sessions/{quiet}") as resp:
            quiet_body = await resp.json()
    assert body["metrics"] == talky_metrics and body["end_reason"] == "client_stop"
    assert quiet_body["metrics"] == {"user_turns": 0, "agent_turns": 0, "interruptions": 0,
                                     "false_barge_ins": 0, "non_turns": 0, "turn_latencies_ms": []}
    engines.executor.shutdown()


def test_a_long_calls_latency_list_is_capped_but_its_summary_counts_every_turn(store: Store) -> None:
    engines = Engines(stt_threads=1)
    pipe = store.create_pipe({"agent_id": "metrics-bot"}).id
    sid = store.create_session(pipe, "metrics-bot", "inbound_phone")
    metrics = summary(engines, pipe, [500.0 + i for i in range(MAX_TURN_LATENCIES + 100)], user_turns=600)
    store.end_session(sid, "caller_hangup", metrics=metrics)
    length = {"sqlite": "json_array_length(metrics, '$.turn_latencies_ms')",
              "postgresql": "jsonb_array_length(metrics->'turn_latencies_ms')"}[store.engine.dialect.name]
    count = {"sqlite": "json_extract(metrics, '$.response_ms.count')",
             "postgresql": "(metrics->'response_ms'->>'count')::int"}[store.engine.dialect.name]
    with store.engine.connect() as conn:
        row = conn.execute(text(f"SELECT {length}, {count} FROM sessions WHERE id = :s"), {"s": sid}).one()
    assert tuple(row) == (MAX_TURN_LATENCIES, MAX_TURN_LATENCIES + 100)
    assert store.get_session(sid).metrics["turn_latencies_ms"][-1] == 500 + MAX_TURN_LATENCIES - 1
    engines.executor.shutdown()
