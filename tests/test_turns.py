"""Endpointing logic on hand-made VAD decision streams."""

import pytest

from speechpipe.pipeline.config import EndpointingConfig
from speechpipe.pipeline.turns import Signal, TurnDetector, looks_unfinished


def run(decisions: str, **cfg) -> list[tuple[int, Signal]]:
    det = TurnDetector(EndpointingConfig(**cfg))
    out = []
    for i, c in enumerate(decisions):
        for s in det.process(c == "#"):
            out.append((i, s))
    return out


def test_turn_ends_after_silence_setting():
    # 20 voiced frames (400 ms), then 30 silent (600 ms) with a 500 ms endpoint.
    signals = run("#" * 20 + "." * 30, silence_ms=500, min_speech_ms=200)
    assert signals[0] == (1, Signal.SPEECH_START)
    assert (29, Signal.PAUSE) in signals  # 200 ms into the silence
    assert signals[-1] == (44, Signal.END)  # 25 silent frames = 500 ms


def test_short_blip_is_discarded_not_a_turn():
    signals = run("###" + "." * 30, silence_ms=300, min_speech_ms=200)
    assert [s for _, s in signals] == [Signal.SPEECH_START, Signal.PAUSE, Signal.DISCARD]


def test_single_vad_flicker_does_not_reset_the_endpoint():
    det = TurnDetector(EndpointingConfig(silence_ms=300, min_speech_ms=100))
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
])
def test_looks_unfinished(text: str, unfinished: bool) -> None:
    assert looks_unfinished(text) is unfinished
