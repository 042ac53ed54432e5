"""Prometheus `/metrics` for one app: the `Telemetry` that owns its registry, and the SIP workers' feed.

`setup_metrics(app)` (a route group) makes a `Telemetry` with its own `CollectorRegistry` (never the
process-global one: one test process builds many apps) and mounts `GET /metrics` (no auth; text format
0.0.4, or OpenMetrics when the scraper asks for it).

Sessions are counted from their typed events: the web edge calls `observe(app, session)` for each session
it creates. SIP sessions live in the media worker processes: there a `TelemetryForwarder`
(`telephony.relay_client`) sends the same events over the agent relay socket (`{"type": "telemetry",
"session_id", "direction", "event"}` frames on a socket whose first frame is `{"type": "telemetry"}`), and
`relay_telemetry` in serve feeds them to the same `Telemetry`. A worker's sessions still live when its
socket drops (it died) end as `worker_crashed`, which is also what the restarted worker writes to SQL for
them.

What other parts already count is read at scrape time (`_StateCollector`): the AgentHub's counters and
runner stats, the client edge's close reasons, the SIP supervisor's health.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from speechpipe.errors import Code
from speechpipe.pipeline import events as ev
from speechpipe.protocol import Direction
from speechpipe.websocket_edge.keys import CLIENT_EDGE_KEY, HUB_KEY, SIP_HEALTH_KEY

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
LIVE_DIRECTIONS: tuple[Direction, ...] = ("web", "inbound_phone")  # what the transports run today
# The events /metrics counts; the only ones a worker forwards.
COUNTED = ev.METERED
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
# Close names only admission gives (credentials, origin, capacity): a refused connection, not a session.
REFUSALS = frozenset({Code.TOKEN_MALFORMED, Code.TOKEN_UNKNOWN, Code.TOKEN_EXPIRED, Code.TOKEN_USED,
                      Code.TOKEN_WRONG_PIPE, Code.API_KEY_REVOKED, Code.UNAUTHORIZED, Code.PIPE_NOT_FOUND,
                      "origin_not_allowed", "unavailable"})
MAX_LABEL_VALUES = 64  # per label: end reasons come from agents, so they must not grow without bound
WORKER_LOST = "worker_crashed"


class _Labels:
    """Bounded label values: the first MAX_LABEL_VALUES distinct values, then "other"."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = str(value or "unknown")[:64]
        if text in self._seen:
            return text
        if len(self._seen) >= MAX_LABEL_VALUES:
            return "other"
        self._seen.add(text)
        return text


def _seconds(values: dict[str, Any], key: str, scale: float = 1000.0) -> float | None:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value) / scale


class Telemetry:
    """The app's registry and the counters sessions feed (local ones by `observe`, remote ones by
    `record`). All methods run on the app's loop."""

    def __init__(self, app: web.Application | None = None) -> None:
        self.app = app
        self.registry = r = CollectorRegistry(auto_describe=True)
        d = ["direction"]
        self.sessions_live = Gauge("speechpipe_sessions_live", "Sessions running now", d, registry=r)
        self.sessions_started = Counter("speechpipe_sessions_started", "Sessions started", d, registry=r)
        self.sessions_ended = Counter("speechpipe_sessions_ended", "Sessions ended, by end reason",
                                      ["direction", "end_reason"], registry=r)
        self.turns = Counter("speechpipe_turns", "Finished turns (user: transcribed or typed; agent: spoken "
                             "replies, cut ones included)", ["role", "direction"], registry=r)
        self.interrupted = Counter("speechpipe_agent_turns_interrupted", "Agent turns cut before their end "
                                   "(barge-in, superseded, session over)", d, registry=r)
        self.non_turns = Counter("speechpipe_user_non_turns", "User speech kept but not made a turn: "
                                 "backchannels over the agent, utterances with no meaningful words",
                                 ["kind", "direction"], registry=r)
        self.barge_ins = Counter("speechpipe_barge_ins", "Agent replies cut by the user speaking or typing",
                                 d, registry=r)
        self.response_latency = Histogram(
            "speechpipe_response_latency_seconds",
            "User's last voiced frame to the reply's first audio frame out", d, buckets=LATENCY_BUCKETS,
            registry=r)
        self.barge_in_reaction = Histogram(
            "speechpipe_barge_in_reaction_seconds", "User's speech onset to the last agent audio frame out, "
            "for a confirmed barge-in", d, buckets=FAST_BUCKETS, registry=r)
        self.stt_final = Histogram("speechpipe_stt_final_seconds", "End of utterance decided to its final "
                                   "text", d, buckets=FAST_BUCKETS, registry=r)
        self.stt_compute = Histogram("speechpipe_stt_compute_seconds", "STT compute per final transcript",
                                     d, buckets=FAST_BUCKETS, registry=r)
        self.stt_audio = Counter("speechpipe_stt_audio_seconds", "Audio in the final transcripts", d,
                                 registry=r)
        self.tts_first_audio = Histogram("speechpipe_tts_first_audio_seconds", "Sentence handed to TTS to "
                                         "its first synthesized audio", d, buckets=FAST_BUCKETS, registry=r)
        self.tts_compute = Histogram("speechpipe_tts_compute_seconds", "TTS time per sentence (waits for "
                                     "buffer space excluded)", d, buckets=FAST_BUCKETS, registry=r)
        self.tts_audio = Counter("speechpipe_tts_audio_seconds", "Audio synthesized", d, registry=r)
        self.partials_shed = Counter("speechpipe_stt_partials_shed", "Partial transcripts skipped because a "
                                     "final decode was waiting (shed first under load)", d, registry=r)
        self.stt_queue = Histogram("speechpipe_stt_queue_seconds", "Time a decode waited in the STT decode "
                                   "pool before it ran (final: ends a turn; speculative: at a pause)",
                                   ["direction", "kind"], buckets=FAST_BUCKETS, registry=r)
        for direction in LIVE_DIRECTIONS:  # every series exists from the start, so rate() sees the first one
            for kind in ("final", "speculative"):
                self.stt_queue.labels(direction, kind)
            for family in (self.sessions_live, self.sessions_started, self.interrupted, self.barge_ins,
                           self.response_latency, self.barge_in_reaction, self.stt_final, self.stt_compute,
                           self.stt_audio, self.tts_first_audio, self.tts_compute, self.tts_audio,
                           self.partials_shed):
                family.labels(direction)
            for role in ("user", "agent"):
                self.turns.labels(role, direction)
            for kind in ("backchannel", "noise"):
                self.non_turns.labels(kind, direction)
        self.dispatch_failures: collections.Counter[str] = collections.Counter()
        self._live: dict[str, tuple[str, object | None]] = {}  # session id → (direction, remote source)
        self._end_reasons = _Labels()
        self._failure_reasons = _Labels()
        r.register(_StateCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # ---- sessions -----------------------------------------------------------------------------------
    def observe(self, session: Any) -> None:
        """Count a local PipelineSession: subscribe before `session.start()`."""
        direction = session.info.direction

        def listener(event: ev.Event) -> None:
            if isinstance(event, COUNTED):
                self.record(str(session.session_id), direction, event.to_json())

        session.subscribe(listener)

    def record(self, session_id: str, direction: str, event: dict[str, Any],
               source: object | None = None) -> None:
        """One session event as JSON (`Event.to_json()`), local or forwarded by a worker (`source`)."""
        kind = event.get("type")
        d = direction if direction in LIVE_DIRECTIONS else "other"
        if kind == ev.SessionStarted.type:
            if session_id not in self._live:
                self._live[session_id] = (d, source)
                self.sessions_started.labels(d).inc()
                self.sessions_live.labels(d).inc()
        elif kind == ev.SessionEnded.type:
            self._ended(session_id, str(event.get("reason") or "unknown"))
        elif kind == ev.UserTurn.type:
            self.turns.labels("user", d).inc()
        elif kind == ev.UserNonTurn.type and event.get("kind") in ("backchannel", "noise"):
            self.non_turns.labels(str(event["kind"]), d).inc()
        elif kind == ev.AgentSpeechDone.type:
            self.turns.labels("agent", d).inc()
            if event.get("interrupted"):
                self.interrupted.labels(d).inc()
        elif kind == ev.BargeIn.type:
            self.barge_ins.labels(d).inc()
        elif kind == ev.Metric.type and isinstance(event.get("values"), dict):
            self._metric(d, str(event.get("name")), event["values"])

    def _ended(self, session_id: str, reason: str) -> None:
        live = self._live.pop(session_id, None)
        if live is None:  # never seen start, or already ended (a worker's socket dropped first)
            return
        direction = live[0]
        self.sessions_ended.labels(direction, self._end_reasons(reason)).inc()
        self.sessions_live.labels(direction).dec()

    def _metric(self, d: str, name: str, values: dict[str, Any]) -> None:
        def observe(histogram: Histogram, key: str) -> None:
            seconds = _seconds(values, key)
            if seconds is not None:
                histogram.labels(d).observe(seconds)

        if name == "turn":
            observe(self.response_latency, "response_latency_ms")
        elif name == "barge_in":
            observe(self.barge_in_reaction, "reaction_ms")
        elif name in ("stt", "tts"):
            first, compute, audio = ((self.stt_final, self.stt_compute, self.stt_audio) if name == "stt"
                                     else (self.tts_first_audio, self.tts_compute, self.tts_audio))
            observe(first, "final_ms" if name == "stt" else "first_audio_ms")
            observe(compute, "compute_ms")
            audio_s = _seconds(values, "audio_s", 1.0)
            if audio_s is not None:
                audio.labels(d).inc(audio_s)
        elif name == "stt_queue":
            for kind in ("final", "speculative"):
                seconds = _seconds(values, f"{kind}_wait_ms")
                if seconds is not None:
                    self.stt_queue.labels(d, kind).observe(seconds)
        elif name == "stt_partial_shed":
            count = values.get("count")
            if isinstance(count, int | float) and 0 < count < 1e6:
                self.partials_shed.labels(d).inc(count)

    def source_lost(self, source: object) -> None:
        """A worker's telemetry socket closed: its sessions still live died with it."""
        for session_id, (_, src) in list(self._live.items()):
            if src is source:
                self._ended(session_id, WORKER_LOST)

    def dispatch_failed(self, reason: str) -> None:
        self.dispatch_failures[self._failure_reasons(reason)] += 1


TELEMETRY_KEY = web.AppKey("speechpipe.telemetry", Telemetry)


def observe(app: web.Application, session: Any) -> None:
    """Count `session` on the app's /metrics (nothing if the app has none)."""
    telemetry = app.get(TELEMETRY_KEY)
    if telemetry is not None:
        telemetry.observe(session)


def count_dispatch_failure(app: web.Application, reason: str) -> None:
    """No agent took a session (web edge, relay): counted by reason on the app's /metrics."""
    telemetry = app.get(TELEMETRY_KEY)
    if telemetry is not None:
        telemetry.dispatch_failed(reason)


# ---- read at scrape time ------------------------------------------------------------------------------
class _StateCollector:
    """The figures other parts keep themselves, read when Prometheus scrapes."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def describe(self) -> list[Metric]:
        return []  # names vary with what the app has; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        app = self.telemetry.app
        for part in (self._dispatch, self._client_edge, self._sip):
            try:
                yield from part(app)
            except Exception:  # one broken source must not take /metrics down
                log.exception("metrics: %s failed", part.__name__)

    def _dispatch(self, app: web.Application | None) -> Iterable[Metric]:
        hub = app.get(HUB_KEY) if app is not None else None
        counters = dict(hub.counters) if hub is not None else {}
        failures = CounterMetricFamily("speechpipe_dispatch_failures", "Sessions no agent took, by reason",
                                       labels=["reason"])
        for reason, n in sorted(self.telemetry.dispatch_failures.items()):
            failures.add_metric([reason], n)
        yield failures
        if hub is None:
            return
        events = CounterMetricFamily("speechpipe_agent_hub_events", "AgentHub counters (dispatched, "
                                     "jobs_offered, acks_timed_out, runners_lost_*, ...)", labels=["event"])
        for key, n in sorted(counters.items())[:200]:
            events.add_metric([key[:64]], n)
        yield events
        yield from _per_runner(hub.runners())
        stats = hub.stats()
        yield GaugeMetricFamily("speechpipe_agent_runners_connected", "Runners connected",
                                value=stats.get("runners", 0))
        yield GaugeMetricFamily("speechpipe_agent_calls_live", "Sessions bridged to a runner now",
                                value=stats.get("live_calls", 0))
        yield GaugeMetricFamily("speechpipe_agent_offers_pending", "Jobs offered, not yet acknowledged",
                                value=stats.get("pending_offers", 0))
        per_agent = {name: GaugeMetricFamily(f"speechpipe_agent_{name}", doc, labels=["agent_id"])
                     for name, doc in (("runners", "Runners per agent id"),
                                       ("capacity", "Call capacity per agent id (draining runners excluded)"),
                                       ("load", "Calls held per agent id"))}
        for agent_id, figures in sorted(stats.get("agents", {}).items()):
            for name, family in per_agent.items():
                family.add_metric([str(agent_id)], figures.get(name, 0))
        yield from per_agent.values()

    def _client_edge(self, app: web.Application | None) -> Iterable[Metric]:
        edge = app.get(CLIENT_EDGE_KEY) if app is not None else None
        if edge is None:
            return
        closes = CounterMetricFamily("speechpipe_client_closes", "Client WebSocket connections closed, by "
                                     "close name", labels=["reason"])
        refusals = CounterMetricFamily("speechpipe_client_refusals", "Client connections refused before a "
                                       "session (token_*, api_key_revoked, origin, ...), by reason",
                                       labels=["reason"])
        for name, n in sorted(edge.closed_by.items()):
            closes.add_metric([name], n)
            if name in REFUSALS:
                refusals.add_metric([name], n)
        yield closes
        yield refusals
        yield GaugeMetricFamily("speechpipe_client_connections", "Client WebSocket connections open",
                                value=len(edge.connections))

    def _sip(self, app: web.Application | None) -> Iterable[Metric]:
        health_of = app.get(SIP_HEALTH_KEY) if app is not None else None
        if health_of is None:
            return
        health = health_of() if callable(health_of) else health_of
        labels = ["worker", "port"]
        restarts = CounterMetricFamily("speechpipe_sip_worker_restarts", "SIP media worker restarts",
                                       labels=labels)
        up = GaugeMetricFamily("speechpipe_sip_worker_up", "1 when the SIP worker is up", labels=labels)
        calls = GaugeMetricFamily("speechpipe_sip_worker_calls", "Calls on the SIP worker", labels=labels)
        for w in health.get("workers", []):
            key = [str(w["index"]), str(w["port"])]
            restarts.add_metric(key, w.get("restarts", 0))
            up.add_metric(key, 1 if w.get("state") == "up" else 0)
            calls.add_metric(key, w.get("calls", 0))
        yield from (restarts, up, calls)
        yield GaugeMetricFamily("speechpipe_sip_capacity", "Call capacity of the SIP workers that are up",
                                value=health.get("capacity", 0))


# ---- the route ----------------------------------------------------------------------------------------
async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[TELEMETRY_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def setup_metrics(app: web.Application) -> Telemetry:
    """Adds `GET /metrics` and the app's `Telemetry` (`app[TELEMETRY_KEY]`)."""
    telemetry = Telemetry(app)
    app[TELEMETRY_KEY] = telemetry
    app.router.add_get(METRICS_PATH, metrics)
    return telemetry


# ---- SIP workers: their sessions' events reach serve over the agent relay ---------------------------------
async def relay_telemetry(request: web.Request, ws: web.WebSocketResponse) -> web.WebSocketResponse:
    """Serve side of a worker's telemetry socket (the relay hands it over after the first frame)."""
    telemetry = request.app.get(TELEMETRY_KEY)
    source = object()
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            try:
                frame = msg.json()
                if telemetry is not None and frame.get("type") == "telemetry" and "event" in frame:
                    telemetry.record(str(frame["session_id"]), str(frame.get("direction")), frame["event"],
                                     source)
            except Exception:
                log.exception("relay: bad telemetry frame")
    finally:
        if telemetry is not None:
            telemetry.source_lost(source)
        await ws.close()
    return ws


def _per_runner(runners: list[dict[str, Any]]) -> Iterable[Metric]:
    """Each connected runner's offer answers: a runner that stops acking shows here before callers wait."""
    labels = ["runner_id", "agent_id"]
    acks = CounterMetricFamily("speechpipe_agent_runner_acks", "Offers a runner answered in time",
                               labels=labels)
    timeouts = CounterMetricFamily("speechpipe_agent_runner_ack_timeouts", "Offers a runner left unanswered "
                                   "past the ack deadline", labels=labels)
    late = CounterMetricFamily("speechpipe_agent_runner_acks_late", "Acks that came after the deadline",
                               labels=labels)
    rotation = GaugeMetricFamily("speechpipe_agent_runner_in_rotation", "1 if the runner gets offers, 0 "
                                 "while missed acks keep it out", labels=labels)
    for r in runners[:500]:
        key = [str(r["runner_id"]), str(r["agent_id"])]
        acks.add_metric(key, r.get("acks_total", 0))
        timeouts.add_metric(key, r.get("ack_timeouts_total", 0))
        late.add_metric(key, r.get("acks_late_total", 0))
        rotation.add_metric(key, 1 if r.get("in_rotation", True) else 0)
    yield from (acks, timeouts, late, rotation)
