"""The runner SDK end to end: every hook fires and every control acts, in a real runner process talking to a
real server hosting real PipelineSessions. Plus the runner's own side of the control protocol (job
rejections, reconnects) and its configuration.
"""

from __future__ import annotations

import asyncio
import json
import signal
import wave
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.realtime import RealtimeLine
from speechpipe.runner import AgentRunner, RunnerError, Session
from speechpipe.runner import protocol as p
from speechpipe.runner.runner import control_url
from tests.fixtures_agents import ROOT, TcpProxy
from tests.speech import synth
from tests.test_agent_channel import until

pytestmark = pytest.mark.asyncio(loop_scope="session")

ECHO = ROOT / "examples" / "echo_agent.py"


async def test_the_seed_handler_serves_phone_and_web_unchanged(agent_channel) -> None:
    ch = await agent_channel()
    await ch.runner("echo", script=ECHO)
    phone = await ch.call("echo", direction="inbound_phone", caller="+15550123")
    web_call = await ch.call("echo", direction="web")
    phone_hello = "Hello! You're on the phone with the echo agent."
    await phone.wait(ev.AgentSpeechDone, lambda e: e.text == phone_hello)
    await web_call.wait(ev.AgentSpeechDone, lambda e: e.text == "Hello! This is the echo agent on the web.")
    assert await phone.ask("I am calling") == "You said: I am calling"
    assert await web_call.ask("I am browsing") == "You said: I am browsing"


async def test_call_start_user_turn_agent_turn_metric_call_end(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call()
    start = await runner.wait_event("call_start")
    assert start["session_id"] == call.session_id
    assert await call.ask("good morning") == "You said: good morning"
    turn = await runner.wait_event("user_turn")
    assert turn["text"] == "good morning" and turn["turn_id"] > 0
    agent = await runner.wait_event("agent_turn")
    assert agent == {**agent, "turn_id": turn["turn_id"], "text": "You said: good morning"}
    metric = await runner.wait_event("metric")
    assert metric["turn_id"] == turn["turn_id"]
    assert 0 < metric["values"]["response_latency_ms"] < 5000
    assert metric["values"]["endpoint_silence_ms"] == 500
    # a say() is an agent turn too, numbered by the platform
    call.session.push_text("say Nice weather today")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Nice weather today")
    said = await runner.wait_event("agent_turn", lambda e: e["text"] == "Nice weather today")
    assert said["turn_id"] < 0
    await call.hang_up("caller_hung_up")
    end = await runner.wait_event("call_end")
    assert end["reason"] == "caller_hung_up" and end["data"] == {"user_turns": 2}
    names = [e["event"] for e in runner.events() if e["event"] in ("call_start", "user_turn", "call_end")]
    assert names == ["call_start", "user_turn", "user_turn", "call_end"]


async def test_interruption_hook_gets_what_the_user_heard(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call(speed=2)
    call.session.push_text("long")
    turn = await call.wait(ev.UserTurn, lambda e: e.text == "long")
    await call.wait(ev.AgentSpeechStarted, lambda e: e.seq == turn.seq)
    await asyncio.sleep(1.0)  # ~2 s of audio heard at double speed
    assert await call.ask("wait a moment") == "You said: wait a moment"
    cut = await runner.wait_event("interruption")
    assert cut["turn_id"] == turn.seq and cut["user"] == "wait a moment"
    assert cut["heard"] and cut["text"].startswith(cut["heard"]) and len(cut["heard"]) < len(cut["text"])
    barge = call.of(ev.BargeIn)[0]
    assert barge.heard_text == cut["heard"]
    rows = [t for t in await ch.astore.list_turns(call.session_id) if t.role == "agent" and t.interrupted]
    assert len(rows) == 1 and rows[0].heard_text == cut["heard"]


async def test_dtmf_hook_and_raising_hooks_are_isolated(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call(metadata={"raise_in_entry": True})  # the entrypoint raises after its set-up
    call.session.dtmf("5")
    assert (await runner.wait_event("dtmf"))["digit"] == "5"
    call.session.dtmf("9")  # this dtmf hook raises
    err = await runner.wait_event("error", lambda e: e["details"].get("hook") == "dtmf")
    assert err["code"] == "hook_failed" and "dtmf hook blew up" in err["message"]
    call.session.push_text("boom")  # this user_turn hook raises
    await runner.wait_event("error", lambda e: e["details"].get("hook") == "user_turn")
    assert await call.ask("still there") == "You said: still there"
    call.session.push_text("stats")
    stats = (await runner.wait_event("stats"))["stats"]
    assert stats["hook_errors"] == 3  # entrypoint, dtmf, user_turn
    assert not call.session.ended.is_set()


async def test_say_and_end(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call()
    call.session.push_text("say This is the agent speaking")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "This is the agent speaking")
    call.session.push_text("end booking_complete")
    assert await call.ended() == "booking_complete"
    assert call.of(ev.AgentSpeechDone)[-1].text == "Goodbye."  # said before hanging up, not cut
    assert not call.of(ev.AgentSpeechDone)[-1].interrupted
    assert (await runner.wait_event("call_end"))["reason"] == "booking_complete"
    assert (await ch.astore.get_session(call.session_id)).end_reason == "booking_complete"


async def test_transfer_refused_on_web_done_on_the_phone(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    web_call = await ch.call()
    web_call.session.push_text("transfer sip:desk@example.com")
    err = await runner.wait_event("error")
    assert err["code"] == "transfer_unsupported" and "sip:desk@example.com" in err["message"]
    assert await web_call.ask("ok then") == "You said: ok then"

    asked: list[tuple[str, str]] = []

    async def on_transfer(target: str, mode: str) -> str | None:
        asked.append((target, mode))
        return None

    phone = await ch.call(direction="inbound_phone", on_transfer=on_transfer)
    phone.session.push_text("transfer 2001")
    assert await phone.ended() == "transferred"
    assert asked == [("2001", "blind")]
    await runner.wait_event("call_end", lambda e: e["reason"] == "transferred")


async def test_recording_pause_and_resume(agent_channel) -> None:
    ch = await agent_channel()
    await ch.runner()
    call = await ch.call(speed=2)
    assert await call.ask("pause") == "Recording paused."
    # Said while paused: the client sees it redacted (the agent got the word and resumed).
    call.session.push_text("resume")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Recording resumed.")
    await call.hang_up("caller_hung_up")
    await call.ended()
    rec = await ch.astore.get_recording(call.session_id)
    with wave.open(rec.path) as w:
        stereo = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    agent = stereo[:, 1].astype(np.float64)
    turns = {t.text: t for t in await ch.astore.list_turns(call.session_id) if t.role == "agent"}

    def rms(text: str) -> float:
        t = turns[text]
        seg = agent[t.start_ms * 16:t.end_ms * 16]
        assert len(seg) > 8000, (text, t.start_ms, t.end_ms)
        return float(np.sqrt(np.mean(seg ** 2)))

    said = [(t.text, t.redacted) for t in await ch.astore.list_turns(call.session_id) if t.role == "user"]
    assert said == [("pause", False), ("[redacted]", True)]
    assert rms("Recording paused.") == 0.0  # kept in time, written as silence
    assert rms("Recording resumed.") > 300


async def test_dispatch_hands_the_call_to_another_agent(agent_channel) -> None:
    ch = await agent_channel()
    front = await ch.runner("probe")
    billing = await ch.runner("billing")
    call = await ch.call("probe", metadata={"account": "A-9"})
    assert await call.ask("hello") == "You said: hello"
    call.session.push_text("dispatch nobody-there")  # fails: the call stays
    failed = await front.wait_event("error")
    assert failed["code"] == "dispatch_failed" and failed["details"]["agent_id"] == "nobody-there"
    assert await call.ask("still you") == "You said: still you"
    call.session.push_text("dispatch billing")
    assert (await front.wait_event("call_end"))["reason"] == "dispatched"
    entry = await billing.wait_event("entry")
    assert entry["session_id"] == call.session_id and entry["agent_id"] == "billing"
    assert entry["metadata"]["account"] == "A-9" and entry["metadata"]["dispatched_from"] == "probe"
    assert entry["metadata"]["handoff"] == {"note": "from probe", "turns": 4}
    assert await call.ask("about my bill") == "You said: about my bill"
    assert [e["text"] for e in billing.events("user_turn")] == ["about my bill"]
    assert ch.hub.counters["handoffs"] == 1 and ch.hub.counters["handoffs_failed"] == 1
    await call.hang_up("caller_hung_up")
    assert (await billing.wait_event("call_end"))["reason"] == "caller_hung_up"


async def test_interrupt_stops_the_agent_talking(agent_channel) -> None:
    ch = await agent_channel()
    await ch.runner()
    call = await ch.call(speed=2)
    call.session.push_text("long")
    turn = await call.wait(ev.UserTurn, lambda e: e.text == "long")
    await call.wait(ev.AgentSpeechStarted, lambda e: e.seq == turn.seq)
    call.session.dtmf("#")  # the probe's dtmf hook calls session.interrupt()
    done = await call.wait(ev.AgentSpeechDone, lambda e: e.seq == turn.seq, within_s=5)
    assert done.interrupted and call.of(ev.Clear)


async def test_silence_hook_fires_when_nobody_talks(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    config = PipeConfig(agent_id="probe", vad={"engine": "webrtc"}, silence_timeout_s=1.0)
    await ch.call(config=config)
    event = await runner.wait_event("silence", within_s=8)
    assert event["seconds"] >= 1.0


async def test_audio_turn_with_partials_through_the_channel(agent_channel, partial_engines) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call(speed=0, engines=partial_engines,
                         config=PipeConfig(agent_id="probe", endpointing={"silence_ms": 600}))
    line = RealtimeLine(call.session)
    await line.silence(0.5)
    await line.play(synth("Could you please book a table for two people on Friday evening"))
    assert await line.until(lambda: bool(call.of(ev.AgentSpeechDone)), timeout_s=20)
    turn = (await runner.wait_event("user_turn"))["text"].lower()
    assert "table for two" in turn and "friday" in turn
    partials = runner.events("user_partial")
    assert partials and all(p["t"] <= runner.events("user_turn")[0]["t"] for p in partials)
    assert any("table" in p["text"].lower() for p in partials)
    reply = call.of(ev.AgentSpeechDone)[0]
    assert reply.text.startswith("You said: ") and "please book a table for two" in reply.text.lower()
    assert np.abs(line.received()).max() > 1000  # the reply was heard as audio on the line
    metric = await runner.wait_event("metric")
    assert 0 < metric["values"]["response_latency_ms"] < 5000


# ---- the runner's side of the control socket --------------------------------------------------------------
async def test_runner_rejects_jobs_it_cannot_take(agent_channel) -> None:
    """A runner process against a hand-driven control peer: the reasons it gives for saying no."""
    ch = await agent_channel()  # only for its store, API key and temp dir
    acks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    bridges: list[web.WebSocketResponse] = []
    control: list[web.WebSocketResponse] = []

    async def control_socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        control.append(ws)
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["type"] == "register":
                await ws.send_json({"type": "registered", "runner_id": "run_x", "protocol": 1,
                                    "heartbeat_interval_ms": 5000, "heartbeat_timeout_ms": 15000})
            elif frame["type"] in ("job.ack", "drain"):
                await acks.put(frame)
        return ws

    async def silent_bridge(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        bridges.append(ws)  # never answers hello: the accepted job stays pending
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/agents/connect", control_socket)
    app.router.add_get("/v1/agents/bridge/{sid}", silent_bridge)
    site_runner = web.AppRunner(app)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site_runner.addresses[0][1]}"
    try:
        proc = await ch.runner("probe", capacity=1, url=base, wait=False,
                               env={"PROBE_REFUSE_PIPE": "pipe_no"})
        await until(lambda: bool(control), what="runner connected")
        await asyncio.sleep(0.2)
        n = 0

        async def offer(agent_id: str, pipe_id: str = "pipe_ok") -> dict[str, Any]:
            nonlocal n
            n += 1
            await control[0].send_json({
                "type": "job.assign", "job_id": f"job_{n}", "session_id": f"sess_{n}", "agent_id": agent_id,
                "bridge_url": f"{base.replace('http', 'ws')}/v1/agents/bridge/sess_{n}",
                "call_token": "spc_t", "deadline_ms": 1000, "metadata": {"pipe_id": pipe_id}})
            return await asyncio.wait_for(acks.get(), 5)

        assert await offer("someone-else") == {"type": "job.ack", "job_id": "job_1", "accepted": False,
                                                "reason": "agent_id_mismatch"}
        assert (await offer("probe", "pipe_no"))["reason"] == "refused"
        assert (await offer("probe"))["accepted"] is True
        assert (await offer("probe"))["reason"] == "at_capacity"
        proc.signal(signal.SIGTERM)
        assert (await asyncio.wait_for(acks.get(), 5))["type"] == "drain"
        assert (await offer("probe"))["reason"] == "draining"
        assert await proc.wait_exit(30) == 0  # the pending call fails its hello, then the runner exits
        stats = proc.events("exit")[0]["stats"]
        assert stats["jobs_offered"] == 5 and stats["jobs_accepted"] == 1 and stats["calls_failed"] == 1
        assert stats["jobs_rejected"] == {"agent_id_mismatch": 1, "refused": 1, "at_capacity": 1,
                                          "draining": 1}
    finally:
        await site_runner.cleanup()


async def test_acks_do_not_wait_for_a_slow_job_filter_or_for_call_set_up() -> None:
    """In-process runner, hand-driven control peer: a burst of offers is answered without waiting for any call
    to start; an async on_job filter holds its slot, but not the answers to the offers behind it."""
    gate = asyncio.Event()
    filtered: list[str] = []

    async def on_job(job: dict[str, Any]) -> bool:
        filtered.append(job["job_id"])
        if job["job_id"] == "job_slow":
            await gate.wait()
        return True

    acks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    control: list[web.WebSocketResponse] = []
    dials: list[str] = []

    async def control_socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        control.append(ws)
        async for msg in ws:
            frame = json.loads(msg.data)
            if frame["type"] == "register":
                await ws.send_json({"type": "registered", "runner_id": "run_x", "protocol": 1,
                                    "heartbeat_interval_ms": 30000, "heartbeat_timeout_ms": 90000})
            elif frame["type"] == "job.ack":
                await acks.put(frame)
        return ws

    async def silent_bridge(request: web.Request) -> web.WebSocketResponse:
        dials.append(request.match_info["sid"])
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:  # never says hello.ack: the call stays in set-up
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/agents/connect", control_socket)
    app.router.add_get("/v1/agents/bridge/{sid}", silent_bridge)
    site_runner = web.AppRunner(app)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site_runner.addresses[0][1]}"
    runner = AgentRunner(_noop, agent_id="probe", capacity=40, url=base, api_key="spk_test", on_job=on_job,
                         call_start_timeout_s=30.0, end_timeout_s=0.5)
    try:
        await runner.start(timeout_s=10)
        ids = ["job_slow", *(f"job_{i}" for i in range(39)), "job_over"]
        for job_id in ids:  # written back to back, as the hub does in a burst
            await control[0].send_json({
                "type": "job.assign", "job_id": job_id, "session_id": f"sess_{job_id}", "agent_id": "probe",
                "bridge_url": f"{base.replace('http', 'ws')}/v1/agents/bridge/{job_id}",
                "call_token": "spc_t", "deadline_ms": 1000, "metadata": {}})
        got = {a["job_id"]: a for a in [await asyncio.wait_for(acks.get(), 10) for _ in range(40)]}
        # Every job behind the slow filter is answered while it still decides; it holds the 40th slot.
        assert set(got) == set(ids[1:]) and all(got[i]["accepted"] for i in ids[1:40])
        assert got["job_over"] == {"type": "job.ack", "job_id": "job_over", "accepted": False,
                                   "reason": "at_capacity"}
        assert filtered == ids[:40]  # job_over never got as far as the filter
        gate.set()
        assert await asyncio.wait_for(acks.get(), 10) == {"type": "job.ack", "job_id": "job_slow",
                                                          "accepted": True}
        await until(lambda: len(dials) == 40, what="every accepted call dialled its bridge")
        assert runner.stats()["jobs_accepted"] == 40 and runner.stats()["active_calls"] == 40
    finally:
        await runner.shutdown(timeout_s=0)
        await site_runner.cleanup()


async def test_control_socket_reconnects_and_calls_survive(agent_channel) -> None:
    ch = await agent_channel()
    proxy = await TcpProxy(int(ch.url.rsplit(":", 1)[1])).start()
    try:
        runner = await ch.runner(url=proxy.url)
        call = await ch.call()
        assert await call.ask("before") == "You said: before"
        proxy.cut(0)  # the control socket only
        await until(lambda: ch.hub.counters["runner_reconnects"] == 1, what="runner re-registered")
        assert await call.ask("after") == "You said: after"  # its bridge never noticed
        second = await ch.call()
        assert second.attached and await second.ask("new call") == "You said: new call"
        assert ch.runner_info(runner.worker_id)["load"] == 2
        call.session.push_text("stats")
        stats = (await runner.wait_event("stats"))["stats"]
        assert stats["reconnects"] == 1 and stats["connected"] and stats["bridge_redials"] == 0
    finally:
        await proxy.close()


# ---- configuration and the SDK surface, in-process ------------------------------------------------------
async def _noop(ctx: Any) -> None:
    return None


async def test_runner_config_from_env_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEECHPIPE_URL", "https://pipe.example.com/")
    monkeypatch.setenv("SPEECHPIPE_API_KEY", "spk_env")
    monkeypatch.setenv("SPEECHPIPE_AGENT_ID", "env-agent")
    r = AgentRunner(_noop)
    assert (r.url, r.api_key, r.agent_id, r.capacity) == (
        "wss://pipe.example.com/v1/agents/connect", "spk_env", "env-agent", 10)
    r = AgentRunner(_noop, "arg-agent", 3, url="ws://10.0.0.5:8780", api_key="spk_arg")
    assert (r.url, r.api_key, r.agent_id, r.capacity) == (
        "ws://10.0.0.5:8780/v1/agents/connect", "spk_arg", "arg-agent", 3)
    assert control_url("http://h:1/prefix") == "ws://h:1/prefix/v1/agents/connect"
    monkeypatch.delenv("SPEECHPIPE_API_KEY")
    with pytest.raises(RunnerError, match="API key"):
        AgentRunner(_noop)
    with pytest.raises(RunnerError, match="agent_id"):
        AgentRunner(_noop, "bad id", api_key="k")
    with pytest.raises(RunnerError, match="URL"):
        AgentRunner(_noop, "a", api_key="k", url="ftp://x")


async def test_unknown_hook_names_are_refused() -> None:
    async def send(frame: dict[str, Any]) -> None:
        return None

    s = Session(send)
    with pytest.raises(ValueError, match="unknown hook 'on_user_turn'"):
        s.on("on_user_turn", print)
    assert s.on("dtmf")(print) is print


async def test_protocol_constants_match_the_pipeline() -> None:
    from speechpipe.pipeline import agent as pa

    for name in ("CALL_STARTED", "USER_PARTIAL", "USER_TEXT", "USER_INTERRUPTED", "AGENT_SPEECH_DONE", "DTMF",
                 "SILENCE", "METRIC", "CALL_ENDED", "ERROR", "TEXT_DELTA", "TEXT_END", "SAY", "TRANSFER",
                 "END_CALL", "DISPATCH", "RECORDING_PAUSE", "RECORDING_RESUME"):
        assert getattr(p, name) == getattr(pa, name), name

