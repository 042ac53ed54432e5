"""The speech pipeline end to end on real audio: espeak speech in, whisper turns, espeak replies out."""

from __future__ import annotations

import asyncio
import wave

import numpy as np
import pytest

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import CallbackAgent
from speechpipe.pipeline.config import PipeConfig

from .sounds import cough, white_noise
from .speech import phone_speech, synth, wer

SENTENCES = [
    "I would like to book a table for dinner on Friday.",
    "Can you tell me when the pharmacy opens tomorrow?",
    "I want to speak to a person please.",
]
WER_BOUND = 0.15  # espeak speech through tiny.en: measured 0.0 on these, bound leaves room for one slip


async def test_turns_at_16k_are_transcribed_answered_and_recorded(talk):
    t = await talk()
    for sentence in SENTENCES:
        await t.line.play(synth(sentence))
        n = len(t.of(ev.AgentSpeechDone))
        assert await t.line.until(lambda n=n: len(t.of(ev.AgentSpeechDone)) > n, 15)
        await t.line.silence(0.3)
    turns = t.of(ev.UserTurn)
    assert [u.text for u in turns] and all(
        wer(s, u.text) <= WER_BOUND for s, u in zip(SENTENCES, turns, strict=True)), [u.text for u in turns]
    done = t.of(ev.AgentSpeechDone)
    assert all(not d.interrupted and d.heard_text == d.text for d in done)
    assert [d.text for d in done] == [f"You said: {u.text}" for u in turns]
    latencies = [m.values["response_latency_ms"] for m in t.of(ev.Metric) if m.name == "turn"]
    assert len(latencies) == 3 and all(0 < x < 5000 for x in latencies)

    await t.session.end("hangup")
    path = t.session.recorder.path
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        stereo = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    user, agent = stereo[0::2].astype(float), stereo[1::2].astype(float)

    def energy(x, start_ms, end_ms):
        seg = x[start_ms * rate // 1000:end_ms * rate // 1000]
        return float(np.sqrt(np.mean(seg ** 2))) if len(seg) else 0.0

    for u in turns:  # the user's words are on the left channel where the turn says, agent silent there
        assert energy(user, u.start_ms, u.end_ms) > 300
        assert energy(agent, u.start_ms, u.end_ms) < 50
    for d in done:  # the agent's reply is on the right channel where its turn says
        assert energy(agent, d.start_ms, d.end_ms) > 300
        assert d.start_ms >= turns[0].end_ms


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
async def test_phone_quality_8k_g711_input(talk, law):
    t = await talk(input_rate=8000, output_rate=8000, direction="inbound_phone")
    sentence = SENTENCES[0]
    await t.line.play(phone_speech(sentence, law=law, rate=8000))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechDone), 15)
    (turn,) = t.of(ev.UserTurn)
    assert wer(sentence, turn.text) <= WER_BOUND
    out = t.line.received()
    assert np.sqrt(np.mean(out.astype(float) ** 2)) > 100  # the reply came back at 8 kHz


LONG_REPLY = ("Thank you for calling. Our opening hours are from nine in the morning until six in the "
              "evening on weekdays, and from ten until four on Saturdays. We are closed on Sundays and "
              "on public holidays. You can also reach us by email at any time.")


async def test_barge_in_cuts_the_agent_and_reports_what_was_heard(talk):
    t = await talk(agent=CallbackAgent(lambda text: LONG_REPLY))
    await t.line.play(synth("What are your opening hours?"))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechStarted), 10)
    await t.line.silence(2.0)  # let the agent talk for a while
    await t.line.play(synth("Stop, I want to speak to a person please."))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechDone), 5)
    (done,) = [d for d in t.of(ev.AgentSpeechDone) if d.text == LONG_REPLY]
    assert done.interrupted
    assert done.heard_text and LONG_REPLY.startswith(done.heard_text)
    assert len(done.heard_text) < len(LONG_REPLY)
    assert t.of(ev.Clear) and t.of(ev.BargeIn)
    reactions = [m.values["reaction_ms"] for m in t.of(ev.Metric) if m.name == "barge_in"]
    assert reactions and reactions[0] < 400
    await t.line.until(lambda: len(t.of(ev.UserTurn)) == 2, 10)
    assert "person" in t.of(ev.UserTurn)[1].text.lower()


# espeak-ng spells "mhm" as letters, so the spoken backchannels here are ones it says like a person.
@pytest.mark.parametrize("noise", ["cough", "okay", "right", "uh-huh", "noise"])
async def test_noise_and_backchannels_do_not_cut_the_agent(talk, noise):
    t = await talk(agent=CallbackAgent(lambda text: LONG_REPLY))
    await t.line.play(synth("What are your opening hours?"))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechStarted), 10)
    await t.line.silence(1.5)
    sound = {"cough": lambda: np.concatenate([cough(), np.zeros(3200, np.int16), cough(seed=1)]),
             "okay": lambda: synth("okay"),
             "right": lambda: synth("right"),
             "uh-huh": lambda: synth("uh-huh"),
             "noise": lambda: white_noise(800, -30)}[noise]()
    await t.line.play(sound)
    assert await t.line.until(lambda: t.of(ev.AgentSpeechDone), 30)
    (done,) = t.of(ev.AgentSpeechDone)
    assert not done.interrupted and done.heard_text == LONG_REPLY
    assert not t.of(ev.BargeIn) and len(t.of(ev.UserTurn)) == 1


async def test_typed_text_is_a_turn(talk):
    t = await talk()
    t.session.push_text("hello there")
    assert await t.line.until(lambda: t.of(ev.AgentSpeechDone), 10)
    assert t.of(ev.UserTurn)[0].typed and t.of(ev.AgentSpeechDone)[0].text == "You said: hello there"


async def test_agent_say_and_greeting(talk):
    t = await talk(agent=CallbackAgent(lambda text: "ok", greeting="Hello, how can I help?"))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechDone), 10)
    assert t.of(ev.AgentSpeechDone)[0].text == "Hello, how can I help?"


def test_pipe_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError):
        PipeConfig(agent_id="a", endpointing={"silence_ms": 10})
    with pytest.raises(ValueError):
        PipeConfig(agent_id="a", tts={"voice": "en; rm -rf /"})
    with pytest.raises(ValueError):
        PipeConfig(agent_id="a", bogus=1)


KOREAN = ["안녕하세요 오늘 날씨가 좋네요", "내일 아침에 회의가 있습니다"]


async def test_vosk_streams_partials_and_final_follows_the_endpoint(talk):
    """Korean vosk (the only vosk model on PyPI): two concurrent sessions share one model; partials arrive
    while the audio streams, and each turn gets its final text."""
    config = PipeConfig(agent_id="test", stt={"engine": "vosk", "language": "ko"})
    a = await talk(config, CallbackAgent(lambda text: None))  # a silent agent: no replies to talk over
    b = await talk(config, CallbackAgent(lambda text: None))
    assert a.session.stt_engine is b.session.stt_engine

    async def speak(t, texts):
        for n, text in enumerate(texts, 1):
            await t.line.play(synth(text, voice="ko"))
            await t.line.until(lambda n=n: len(t.of(ev.UserTurn)) >= n, 10)
            await t.line.silence(1.0)

    # A vosk recognizer builds its share of the decoding graph on its first utterance (~1 s of CPU), so the
    # first turn of a cold process is slow; the second shows the steady state.
    await asyncio.gather(speak(a, KOREAN), speak(b, KOREAN[::-1]))
    for t in (a, b):
        turns = t.of(ev.UserTurn)
        assert len(turns) == 2 and all(u.text for u in turns)
        for turn in turns:  # partials arrive before each turn's final text
            start = t.events.index(next(e for e in t.events if isinstance(e, ev.UserSpeechStarted)
                                         and t.events.index(e) < t.events.index(turn)))
            assert any(start < t.events.index(p) < t.events.index(turn) for p in t.of(ev.UserPartial))
        # One final per turn. How fast it comes is a benchmark figure (bench/pipeline.py), not a test:
        # a wall-clock bound here failed on a loaded 2-core machine (262 ms against 200).
        assert len([m for m in t.of(ev.Metric) if m.name == "stt"]) == 2
