"""Endpointing on hand-made VAD decision streams; the turn detector's judgement of words and voice."""

import numpy as np
import pytest

from speechpipe.pipeline.config import EndpointingConfig
from speechpipe.pipeline.turns import (
    Endpointer,
    HeuristicTurnDetector,
    Signal,
    TurnCues,
    endpoint_for,
    looks_unfinished,
    prosody,
)


def run(decisions: str, **cfg) -> list[tuple[int, Signal]]:
    det = Endpointer(EndpointingConfig(**cfg))
    out = []
    for i, c in enumerate(decisions):
        for s in det.process(c == "#"):
            out.append((i, s))
    return out


def test_turn_ends_after_silence_setting():
    # 20 voiced frames (400 ms), then 30 silent (600 ms) with a 500 ms endpoint.
    signals = run("#" * 20 + "." * 30, silence_ms=500, min_speech_ms=200)
    assert signals[0] == (1, Signal.SPEECH_START)
    assert (29, Signal.PAUSE) in signals  # 200 ms into the silence: time to decode what was said
    assert signals[-1] == (44, Signal.END)  # 25 silent frames = 500 ms


def test_short_blip_is_discarded_not_a_turn():
    signals = run("###" + "." * 30, silence_ms=300, min_speech_ms=200)
    assert [s for _, s in signals] == [Signal.SPEECH_START, Signal.PAUSE, Signal.DISCARD]


def test_single_vad_flicker_does_not_reset_the_endpoint():
    det = Endpointer(EndpointingConfig(silence_ms=300, min_speech_ms=100))
    seq = "#" * 10 + "....#....#......"
    got = [s for c in seq for s in det.process(c == "#")]
    assert Signal.RESUME not in got and got[-1] is Signal.END
    assert det.end_ms() == 10 * 20


def test_speech_resuming_in_a_pause_continues_the_turn():
    signals = run("#" * 10 + "." * 12 + "#" * 10 + "." * 20, silence_ms=300, min_speech_ms=100)
    kinds = [s for _, s in signals]
    assert kinds == [Signal.SPEECH_START, Signal.PAUSE, Signal.RESUME, Signal.PAUSE, Signal.END]


def test_max_turn_length_cuts():
    signals = run("#" * 120, silence_ms=500, max_turn_s=2.0)
    assert (99, Signal.MAX_LENGTH) in signals


@pytest.mark.parametrize(("text", "unfinished"), [
    ("I would like to order", True), ("My number is four five six,", True), ("4 5 6", True),
    ("Can I pay with a card and", True), ("I'd like a table for", True), ("Call the", True),
    ("What are your opening hours?", False), ("Thank you.", False), ("No.", False),
    ("Stop, I want to speak to a person please.", False), ("", False),
    ("Please hold while I...", True), ("I'd like", True), ("The conference is now", True),
    ("Yes, it is.", False), ("I can.", False), ("My name is.", True),
    ("That agent is already logged on.", False),
    ("Which folder should I save this message to?", False), ("Who am I speaking with?", False),
    ("Can you send the package to?", True),  # a stranded preposition ends a wh-question only
])
def test_looks_unfinished(text: str, unfinished: bool) -> None:
    assert looks_unfinished(text) is unfinished


def test_endpoint_waits_for_the_verdict_then_takes_it():
    # A heuristic pause is held open (undecided_ms) until the session applies the verdict.
    det = Endpointer(EndpointingConfig(), undecided_ms=1500)
    got = [s for c in "#" * 20 + "." * 40 for s in det.process(c == "#")]
    assert Signal.END not in got  # 800 ms of silence, no verdict yet
    det.endpoint_ms = 200  # judged finished: the next frame ends it
    assert det.process(False) == [Signal.END]
    # The next utterance starts undecided again.
    got = [s for c in "#" * 5 for s in det.process(c == "#")]
    assert got == [Signal.SPEECH_START] and det.endpoint_ms == 1500


def test_endpoint_for_maps_the_probability_onto_the_configured_silences():
    cfg = EndpointingConfig(min_silence_ms=200, silence_ms=500, max_silence_ms=1500)
    assert endpoint_for(0.95, cfg) == endpoint_for(0.8, cfg) == 200
    assert endpoint_for(0.5, cfg) == 500
    assert endpoint_for(0.0, cfg) == 1500
    assert 500 < endpoint_for(0.25, cfg) < 1500
    # silence_ms outside the range widens it instead of contradicting it.
    assert EndpointingConfig(silence_ms=2000).silence_range_ms == (200, 2000, 2000)
    assert EndpointingConfig(silence_ms=150).silence_range_ms == (150, 150, 1500)


@pytest.mark.parametrize(("text", "finished"), [
    ("What time do you open tomorrow?", True), ("I need to change my address.", True),
    ("I'd like to order a large pizza with", False), ("My number is four five six", False),
    ("Please enter your", False), ("Please hold while I...", False),
])
def test_heuristic_detector_reads_the_words(text: str, finished: bool) -> None:
    p = HeuristicTurnDetector().end_probability(TurnCues(text, voiced_s=0.3 * len(text.split())))
    assert (endpoint_for(p, EndpointingConfig()) == 200) is finished
    assert (p < 0.5) is not finished


def _tone(start_hz: float, end_hz: float, seconds: float = 0.6, fade: bool = False) -> np.ndarray:
    """A voiced-like buzz (a pulse train's first 10 harmonics) gliding from start_hz to end_hz."""
    t = np.arange(int(16000 * seconds)) / 16000
    f = np.linspace(start_hz, end_hz, len(t))
    phase = 2 * np.pi * np.cumsum(f) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 11))
    if fade:
        x *= np.linspace(1.0, 0.1, len(t))
    return (x / np.abs(x).max() * 12000).astype(np.int16)


def test_prosody_hears_a_falling_pitch_and_fading_energy() -> None:
    falling, decay = prosody(_tone(220, 150, fade=True))
    assert falling is not None and falling < -4 and decay is not None and decay > 3
    level, steady = prosody(_tone(180, 182))
    assert level is not None and abs(level) < 1 and steady is not None and abs(steady) < 1
    rising, _ = prosody(_tone(150, 220))
    assert rising is not None and rising > 4
    assert prosody(np.zeros(16000, np.int16)) == (None, 0.0)  # silence: no pitch to read


def test_prosody_tips_a_finished_text_but_not_an_unfinished_one() -> None:
    det = HeuristicTurnDetector()
    text = "I need to change my address."
    flat = det.end_probability(TurnCues(text, 2.0, pitch_slope=0.0, energy_decay_db=0.0))
    fall = det.end_probability(TurnCues(text, 2.0, pitch_slope=-8.0, energy_decay_db=6.0))
    rise = det.end_probability(TurnCues(text, 2.0, pitch_slope=6.0, energy_decay_db=0.0))
    assert rise < flat < fall
    open_fall = det.end_probability(TurnCues("I would like to order the", 2.0, pitch_slope=-8.0,
                                             energy_decay_db=6.0))
    assert open_fall < 0.5


@pytest.mark.parametrize(("last_word", "mark", "unsure"), [
    (0.95, 0.9, False), (None, None, False), (0.95, None, False),
    (0.11, 0.9, True),  # "... a subscription net.": the last word half-heard
    (0.99, 0.31, True),  # "We need a table for four people.": the period barely chosen
    (0.85, 0.5, True),  # "the conferences.": neither alone, both together
])
def test_an_unsure_end_keeps_a_finished_reading_text_waiting_past_a_pause(
        last_word: float | None, mark: float | None, unsure: bool) -> None:
    cfg = EndpointingConfig()
    cues = TurnCues("I was charged for a subscription net.", 2.0, last_word_prob=last_word,
                    end_mark_prob=mark)
    assert cues.unsure_end is unsure
    endpoint = endpoint_for(HeuristicTurnDetector().end_probability(cues), cfg)
    if unsure:
        # Past a caller's pause mid-sentence (bench/turns.py inserts 400-800 ms), short of the longest.
        assert 900 <= endpoint < cfg.silence_range_ms[2]
    else:
        assert endpoint == cfg.min_silence_ms
    # An unfinished-reading text waits the same whether or not the decoder was sure of it.
    open_end = TurnCues("I'd like to order a large pizza with", 2.0, last_word_prob=last_word,
                        end_mark_prob=mark)
    assert HeuristicTurnDetector().end_probability(open_end) < 0.2


def test_end_confidence_multiplies_the_last_words_tokens_and_the_mark() -> None:
    from speechpipe.pipeline.stt.whisper import end_confidence

    end = end_confidence([" I", " was", " charged", " sub", "scription", " ne", "t", "."],
                         [0.9, 0.9, 0.9, 0.8, 0.9, 0.5, 0.4, 0.7])
    assert end is not None and end.last_word == pytest.approx(0.2) and end.end_mark == pytest.approx(0.7)
    end = end_confidence([" Hello", " there"], [0.9, 0.6])
    assert end is not None and end.last_word == pytest.approx(0.6) and end.end_mark is None
    both = end_confidence(["Wait", "?!"], [0.5, 0.25])
    assert both is not None and both.last_word == pytest.approx(0.5) and both.end_mark == pytest.approx(0.25)
    assert end_confidence(["."], [0.9]) is None and end_confidence([], []) is None
