"""Partial transcripts by default: Whisper partials while the user speaks, shed first under load.

The lane's rules on plain Python streams (no engine): a final never waits behind a partial decode, a partial
is shed while any lane on the executor has a final queued or running, and one partial decodes at a time.
Then real sessions on espeak speech through Whisper: the default pipe sends `user_partial` events before the
turn, `stt.partials=false` and the server-wide override turn them off, and several sessions talking at once
on this machine's cores all get the right final text while the shed partials are counted.
"""

from __future__ import annotations

import asyncio
import re
import threading

import numpy as np
import pytest

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.stt.base import STTStream, Transcript
from speechpipe.pipeline.stt_lane import STTLane, decode_gate

from .speech import synth, wer

pytestmark = pytest.mark.asyncio(loop_scope="session")

WER_BOUND = 0.15  # as tests/test_pipeline.py: espeak speech through tiny.en
FRAME = 320
LONG = ("Could you please book a table for two people on Friday evening at the Italian restaurant near the "
        "station")


# ---- the lane, on plain streams --------------------------------------------------------------------------
class BlockingStream(STTStream):
    """Counts samples; `partial_decode` and `final` block until released, when asked to."""

    def __init__(self) -> None:
        self.samples = 0
        self.partial_started = threading.Event()
        self.release_partial = threading.Event()
        self.final_started = threading.Event()
        self.release_final = threading.Event()
        self.release_final.set()

    def accept(self, pcm16: np.ndarray) -> None:
        self.samples += len(pcm16)

    def partial(self) -> str | None:
        return None

    def partial_decode(self) -> str | None:
        self.partial_started.set()
        assert self.release_partial.wait(30)
        return f"partial of {self.samples}"

    def final(self) -> Transcript:
        self.final_started.set()
        assert self.release_final.wait(30)
        return Transcript(f"final of {self.samples}", self.samples / 16000, 0.0)

    def reset(self) -> None:
        self.samples = 0


class Lane:
    def __init__(self, executor, stream: BlockingStream | None = None) -> None:
        self.stream = stream or BlockingStream()
        self.partials: list[str] = []
        self.shed = 0
        self.lane = STTLane(executor, self.stream, streaming=False, on_partial=self.partials.append,
                            partial_interval_s=0.2, on_shed=self._shed)

    def _shed(self) -> None:
        self.shed += 1

    def speak(self, seconds: float) -> None:
        for _ in range(round(seconds * 50)):
            self.lane.feed(np.ones(FRAME, np.int16))


async def wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.get_running_loop().run_in_executor(None, event.wait, 30)


async def until(pred, within_s: float = 30.0) -> None:
    for _ in range(int(within_s * 100)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


@pytest.fixture
def executor():
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown(wait=True)


async def test_a_final_never_waits_behind_a_partial(executor):
    a = Lane(executor)
    a.speak(0.2)  # one partial's worth of new audio
    await wait_thread_event(a.stream.partial_started)
    final = await asyncio.wait_for(a.lane.final(), 30)  # answered while the partial still decodes
    assert final.text == "final of 3200" and not a.stream.release_partial.is_set()
    a.stream.release_partial.set()
    await asyncio.wait_for(a.lane.run(lambda: None), 30)
    await until(lambda: not decode_gate(executor).partials)
    for _ in range(3):
        await asyncio.sleep(0)  # its done-callback has run: the late result is dropped (a final came)
    assert a.partials == [] and a.lane.partials_tried == 1 and a.shed == 0


async def test_partials_are_shed_while_any_final_is_pending(executor):
    busy, talker = Lane(executor), Lane(executor)
    busy.stream.release_final.clear()
    busy.speak(0.1)
    pending = busy.lane.final()  # another session's final decoding
    await wait_thread_event(busy.stream.final_started)
    talker.speak(0.6)  # three partials due, all shed
    assert talker.shed == 3 and talker.lane.partials_shed == 3 and talker.partials == []
    busy.stream.release_final.set()
    await asyncio.wait_for(pending, 30)
    talker.stream.release_partial.set()
    talker.speak(0.2)  # the STT is idle again: this one decodes
    await until(lambda: talker.partials)
    assert talker.partials == ["partial of 12800"] and talker.shed == 3


async def test_one_partial_decodes_at_a_time(executor):
    first, second = Lane(executor), Lane(executor)
    first.speak(0.2)
    await wait_thread_event(first.stream.partial_started)
    second.speak(0.2)
    first.speak(0.2)  # its own previous partial is still decoding
    assert second.shed == 1 and first.shed == 1
    first.stream.release_partial.set()
    await until(lambda: first.partials)
    assert len(first.partials) == 1 and first.partials[0].startswith("partial of ")  # of the audio by then


# ---- real sessions -----------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


async def speak(t, sentence: str) -> None:
    await t.line.silence(0.3)
    await t.line.play(synth(sentence))
    assert await t.line.until(lambda: bool(t.of(ev.UserTurn)), 60)
    await t.line.silence(1.0)  # a second turn, if the utterance was split, has landed


async def test_the_default_pipe_sends_partials_before_the_turn(talk):
    t = await talk()  # PipeConfig defaults: whisper, stt.partials on
    await speak(t, LONG)
    turns = t.of(ev.UserTurn)
    heard = " ".join(u.text for u in turns)  # one turn, unless the VAD heard a pause mid-sentence
    assert wer(LONG, heard) <= WER_BOUND, heard
    before = [e for e in t.events[: t.events.index(turns[0])] if isinstance(e, ev.UserPartial)]
    assert before, [e.type for e in t.events]
    assert not any(t.events.index(p) > t.events.index(turns[-1]) for p in t.of(ev.UserPartial))
    final_words = set(words(heard))
    for p in t.of(ev.UserPartial):  # each partial is the start of what the final says, give or take a word
        said = words(p.text)
        assert said and len(final_words.intersection(said)) >= 0.6 * len(said), (p.text, heard)
        assert not p.redacted
    assert t.session.metrics_summary()["stt_partials"]["sent"] == len(t.of(ev.UserPartial))


async def test_no_partials_when_the_pipe_turns_them_off(talk):
    t = await talk(PipeConfig(agent_id="test", stt={"partials": False}))
    await speak(t, LONG)
    assert wer(LONG, t.of(ev.UserTurn)[0].text) <= WER_BOUND
    assert t.of(ev.UserPartial) == [] and "stt_partials" not in t.session.metrics_summary()


async def test_the_server_wide_override_turns_partials_off(talk, engines, monkeypatch):
    whisper = engines.stt(PipeConfig(agent_id="test"))
    monkeypatch.setattr(whisper, "partial_interval_s", 0.0)  # SPEECHPIPE_WHISPER_PARTIAL_S=0
    t = await talk()
    await speak(t, LONG)
    assert t.of(ev.UserTurn) and t.of(ev.UserPartial) == []


SENTENCES = [
    "I would like to book a table for dinner on Friday.",
    "Can you tell me when the pharmacy opens tomorrow?",
    "I want to speak to a person please.",
    "Please call me back tomorrow morning.",
]


async def test_under_load_every_turn_is_right_and_shed_partials_are_counted(talk):
    talks = [await talk() for _ in SENTENCES]
    await asyncio.gather(*(speak(t, s) for t, s in zip(talks, SENTENCES, strict=True)))
    for t in talks:
        await t.session.end("test_over")
    shed = 0
    for t, sentence in zip(talks, SENTENCES, strict=True):
        heard = " ".join(u.text for u in t.of(ev.UserTurn))
        assert wer(sentence, heard) <= WER_BOUND, (sentence, heard)
        metrics = t.of(ev.SessionEnded)[0].metrics
        partials = metrics.get("stt_partials", {"sent": 0, "shed": 0})
        assert partials["sent"] == len(t.of(ev.UserPartial))
        assert partials["shed"] == t.session.counts["partials_shed"] == len(
            [m for m in t.of(ev.Metric) if m.name == "stt_partial_shed"])
        shed += partials["shed"]
    # Four sessions speaking at once, one partial decode at a time and none beside a final: some are shed.
    assert shed > 0
