"""Turn detection on real speech through a real session: a finished sentence ends at the shortest silence,
a sentence paused mid-thought stays one turn, on the web (16 kHz) and phone (8 kHz μ-law) legs.

The audio goes in lock-step with the STT: each 20 ms frame is pushed only once the session has taken the
one before and every STT call it made has finished. Decisions then depend on the session clock alone
(a verdict lands on the frame after its pause's decode, as on an idle machine), never on how fast this
machine decodes, so nothing here has a timing threshold. The session keeps where a turn ends independent
of the decode's speed by itself too: one test feeds the same audio all at once and gets the same turns.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from bench.turns import COMPLETE_ESPEAK, PAUSED_ESPEAK
from bench.web_sessions import last_voiced_sample
from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import CallbackAgent
from speechpipe.pipeline.audio import Resampler
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.models import get_stt_engine
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo
from speechpipe.pipeline.turns import HeuristicTurnDetector, TurnCues, prosody
from tests import realspeech
from tests.speech import g711_roundtrip, resample, silence, synth, wer

FINISHED = "What time does the pharmacy open tomorrow?"
FOLLOW_UP = "I also need a prescription refilled."
# Spoken whole with 700 ms of silence after "with": the pause a caller makes looking for a word.
PAUSED_HEAD, PAUSED_TAIL = "I'd like to order a large pizza with", "olives and mushrooms."


def frames(session: PipelineSession, pcm: np.ndarray) -> list[np.ndarray]:
    n = session.input_rate // 50
    return [pcm[i:i + n] for i in range(0, len(pcm) - n + 1, n)]


async def taken(session: PipelineSession, poll_s: float = 0.001) -> None:
    """Until the session's frame loop has taken every frame pushed."""
    while session._input.qsize() and not session.ended.is_set():  # noqa: ASYNC110 (no event for it)
        await asyncio.sleep(poll_s)


async def lockstep(session: PipelineSession, pcm: np.ndarray) -> None:
    for frame in frames(session, pcm):
        session.push_audio(frame)
        session.pull_frame()
        await taken(session)
        await asyncio.sleep(0.001)  # the input loop finishes the frame it took
        if session.stt._tail is not None:
            await asyncio.shield(session.stt._tail)
        await asyncio.sleep(0)  # the decode's done-callbacks (the verdict) run before the next frame


async def burst(session: PipelineSession, pcm: np.ndarray) -> None:
    """All of `pcm` at once, as a machine far behind real time takes it: the frame loop runs ahead of
    every decode. Returns once every frame has been taken."""
    for frame in frames(session, pcm):
        session.push_audio(frame)
    await taken(session, 0.005)


def paused_sentence(rate: int) -> np.ndarray:
    """The sentence spoken whole, with a 700 ms break after "with" (espeak-ng SSML: the break sits inside
    the sentence's intonation, as a caller's pause for a word does)."""
    return on_leg(synth(f'<speak>{PAUSED_HEAD} <break time="700ms"/> {PAUSED_TAIL}</speak>', ssml=True), rate)


def on_leg(pcm: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz speech as the leg carries it: as is on the web, 8 kHz μ-law on the phone."""
    return pcm if rate == 16000 else g711_roundtrip(resample(pcm, 16000, 8000))


def speech(text: str, rate: int) -> np.ndarray:
    return on_leg(synth(text), rate)


async def session_for(engines: Engines, rate: int, **endpointing) -> tuple[PipelineSession, list[ev.Event]]:
    """A session whose UserTurn events carry `at_ms`: the session clock when the turn ended."""
    config = PipeConfig(agent_id="turns", endpointing=endpointing, stt={"partials": False})
    session = PipelineSession(SessionInfo("pipe_turns", "turns", "web" if rate == 16000 else "inbound_phone"),
                              config, engines, input_rate=rate, output_rate=rate)
    events: list[ev.Event] = []

    def keep(event: ev.Event) -> None:
        if isinstance(event, ev.UserTurn):
            event.at_ms = session._clock * 1000 // 16000  # type: ignore[attr-defined]
        events.append(event)

    session.subscribe(keep)
    await session.start()
    await session.attach_agent(CallbackAgent(lambda text: None))
    return session, events


def turns(events: list[ev.Event]) -> list[ev.UserTurn]:
    return [e for e in events if isinstance(e, ev.UserTurn)]


@pytest.mark.parametrize("rate", [16000, 8000], ids=["web", "phone"])
async def test_a_finished_sentence_ends_at_the_shortest_silence(engines: Engines, rate: int) -> None:
    session, events = await session_for(engines, rate)
    try:
        await lockstep(session, np.concatenate([silence(300, rate), speech(FINISHED, rate)]))
        await lockstep(session, silence(240, rate))  # 240 ms: past the finished endpoint, far from 500 ms
        got = turns(events)
        assert len(got) == 1 and wer(FINISHED, got[0].text) <= 0.2, got
        # Ended at the shortest silence by the session clock (VAD silence: the voice's tail and the VAD's
        # hang-over come first), well before silence endpointing's 500 ms.
        assert got[0].at_ms - got[0].end_ms <= 200 + 20, got[0]
    finally:
        await session.end("test_over")


@pytest.mark.parametrize("rate", [16000, 8000], ids=["web", "phone"])
async def test_a_sentence_paused_mid_thought_stays_one_turn(engines: Engines, rate: int) -> None:
    session, events = await session_for(engines, rate)
    try:
        await lockstep(session, np.concatenate([silence(300, rate), paused_sentence(rate)]))
        await lockstep(session, silence(1600, rate))  # the longest silence: whatever was judged, it ends
        got = turns(events)
        assert len(got) == 1, [t.text for t in got]
        assert wer(f"{PAUSED_HEAD} {PAUSED_TAIL}", got[0].text) <= 0.25, got[0].text
        # The pause was heard and judged unfinished: a finished verdict would have ended the turn in it.
        assert not any(isinstance(e, ev.UserNonTurn) for e in events)
    finally:
        await session.end("test_over")


def recorded(index: int, rate: int) -> tuple[str, np.ndarray]:
    """A real recorded one-sentence prompt as the leg carries it."""
    u = realspeech.single_sentences()[index]
    return u.text, realspeech.wideband(u) if rate == 16000 else realspeech.telephone(u)


@pytest.mark.parametrize("rate", [16000, 8000], ids=["web", "phone"])
@pytest.mark.parametrize("voice", ["espeak", "recorded"])
async def test_where_a_turn_ends_does_not_depend_on_how_fast_the_pause_is_decoded(engines: Engines,
                                                                                  voice: str,
                                                                                  rate: int) -> None:
    """A finished sentence, 400 ms of silence (past the shortest endpoint, short of silence endpointing's
    500 ms), then more: the same two turns whether the audio comes in lock-step with the STT or all at once,
    the frame loop far ahead of the pause's decode (its verdict would land after the speech resumed)."""
    if voice == "espeak":
        first, second = (FINISHED, speech(FINISHED, rate)), (FOLLOW_UP, speech(FOLLOW_UP, rate))
    else:  # "All circuits are busy now." then "Your call cannot be completed as dialed."
        first, second = recorded(1, rate), recorded(3, rate)
    audio = np.concatenate([silence(300, rate), first[1], silence(400, rate), second[1]]).astype(np.int16)
    heard = []
    for feed in (lockstep, burst):
        session, events = await session_for(engines, rate)
        try:
            await feed(session, audio)
            await lockstep(session, silence(1600, rate))  # the longest silence: the last turn ends
            heard.append([(t.text, t.start_ms, t.end_ms) for t in turns(events)])
        finally:
            await session.end("test_over")
    in_step, at_once = heard
    assert len(in_step) == 2 and wer(first[0], in_step[0][0]) <= 0.2, in_step
    assert at_once == in_step


async def test_silence_endpointing_cuts_the_same_pause(engines: Engines) -> None:
    """The control: with `turn_detector: silence` the 700 ms pause is longer than the 500 ms endpoint, so
    the same audio becomes two turns. (Without this the test above could pass for another reason.)"""
    session, events = await session_for(engines, 16000, turn_detector="silence")
    try:
        await lockstep(session, np.concatenate([silence(300), paused_sentence(16000)]))
        await lockstep(session, silence(800))
        assert len(turns(events)) == 2, [t.text for t in turns(events)]
    finally:
        await session.end("test_over")


async def test_a_finished_sentence_waits_the_full_silence_without_the_detector(engines: Engines) -> None:
    session, events = await session_for(engines, 16000, turn_detector="silence")
    try:
        await lockstep(session, np.concatenate([silence(300), speech(FINISHED, 16000)]))
        await lockstep(session, silence(240))
        assert turns(events) == []  # 240 ms is not 500
        await lockstep(session, silence(400))
        assert len(turns(events)) == 1
    finally:
        await session.end("test_over")


# ---- the words' verdict over sets: how often a finished sentence ends early, a half sentence does not ------
def _judge(engine: Any, pcm: np.ndarray, rate: int) -> tuple[float, TurnCues]:
    """The detector's verdict on `pcm` (16 kHz) as the session makes it at a pause: the leg's audio back at
    16 kHz, decoded with the 160 ms of silence the pause decode sees, the last 0.5 s voiced for prosody."""
    audio = on_leg(pcm, rate)
    if rate != 16000:
        up = Resampler(rate, 16000)
        audio = np.concatenate([up.process(audio), up.flush()])[: len(pcm)]
    end = last_voiced_sample(audio)
    stream = engine.new_stream("en")
    try:
        stream.accept(np.concatenate([audio[:end], silence(160)]))
        heard = stream.final()
    finally:
        stream.close()
    slope, decay = prosody(audio[max(0, end - 8000):end])
    cues = TurnCues(heard.text, end / 16000 * 0.8, slope, decay, heard.last_word_prob, heard.end_mark_prob)
    return HeuristicTurnDetector().end_probability(cues), cues


@pytest.fixture(scope="module")
def verdicts() -> dict[str, list[tuple[float, TurnCues]]]:
    """Verdicts on bench/turns.py's espeak sets and the recorded one-sentence prompts, web and phone:
    "finished" (whole sentences), "halves" (the first half of a sentence a caller paused in, up to the
    pause)."""
    engine = get_stt_engine("whisper", None, "en")
    finished = [synth(t) for t in COMPLETE_ESPEAK]
    finished += [np.asarray(realspeech.wideband(u)) for u in realspeech.single_sentences()[::2]]
    halves = []
    for head, tail in PAUSED_ESPEAK:
        pcm = synth(f'<speak>{head} <break time="700ms"/> {tail}</speak>', ssml=True)
        halves.append(pcm[: len(synth(head))])
    out: dict[str, list[tuple[float, TurnCues]]] = {"finished": [], "halves": []}
    for rate in (16000, 8000):
        out["finished"] += [_judge(engine, pcm, rate) for pcm in finished]
        out["halves"] += [_judge(engine, pcm, rate) for pcm in halves]
    return out


def test_finished_sentences_are_judged_finished(verdicts: dict[str, list[tuple[float, TurnCues]]]) -> None:
    got = verdicts["finished"]
    early = [c.text for p, c in got if p >= 0.8]
    late = [(round(p, 2), c.text, c.last_word_prob, c.end_mark_prob) for p, c in got if p < 0.8]
    print(f"finished sentences judged finished: {len(early)} of {len(got)}; not: {late}")
    assert len(early) >= 0.85 * len(got), late  # measured 75-76 of 80


def test_half_sentences_are_not_judged_finished(verdicts: dict[str, list[tuple[float, TurnCues]]]) -> None:
    got = verdicts["halves"]
    cut = [(c.text, c.last_word_prob, c.end_mark_prob) for p, c in got if p >= 0.8]
    # Without the decoder's end confidence, the words alone.
    detector = HeuristicTurnDetector()
    words_only = [c.text for _, c in got if detector.end_probability(replace(
        c, last_word_prob=None, end_mark_prob=None)) >= 0.8]
    print(f"half sentences judged finished: {len(cut)} of {len(got)} ({cut}); on the words alone "
          f"{len(words_only)} ({words_only})")
    # Measured 3 of 24 (7 on the words alone): the bar leaves room for a kernel's rounding.
    assert len(cut) <= 0.25 * len(got), cut
    assert len(cut) < len(words_only)  # the end confidence is what holds some of them
