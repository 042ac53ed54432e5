"""Whisper's failure guards and the choice between its two passes, on decoder outputs given as text.

The model's own behaviour is tested on real audio in tests/test_stt.py; here the decoder's output is fixed
(strings tiny.en produced on the dev set and on espeak audio), so each rule is pinned down exactly: when the
30 s second pass runs, which pass is kept, and what DecodeInfo says about it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from speechpipe.pipeline.stt.whisper import (
    WhisperEngine,
    _Pass,
    compression_ratio,
    echoed_text,
    find_repeats,
    repeated_tail,
)
from tests.speech import synth

DIALED = "Your call cannot be completed as dialed."


def test_compression_ratio_is_whispers() -> None:
    # faster-whisper's get_compression_ratio: UTF-8 bytes over zlib bytes; its threshold is 2.4.
    assert compression_ratio("") == 0.0
    assert compression_ratio(DIALED) < 1.2
    assert compression_ratio(f"{DIALED} {DIALED}") < 2.4  # one restart is not a loop by Whisper's rule
    assert compression_ratio("Thank you. " * 12) > 2.4


def test_find_repeats_names_what_it_removed() -> None:
    assert find_repeats("Hello? Hello? Hello? Hello?", voiced_s=0.5, hit_cap=False) == ("Hello?", "loop")
    assert find_repeats(f"{DIALED} Your call cannot be", voiced_s=2.2, hit_cap=False) == (DIALED, "restart")
    assert find_repeats(DIALED, voiced_s=2.2, hit_cap=False) == (DIALED, "")
    # A prefix that is not a cut-short word of the earlier sentence is no restart ("dialled" vs "dial").
    assert find_repeats(f"{DIALED} Your call cannot be completed as dialled", voiced_s=4.0,
                        hit_cap=False)[1] == ""
    # Only a sentence end may precede a restart: one long sentence repeating an opening word pair stays.
    assert repeated_tail("I want the red one not the blue one.") == ""


def test_echoed_text_is_a_whole_text_said_over() -> None:
    assert echoed_text("Goodbye! Goodbye!") == "Goodbye!"
    assert echoed_text("Good bye. Good bye.") == "Good bye."
    assert echoed_text("Hold on, hold on, hold on.") == "Hold on,"
    for once in ["Goodbye.", "Thank you, thank you very much.", "My number is 5 5 5 1 2 1 2", ""]:
        assert echoed_text(once) == "", once


def _fake_passes(short: tuple[str, float, float], full: tuple[str, float, float] | None,
                 calls: list[str], penalised: tuple[str, float, float] | None = None
                 ) -> Callable[..., _Pass]:
    """A decoder that answers (raw text, avg log-prob, no-speech prob) per pass: `full` for the 30 s window,
    `penalised` for a pass with a repetition penalty (both default to `short`). `calls` gets "10 s" or
    "10 s penalised" per pass."""

    def run(pcm16: np.ndarray, window_s: float, language: str | None,
            repetition_penalty: float = 1.0) -> _Pass:
        calls.append(f"{window_s:.0f} s" + (" penalised" if repetition_penalty > 1 else ""))
        answer = full if window_s >= 30 else penalised if repetition_penalty > 1 else None
        raw, logprob, nsp = answer or short
        return _Pass(window_s, raw, logprob, nsp, False, 0.01, 0.05)

    return run


@pytest.fixture()
def audio() -> np.ndarray:
    # What was said only sets the window (~3.3 s: a 10 s short window) and the voiced seconds the guards
    # judge repeats by; the words come from the fake decoder.
    return synth("My number is five five five, one two one two.")


@pytest.mark.parametrize(
    "short,full,text,fallback,path,repeat",
    [
        # One clean pass: nothing more runs.
        ((DIALED, -0.1, 0.05), None, DIALED, "", "short", ""),
        # The dev set's restart, cut mid-word: removed by the guard, and the full pass (clean) is kept.
        ((f"{DIALED} Your call cannot be completed as dial", -0.08, 0.04), (DIALED, -0.12, 0.05),
         DIALED, "repeat", "full", ""),
        # Whisper's compression rule: the loop is collapsed, the full pass preferred for having none.
        (("Thank you. " * 12, -0.2, 0.1), ("Thank you.", -0.3, 0.1), "Thank you.", "compression", "full", ""),
        # Digits read out look like a repeated tail in both passes: the likelier (short) one stays.
        (("My number is 5 5 5 1 2 1 2", -0.39, 0.1), ("My number is 5 5 5 1 2 1 2 1", -0.42, 0.1),
         "My number is 5 5 5 1 2 1 2", "repeat", "short+full", "tail"),
        # A one-phrase turn decoded as the phrase twice (tiny.en on the AVX kernel, 7 s window): the full
        # pass, which hears it once, is kept.
        (("Goodbye! Goodbye!", -0.68, 0.12), ("Goodbye.", -0.35, 0.09), "Goodbye.", "repeat", "full", ""),
        # Said twice and heard twice by both passes: the echo stays, as said.
        (("No, no.", -0.3, 0.1), ("No, no.", -0.4, 0.1), "No, no.", "repeat", "short+full", "echo"),
        # A full pass that hears no speech never replaces the speech the short pass heard.
        ((f"{DIALED} Your call cannot be completed as dial", -0.08, 0.04), ("you", -0.9, 0.95),
         DIALED, "repeat", "short+full", "restart"),
    ],
)
def test_second_pass_choice(whisper_engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch, audio: np.ndarray,
                            short: tuple[str, float, float], full: tuple[str, float, float] | None, text: str,
                            fallback: str, path: str, repeat: str) -> None:
    calls: list[str] = []
    monkeypatch.setattr(whisper_engine, "_pass", _fake_passes(short, full, calls))
    got, info = whisper_engine.transcribe(audio, "en")
    assert (got, info.fallback, info.path, info.repeat) == (text, fallback, path, repeat)
    assert calls == (["10 s"] if path == "short" else ["10 s", "10 s penalised", "30 s"])
    kept = full if path == "full" else short
    assert kept is not None and (info.raw_text, info.avg_logprob) == (kept[0], kept[1])
    assert info.window_s == (30.0 if path == "full" else 10.0)
    assert info.decode_s == pytest.approx(0.05 * len(calls))  # time covers every pass
    assert info.compression_ratio == pytest.approx(compression_ratio(kept[0]))


@pytest.mark.parametrize(
    "penalised,text,path,calls",
    [
        # The penalised pass hears the restart-free sentence: kept, and the 30 s pass never runs.
        ((DIALED, -0.12, 0.05), DIALED, "penalty", ["10 s", "10 s penalised"]),
        # It loops as well: the 30 s pass decides, as without it.
        ((f"{DIALED} Your call", -0.1, 0.05), DIALED, "full", ["10 s", "10 s penalised", "30 s"]),
        # Clean but outside Whisper's thresholds (avg log-prob < -1): not trusted, the 30 s pass runs.
        (("Your coal can not.", -1.4, 0.3), DIALED, "full", ["10 s", "10 s penalised", "30 s"]),
    ],
)
def test_second_pass_tries_a_repetition_penalty_first(
        whisper_engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch, audio: np.ndarray,
        penalised: tuple[str, float, float], text: str, path: str, calls: list[str]) -> None:
    seen: list[str] = []
    restart = (f"{DIALED} Your call cannot be completed as dial", -0.08, 0.04)
    monkeypatch.setattr(whisper_engine, "_pass", _fake_passes(restart, (DIALED, -0.2, 0.05), seen, penalised))
    got, info = whisper_engine.transcribe(audio, "en")
    assert (got, info.fallback, info.path, seen) == (text, "repeat", path, calls)
    assert info.window_s == (30.0 if path == "full" else 10.0)


def test_no_second_pass_without_speech_or_room(whisper_engine: WhisperEngine,
                                              monkeypatch: pytest.MonkeyPatch, audio: np.ndarray) -> None:
    calls: list[str] = []
    # No speech by the guards' rules: nothing a second pass could rescue.
    monkeypatch.setattr(whisper_engine, "_pass", _fake_passes(("you you you you", -1.2, 0.9), None, calls))
    assert whisper_engine.transcribe(audio, "en")[0] == "" and calls == ["10 s"]
    # A 24 s turn already fills the 30 s window: its one pass is the 30 s pass, so no second pass runs.
    calls.clear()
    long = np.tile(audio, 10)[: 24 * 16000]
    restart = (f"{DIALED} Your call", -0.1, 0.05)
    monkeypatch.setattr(whisper_engine, "_pass", _fake_passes(restart, None, calls))
    text, info = whisper_engine.transcribe(long, "en")
    assert calls == ["30 s"] and (info.fallback, info.path, text) == ("", "short", DIALED)


def test_partial_decode_skips_the_second_pass_and_is_not_kept(
        whisper_engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch, audio: np.ndarray) -> None:
    """A partial is a preview: the 30 s pass (~0.4 s of a core) would hold up the pause's decode. Its
    one-pass text that wanted that pass is not cached, so the final at the endpoint still runs it."""
    calls: list[str] = []
    restart = (f"{DIALED} Your call cannot be completed as dial", -0.08, 0.04)
    monkeypatch.setattr(whisper_engine, "_pass", _fake_passes(restart, (DIALED, -0.12, 0.05), calls))
    stream = whisper_engine.new_stream("en")
    stream.accept(audio)
    assert stream.partial_decode() == DIALED  # the guard's text of the one pass
    assert calls == ["10 s"]
    assert stream.last_info is not None and (stream.last_info.fallback, stream.last_info.path) == (
        "repeat", "short-only")
    final = stream.final()
    assert final.text == DIALED and calls == ["10 s", "10 s", "10 s penalised", "30 s"]
    assert stream.last_info is not None and stream.last_info.path == "full"
    # A clean one-pass partial is the final's decode: the endpoint reuses it.
    calls.clear()
    monkeypatch.setattr(whisper_engine, "_pass", _fake_passes((DIALED, -0.1, 0.05), None, calls))
    stream.reset()
    stream.accept(audio)
    assert stream.partial_decode() == DIALED and stream.final().text == DIALED and calls == ["10 s"]
