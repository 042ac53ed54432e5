"""The agent channel, server side, against real runner processes: dispatch, failover, capacity, load sharing,
crashes, frozen runners, bridge drops, drain, call-token scope, and bad frames on both sockets.

Runners are `tests/agent_probe.py` subprocesses dialling a real aiohttp server on 127.0.0.1; sessions are
real PipelineSessions (typed turns: the channel's semantics do not depend on audio) writing to SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import Any

import aiohttp
import pytest

from speechpipe.pipeline import agent as pipeline_agent
from speechpipe.pipeline import events as ev
from speechpipe.pipeline.config import PipeConfig
from speechpipe.runner import protocol as p
from tests.fixtures_agents import Channel, TcpProxy

pytestmark = pytest.mark.asyncio(loop_scope="session")

APOLOGY = PipeConfig(agent_id="x").no_agent_message


async def until(pred: Any, within_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {within_s} s")
        await asyncio.sleep(0.02)


async def sql_turns(ch: Channel, session_id: str) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in await ch.astore.list_turns(session_id)]


# ---- dispatch ------------------------------------------------------------------------------------------
async def test_dispatch_delivers_the_call_and_every_turn_is_stored(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner(capacity=2)
    call = await ch.call(direction="inbound_phone", caller="+15550100", metadata={"account": "A-7"})
    assert call.attached
    entry = await runner.wait_event("entry")
    assert entry["session_id"] == call.session_id
    assert entry["direction"] == "inbound_phone" and entry["caller"] == "+15550100"
    assert entry["agent_id"] == "probe" and entry["pipe_id"] == ch.pipe_for("probe")
    assert entry["metadata"] == {"account": "A-7"}
    assert await call.ask("hello there") == "You said: hello there"
    assert await call.ask("second turn") == "You said: second turn"
    await call.hang_up("caller_hung_up")
    assert (await runner.wait_event("call_end"))["reason"] == "caller_hung_up"
    assert await sql_turns(ch, call.session_id) == [
        ("user", "hello there"), ("agent", "You said: hello there"),
        ("user", "second turn"), ("agent", "You said: second turn")]
    assert (await ch.astore.get_session(call.session_id)).end_reason == "caller_hung_up"
    counters = ch.hub.stats()["counters"]
    assert counters["dispatched"] == 1 and counters["jobs_accepted"] == 1 and counters["jobs_offered"] == 1


async def test_no_runner_registered_apologises_and_records_the_reason(agent_channel) -> None:
    ch = await agent_channel()
    t0 = time.monotonic()
    call = await ch.call("nobody-home")
    assert call.attached is False
    assert await call.ended(within_s=20) == "no_runner"
    assert time.monotonic() - t0 < 15
    assert any(e.text == APOLOGY and not e.interrupted for e in call.of(ev.AgentSpeechDone))
    assert await sql_turns(ch, call.session_id) == [("agent", APOLOGY)]
    assert (await ch.astore.get_session(call.session_id)).end_reason == "no_runner"


async def test_ack_timeout_fails_over_to_the_next_runner(agent_channel) -> None:
    # Heartbeat timeout 3 s, ack deadline 0.5 s: a stopped runner misses the ack long before it is dead.
    ch = await agent_channel(ack_timeout_s=0.5, heartbeat_interval_s=1.0)
    frozen = await ch.runner(capacity=2)
    healthy = await ch.runner(capacity=2)
    frozen.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        call = await ch.call()
        took = time.monotonic() - t0
    finally:
        frozen.signal(signal.SIGCONT)
    assert call.attached
    assert (await healthy.wait_event("entry"))["session_id"] == call.session_id
    assert ch.hub.counters["acks_timed_out"] == 1
    assert took >= 0.5
    assert await call.ask("after failover") == "You said: after failover"
    # The resumed runner acks the stale offer late: the hub cancels it, and it never serves that call.
    await until(lambda: ch.hub.counters["acks_late"] == 1, what="late ack seen")
    await until(lambda: (ch.runner_info(frozen.worker_id) or {}).get("load") == 0, what="stale job dropped")
    assert frozen.events("entry") == []
    # ... and it is healthy: the least-loaded runner (load 0 vs 1) takes the next call.
    call2 = await ch.call()
    assert call2.attached
    assert (await frozen.wait_event("entry"))["session_id"] == call2.session_id


async def test_at_capacity_the_session_apologises(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner(capacity=1)
    first = await ch.call()
    assert first.attached
    second = await ch.call()
    assert second.attached is False
    assert await second.ended() == "at_capacity"
    assert await sql_turns(ch, second.session_id) == [("agent", APOLOGY)]
    assert (await ch.astore.get_session(second.session_id)).end_reason == "at_capacity"
    # The busy runner was never bothered with the second job, and its call goes on.
    assert await first.ask("still here") == "You said: still here"
    first.session.push_text("stats")
    stats = (await runner.wait_event("stats"))["stats"]
    assert stats["jobs_offered"] == 1 and stats["jobs_accepted"] == 1 and stats["active_calls"] == 1


async def test_two_runners_of_one_agent_share_the_load(agent_channel) -> None:
    ch = await agent_channel()
    a = await ch.runner(capacity=2)
    b = await ch.runner(capacity=2)
    calls = [await ch.call() for _ in range(4)]
    assert all(c.attached for c in calls)
    await until(lambda: len(a.events("entry")) + len(b.events("entry")) == 4, what="4 calls served")
    on_a = {e["session_id"] for e in a.events("entry")}
    on_b = {e["session_id"] for e in b.events("entry")}
    assert len(on_a) == 2 and len(on_b) == 2
    for c in calls:  # every call is live on its runner
        assert await c.ask(f"ping {c.session_id[-4:]}") == f"You said: ping {c.session_id[-4:]}"
    overflow = await ch.call()
    assert overflow.attached is False and await overflow.ended() == "at_capacity"
    # A slot frees on A: the next call goes there, the least loaded runner.
    done = next(c for c in calls if c.session_id in on_a)
    await done.hang_up("caller_hung_up")
    await until(lambda: ch.runner_info(a.worker_id)["load"] == 1, what="slot freed on A")
    extra = await ch.call()
    assert extra.attached
    assert (await a.wait_event("entry", lambda e: e["session_id"] == extra.session_id))


# ---- runners dying -----------------------------------------------------------------------------------------
async def test_runner_killed_mid_call_apology_and_turns_in_sql(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call()
    assert await call.ask("first question") == "You said: first question"
    assert await call.ask("second question") == "You said: second question"
    call.session.push_text("long")
    turn = await call.wait(ev.UserTurn, lambda e: e.text == "long")
    await call.wait(ev.AgentSpeechStarted, lambda e: e.seq == turn.seq)
    runner.signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert await call.ended(within_s=20) == "agent_gone"
    assert time.monotonic() - t0 < 10
    cut = next(e for e in call.of(ev.AgentSpeechDone) if e.seq == turn.seq)
    assert cut.interrupted and cut.text.startswith("This is the first")
    assert any(e.text == APOLOGY and not e.interrupted for e in call.of(ev.AgentSpeechDone))
    rows = await ch.astore.list_turns(call.session_id)
    assert [(t.role, t.text) for t in rows[:5]] == [
        ("user", "first question"), ("agent", "You said: first question"),
        ("user", "second question"), ("agent", "You said: second question"), ("user", "long")]
    assert rows[5].role == "agent" and rows[5].interrupted and rows[5].text.startswith("This is the first")
    assert (rows[6].role, rows[6].text, rows[6].interrupted) == ("agent", APOLOGY, False)
    assert (await ch.astore.get_session(call.session_id)).end_reason == "agent_gone"
    assert ch.runner_info(runner.worker_id) is None


async def test_frozen_runner_is_found_by_heartbeat_timeout(agent_channel) -> None:
    ch = await agent_channel(heartbeat_interval_s=0.3)  # timeout 0.9 s
    runner = await ch.runner()
    call = await ch.call()
    assert await call.ask("hello") == "You said: hello"
    runner.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        assert await call.ended(within_s=15) == "agent_gone"
        assert time.monotonic() - t0 < 8
    finally:
        runner.signal(signal.SIGCONT)
    lost = {k: v for k, v in ch.hub.counters.items() if k.startswith("runners_lost_")}
    assert lost.get("runners_lost_heartbeat_timeout") == 1, lost
    assert any(e.text == APOLOGY for e in call.of(ev.AgentSpeechDone))


async def test_bridge_drop_redial_replays_exactly_once(agent_channel) -> None:
    ch = await agent_channel()
    proxy = await TcpProxy(int(ch.url.rsplit(":", 1)[1])).start()
    try:
        runner = await ch.runner(url=proxy.url)
        call = await ch.call()
        assert await call.ask("before the drop") == "You said: before the drop"
        assert len(proxy.conns) == 2  # the control socket, then this call's bridge
        proxy.cut(1)
        # Typed while the bridge is down (or being noticed as down): kept, replayed after the redial.
        assert await call.ask("during the drop") == "You said: during the drop"
        await until(lambda: ch.hub.counters["bridge_redials"] == 1, what="redial counted by the hub")
        assert await call.ask("after the drop") == "You said: after the drop"
        assert len(proxy.conns) == 3
        said = [e["text"] for e in runner.events("user_turn")]
        assert said == ["before the drop", "during the drop", "after the drop"]  # no loss, no duplicate
        replies = [e.text for e in call.of(ev.AgentSpeechDone)]
        assert replies == [f"You said: {t}" for t in said]
        call.session.push_text("stats")
        stats = (await runner.wait_event("stats"))["stats"]
        assert stats["bridge_redials"] == 1 and stats["calls_failed"] == 0
        assert not call.session.ended.is_set()
    finally:
        await proxy.close()


async def test_sigterm_drains_then_ends_the_rest_cleanly(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner(capacity=4, env={"PROBE_DRAIN_S": "4"})
    short = await ch.call()
    lasting = await ch.call()
    assert await short.ask("hi") == "You said: hi"
    lasting.session.push_text("sleep 1.5")
    await runner.wait_event("user_turn", lambda e: e["text"] == "sleep 1.5")
    runner.signal(signal.SIGTERM)
    t0 = time.monotonic()
    await until(lambda: (ch.runner_info(runner.worker_id) or {}).get("draining"), what="runner draining")
    refused = await ch.call()  # a draining runner takes no new job
    assert refused.attached is False and await refused.ended() == "no_runner"
    # Live calls go on: the answer started before SIGTERM arrives after it.
    await lasting.wait(ev.AgentSpeechDone, lambda e: e.text == "I slept 1.5 seconds.")
    assert await short.ask("still talking") == "You said: still talking"
    await short.hang_up("caller_hung_up")  # this one ends on its own during the drain
    # The other outlives the 4 s drain: the runner ends it with agent.end_call.
    assert await lasting.ended(within_s=20) == "runner_shutdown"
    assert time.monotonic() - t0 >= 3.9
    assert await runner.wait_exit(20) == 0
    stats = runner.events("exit")[0]["stats"]
    assert stats["draining"] and stats["active_calls"] == 0
    assert stats["jobs_accepted"] == 2 and stats["calls_started"] == 2 and stats["calls_completed"] == 2
    assert stats["calls_ended_by_shutdown"] == 1 and stats["calls_failed"] == 0
    assert (await ch.astore.get_session(lasting.session_id)).end_reason == "runner_shutdown"


# ---- authentication and call tokens ---------------------------------------------------------------------
async def test_bad_or_revoked_api_key_is_refused(agent_channel) -> None:
    ch = await agent_channel()
    bad = await ch.runner(env={"SPEECHPIPE_API_KEY": "spk_" + "x" * 43}, wait=False)
    assert await bad.wait_exit(20) != 0
    assert "refused the API key (HTTP 401)" in bad.stderr.read_text()
    revoked = ch.store.create_api_key("soon revoked")
    ch.store.revoke_api_key(revoked.key.id)
    gone = await ch.runner(env={"SPEECHPIPE_API_KEY": revoked.secret}, wait=False)
    assert await gone.wait_exit(20) != 0
    assert ch.hub.counters["auth_failures"] == 2 and ch.hub.runners() == []


class RawPeer:
    """A hand-driven protocol peer (a test's own runner), for frames the SDK would never send."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws

    async def send(self, frame: Any) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, within_s: float = 5.0,
                   skip: tuple[str, ...] = ("heartbeat", "ack")) -> dict[str, Any]:
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), within_s)  # receive(timeout=) restarts at pings
            if msg.type != aiohttp.WSMsgType.TEXT:  # the code the server's CLOSE frame carried, if any
                code = msg.data if msg.type == aiohttp.WSMsgType.CLOSE else self.ws.close_code
                return {"type": "<closed>", "code": code}
            frame = json.loads(msg.data)
            if frame.get("type") not in skip:
                return frame

    async def expect_error(self, frame: Any, code: str) -> dict[str, Any]:
        await self.send(frame)
        got = await self.recv()
        assert got["type"] == "error" and got["code"] == code, (frame, got)
        assert got["message"]
        return got


async def raw_control(http: aiohttp.ClientSession, ch: Channel) -> RawPeer:
    ws = await http.ws_connect(f"{ch.url.replace('http', 'ws')}/v1/agents/connect",
                               headers={"Authorization": f"Bearer {ch.api_key}"})
    return RawPeer(http, ws)


async def raw_register(http: aiohttp.ClientSession, ch: Channel, agent_id: str = "raw") -> RawPeer:
    peer = await raw_control(http, ch)
    await peer.send({"type": "register", "agent_id": agent_id, "capacity": 2, "worker_id": "raw-1"})
    assert (await peer.recv())["type"] == "registered"
    return peer


async def raw_bridge(http: aiohttp.ClientSession, url: str) -> RawPeer:
    return RawPeer(http, await http.ws_connect(url))


async def test_call_token_is_valid_for_one_session_only(agent_channel) -> None:
    ch = await agent_channel(heartbeat_interval_s=30.0)  # the raw runner never beats
    async with aiohttp.ClientSession() as http:
        control = await raw_register(http, ch)
        attaching = asyncio.ensure_future(ch.call("raw"))
        job = await control.recv()
        assert job["type"] == "job.assign" and job["agent_id"] == "raw" and job["deadline_ms"] == 1000
        assert job["metadata"]["direction"] == "web"
        await control.send({"type": "job.ack", "job_id": job["job_id"], "accepted": True})
        token = job["call_token"]
        other = job["bridge_url"].rsplit("/", 1)[0] + "/sess_000000000000000000000000"
        hello = {"type": "hello", "protocol": p.PROTOCOL_VERSION, "call_token": token}
        # The token does not open another session's bridge...
        wrong = await raw_bridge(http, other)
        await wrong.expect_error(hello, "bad_token")
        assert (await wrong.recv())["code"] == p.CLOSE_CALL_OVER
        # ... nor speak another protocol version ...
        old = await raw_bridge(http, job["bridge_url"])
        await old.expect_error({**hello, "protocol": 99}, "protocol_unsupported")
        # ... but opens its own.
        bridge = await raw_bridge(http, job["bridge_url"])
        await bridge.send(hello)
        ack = await bridge.recv()
        assert ack["type"] == "hello.ack" and ack["protocol"] == p.PROTOCOL_VERSION and not ack["resumed"]
        assert set(ack["events"]) == set(p.PLATFORM_EVENTS) and "agent.dispatch" in ack["verbs"]
        # agent.interrupt is advertised once the pipeline knows it
        assert ("agent.interrupt" in ack["verbs"]) == hasattr(pipeline_agent, "INTERRUPT")
        call = await attaching
        assert call.attached
        started = await bridge.recv()
        assert started["type"] == "call.started" and started["session_id"] == call.session_id
        # A verb for a turn never sent is refused with a reason; the call goes on.
        await bridge.expect_error({"type": "agent.text.delta", "turn_id": 99, "text": "hm"}, "unknown_turn")
        call.session.push_text("are you there")
        user = await bridge.recv()
        assert user["type"] == "user.text" and user["text"] == "are you there"
        await bridge.send({"type": "agent.text.delta", "turn_id": user["turn_id"], "text": "Yes, I am here."})
        await bridge.send({"type": "agent.text.end", "turn_id": user["turn_id"]})
        await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Yes, I am here.")
        await call.hang_up("caller_hung_up")
        frames = [await bridge.recv()]
        while frames[-1]["type"] != "<closed>":
            frames.append(await bridge.recv())
        assert [f["type"] for f in frames][-2:] == ["call.ended", "<closed>"]
        assert frames[-2]["reason"] == "caller_hung_up" and frames[-1]["code"] == p.CLOSE_NORMAL
        # After the call, the token is dead.
        again = await raw_bridge(http, job["bridge_url"])
        await again.expect_error({**hello, "last_seq": 0}, "bad_token")


async def test_heartbeats_both_ways_and_silent_runner_is_dropped(agent_channel) -> None:
    ch = await agent_channel(heartbeat_interval_s=0.2)  # timeout 0.6 s
    async with aiohttp.ClientSession() as http:
        peer = await raw_control(http, ch)
        await peer.send({"type": "register", "agent_id": "raw", "capacity": 1, "worker_id": "silent"})
        reg = await peer.recv()
        assert reg["heartbeat_interval_ms"] == 200 and reg["heartbeat_timeout_ms"] == 600
        beats = [await peer.recv(skip=()) for _ in range(2)]
        assert [b["type"] for b in beats] == ["heartbeat", "heartbeat"]
        for _ in range(5):  # a runner that beats stays
            await peer.send({"type": "heartbeat", "active": 0})
            await asyncio.sleep(0.2)
        assert ch.runner_info("silent") is not None
        t0 = time.monotonic()
        closed = await peer.recv(within_s=5)  # now silent: dropped after the timeout
        assert closed == {"type": "<closed>", "code": p.CLOSE_HEARTBEAT}
        assert 0.4 < time.monotonic() - t0 < 2.0
    assert ch.runner_info("silent") is None
    assert ch.hub.counters["runners_lost_heartbeat_timeout"] == 1


# ---- idle timers: only real frames keep a runner's socket open ---------------------------------------------
async def _pings(ws: aiohttp.ClientWebSocketResponse, every_s: float = 0.1) -> None:
    """WebSocket pings and nothing else, until the socket closes (or the task is cancelled)."""
    while not ws.closed:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.ping()
        await asyncio.sleep(every_s)


class _Frames:
    """`frame` every `every_s` until stopped; `last` is when the last one was started (the server got it
    later, so its idle timer cannot run out before `last` + the limit)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any],
                 every_s: float = 0.1) -> None:
        self.ws = ws
        self.frame = frame
        self.last = time.monotonic()
        self.task = asyncio.ensure_future(self._send(every_s))

    async def _send(self, every_s: float) -> None:
        while not self.ws.closed:
            self.last = time.monotonic()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(json.dumps(self.frame))
            await asyncio.sleep(every_s)

    async def stop(self) -> float:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.last


class _Closed:
    """Reads a socket opened with autoping=False until the server closes it: its close code, and how many of
    our pings it answered (proof the connection was alive at the WebSocket level all along)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.pongs = 0
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> Any:
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.PONG:
                self.pongs += 1
            elif msg.type == aiohttp.WSMsgType.PING:  # the server's own pings (bridges): answered as usual
                await self.ws.pong(msg.data)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data
            elif msg.type != aiohttp.WSMsgType.TEXT:  # CLOSED/ERROR without a close frame
                return self.ws.close_code

    async def code(self, within_s: float) -> Any:
        return await asyncio.wait_for(self.task, within_s)


async def test_a_control_socket_that_only_pings_is_closed_and_the_runner_leaves_the_rotation(
        agent_channel) -> None:
    """Heartbeat frames keep a registered runner; WebSocket pings (answered by the server's aiohttp) do not:
    with only pings the socket is closed with 4408 once the heartbeat timeout passes, as a silent one is."""
    ch = await agent_channel(heartbeat_interval_s=0.3)  # idle limit (heartbeat timeout) 0.9 s
    limit = ch.hub.heartbeat_timeout_s
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{ch.url.replace('http', 'ws')}/v1/agents/connect", autoping=False,
                                   headers={"Authorization": f"Bearer {ch.api_key}"})
        await ws.send_str(json.dumps({"type": "register", "agent_id": "raw", "capacity": 1,
                                      "worker_id": "pinger"}))
        first = await ws.receive(timeout=10)
        assert json.loads(first.data)["type"] == "registered"
        closed = _Closed(ws)
        pinger = asyncio.ensure_future(_pings(ws))
        beats = _Frames(ws, {"type": "heartbeat", "active": 0})
        try:
            await asyncio.sleep(3 * limit)  # pings and heartbeats: it stays
            assert not closed.task.done() and ch.runner_info("pinger") is not None
            t_last = await beats.stop()  # from here on, pings only
            assert await closed.code(within_s=30) == p.CLOSE_HEARTBEAT
            # Never before the timeout, counted from the last real frame.
            assert time.monotonic() - t_last >= limit
            assert closed.pongs >= 10  # every ping was answered until the close: pings do not count
        finally:
            pinger.cancel()
            beats.task.cancel()
    assert ch.runner_info("pinger") is None and ch.hub.runners("raw") == []  # out of the rotation
    assert ch.hub.counters["runners_lost_heartbeat_timeout"] == 1


async def test_a_bridge_that_only_pings_is_closed_with_4408_and_the_call_ends_when_nobody_redials(
        agent_channel, caplog: pytest.LogCaptureFixture) -> None:
    """After `hello`, a bridge that carries runner frames stays; one that carries only WebSocket pings is
    closed with 4408 after `bridge_idle_s`. The runner (its control socket beating all along) keeps its place;
    the call waits `bridge_grace_s` for a redial (which the SDK would make) and, with none, ends."""
    ch = await agent_channel(heartbeat_interval_s=0.3, bridge_grace_s=1.0)  # bridge idle limit 0.9 s
    limit = ch.hub.bridge_idle_s
    assert limit == ch.hub.heartbeat_timeout_s == pytest.approx(0.9)
    caplog.set_level("WARNING", logger="speechpipe.websocket_edge.agent_channel")
    async with aiohttp.ClientSession() as http:
        control = await raw_register(http, ch)
        control_beats = _Frames(control.ws, {"type": "heartbeat", "active": 1})
        pinger = bridge_acks = None
        try:
            attaching = asyncio.ensure_future(ch.call("raw"))
            job = await control.recv(within_s=10)
            assert job["type"] == "job.assign"
            await control.send({"type": "job.ack", "job_id": job["job_id"], "accepted": True})
            ws = await http.ws_connect(job["bridge_url"], autoping=False)
            await ws.send_str(json.dumps({"type": "hello", "protocol": p.PROTOCOL_VERSION,
                                          "call_token": job["call_token"]}))
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "hello.ack"
            call = await attaching
            assert call.attached
            closed = _Closed(ws)
            pinger = asyncio.ensure_future(_pings(ws))
            bridge_acks = _Frames(ws, {"type": "ack"})
            await asyncio.sleep(3 * limit)  # pings and acks: it stays
            assert not closed.task.done() and ch.hub.counters["bridges_idle_closed"] == 0
            t_last = await bridge_acks.stop()  # from here on, pings only
            assert await closed.code(within_s=30) == p.CLOSE_HEARTBEAT
            assert time.monotonic() - t_last >= limit
            assert closed.pongs >= 10
            assert ch.hub.counters["bridges_idle_closed"] == 1
            assert any("no frame from the runner" in r.getMessage() for r in caplog.records)
            assert ch.runner_info("raw-1") is not None  # its runner is fine: only this bridge was dead
            assert await call.ended(within_s=30) == "agent_gone"  # no redial within the grace
            assert ch.hub.counters["bridges_lost"] == 1
        finally:
            control_beats.task.cancel()
            if pinger is not None:
                pinger.cancel()
            if bridge_acks is not None:
                bridge_acks.task.cancel()


async def test_a_runner_on_a_quiet_call_stays_connected_past_the_idle_limits(agent_channel) -> None:
    """The SDK runner's own frames (control heartbeats, keepalive acks on a quiet bridge) keep both sockets
    open through a call where nobody says anything for many idle limits: no close, no redial, no loss."""
    ch = await agent_channel()  # heartbeat every 0.5 s: idle limits 1.5 s on both sockets
    runner = await ch.runner()
    call = await ch.call()
    assert await call.ask("hello") == "You said: hello"
    await asyncio.sleep(4 * ch.hub.bridge_idle_s)  # a caller on hold: not a frame of the call either way
    assert await call.ask("still there") == "You said: still there"
    counters = ch.hub.counters
    assert counters["bridges_idle_closed"] == 0 and counters["bridge_redials"] == 0
    assert not any(k.startswith("runners_lost_") for k in counters), dict(counters)
    assert ch.runner_info(runner.worker_id) is not None and not call.session.ended.is_set()
    call.session.push_text("stats")
    stats = (await runner.wait_event("stats"))["stats"]
    assert stats["bridge_keepalives"] >= 1 and stats["bridge_redials"] == 0 and stats["reconnects"] == 0


# ---- bad frames never crash the server ------------------------------------------------------------------
BAD_CONTROL = [
    ("not json at all", "invalid_json"),
    ("[1, 2, 3]", "not_an_object"),
    ("{\"no_type\": 1}", "missing_type"),
    ("{\"type\": \"teleport\"}", "unknown_type"),
    ("{\"type\": \"register\", \"agent_id\": \"x\", \"capacity\": NaN}", "invalid_json"),
    ("{\"type\": \"register\", \"agent_id\": \"bad id!\", \"capacity\": 1}", "bad_field"),
    ("{\"type\": \"register\", \"agent_id\": \"x\", \"capacity\": 0}", "bad_field"),
    ("{\"type\": \"register\", \"agent_id\": \"x\", \"capacity\": true}", "bad_field"),
    ("{\"type\": \"register\", \"agent_id\": \"x\"}", "missing_field"),
    ("{\"type\": \"job.ack\", \"job_id\": \"j\", \"accepted\": true}", "out_of_order"),
    ("{\"type\": \"heartbeat\"}", "out_of_order"),
    ("[" * 5000 + "]" * 5000, "invalid_json"),
]


async def test_malformed_and_out_of_order_frames_get_error_frames(agent_channel) -> None:
    ch = await agent_channel(heartbeat_interval_s=30.0)
    async with aiohttp.ClientSession() as http:
        peer = await raw_control(http, ch)
        for raw, code in BAD_CONTROL:
            await peer.expect_error(raw, code)
        await peer.ws.send_bytes(b"\x00\x01binary")
        assert (await peer.recv())["code"] == "binary_not_supported"
        await peer.send({"type": "register", "agent_id": "raw", "capacity": 1, "worker_id": "w"})
        assert (await peer.recv())["type"] == "registered"
        await peer.expect_error({"type": "register", "agent_id": "raw", "capacity": 1}, "out_of_order")
        await peer.expect_error({"type": "job.ack", "job_id": "job_nope", "accepted": True}, "unknown_job")
        await peer.expect_error({"type": "job.ack", "job_id": "j", "accepted": "yes"}, "bad_field")
        await peer.expect_error({"type": "agent.say", "text": "wrong socket"}, "unknown_type")
        # Bridge: nothing before hello, no garbage after it.
        bridge = await raw_bridge(http, f"{ch.url.replace('http', 'ws')}/v1/agents/bridge/sess_x")
        await bridge.expect_error({"type": "agent.say", "text": "too early"}, "out_of_order")
        await bridge.expect_error("{", "invalid_json")
        await bridge.expect_error({"type": "hello", "protocol": 1}, "missing_field")
        await bridge.expect_error({"type": "hello", "protocol": 1, "call_token": "spc_forged"}, "bad_token")
    # The server is fine: a real runner registers and serves a call.
    runner = await ch.runner()
    call = await ch.call()
    assert call.attached and await call.ask("all good") == "You said: all good"
    assert runner.events("error") == []
    assert ch.hub.counters["protocol_errors"] >= len(BAD_CONTROL) + 8


async def test_error_budget_closes_a_hostile_socket(agent_channel) -> None:
    ch = await agent_channel(max_errors=5)
    async with aiohttp.ClientSession() as http:
        peer = await raw_control(http, ch)
        for _ in range(4):
            await peer.expect_error("garbage", "invalid_json")
        await peer.send("garbage")
        assert (await peer.recv())["code"] == "invalid_json"
        assert (await peer.recv())["code"] == "too_many_errors"
        assert (await peer.recv()) == {"type": "<closed>", "code": p.CLOSE_PROTOCOL}


async def test_one_runner_holds_more_than_a_hundred_calls(agent_channel) -> None:
    """Past aiohttp's default 100-connection pool: every call holds its own bridge socket. All 130 are offered
    at once: however slowly a loaded machine lets the runner ack them, none fails for want of an ack (the
    only runner there is is waited for, not failed over)."""
    from bench.agent_channel import BenchSession, turn
    from speechpipe.pipeline.session import SessionInfo

    ch = await agent_channel()
    runner = await ch.runner(capacity=200)
    sessions = [BenchSession(SessionInfo(pipe_id="p", agent_id="probe", direction="web",
                                         session_id=f"sess_many{i:04d}")) for i in range(130)]
    links = await asyncio.gather(*[ch.hub.dispatch(s) for s in sessions])
    counters = ch.hub.counters
    assert counters["dispatched"] == 130 and counters["jobs_offered"] == 130
    assert counters["acks_timed_out"] == 0 and counters["acks_late"] == 0
    for s, link in zip(sessions, links, strict=True):
        await link.send({"type": "call.started", "session_id": s.session_id, "direction": "web"})
    latencies = await asyncio.gather(*[turn(link, 1) for link in links])
    assert len(latencies) == 130 and ch.runner_info(runner.worker_id)["load"] == 130
    for s, link in zip(sessions, links, strict=True):
        s.ended.set()
        await link.send({"type": "call.ended", "reason": "done"})
        await link.close("done")
    await until(lambda: ch.runner_info(runner.worker_id)["load"] == 0, what="all calls released")


# ---- ack deadlines -----------------------------------------------------------------------------------------
async def test_the_only_runner_is_waited_for_past_the_ack_deadline(agent_channel) -> None:
    """A runner that acks after the ack deadline, with no other runner to fail over to, still gets the call:
    the deadline is a reason to fail over, not to give up."""
    ch = await agent_channel(ack_timeout_s=0.2, heartbeat_interval_s=30.0)  # the raw runner never beats
    async with aiohttp.ClientSession() as http:
        control = await raw_register(http, ch)
        attaching = asyncio.ensure_future(ch.call("raw"))
        job = await control.recv()
        assert job["type"] == "job.assign" and job["deadline_ms"] == 200
        # Answer only once the hub has seen the deadline pass and kept the offer open.
        await until(lambda: ch.hub.counters["acks_slow"] == 1, what="ack deadline passed, offer kept")
        await control.send({"type": "job.ack", "job_id": job["job_id"], "accepted": True})
        bridge = await raw_bridge(http, job["bridge_url"])
        await bridge.send({"type": "hello", "protocol": p.PROTOCOL_VERSION, "call_token": job["call_token"]})
        assert (await bridge.recv())["type"] == "hello.ack"
        call = await attaching
        assert call.attached
        assert (await bridge.recv())["type"] == "call.started"
        counters = ch.hub.counters
        assert counters["acks_timed_out"] == 0 and counters["acks_late"] == 0
        assert counters["jobs_accepted"] == 1 and counters["dispatched"] == 1
        assert ch.runner_info("raw-1")["missed_acks"] == 0
        await call.hang_up("caller_hung_up")


async def test_an_ack_that_came_while_the_server_was_busy_is_not_missed(agent_channel) -> None:
    """The ack deadline passes while the server's event loop is stuck, with the ack already in its socket:
    the ack is read before the deadline counts, so the offer stands (though another runner was free)."""
    ch = await agent_channel(ack_timeout_s=0.2, heartbeat_interval_s=30.0)
    async with aiohttp.ClientSession() as http:
        raw = await raw_register(http, ch, agent_id="probe")  # registered first: first pick on a tie
        other = await ch.runner(capacity=2)
        attaching = asyncio.ensure_future(ch.call())
        job = await raw.recv()
        for _ in range(20):  # let the hub get to waiting for the ack
            await asyncio.sleep(0)
        await raw.send({"type": "job.ack", "job_id": job["job_id"], "accepted": True})
        time.sleep(0.5)  # noqa: ASYNC251 -- on purpose: the loop the hub runs on is busy past the deadline
        bridge = await raw_bridge(http, job["bridge_url"])
        await bridge.send({"type": "hello", "protocol": p.PROTOCOL_VERSION, "call_token": job["call_token"]})
        assert (await bridge.recv())["type"] == "hello.ack"
        call = await attaching
        assert call.attached
        assert ch.hub.counters["acks_timed_out"] == 0 and ch.hub.counters["jobs_offered"] == 1
        assert other.events("entry") == []
        await call.hang_up("caller_hung_up")


async def test_the_only_runner_that_never_acks_ends_at_the_dispatch_deadline(agent_channel) -> None:
    ch = await agent_channel(ack_timeout_s=0.2, dispatch_timeout_s=1.0, heartbeat_interval_s=30.0)
    async with aiohttp.ClientSession() as http:
        control = await raw_register(http, ch)
        call = await ch.call("raw")
        job = await control.recv()
        assert call.attached is False and await call.ended() == "ack_timeout"
        assert ch.hub.counters["acks_slow"] == 1 and ch.hub.counters["acks_timed_out"] == 1
        # Its late accept is refused: the hub tells it to drop the job.
        await control.send({"type": "job.ack", "job_id": job["job_id"], "accepted": True})
        assert await control.recv() == {"type": "job.cancel", "job_id": job["job_id"], "reason": "ack_late"}


async def test_a_runner_that_never_acks_leaves_the_rotation_until_it_beats(agent_channel) -> None:
    """Consecutive missed acks take a runner out of rotation: later sessions go straight to the healthy one
    instead of waiting out its ack deadline first. A heartbeat brings it back."""
    ch = await agent_channel(ack_timeout_s=0.3, heartbeat_interval_s=30.0)
    async with aiohttp.ClientSession() as http:
        mute = await raw_register(http, ch, agent_id="probe")  # registered first: first pick on a tie
        healthy = await ch.runner(capacity=4)
        offered: list[dict[str, Any]] = []
        calls = []
        for n in range(2):  # mute holds no call, so it is the least loaded: each call tries it first
            calls.append(await ch.call())
            offered.append(await mute.recv())
            assert calls[-1].attached
            assert ch.hub.counters["acks_timed_out"] == n + 1
        assert ch.hub.counters["runners_out_of_rotation"] == 1
        assert ch.runner_info("raw-1")["in_rotation"] is False
        async with http.get(ch.url + "/metrics") as resp:  # each runner's ack record, as operators see it
            scraped = await resp.text()
        labels = f'{{agent_id="probe",runner_id="{ch.runner_info("raw-1")["runner_id"]}"}}'
        for line in (f"speechpipe_agent_runner_ack_timeouts_total{labels} 2.0",
                     f"speechpipe_agent_runner_acks_total{labels} 0.0",
                     f"speechpipe_agent_runner_in_rotation{labels} 0.0"):
            assert line in scraped, (line, [s for s in scraped.splitlines() if "runner_" in s])
        assert ch.hub.stats()["agents"]["probe"]["capacity"] == 4  # only the healthy runner's slots
        calls.append(await ch.call())  # straight to the healthy runner: no offer to mute, no timeout
        assert calls[-1].attached
        assert ch.hub.counters["acks_timed_out"] == 2 and ch.hub.counters["jobs_offered"] == 5
        for c in calls:
            await healthy.wait_event("entry", lambda e, c=c: e["session_id"] == c.session_id)
        # Alive again: one heartbeat and it takes offers (and, the least loaded, the next call's).
        await mute.send({"type": "heartbeat", "active": 0})
        await until(lambda: ch.runner_info("raw-1")["in_rotation"], what="back in rotation")
        assert ch.hub.counters["runners_back_in_rotation"] == 1
        attaching = asyncio.ensure_future(ch.call())
        job = await mute.recv()
        assert job["type"] == "job.assign" and job["job_id"] not in {o["job_id"] for o in offered}
        await mute.send({"type": "job.ack", "job_id": job["job_id"], "accepted": False, "reason": "refused"})
        assert (await attaching).attached  # the healthy runner takes the refused one
        assert ch.hub.counters["acks_timed_out"] == 2
