"""Redaction while the agent has paused the recording (`recording.pause` … `recording.resume`).

Real parts throughout: the probe agent in a runner process pauses and resumes through the SDK when the user
says "pause" / "resume"; sessions run in this process against a migrated SQLite store. What is checked:
user words said while paused reach the agent in clear, but SQL, the client's events, the REST transcript
and the session's log lines hold "[redacted]"; the paused span is a pair of `recording.*` events and
`session_events` rows at the session clock; agent turns are stored as spoken.
"""

from __future__ import annotations

import logging
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from speechpipe.errors import NotFoundError
from speechpipe.pipeline import events as ev
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.realtime import RealtimeLine
from speechpipe.settings import Settings
from speechpipe.websocket_edge.app import create_app
from speechpipe.websocket_edge.rest import setup_rest

from .speech import synth

pytestmark = pytest.mark.asyncio(loop_scope="session")

SECRET = "my card number is 4111 1111 1111 1111"
REDACTED = "[redacted]"


async def _rest_transcript(ch, session_id: str, tmp_path: Path) -> dict:
    """GET /v1/sessions/{id}/transcript from a real REST app over the channel's database."""
    settings = Settings(data_dir=tmp_path / "rest", database_url="sqlite:///unused.db")
    app = create_app(settings, ch.store, route_groups=[setup_rest])
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/sessions/{session_id}/transcript"
        async with aiohttp.ClientSession() as http, http.get(
                url, headers={"Authorization": f"Bearer {ch.api_key}"}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()
    finally:
        await runner.cleanup()


async def test_typed_turns_while_paused_reach_only_the_agent(agent_channel, caplog, tmp_path) -> None:
    caplog.set_level(logging.INFO)
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call(speed=2)
    assert await call.ask("hello") == "You said: hello"

    call.session.push_text("pause")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Recording paused.")
    paused = await call.wait(ev.RecordingPaused)
    assert call.session.recording_paused
    call.session.push_text(SECRET)
    secret_turn = await call.wait(ev.UserTurn, lambda e: e.redacted)
    await call.wait(ev.AgentSpeechDone, lambda e: e.seq == secret_turn.seq)
    call.session.push_text("resume")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Recording resumed.")
    resumed = await call.wait(ev.RecordingResumed)
    assert await call.ask("after") == "You said: after"
    await call.hang_up()
    await call.ended()

    # The agent heard every word in clear, and answered (it chose to say the number back).
    heard = [e["text"] for e in runner.events("user_turn")]
    assert heard == ["hello", "pause", SECRET, "resume", "after"]
    assert f"You said: {SECRET}" in [d.text for d in call.of(ev.AgentSpeechDone)]

    # The client saw the words said while paused as "[redacted]", flagged.
    user_events = [(u.text, u.redacted) for u in call.of(ev.UserTurn)]
    assert user_events == [("hello", False), ("pause", False), (REDACTED, True), (REDACTED, True),
                           ("after", False)]
    assert (paused.type, resumed.type) == ("recording.paused", "recording.resumed")
    assert 0 <= paused.at_ms <= resumed.at_ms
    assert paused.to_json() == {"type": "recording.paused", "at_ms": paused.at_ms}
    assert call.of(ev.UserTurn)[2].to_json()["redacted"] is True

    # SQL: the same, the span stored as two session events at the session clock.
    turns = await ch.astore.list_turns(call.session_id)
    users = [(t.text, t.redacted) for t in turns if t.role == "user"]
    assert users == user_events
    for t in turns:
        if t.redacted:
            assert paused.at_ms <= t.start_ms <= resumed.at_ms
    agent_texts = [t.text for t in turns if t.role == "agent"]
    assert f"You said: {SECRET}" in agent_texts and "Recording resumed." in agent_texts  # stored as spoken
    events = await ch.astore.list_session_events(call.session_id)
    assert [(e.kind, e.at_ms) for e in events] == [("recording_paused", paused.at_ms),
                                                   ("recording_resumed", resumed.at_ms)]

    # REST serves the stored text: no transcript surface returns the paused words.
    rest = await _rest_transcript(ch, call.session_id, tmp_path)
    assert [(t["text"], t["redacted"]) for t in rest["turns"] if t["role"] == "user"] == [
        ("hello", False), ("pause", False), (REDACTED, True), (REDACTED, True), ("after", False)]
    # ...and shows the gap.
    assert [(e["kind"], e["at_ms"]) for e in rest["events"]] == [("recording_paused", paused.at_ms),
                                                                 ("recording_resumed", resumed.at_ms)]

    # The session's log lines name the turn, never its words.
    session_lines = [r.getMessage() for r in caplog.records if r.name.endswith("pipeline.session")]
    assert any(f"user turn {secret_turn.seq}: '{REDACTED}'" in line for line in session_lines)
    assert not [line for line in session_lines if "4111" in line or "'resume'" in line]
    assert any("recording paused at" in line for line in session_lines)


async def test_pause_protects_the_transcript_without_a_recording(agent_channel) -> None:
    """A pipe that does not record: pause and resume are not "unsupported", they still redact."""
    ch = await agent_channel()
    runner = await ch.runner()
    config = PipeConfig(agent_id="probe", vad={"engine": "webrtc"}, recording={"enabled": False})
    call = await ch.call(config=config, speed=2)
    assert call.session.recorder is None
    call.session.push_text("pause")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Recording paused.")
    call.session.push_text("the secret word is swordfish")
    await runner.wait_event("user_turn", lambda e: e["text"] == "the secret word is swordfish")
    call.session.push_text("resume")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Recording resumed.")
    await call.hang_up()
    await call.ended()
    assert not runner.events("error")  # no `unsupported` for recording control
    turns = [(t.text, t.redacted) for t in await ch.astore.list_turns(call.session_id) if t.role == "user"]
    assert turns == [("pause", False), (REDACTED, True), (REDACTED, True)]
    kinds = [e.kind for e in await ch.astore.list_session_events(call.session_id)]
    assert kinds == ["recording_paused", "recording_resumed"]
    with pytest.raises(NotFoundError):
        await ch.astore.get_recording(call.session_id)


async def test_spoken_turn_while_paused_is_redacted_and_silent_in_the_recording(agent_channel) -> None:
    ch = await agent_channel()
    runner = await ch.runner()
    call = await ch.call(speed=0, config=PipeConfig(agent_id="probe", vad={"engine": "webrtc"},
                                                    endpointing={"silence_ms": 600}))
    line = RealtimeLine(call.session)
    await line.silence(0.3)

    def spoken(pred):  # an agent reply has been spoken to its end
        return lambda: any(pred(d) for d in call.of(ev.AgentSpeechDone))

    call.session.push_text("pause")
    assert await line.until(spoken(lambda d: d.text == "Recording paused."), 20)
    await line.silence(0.3)
    await line.play(synth("Please book a table for two people on Friday evening."))
    assert await line.until(lambda: any(u.redacted and not u.typed for u in call.of(ev.UserTurn)), 20)
    secret = next(u for u in call.of(ev.UserTurn) if u.redacted and not u.typed)
    assert await line.until(spoken(lambda d: d.seq == secret.seq), 20)
    call.session.push_text("resume")
    assert await line.until(spoken(lambda d: d.text == "Recording resumed."), 20)
    await line.silence(0.3)
    await line.play(synth("What are your opening hours?"))
    assert await line.until(lambda: any(not u.typed and not u.redacted for u in call.of(ev.UserTurn)), 20)
    clear = next(u for u in call.of(ev.UserTurn) if not u.typed and not u.redacted)
    assert await line.until(spoken(lambda d: d.seq == clear.seq), 20)
    await call.hang_up()
    await call.ended()

    # The agent got the spoken words; the client and SQL did not.
    heard = [e["text"].lower() for e in runner.events("user_turn")]
    assert any("table for two" in h and "friday" in h for h in heard), heard
    assert secret.text == REDACTED
    assert not any("table" in u.text.lower() for u in call.of(ev.UserTurn) + call.of(ev.UserPartial))
    assert "opening hours" in clear.text.lower()
    rows = {t.seq: t for t in await ch.astore.list_turns(call.session_id)}
    assert (rows[secret.seq].text, rows[secret.seq].redacted) == (REDACTED, True)
    assert not rows[clear.seq].redacted and "opening hours" in rows[clear.seq].text.lower()
    assert not [t for t in rows.values() if t.role == "user" and "table" in t.text.lower()]

    # The recording: the paused span is silence on both channels, and the redacted turn lies inside it;
    # the turn after the resume is on the user channel.
    (paused,), (resumed,) = call.of(ev.RecordingPaused), call.of(ev.RecordingResumed)
    events = await ch.astore.list_session_events(call.session_id)
    assert [(e.kind, e.at_ms) for e in events] == [("recording_paused", paused.at_ms),
                                                   ("recording_resumed", resumed.at_ms)]
    assert paused.at_ms < secret.start_ms < secret.end_ms < resumed.at_ms
    rec = await ch.astore.get_recording(call.session_id)
    with wave.open(rec.path) as w:
        rate = w.getframerate()
        stereo = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2).astype(np.float64)

    def rms(channel: int, start_ms: int, end_ms: int) -> float:
        seg = stereo[start_ms * rate // 1000:end_ms * rate // 1000, channel]
        assert len(seg) > rate // 10
        return float(np.sqrt(np.mean(seg ** 2)))

    assert rms(0, paused.at_ms, resumed.at_ms) == 0.0 and rms(1, paused.at_ms, resumed.at_ms) == 0.0
    assert rms(0, clear.start_ms, clear.end_ms) > 300
