"""The client WebSocket over real sockets: refusals, negotiation, pacing, barge-in `clear`, limits.

Real speech (espeak-ng) streams in at real time; whisper and espeak answer through the in-process echo
agent; every close is checked for its documented code and reason, and SQL is checked for what survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

from speechpipe.websocket_edge.client_ws import CLOSE_CODES

from .fixtures_web import LONG_REPLY, start_web_server
from .speech import silence, synth, wer

# The fixtures (server, clients) live on the session loop: the tests must run there too.
pytestmark = pytest.mark.asyncio(loop_scope="session")

SENTENCE = "Can you tell me when the pharmacy opens tomorrow?"


def pcm_of(client) -> np.ndarray:
    return np.frombuffer(b"".join(a for _, a in client.audio), np.int16)


# ---------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case", ["malformed", "unknown", "expired", "used", "wrong_pipe", "api_key_revoked",
                                  "origin"])
async def test_refused_connections_get_their_close_code_and_no_session(web_server, raw_connect, case):
    srv = web_server
    pipe = srv.pipe("echo")
    headers = None
    if case == "malformed":
        url, name = srv.ws_url(pipe, "not-a-token"), "token_malformed"
    elif case == "unknown":
        url, name = srv.ws_url(pipe, "spt_" + "A" * 43), "token_unknown"
    elif case == "expired":
        token = srv.token(pipe, ttl_s=0.2)
        await asyncio.sleep(0.4)
        url, name = srv.ws_url(pipe, token), "token_expired"
    elif case == "used":
        token = srv.token(pipe)
        first = await raw_connect(srv.ws_url(pipe, token))
        await first.send_json({"type": "start", "sample_rate": 16000})
        await first.wait_for("session.started")
        url, name = srv.ws_url(pipe, token), "token_used"
    elif case == "wrong_pipe":
        url, name = srv.ws_url(srv.pipe("long-talker"), srv.token(pipe)), "token_wrong_pipe"
    elif case == "api_key_revoked":
        key = srv.store.create_api_key("to-revoke")
        token = srv.token(pipe, api_key_id=key.key.id)
        srv.store.revoke_api_key(key.key.id)
        url, name = srv.ws_url(pipe, token), "api_key_revoked"
    else:
        url, name = srv.ws_url(pipe, srv.token(pipe)), "origin_not_allowed"
        headers = {"Origin": "https://evil.example"}
    before = srv.session_count()
    client = await raw_connect(url, headers=headers)
    await client.send_json({"type": "start", "sample_rate": 16000})
    code, reason = await client.closed(10)
    assert (code, reason.split(":")[0]) == (CLOSE_CODES[name], name)
    assert not client.audio and not client.of("session.started")
    assert srv.session_count() == before  # refused before any session row existed


async def test_same_origin_and_listed_origins_are_allowed(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)), headers={"Origin": srv.url})
    await client.send_json({"type": "start", "sample_rate": 16000})
    await client.wait_for("session.started")
    await client.send_json({"type": "stop"})
    assert await client.closed() == (1000, "normal: client_stop")


# --------------------------------------------------------------------------------- a whole session


async def test_spoken_turn_at_8k_in_48k_out_is_answered_paced_and_stored(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 8000, "output_sample_rate": 48000})
    (started,) = await client.wait_for("session.started")
    assert (started["input_sample_rate"], started["output_sample_rate"]) == (8000, 48000)
    speech = synth(SENTENCE, rate=8000)
    await client.stream(np.concatenate([silence(300, 8000), speech, silence(700, 8000)]), 8000)
    (turn,) = await client.wait_for("user_turn")
    assert wer(SENTENCE, turn["text"]) <= 0.15
    stream_silence = asyncio.ensure_future(client.stream(silence(12000, 8000), 8000))
    (done,) = await client.wait_for("agent.speech_done", timeout_s=20)
    await asyncio.sleep(0.3)
    assert done["text"] == f"You said: {turn['text']}" and not done["interrupted"]
    assert {len(a) for _, a in client.audio} == {1920}  # 20 ms frames at 48 kHz
    (metric,) = [m for m in client.of("metric") if m["name"] == "turn"]
    assert 0 < metric["values"]["response_latency_ms"] < 3000

    # Paced: audio arrives at real time. The first 100 ms may come at once (the jitter allowance); after
    # that the client is never more than that far ahead of the wall clock, and never starved mid-reply.
    times = np.array([t for t, _ in client.audio])
    audio_s = np.arange(1, len(times) + 1) * 0.02
    ahead = audio_s - (times - times[0])
    assert ahead.max() <= 0.1 + 0.02 + 0.03, ahead.max()
    assert ahead.min() >= -0.06, ahead.min()  # a late frame would leave the client's buffer dry
    reply_s = (done["end_ms"] - done["start_ms"]) / 1000
    print(f"\npacing: client ahead of real time max {ahead.max() * 1000:.0f} ms, "
          f"min {ahead.min() * 1000:.0f} ms; {len(times)} frames for a {reply_s:.2f} s reply")
    assert abs(len(times) * 0.02 - reply_s) < 0.1
    stream_silence.cancel()

    await client.send_json({"type": "stop"})
    assert await client.closed() == (1000, "normal: client_stop")
    rec = await srv.ended(started["session_id"])
    assert rec.end_reason == "client_stop" and rec.direction == "web"
    turns = srv.turns(started["session_id"])
    assert [(t.role, t.text) for t in turns] == [("user", turn["text"]), ("agent", done["text"])]


async def test_barge_in_sends_clear_at_once_and_stops_the_audio(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("long-talker")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 16000})
    (started,) = await client.wait_for("session.started")
    await client.stream(np.concatenate([synth("What are your opening hours?"), silence(600)]), 16000)
    await client.wait_for("agent.speech_started", timeout_s=10)
    await client.stream(silence(2000), 16000)  # the agent talks for a while
    barge = asyncio.ensure_future(client.stream(np.concatenate(
        [synth("Stop, I want to speak to a person please."), silence(1500)]), 16000))
    (clear,) = await client.wait_for("clear", timeout_s=10)
    onset = [e for e in client.of("user.speech_started") if e["_t"] < clear["_t"]][-1]
    await barge
    # Read once the interruption has been streamed: the metric follows `clear` on the socket and need not
    # have been read yet when `clear` was.
    (reaction,) = [m["values"]["reaction_ms"] for m in client.of("metric") if m["name"] == "barge_in"]
    (done,) = [d for d in client.of("agent.speech_done") if d["text"] == LONG_REPLY]
    assert done["interrupted"] and done["heard_text"] and LONG_REPLY.startswith(done["heard_text"])

    # Judged by what the client received, in order on the socket, not by wall-clock gaps (a busy machine
    # stretches those): the agent's audio paused at the onset, so almost none follows the onset event
    # (frames already in flight); none of the cut reply follows `clear`.
    def seconds_of_audio(since: float, until: float) -> float:
        return sum(len(pcm) for t, pcm in client.audio if since < t <= until) / 2 / 16000

    after_onset = seconds_of_audio(onset["_t"], clear["_t"])
    print(f"\nraw barge-in: {after_onset * 1000:.0f} ms of agent audio after the onset event; "
          f"clear {(clear['_t'] - onset['_t']) * 1000:.0f} ms after it; server reaction {reaction:.0f} ms")
    assert after_onset <= 0.1
    # The next audio is the answer to the user's turn, announced by `agent_reply` (its first frames can
    # overtake `agent.speech_started`).
    next_reply = min((e["_t"] for e in client.of("agent_reply") if e["_t"] > clear["_t"]),
                     default=float("inf"))
    assert seconds_of_audio(clear["_t"], next_reply) == 0
    (barge_in,) = client.of("barge_in")
    assert barge_in["heard_text"] == done["heard_text"]

    await client.send_json({"type": "stop"})
    await client.closed()
    turns = srv.turns(started["session_id"])
    agent = [t for t in turns if t.role == "agent"]
    assert agent[0].interrupted and agent[0].heard_text == done["heard_text"]


# ----------------------------------------------------------------------------- limits and garbage


async def _typed_turn(client) -> dict:
    """One typed user turn and the agent's whole reply; returns the agent.speech_done event."""
    n = len(client.of("agent.speech_done"))
    await client.send_json({"type": "text", "text": "hello there"})
    done = await client.wait_for("agent.speech_done", n + 1)
    return done[-1]


async def test_text_garbage_gets_error_events_then_close_1007_and_turns_stay(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 16000})
    (started,) = await client.wait_for("session.started")
    await client.stream(np.concatenate([synth(SENTENCE), silence(800)]), 16000)
    await client.wait_for("user_turn")
    await client.wait_for("agent.speech_done", timeout_s=20)
    garbage = ["{not json", "[1, 2]", '{"type": "dance"}', '{"type": "start", "sample_rate": 16000}',
               '{"type": "text", "text": 5}']
    codes = ["bad_message", "bad_message", "unknown_type", "already_started"]
    for raw in garbage:
        await client.ws.send_str(raw)
    code, reason = await client.closed()
    assert [e["code"] for e in client.of("error")] == codes
    assert code == CLOSE_CODES["bad_message"] == 1007 and reason.startswith("bad_message: 5 invalid messages")
    rec = await srv.ended(started["session_id"])
    assert rec.end_reason == "bad_message"
    turns = srv.turns(started["session_id"])
    assert [t.role for t in turns] == ["user", "agent"] and wer(SENTENCE, turns[0].text) <= 0.15


@pytest.mark.parametrize("size", ["limit+2", "1 MB", "16 MB"])
async def test_oversized_frame_closes_1009_and_turns_stay(web_server, raw_connect, size):
    """Whatever its size (just over the limit, or past what the server will even buffer), an oversized
    frame is `frame_too_big` on the wire and in SQL."""
    srv = web_server
    pipe = srv.pipe("echo")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 16000})
    (started,) = await client.wait_for("session.started")
    done = await _typed_turn(client)
    n = {"limit+2": srv.edge.limits.max_frame_bytes + 2, "1 MB": 1 << 20, "16 MB": 16 << 20}[size]
    with contextlib.suppress(ConnectionError):  # the server may close before it has read all of it
        await client.ws.send_bytes(bytes(n))
    code, reason = await client.closed()
    if size == "16 MB" and code == 1006:
        pass  # the server closed while the client still sent: its TCP reset can overtake the close frame
    else:
        assert (code, reason.split(":")[0]) == (1009, "frame_too_big")
    assert (await srv.ended(started["session_id"])).end_reason == "frame_too_big"
    assert [(t.role, t.text) for t in srv.turns(started["session_id"])] == [
        ("user", "hello there"), ("agent", done["text"])]


@pytest.mark.parametrize("started_first", [False, True], ids=["before-start", "after-start"])
async def test_a_client_that_only_pings_is_closed_4408(web_server, raw_connect, started_first):
    """WebSocket pings keep the TCP path alive but are not messages: they do not reset the idle timer."""
    srv = web_server
    pipe = srv.pipe("echo")
    with srv.limits(idle_timeout_s=1.0):
        client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
        if started_first:
            await client.send_json({"type": "start", "sample_rate": 16000})
            await client.wait_for("session.started")
        t0 = time.monotonic()
        while not client.ws.closed and time.monotonic() - t0 < 6:
            with contextlib.suppress(ConnectionError):
                await client.ws.ping()
            await asyncio.sleep(0.2)
        code, reason = await client.closed()
    assert (code, reason.split(":")[0]) == (4408, "idle_timeout")
    if started_first:
        (started,) = client.of("session.started")
        assert (await srv.ended(started["session_id"])).end_reason == "idle_timeout"


async def test_idle_client_closes_4408(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    with srv.limits(idle_timeout_s=1.0):
        client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
        await client.send_json({"type": "start", "sample_rate": 16000})
        (started,) = await client.wait_for("session.started")
        done = await _typed_turn(client)
        t0 = time.monotonic()
        code, reason = await client.closed()
    assert (code, reason.split(":")[0]) == (4408, "idle_timeout") and time.monotonic() - t0 < 3
    assert (await srv.ended(started["session_id"])).end_reason == "idle_timeout"
    assert [t.text for t in srv.turns(started["session_id"])] == ["hello there", done["text"]]


async def test_message_flood_closes_4429(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 16000})
    (started,) = await client.wait_for("session.started")
    for _ in range(srv.edge.limits.message_burst + 50):
        await client.ws.send_bytes(bytes(2))
    code, reason = await client.closed()
    assert (code, reason.split(":")[0]) == (4429, "rate_limited")
    assert (await srv.ended(started["session_id"])).end_reason == "rate_limited"


async def test_bad_start_is_an_error_event_not_a_session(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    before = srv.session_count()
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 11025})
    await client.send_json({"type": "text", "text": "too early"})
    errors = await client.wait_for("error", 2)
    assert [e["code"] for e in errors] == ["bad_start", "not_started"]
    assert srv.session_count() == before
    await client.send_json({"type": "start", "sample_rate": 24000})
    (started,) = await client.wait_for("session.started")
    assert started["output_sample_rate"] == 24000  # output follows the input rate unless asked otherwise
    await client.send_json({"type": "stop"})
    assert (await client.closed())[0] == 1000


async def test_client_that_stops_reading_is_closed_4410_and_session_ends_cleanly(web_server):
    """A client that stops reading: its socket fills, the server's queue passes its bound, the session ends
    (turns kept) and the close frame with 4410 is waiting for the client when it reads again."""
    import websockets

    srv = web_server
    pipe = srv.pipe("long-talker")
    async with websockets.connect(srv.ws_url(pipe, srv.token(pipe)), max_queue=1, max_size=None,
                                  compression=None) as ws:
        await ws.send('{"type": "start", "sample_rate": 16000, "output_sample_rate": 48000}')
        started = None
        while started is None:  # read normally until the session has started
            msg = await ws.recv()
            if isinstance(msg, str) and '"session.started"' in msg:
                import json

                started = json.loads(msg)
        await ws.send('{"type": "text", "text": "What are your opening hours?"}')
        # ... and never read again: the long reply (≈15 s at 96 kB/s) piles up behind the socket.
        t0 = time.monotonic()
        rec = await srv.ended(started["session_id"], timeout_s=30)
        print(f"\nslow consumer: session ended {time.monotonic() - t0:.1f} s after the client stopped")
        assert rec.end_reason == "slow_consumer"
        code = None
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as exc:
            code, reason = exc.rcvd.code, exc.rcvd.reason
    assert (code, reason.split(":")[0]) == (4410, "slow_consumer")
    turns = srv.turns(started["session_id"])
    assert turns[0].role == "user" and turns[0].text == "What are your opening hours?"


async def test_no_agent_apologises_then_closes_1000_with_the_reason(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("absent")
    client = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
    await client.send_json({"type": "start", "sample_rate": 16000})
    (started,) = await client.wait_for("session.started")
    code, reason = await client.closed(30)
    assert (code, reason) == (1000, "normal: no_runner")
    (apology,) = client.of("agent_reply")
    assert apology["text"] == "Sorry, no agent is available right now. Please try again later."
    assert len(pcm_of(client)) > 16000  # it was spoken (over a second of audio) before the close
    assert client.of("session.ended")[-1]["reason"] == "no_runner"
    assert (await srv.ended(started["session_id"])).end_reason == "no_runner"


async def test_server_shutdown_closes_1001_and_ends_the_session(web_server, engines, raw_connect, tmp_path):
    from speechpipe.settings import Settings
    from speechpipe.storage import Store

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'sd.db'}")
    settings.ensure_dirs()
    store = Store(settings.db_url)
    store.upgrade()
    other = start_web_server(settings, store, engines)
    try:
        pipe = other.pipe("echo")
        client = await raw_connect(other.ws_url(pipe, other.token(pipe)))
        await client.send_json({"type": "start", "sample_rate": 16000})
        (started,) = await client.wait_for("session.started")
        done = await _typed_turn(client)
        await asyncio.to_thread(other.stop)
        code, reason = await client.closed()
        assert (code, reason.split(":")[0]) == (1001, "server_shutdown")
        assert store.get_session(started["session_id"]).end_reason == "server_shutdown"
        assert [t.text for t in store.list_turns(started["session_id"])] == ["hello there", done["text"]]
    finally:
        store.close()


async def test_page_and_sdk_are_served(web_server):
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(web_server.url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html" and "/static/page.js" in await r.text()
        async with http.get(web_server.url + "/sdk/speechpipe.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
            assert r.headers["Access-Control-Allow-Origin"] == "*"  # importable from other origins
            assert "export class SpeechPipeSession" in await r.text()
        async with http.get(web_server.url + "/sdk/speechpipe-worklets.js") as r:
            assert r.status == 200 and 'registerProcessor("speechpipe-capture"' in await r.text()
        for path in ("/sdk/../client_ws.py", "/sdk/page.js", "/static/speechpipe.js"):
            async with http.get(web_server.url + path) as r:
                assert r.status == 404, path


async def test_session_limit_refuses_4503_without_using_the_token(web_server, raw_connect):
    srv = web_server
    pipe = srv.pipe("echo")
    with srv.limits(max_sessions=1):
        first = await raw_connect(srv.ws_url(pipe, srv.token(pipe)))
        await first.send_json({"type": "start", "sample_rate": 16000})
        await first.wait_for("session.started")
        token = srv.token(pipe)
        second = await raw_connect(srv.ws_url(pipe, token))
        code, reason = await second.closed()
        assert (code, reason.split(":")[0]) == (4503, "unavailable")
        await first.send_json({"type": "stop"})
        await first.closed()
        for _ in range(50):  # the first session's slot frees once it has ended
            if srv.edge.live_sessions == 0:
                break
            await asyncio.sleep(0.1)
        third = await raw_connect(srv.ws_url(pipe, token))  # the refused token is still good
        await third.send_json({"type": "start", "sample_rate": 16000})
        await third.wait_for("session.started")


async def test_a_session_that_cannot_start_tells_the_client_and_ends_its_row(web_server, raw_connect,
                                                                              tmp_path):
    import aiohttp

    srv = web_server
    # A model directory that resolves (so the pipe is accepted) but does not load: the start fails at STT.
    broken = tmp_path / "broken-whisper"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a CTranslate2 model")
    (broken / "config.json").write_text("{}")
    key = srv.store.create_api_key("start-failure").secret
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(f"{srv.url}/v1/pipes", json={"config": {
                "agent_id": "echo", "stt": {"engine": "whisper", "model": str(broken)}}}) as resp:
            assert resp.status == 201, await resp.text()
            pipe = (await resp.json())["id"]
        async with http.post(f"{srv.url}/v1/sessions/tokens", json={"pipe_id": pipe}) as resp:
            assert resp.status == 201, await resp.text()
            token = (await resp.json())["token"]
        client = await raw_connect(srv.ws_url(pipe, token))
        await client.send_json({"type": "start", "sample_rate": 16000})
        code, reason = await client.closed(60)
        assert (code, reason.split(":")[0]) == (4500, "internal_error"), reason
        (err,) = client.of("error")
        assert (err["code"], err["stage"]) == ("start_failed", "stt")
        assert str(broken) not in err["message"]  # no server paths in what the client sees
        # The row the failed start opened is ended, with its reason, and readable over REST.
        async with http.get(f"{srv.url}/v1/sessions", params={"pipe_id": pipe}) as resp:
            assert resp.status == 200, await resp.text()
            (row,) = (await resp.json())["data"]
    assert row["end_reason"] == "start_failed" and row["ended_at"] is not None
