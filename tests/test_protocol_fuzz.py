"""Fuzzing the agent channel's frames with hypothesis: the parsers alone, the replay books, and a live server
whose control and bridge sockets must answer every frame exactly as the protocol module predicts (an
`error` frame with the predicted code, or silence for valid frames) and never fall over.

The live part runs hypothesis in a worker thread with a blocking WebSocket client (`websockets.sync`)
while the test's event loop serves the real aiohttp app, hub and PipelineSession.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from speechpipe.runner import protocol as p
from tests.test_agent_channel import raw_register

pytestmark = pytest.mark.asyncio(loop_scope="session")

CODES = {v for k, v in vars(p.Codes).items() if not k.startswith("_")}
SPECS = {"control_from_runner": p.CONTROL_FROM_RUNNER, "control_from_server": p.CONTROL_FROM_SERVER,
         "bridge_from_runner": p.BRIDGE_FROM_RUNNER, "bridge_from_server": p.BRIDGE_FROM_SERVER}

scalars = (st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=True)
           | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
KIND_VALUES = {
    "str": st.text(max_size=24) | st.from_regex(p.AGENT_ID_RE, fullmatch=True) | st.just("blind"),
    "int": st.integers(-3, 40) | st.integers(2**53 - 2, 2**53 + 2),
    "num": st.floats(-1, 100) | st.integers(-1, 100),
    "bool": st.booleans(),
    "obj": st.dictionaries(st.text(max_size=8), scalars, max_size=3),
    "list": st.lists(st.text(max_size=12), max_size=4),
}


def frames(spec: p.Spec, types: list[str] | None = None) -> st.SearchStrategy[dict[str, Any]]:
    """Frames near the valid ones: a real (or bogus) type, its fields with right- or wrong-kind values."""
    names = sorted({n for fields in spec.values() for n in fields})

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        kind = draw(st.sampled_from(types or sorted(spec)) | st.just("bogus.type"))
        fields = spec.get(kind, {})
        frame: dict[str, Any] = {"type": kind}
        for name, f in fields.items():
            if draw(st.integers(0, 9)) == 0 and not name.startswith(("seq", "ack")):
                continue  # sometimes leave a field out
            if name in ("seq", "ack") and draw(st.booleans()):
                continue
            frame[name] = draw(KIND_VALUES[f.kind] if draw(st.integers(0, 4)) else json_values)
        for name in draw(st.lists(st.sampled_from(names), max_size=2)):
            frame.setdefault(name, draw(json_values))  # a stray field from another frame type
        return frame

    return build()


def raw_frames(spec: p.Spec, types: list[str] | None = None) -> st.SearchStrategy[str]:
    return (frames(spec, types).map(json.dumps) | st.text(max_size=60)
            | json_values.map(lambda v: json.dumps(v, allow_nan=True)))


# ---- the parsers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SPECS))
async def test_parsers_accept_valid_frames_and_name_every_bad_one(name: str) -> None:
    spec = SPECS[name]

    @settings(max_examples=400, deadline=None)
    @given(raw_frames(spec) | st.binary(max_size=20))
    def check(raw: str | bytes) -> None:
        try:
            frame = p.parse(raw, spec)
        except p.ProtocolError as exc:
            assert exc.code in CODES and exc.message
            assert exc.frame()["type"] == "error"
            return
        assert frame["type"] in spec
        for field, f in spec[frame["type"]].items():
            assert field in frame or not f.required
        json.dumps(frame, allow_nan=False)  # whatever passes is plain, finite JSON

    check()


async def test_outbox_replays_exactly_what_the_peer_missed() -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["send", "deliver", "drop"]), st.integers(0, 3)), max_size=60))
    def check(ops: list[tuple[str, int]]) -> None:
        out, inbox = p.Outbox(limit=10_000), p.Inbox()
        wire: list[dict[str, Any]] = []  # frames in flight
        got: list[int] = []
        n = 0
        for op, k in ops:
            if op == "send":
                n += 1
                wire.append(out.stamp({"type": "user.text", "turn_id": n, "text": "x"}))
            elif op == "deliver":
                for frame in wire[:k + 1]:
                    if inbox.accept(frame):
                        got.append(frame["turn_id"])
                del wire[:k + 1]
                out.ack(inbox.last_seq)
            else:  # the socket drops: in-flight frames are lost, the peer redials and we replay
                wire.clear()
                replay = out.replay_after(inbox.last_seq)
                assert replay is not None
                wire.extend(replay)
        for frame in out.replay_after(inbox.last_seq) or []:
            if inbox.accept(frame):
                got.append(frame["turn_id"])
        assert got == list(range(1, n + 1))  # every frame, once, in order

    check()
    small = p.Outbox(limit=2)
    for i in range(4):
        small.stamp({"type": "x", "i": i})
    assert small.replay_after(0) is None and [f["i"] for f in small.replay_after(2) or []] == [2, 3]


# ---- the live server ---------------------------------------------------------------------------------------
EVENTS_FROM_SPEECH = {"agent.speech_done", "metric", "user.interrupted"}


def _exchange(ws: ClientConnection, raws: list[str], expect: list[str | None]) -> None:
    """Send `raws`, then the sentinel; the replies must be the expected error codes, in order."""
    for raw in raws:
        ws.send(raw)
    ws.send("sentinel-not-json")
    got: list[str] = []
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] in ("heartbeat", "ack") or frame["type"] in EVENTS_FROM_SPEECH:
            continue  # the session's own events, e.g. agent.speech_done after a fuzzed agent.say played
        assert frame["type"] == "error" and frame["message"], frame
        got.append(frame["code"])
        if len(got) == len([e for e in expect if e]) + 1:
            break
    assert got[-1] == "invalid_json"
    assert got[:-1] == [e for e in expect if e], list(zip(raws, expect, strict=True))


def _predict_control(raw: str) -> str | None:
    try:
        frame = p.parse(raw, p.CONTROL_FROM_RUNNER)
    except p.ProtocolError as exc:
        return exc.code
    return {"register": "out_of_order", "job.ack": "unknown_job"}.get(frame["type"])


def _predict_prehello(raw: str) -> str | None:
    try:
        frame = p.parse(raw, p.BRIDGE_FROM_RUNNER)
    except p.ProtocolError as exc:
        return exc.code
    return "out_of_order" if frame["type"] != "hello" else "?"


async def test_live_control_and_bridge_answer_every_frame_as_predicted(agent_channel) -> None:
    ch = await agent_channel(max_errors=10_000, heartbeat_interval_s=30.0)
    ws_url = ch.url.replace("http", "ws")
    auth = {"Authorization": f"Bearer {ch.api_key}"}

    def fuzz() -> None:
        with connect(f"{ws_url}/v1/agents/connect", additional_headers=auth) as control:
            control.send(json.dumps({"type": "register", "agent_id": "fuzz", "capacity": 1,
                                     "worker_id": "fz"}))
            assert json.loads(control.recv(timeout=10))["type"] == "registered"

            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
            @given(st.lists(raw_frames(p.CONTROL_FROM_RUNNER), min_size=1, max_size=6))
            def control_frames(raws: list[str]) -> None:
                _exchange(control, raws, [_predict_control(r) for r in raws])

            control_frames()

        with connect(f"{ws_url}/v1/agents/bridge/sess_fuzz") as bridge:
            types = [t for t in p.BRIDGE_FROM_RUNNER if t != "hello"]

            @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
            @given(st.lists(raw_frames(p.BRIDGE_FROM_RUNNER, types), min_size=1, max_size=6))
            def prehello_frames(raws: list[str]) -> None:
                raws = [r for r in raws if _predict_prehello(r) != "?"]  # a hello would end the socket
                _exchange(bridge, raws, [_predict_prehello(r) for r in raws])

            prehello_frames()

    await asyncio.to_thread(fuzz)
    assert ch.hub.counters["protocol_errors"] > 300
    # Still serving: a real runner registers and takes a call.
    await ch.runner()
    call = await ch.call()
    assert call.attached and await call.ask("still alive") == "You said: still alive"


async def test_live_bridge_after_hello_answers_as_predicted(agent_channel) -> None:
    """Agent verbs with random fields against a live session: right ones act, wrong ones get errors."""
    import aiohttp

    ch = await agent_channel(max_errors=10_000, heartbeat_interval_s=30.0)  # the raw runner never beats
    # Verbs that would end or move the call, or whose answer comes later from the session, are left out.
    types = [t for t in p.BRIDGE_FROM_RUNNER
             if t not in ("hello", "agent.end_call", "agent.dispatch", "agent.transfer", "agent.interrupt")]
    async with aiohttp.ClientSession() as http:
        control = await raw_register(http, ch, "fuzz")
        attaching = asyncio.ensure_future(ch.call("fuzz", speed=8))
        job = await control.recv()
        await control.send({"type": "job.ack", "job_id": job["job_id"], "accepted": True})

        def fuzz() -> None:
            with connect(job["bridge_url"]) as bridge:
                bridge.send(json.dumps({"type": "hello", "protocol": 1, "call_token": job["call_token"]}))
                assert json.loads(bridge.recv(timeout=10))["type"] == "hello.ack"
                assert json.loads(bridge.recv(timeout=10))["type"] == "call.started"
                model = p.Inbox()

                def predict(raw: str) -> str | None:
                    try:
                        frame = p.parse(raw, p.BRIDGE_FROM_RUNNER)
                    except p.ProtocolError as exc:
                        return exc.code
                    if not model.accept(frame) or frame["type"] == "ack":
                        return None
                    if frame["type"] in ("agent.text.delta", "agent.text.end"):
                        return "unknown_turn"  # no user turn was ever sent on this bridge
                    return None

                @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
                @given(st.lists(raw_frames(p.BRIDGE_FROM_RUNNER, types), min_size=1, max_size=5))
                def verbs(raws: list[str]) -> None:
                    _exchange(bridge, raws, [predict(r) for r in raws])

                verbs()

        fuzzing = asyncio.ensure_future(asyncio.to_thread(fuzz))
        call = await attaching
        await fuzzing
    assert call.attached and not call.session.ended.is_set()  # nothing the agent sent broke the session
    assert ch.hub.counters["protocol_errors"] > 20
