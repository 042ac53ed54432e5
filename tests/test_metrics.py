"""`GET /metrics` against what real sessions did: web sessions, a refused token, phone sessions via the relay.

The server is this module's own (`create_app` with every route group, the agent relay and a SIP supervisor
whose worker command fails at once), so its counters start at zero; the tests still compare deltas (a
scrape before, one after), so their order does not matter. Web sessions are raw WebSocket clients sending
espeak speech and typed text to the in-process example agents; what /metrics says is checked against the
events the clients received (each turn's `metric` event) and the turns in SQL. Phone sessions run in this
process like a SIP worker runs them: their events reach serve through `TelemetryForwarder` over the relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import CallbackAgent, echo_reply
from speechpipe.pipeline.call import connect_agent
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.realtime import RealtimeLine
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo
from speechpipe.protocol import RELAY_PATH
from speechpipe.settings import Settings
from speechpipe.storage import AsyncStore, Store
from speechpipe.telephony.relay_client import RelayAgentLink, TelemetryForwarder
from speechpipe.telephony.supervisor import SipSupervisor
from speechpipe.websocket_edge.agent_relay import setup_agent_relay
from speechpipe.websocket_edge.app import SIP_HEALTH_KEY, create_app
from speechpipe.websocket_edge.client_ws import CLIENT_EDGE_KEY

from .fixtures_db import serve_in_thread
from .fixtures_web import WebServer, example_agents, web_route_groups
from .speech import silence, synth

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECRET = "metrics-test-internal-secret"
SIP_KEY = web.AppKey("test_metrics.sip", SipSupervisor)
RESTARTS = "speechpipe_sip_worker_restarts_total"
SENTENCE = "Can you tell me when the pharmacy opens tomorrow?"


class Scrape:
    """One /metrics scrape: sample values by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every series of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and want <= set(lab))

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


async def scrape(http: aiohttp.ClientSession, srv: WebServer) -> Scrape:
    async with http.get(f"{srv.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(await resp.text())


async def scrape_until(http: aiohttp.ClientSession, srv: WebServer, ready: Any,
                       timeout_s: float = 15) -> Scrape:
    """Scrape until `ready(scrape)` holds (closes and relayed events are counted moments after the fact)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await scrape(http, srv)
        if ready(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def metrics_server(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    data = tmp_path_factory.mktemp("metrics")
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data / 'speechpipe.db'}")
    settings.ensure_dirs()
    store = Store(settings.db_url)
    store.upgrade()

    def make_app() -> Any:
        app = create_app(settings, store, route_groups=web_route_groups())
        app[CLIENT_EDGE_KEY].use(engines=engines, agent_factory=example_agents)
        setup_agent_relay(app, SECRET)
        # A real supervisor whose worker exits at once: its restarts are what /metrics must show.
        sip = SipSupervisor(settings, workers=1, port_base=5990, command_prefix=["sh", "-c", "exit 3", "sh"],
                            backoff_initial_s=0.05, backoff_max_s=0.2)
        app[SIP_HEALTH_KEY] = sip.health
        app[SIP_KEY] = sip
        return app

    srv = serve_in_thread(make_app, name="metrics-server", start_timeout_s=60, shutdown_timeout_s=10)
    server = WebServer(url=f"http://127.0.0.1:{srv.port}", settings=settings, store=store, app=srv.app,
                       _loop=srv.loop, _runner=srv.runner, _thread=srv.thread)
    yield server
    server.stop()
    store.close()


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def metric_values(client: Any, name: str) -> list[dict[str, float]]:
    return [m["values"] for m in client.of("metric") if m["name"] == name]


# ------------------------------------------------------------------------------------------ web sessions


async def test_web_sessions_turns_latencies_refusals_and_dispatch_failures(metrics_server, raw_connect, http):
    srv = metrics_server
    before = await scrape(http, srv)
    echo, talker, absent = srv.pipe("echo"), srv.pipe("long-talker"), srv.pipe("absent")

    # Two refused connections: an expired token and a malformed one.
    expired = srv.token(echo, ttl_s=0.2)
    await asyncio.sleep(0.4)
    for token, name in ((expired, "token_expired"), ("not-a-token", "token_malformed")):
        refused = await raw_connect(srv.ws_url(echo, token))
        code, reason = await refused.closed(10)
        assert reason.startswith(name), (code, reason)

    # A: one spoken turn and one typed turn, both answered by the echo agent.
    a = await raw_connect(srv.ws_url(echo, srv.token(echo)))
    await a.send_json({"type": "start", "sample_rate": 16000})
    (a_started,) = await a.wait_for("session.started")
    # B: the long talker, cut off by a typed barge-in, then answered again.
    b = await raw_connect(srv.ws_url(talker, srv.token(talker)))
    await b.send_json({"type": "start", "sample_rate": 16000})
    (b_started,) = await b.wait_for("session.started")
    live = await scrape(http, srv)
    assert delta(live, before, "speechpipe_sessions_live", direction="web") == 2
    assert delta(live, before, "speechpipe_sessions_started_total", direction="web") == 2

    await a.stream(np.concatenate([silence(300), synth(SENTENCE), silence(800)]), 16000)
    await a.wait_for("user_turn")
    await a.wait_for("agent.speech_done", timeout_s=20)
    await a.send_json({"type": "text", "text": "hello there"})
    await a.wait_for("agent.speech_done", 2, timeout_s=20)

    await b.send_json({"type": "text", "text": "What are your opening hours?"})
    await b.wait_for("agent.speech_started", timeout_s=20)
    await asyncio.sleep(1.0)  # the agent talks for a while
    await b.send_json({"type": "text", "text": "Stop, I want to speak to a person."})
    await b.wait_for("barge_in", timeout_s=10)
    await b.wait_for("agent.speech_started", 2, timeout_s=20)  # the answer to the second turn plays

    for client in (a, b):
        await client.send_json({"type": "stop"})
        assert await client.closed() == (1000, "normal: client_stop")

    # C: a pipe whose agent no runner serves: the apology, then the session ends as `no_runner`.
    c = await raw_connect(srv.ws_url(absent, srv.token(absent)))
    await c.send_json({"type": "start", "sample_rate": 16000})
    (c_started,) = await c.wait_for("session.started")
    assert await c.closed(30) == (1000, "normal: no_runner")

    sessions = [a_started["session_id"], b_started["session_id"], c_started["session_id"]]
    records = [await srv.ended(sid) for sid in sessions]
    assert [r.end_reason for r in records] == ["client_stop", "client_stop", "no_runner"]
    turns = [t for sid in sessions for t in srv.turns(sid)]

    after = await scrape_until(http, srv, lambda m: delta(m, before, "speechpipe_client_closes_total",
                                                          reason="normal") >= 3)
    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    # Sessions: started, ended by reason, none live any more.
    assert d("speechpipe_sessions_started_total", direction="web") == 3
    assert d("speechpipe_sessions_ended_total", direction="web", end_reason="client_stop") == 2
    assert d("speechpipe_sessions_ended_total", direction="web", end_reason="no_runner") == 1
    ended = "speechpipe_sessions_ended_total"
    assert after.total(ended) - before.total(ended) == 3
    assert after.get("speechpipe_sessions_live", direction="web") == 0
    assert d("speechpipe_sessions_started_total", direction="inbound_phone") == 0

    # Turns: what SQL holds. A: 2 user + 2 agent; B: 2 typed user + 2 cut agent turns; C: the apology.
    user = sum(1 for t in turns if t.role == "user")
    agent = sum(1 for t in turns if t.role == "agent")
    cut = sum(1 for t in turns if t.role == "agent" and t.interrupted)
    assert (user, agent, cut) == (4, 5, 2)
    assert d("speechpipe_turns_total", role="user", direction="web") == user
    assert d("speechpipe_turns_total", role="agent", direction="web") == agent
    assert d("speechpipe_agent_turns_interrupted_total", direction="web") == cut
    assert d("speechpipe_barge_ins_total", direction="web") == len(b.of("barge_in")) == 1

    # Histograms: one observation per metric event the sessions reported, summing to the same seconds.
    latencies = [v["response_latency_ms"] for c in (a, b, c) for v in metric_values(c, "turn")]
    assert len(latencies) == 4  # A's two answers, B's two (the cut one started playing)
    assert d("speechpipe_response_latency_seconds_count", direction="web") == len(latencies)
    assert d("speechpipe_response_latency_seconds_sum", direction="web") == pytest.approx(
        sum(latencies) / 1000, abs=1e-6)
    reactions = metric_values(b, "barge_in")
    assert d("speechpipe_barge_in_reaction_seconds_count", direction="web") == len(reactions) == 1
    stt = [v for c in (a, b, c) for v in metric_values(c, "stt")]
    assert len(stt) >= 1
    assert d("speechpipe_stt_final_seconds_count", direction="web") == len(stt)
    assert d("speechpipe_stt_compute_seconds_sum", direction="web") == pytest.approx(
        sum(v["compute_ms"] for v in stt) / 1000, abs=1e-6)
    assert d("speechpipe_stt_audio_seconds_total", direction="web") == pytest.approx(
        sum(v["audio_s"] for v in stt), abs=1e-6)
    queue = [v for c in (a, b, c) for v in metric_values(c, "stt_queue")]
    finals = [v["final_wait_ms"] for v in queue if "final_wait_ms" in v]
    assert len(finals) >= 1  # the decodes that ended turns, and how long they queued
    assert d("speechpipe_stt_queue_seconds_count", direction="web", kind="final") == len(finals)
    assert d("speechpipe_stt_queue_seconds_sum", direction="web", kind="final") == pytest.approx(
        sum(finals) / 1000, abs=1e-6)
    tts = [v for c in (a, b, c) for v in metric_values(c, "tts")]
    assert len(tts) >= agent  # at least one synthesized sentence per spoken agent turn
    assert all(0 < v["first_audio_ms"] <= v["compute_ms"] and v["audio_s"] > 0 for v in tts), tts
    assert d("speechpipe_tts_first_audio_seconds_count", direction="web") == len(tts)
    assert d("speechpipe_tts_audio_seconds_total", direction="web") == pytest.approx(
        sum(v["audio_s"] for v in tts), abs=1e-6)

    # Refusals and closes from the client edge; the no-agent session as a dispatch failure.
    assert d("speechpipe_client_refusals_total", reason="token_expired") == 1
    assert d("speechpipe_client_refusals_total", reason="token_malformed") == 1
    assert d("speechpipe_client_closes_total", reason="normal") == 3
    assert d("speechpipe_dispatch_failures_total", reason="no_runner") == 1
    assert after.get("speechpipe_agent_runners_connected") == 0
    assert after.get("speechpipe_client_connections") == 0


# -------------------------------------------------------------------------------- phone sessions (relay)


async def _phone_session(srv: WebServer, astore: AsyncStore, forwarder: TelemetryForwarder, engines: Engines,
                         agent_id: str, tmp: Path) -> tuple[PipelineSession, RealtimeLine, list[ev.Event]]:
    """A session as a SIP worker makes one: 8 kHz, `inbound_phone`, its events forwarded to serve."""
    config = PipeConfig(agent_id=agent_id)
    info = SessionInfo(pipe_id=srv.pipe(agent_id), agent_id=agent_id, direction="inbound_phone",
                       caller="5551234")
    session = PipelineSession(info, config, engines, input_rate=8000, output_rate=8000, store=astore,
                              recordings_dir=tmp)
    events: list[ev.Event] = []
    session.subscribe(events.append)
    forwarder.observe(session)
    await session.start()
    return session, RealtimeLine(session), events


async def test_phone_sessions_count_through_the_relay(metrics_server, engines, http, tmp_path):
    srv = metrics_server
    before = await scrape(http, srv)
    astore = AsyncStore(srv.store, max_workers=2)
    forwarder = TelemetryForwarder(srv.url, SECRET)
    try:
        # P1: answered by an agent in the worker; one spoken turn, then the caller hangs up.
        p1, line, p1_events = await _phone_session(srv, astore, forwarder, engines, "echo", tmp_path)
        await p1.attach_agent(CallbackAgent(echo_reply))
        await line.play(np.concatenate([synth(SENTENCE, rate=8000), silence(800, 8000)]))
        assert await line.until(lambda: any(isinstance(e, ev.AgentSpeechDone) for e in p1_events), 20)
        await line.silence(0.2)
        await p1.end("caller_hangup")

        # P2: the worker asks serve's hub through the relay; no runner: the apology, then the hub's reason.
        p2, line2, p2_events = await _phone_session(srv, astore, forwarder, engines, "absent", tmp_path)
        assert not await connect_agent(p2, lambda s: RelayAgentLink.open(srv.url, SECRET, s))
        # `ended` is set as the end begins; session.ended is emitted once the row and recording are closed.
        assert await line2.until(lambda: any(isinstance(e, ev.SessionEnded) for e in p2_events), 20)
        await forwarder.close(10)
        assert forwarder.pending == 0
    finally:
        await forwarder.close(0)
        astore.close(wait=True)

    # P3: a worker that dies with a call up: its socket drops, the session ends as `worker_crashed`.
    async with http.ws_connect(srv.url + RELAY_PATH, headers={"Authorization": f"Bearer {SECRET}"}) as ws:
        await ws.send_json({"type": "telemetry"})
        started = ev.SessionStarted("sess_crashed_call", 8000, 8000, "inbound_phone")
        await ws.send_json({"type": "telemetry", "session_id": started.session_id,
                            "direction": "inbound_phone", "event": started.to_json()})
        await scrape_until(http, srv, lambda m: delta(m, before, "speechpipe_sessions_started_total",
                                                      direction="inbound_phone") == 3)
        mid = await scrape(http, srv)
        assert delta(mid, before, "speechpipe_sessions_live", direction="inbound_phone") == 1

    after = await scrape_until(
        http, srv, lambda m: m.get("speechpipe_sessions_live", direction="inbound_phone") == 0)

    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    assert d("speechpipe_sessions_started_total", direction="inbound_phone") == 3
    for reason in ("caller_hangup", "no_runner", "worker_crashed"):
        assert d("speechpipe_sessions_ended_total", direction="inbound_phone", end_reason=reason) == 1, reason
    assert after.get("speechpipe_sessions_live", direction="inbound_phone") == 0
    assert d("speechpipe_sessions_started_total", direction="web") == 0

    turns = [t for s in (p1, p2) for t in srv.turns(str(s.session_id))]
    user = sum(1 for t in turns if t.role == "user")
    agent = sum(1 for t in turns if t.role == "agent")
    assert (user, agent) == (1, 2)  # P1's turn and answer, P2's apology
    assert d("speechpipe_turns_total", role="user", direction="inbound_phone") == user
    assert d("speechpipe_turns_total", role="agent", direction="inbound_phone") == agent
    latencies = [e.values["response_latency_ms"] for e in p1_events if isinstance(e, ev.Metric)
                 and e.name == "turn"]
    assert len(latencies) == 1
    assert d("speechpipe_response_latency_seconds_count", direction="inbound_phone") == 1
    assert d("speechpipe_response_latency_seconds_sum", direction="inbound_phone") == pytest.approx(
        latencies[0] / 1000, abs=1e-6)
    assert d("speechpipe_stt_final_seconds_count", direction="inbound_phone") >= 1
    assert d("speechpipe_tts_first_audio_seconds_count", direction="inbound_phone") >= 2
    # The relay's failed dispatch is a dispatch failure; nothing of the telemetry went to the hub.
    assert d("speechpipe_dispatch_failures_total", reason="no_runner") == 1
    assert d("speechpipe_agent_hub_events_total", event="dispatched") == 0


# ------------------------------------------------------------------------------------ scrape-time state


async def test_sip_worker_restarts_and_openmetrics(metrics_server, http):
    srv = metrics_server
    sip = srv.app[SIP_KEY]
    worker = {"worker": "0", "port": "5990"}
    asyncio.run_coroutine_threadsafe(sip.start(wait_ready_s=None), srv._loop).result(10)
    try:
        got = await scrape_until(http, srv, lambda m: m.get(RESTARTS, **worker) >= 2)
        assert got.get(RESTARTS, **worker) >= 2
        assert got.get("speechpipe_sip_worker_up", **worker) == 0
    finally:
        asyncio.run_coroutine_threadsafe(sip.stop(timeout_s=5), srv._loop).result(20)
    restarts = sip.health()["workers"][0]["restarts"]
    final = await scrape(http, srv)
    assert final.get(RESTARTS, **worker) == restarts

    # A Prometheus server asking for OpenMetrics gets it; no API key is needed either way.
    async with http.get(f"{srv.url}/metrics", headers={"Accept": "application/openmetrics-text; "
                                                                  "version=1.0.0"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        body = await resp.text()
    assert body.rstrip().endswith("# EOF") and "speechpipe_sessions_live" in body
