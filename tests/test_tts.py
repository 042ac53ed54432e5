"""pipeline.tts (streaming espeak-ng, real processes) and pipeline.text (sentence splitting)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechpipe.pipeline.audio import Resampler, rms_dbfs
from speechpipe.pipeline.text import SentenceSplitter
from speechpipe.pipeline.tts import EspeakTTS, TTSError, clean_text, validate
from speechpipe.pipeline.vad import SileroVAD
from tests.speech import wer

PARAGRAPH = " ".join(
    f"This is sentence number {i}, and it carries on for a while so the paragraph is long." for i in range(20)
)
SENTENCE = "Could you tell me what time the pharmacy opens tomorrow?"


def espeak_children() -> list[tuple[int, str]]:
    """(pid, state) of this process's espeak-ng children, zombies included (state 'Z')."""
    me = str(os.getpid())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces, so split after the closing parenthesis.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if ppid == me and comm.startswith("espeak"):
            found.append((int(pid), state))
    return found


async def wait_until_no_children() -> None:
    """Poll for up to 2 s: the kernel and asyncio's child watcher finish a killed process off in ms."""
    for _ in range(1000):
        if not espeak_children():
            return
        await asyncio.sleep(0.002)
    assert espeak_children() == []


@pytest.fixture(scope="module")
def tts() -> EspeakTTS:
    return EspeakTTS()


async def speak(tts: EspeakTTS, text: str, **kw) -> list[np.ndarray]:
    return [c async for c in tts.stream(text, **kw)]


def voiced_fraction(pcm22k: np.ndarray) -> float:
    """Fraction of 20 ms frames that Silero calls speech, after resampling to 16 kHz."""
    rs = Resampler(22050, 16000)
    x = np.concatenate([rs.process(pcm22k), rs.flush()])
    vad = SileroVAD()
    frames = x[: len(x) // 320 * 320].reshape(-1, 320)
    return float(np.mean([vad.is_speech(f) for f in frames]))


# --- the audio ---------------------------------------------------------------------------------------------


async def test_stream_yields_speech_in_20ms_chunks(tts: EspeakTTS) -> None:
    chunks = await speak(tts, SENTENCE)
    assert tts.sample_rate == 22050
    assert all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    assert all(len(c) == 441 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 441
    pcm = np.concatenate(chunks)
    seconds = len(pcm) / tts.sample_rate
    # 10 words at 175 wpm is 3.4 s of speaking; espeak-ng adds little lead-in and a short tail.
    assert 2.0 < seconds < 5.0
    assert rms_dbfs(pcm) > -30
    assert voiced_fraction(pcm) > 0.5
    assert not espeak_children()


async def test_rate_and_voice_change_the_audio(tts: EspeakTTS) -> None:
    slow = np.concatenate(await speak(tts, SENTENCE, rate_wpm=120))
    fast = np.concatenate(await speak(tts, SENTENCE, rate_wpm=350))
    assert len(fast) < 0.6 * len(slow)
    low = np.concatenate(await speak(tts, "Hello.", pitch=10))
    high = np.concatenate(await speak(tts, "Hello.", pitch=90))
    assert not np.array_equal(low[: len(high)], high[: len(low)])
    female = np.concatenate(await speak(tts, SENTENCE, voice="en-us+f3"))
    assert voiced_fraction(female) > 0.5


async def test_transcribes_back_to_the_text(tts: EspeakTTS, request: pytest.FixtureRequest) -> None:
    try:
        engine = request.getfixturevalue("whisper_engine")
    except pytest.FixtureLookupError:
        pytest.skip("tests/fixtures_speech.py has no whisper_engine fixture yet")
    pcm = np.concatenate(await speak(tts, SENTENCE))
    rs = Resampler(22050, 16000)
    stream = engine.new_stream("en")
    stream.accept(np.concatenate([rs.process(pcm), rs.flush()]))
    assert wer(SENTENCE, stream.final().text) <= 0.3


async def test_first_chunk_arrives_while_espeak_is_still_synthesising(tts: EspeakTTS) -> None:
    t0 = time.perf_counter()
    first_at = None
    alive_at_first: list[tuple[int, str]] = []
    samples_at_first = 0
    total = 0
    async for chunk in tts.stream(PARAGRAPH):
        if first_at is None:
            first_at = time.perf_counter() - t0
            alive_at_first = espeak_children()
            samples_at_first = len(chunk)
        total += len(chunk)
    total_s = time.perf_counter() - t0
    print(f"\nTTS paragraph: {total / 22050:.1f} s of audio; first chunk after {1000 * first_at:.1f} ms, "
          f"whole stream {1000 * total_s:.1f} ms")
    # The ordering that proves streaming: when the first chunk reached us, espeak-ng was still running
    # (it cannot finish: ~90 s of audio is far more than a pipe holds until we read it).
    assert len(alive_at_first) == 1 and alive_at_first[0][1] != "Z"
    assert samples_at_first < total / 100
    assert total / 22050 > 60
    assert not espeak_children()


# --- cancellation: the process dies and is reaped at once ---------------------------------------------------


async def test_cancelling_the_consumer_kills_and_reaps_espeak(tts: EspeakTTS) -> None:
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in tts.stream(PARAGRAPH):
            got_first.set()
            await asyncio.sleep(0.01)  # a real-time consumer: espeak-ng blocks on the full pipe

    task = asyncio.create_task(consume())
    await got_first.wait()
    (pid, state), = espeak_children()
    assert state != "Z"
    t0 = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancellation landed in the consumer's sleep, not in the generator: the task's done-callback
    # killed espeak-ng, and the child watcher reaps it (SIGKILL and exit take a moment in the kernel).
    await wait_until_no_children()
    print(f"\nespeak-ng gone {1000 * (time.perf_counter() - t0):.1f} ms after cancel()")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_cancelling_inside_the_generator_reaps_before_returning(tts: EspeakTTS) -> None:
    async def consume() -> None:
        async for _ in tts.stream(PARAGRAPH):
            pass  # never yields to the loop except inside the generator's read()

    task = asyncio.create_task(consume())
    for _ in range(1000):
        if espeak_children():
            break
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert espeak_children() == []  # killed and awaited in the generator's finally


async def test_closing_the_stream_kills_and_reaps_espeak(tts: EspeakTTS) -> None:
    async with contextlib.aclosing(tts.stream(PARAGRAPH)) as stream:
        async for _ in stream:
            assert len(espeak_children()) == 1
            break
    assert espeak_children() == []


async def test_breaking_out_of_the_loop_leaves_no_process(tts: EspeakTTS) -> None:
    async for _ in tts.stream(PARAGRAPH):
        break
    # Without aclosing(), the event loop closes the dropped generator in a task it schedules at once.
    await wait_until_no_children()


async def test_concurrent_streams_are_independent(tts: EspeakTTS) -> None:
    texts = [f"Caller number {i} is being answered right now." for i in range(6)]
    results = await asyncio.gather(*(speak(tts, t) for t in texts))
    alone = await speak(tts, texts[3])
    assert np.array_equal(np.concatenate(results[3]), np.concatenate(alone))
    assert all(len(np.concatenate(r)) > 22050 for r in results)
    assert espeak_children() == []


# --- input handling ----------------------------------------------------------------------------------------


async def test_text_that_looks_like_an_option_is_spoken(tts: EspeakTTS) -> None:
    # Were "--help" an argument, espeak-ng would print its usage instead of a WAV stream (TTSError).
    pcm = np.concatenate(await speak(tts, "--help me please"))
    assert len(pcm) > 0.5 * 22050 and voiced_fraction(pcm) > 0.4
    assert rms_dbfs(np.concatenate(await speak(tts, "-v xx -s 80"))) > -35


async def test_markup_and_control_characters_are_not_spoken(tts: EspeakTTS) -> None:
    plain = np.concatenate(await speak(tts, "Hello there."))
    markup = '<speak><prosody rate="slow">Hello\x01\x00 there.</prosody></speak>'
    tagged = np.concatenate(await speak(tts, markup))
    # Read aloud, the tags would add several seconds; stripped, the audio is the same.
    assert abs(len(tagged) - len(plain)) < 0.05 * len(plain)
    assert clean_text("a\x01 5S b\u200b[[h@'loU]]\u202e c") == "a 5S b [ [h@'loU] ] c"
    assert clean_text("x < 5 and y > 3") == "x < 5 and y > 3"


async def test_nothing_to_say_spawns_nothing(tts: EspeakTTS) -> None:
    for text in ("", "   \n\t", "\x00\x01\x02", "<break time='1s'/>"):
        assert await speak(tts, text) == []


@pytest.mark.parametrize(("kw", "message"), [
    ({"voice": "nosuchvoice"}, "no voice"),
    ({"voice": "en-us+nosuch"}, "no voice variant"),
    ({"voice": "-v"}, "form"),
    ({"voice": "en us"}, "form"),
    ({"voice": "../../etc/passwd"}, "form"),
    ({"rate_wpm": 79}, "rate_wpm"),
    ({"rate_wpm": 451}, "rate_wpm"),
    ({"pitch": -1}, "pitch"),
    ({"pitch": 100}, "pitch"),
])
async def test_bad_settings_are_refused_before_spawning(tts: EspeakTTS, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await speak(tts, "Hello.", **kw)
    assert espeak_children() == []


def test_valid_settings_pass() -> None:
    for voice in ("en-us", "en", "en-gb", "EN-US", "de", "en-us+f3", "en-gb+m2"):
        validate(voice, 175, 50)


async def test_a_failing_engine_raises_tts_error() -> None:
    broken = EspeakTTS(binary="false")  # a real process that exits 1 without a WAV stream
    with pytest.raises(TTSError):
        await speak(broken, "Hello.")


# --- sentence splitting ------------------------------------------------------------------------------------


def split(text: str, step: int = 1, **kw) -> list[str]:
    s = SentenceSplitter(**kw)
    out: list[str] = []
    for i in range(0, len(text), step):
        out += s.push(text[i : i + step])
    rest = s.flush()
    return [*out, rest] if rest else out


@pytest.mark.parametrize(("text", "sentences"), [
    ("Hello there. How are you? I'm fine!", ["Hello there.", "How are you?", "I'm fine!"]),
    ("Dr. Smith sees you at 3.5 p.m. tomorrow. Bring your card.",
     ["Dr. Smith sees you at 3.5 p.m. tomorrow.", "Bring your card."]),
    ("Mrs. Jones lives on Baker St. near the park.", ["Mrs. Jones lives on Baker St. near the park."]),
    ("Use e.g. apples, i.e. fruit. J. R. R. Tolkien wrote it.",
     ["Use e.g. apples, i.e. fruit.", "J. R. R. Tolkien wrote it."]),
    ("Well... I think so. Hmm... let me check. Okay… Done.",
     ["Well...", "I think so.", "Hmm... let me check.", "Okay…", "Done."]),
    ("Visit example.com or call 555.1234 today.", ["Visit example.com or call 555.1234 today."]),
    ('He said "stop." Then he left. (Really.) Yes?! Yes.',
     ['He said "stop."', "Then he left.", "(Really.)", "Yes?!", "Yes."]),
    ("Here is the list:\n1. Eggs\n2. Milk\n\nThat's all.",
     ["Here is the list:", "1. Eggs", "2. Milk", "That's all."]),
    ("The price is $3. That's cheap.", ["The price is $3.", "That's cheap."]),
    ("你好。今天天气很好！「是吗？」好的", ["你好。", "今天天气很好！", "「是吗？」", "好的"]),
    ("... !!! ?", []),
])
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_splitter_sentences(text: str, sentences: list[str], step: int) -> None:
    assert split(text, step) == sentences


def test_splitter_waits_for_the_next_word_after_a_period() -> None:
    s = SentenceSplitter()
    assert s.push("See Dr.") == []
    assert s.push(" ") == []  # "Dr. Smith" or "... the Dr. Next ..."? the next word decides
    assert s.push("Smith now. ") == []
    assert s.push("Ok") == ["See Dr. Smith now."]
    assert s.flush() == "Ok"


def test_settle_ends_a_sentence_the_agent_paused_after() -> None:
    s = SentenceSplitter()
    assert s.push("Sure thing!") == [] and s.waiting
    assert s.settle() == "Sure thing!" and not s.waiting
    assert s.push(" Anything else?") == [] and s.settle() == "Anything else?"
    # A pause after an abbreviation or an initial is no sentence end; mid-sentence text is not waiting.
    assert s.push("Ask for Dr.") == [] and s.waiting and s.settle() is None
    assert s.push(" Smith") == [] and not s.waiting and s.settle() is None
    assert s.flush() == "Ask for Dr. Smith"


async def test_a_streamed_sentence_is_spoken_while_the_agent_pauses(tts: EspeakTTS) -> None:
    """The first sentence plays although no further text (nor the end of the reply) comes: an agent that
    waits for it to be heard before streaming on is not deadlocked."""
    from speechpipe.pipeline.config import TTSConfig
    from speechpipe.pipeline.speaker import Speaker

    speaker = Speaker(tts, TTSConfig(), 16000)
    try:
        reply = speaker.begin(1)
        speaker.push_text(reply, "Let me check that for you.")
        frames = []
        for _ in range(1000):  # generous: the settle delay, then espeak's first audio
            frame = speaker.pull()
            if frame is not None:
                frames.append(frame)
                if len(frames) >= 10:
                    break
            await asyncio.sleep(0.01)
        assert len(frames) >= 10 and not reply.text_done
        speaker.push_text(reply, " It is open until six.")
        speaker.end_text(reply)
        assert [s.text for s in reply.sentences][:1] == ["Let me check that for you."]
    finally:
        await speaker.close()


def test_splitter_cuts_a_long_first_clause_early_and_later_ones_late() -> None:
    first = "Sure, I can help you with that, but first I need to confirm a few details about your account"
    streamed = split(first + ". And then, once that is done, we can move on.", step=3)
    assert streamed[0] == "Sure, I can help you with that,"
    assert streamed[1].startswith("but first")
    # Later segments are cut only past clause_chars; this short sentence stays whole.
    assert streamed[-1] == "And then, once that is done, we can move on."
    # When the whole sentence is already there, nothing is cut.
    assert split(first + ".", step=1000) == [first + "."]


def test_splitter_cuts_unpunctuated_text_at_max_chars() -> None:
    words = " ".join(["word"] * 200)
    pieces = split(words, step=7)
    assert len(pieces) > 3 and all(len(p) <= 260 for p in pieces)
    assert " ".join(pieces) == words


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abc XY.,!?…\n\"'3。」")), max_size=400),
       step=st.integers(1, 50))
def test_splitter_never_loses_or_repeats_words(text: str, step: int) -> None:
    pieces = split(text, step)
    assert all(p == p.strip() and any(c.isalnum() for c in p) for p in pieces)
    # Every letter and digit comes out once, in order (full-width stops may split a whitespace "word").
    assert "".join(c for p in pieces for c in p if c.isalnum()) == "".join(c for c in text if c.isalnum())
    if "。" not in text:
        words = [w for w in text.split() if any(c.isalnum() for c in w)]
        assert [w for p in pieces for w in p.split() if any(c.isalnum() for c in w)] == words
