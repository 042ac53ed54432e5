"""An agent that fails on its side is never dead air: the runner SDK reports the failure (`agent.error`), the
platform tells the client (an `error` event with code `agent_error`) and speaks the pipe's apology once per
user turn, and the call goes on. Real runner processes (tests/agent_probe.py) against real sessions.
"""

from __future__ import annotations

import pytest

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.session import Engines
from speechpipe.pipeline.tts import EspeakTTS

pytestmark = pytest.mark.asyncio(loop_scope="session")

APOLOGY = PipeConfig(agent_id="probe").agent_error_message


async def test_a_user_turn_hook_that_raises_gets_an_apology_and_an_error_event(agent_channel) -> None:
    ch = await agent_channel()
    await ch.runner()
    call = await ch.call()
    call.session.push_text("boom")  # the probe's user_turn hook raises
    turn = await call.wait(ev.UserTurn, lambda e: e.text == "boom")
    err = await call.wait(ev.AgentError)
    assert (err.code, err.agent_code, err.seq) == ("agent_error", "hook_failed", turn.seq)
    assert "blew up" not in err.message  # the agent's own words go to the log, not to the client
    apology = await call.wait(ev.AgentSpeechDone, lambda e: e.text == APOLOGY)
    assert not apology.interrupted
    # The call goes on: the next turn is answered.
    assert await call.ask("still there") == "You said: still there"
    assert len(call.of(ev.AgentError)) == 1
    assert not call.session.ended.is_set()


async def test_a_dtmf_hook_and_an_entrypoint_that_raise_are_reported(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call(metadata={"raise_in_entry": True})
    entry = await call.wait(ev.AgentError, lambda e: e.agent_code == "entrypoint_failed")
    assert entry.seq is None
    call.session.dtmf("9")  # the probe's dtmf hook raises
    await runner.wait_event("error", lambda e: e["details"].get("hook") == "dtmf")
    dtmf = await call.wait(ev.AgentError, lambda e: e.agent_code == "hook_failed")
    assert dtmf.code == "agent_error"
    # Neither concerns a user turn: one apology between them, not one each.
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == APOLOGY)
    assert await call.ask("hello") == "You said: hello"  # the hooks set up before the raise still answer
    assert [e.text for e in call.of(ev.AgentSpeechDone)].count(APOLOGY) == 1


async def test_an_empty_apology_says_nothing_but_still_tells_the_client(agent_channel) -> None:
    ch = await agent_channel()
    await ch.runner()
    quiet = PipeConfig(agent_id="probe", vad={"engine": "webrtc"}, agent_error_message="")
    call = await ch.call(config=quiet)
    call.session.push_text("boom")
    await call.wait(ev.AgentError, lambda e: e.agent_code == "hook_failed")
    assert await call.ask("next") == "You said: next"
    assert all(e.text != APOLOGY for e in call.of(ev.AgentSpeechDone))


async def test_an_engine_failing_mid_call_is_an_error_to_client_and_agent(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    engines = Engines()
    engines.tts = EspeakTTS(binary="false")  # the TTS program fails at run time (exits 1, no audio)
    call = await ch.call(engines=engines)
    call.session.push_text("hello there")
    err = await call.wait(ev.Error, lambda e: e.code == "tts_failed")
    assert "false" not in err.message  # the cause is logged, not sent
    told = await runner.wait_event("error", lambda e: e["code"] == "tts_failed")
    assert told["message"] == err.message
    # The session goes on (the agent's text still arrives; the client knows why it hears nothing).
    assert not call.session.ended.is_set()
    await call.session.end("test_over")
    row = await ch.astore.get_session(call.session_id)
    assert row.metrics["engine_errors"]["tts_failed"] >= 1
