"""Barge-in decisions on plain values: speech ms and recognised text in, actions out. No audio."""

import pytest

from speechpipe.pipeline.barge_in import Action, BargeIn, fillers_only, meaningful
from speechpipe.pipeline.config import BargeInConfig


def barge(streaming: bool = False, **cfg) -> BargeIn:
    return BargeIn(BargeInConfig(**cfg), streaming=streaming)


def test_onset_during_playback_pauses_the_agent():
    b = barge()
    assert b.onset(12.5, interruptible=True, playing=True) is Action.PAUSE
    assert b.active and b.candidate.onset_wall == 12.5


def test_onset_before_audio_watches_without_pausing():
    b = barge()
    assert b.onset(1.0, interruptible=True, playing=False) is Action.NONE
    assert b.active  # still a candidate: words may cut the queued reply


@pytest.mark.parametrize("interruptible, cfg", [(False, {}), (True, {"enabled": False})])
def test_no_candidate_over_uninterruptible_speech_or_when_disabled(interruptible, cfg):
    b = barge(**cfg)
    assert b.onset(1.0, interruptible=interruptible, playing=True) is Action.NONE
    assert not b.active
    assert b.due(5000) is Action.NONE
    assert b.utterance_end("stop right there") is Action.NONE


def test_checks_start_after_min_speech_and_come_every_200_ms():
    b = barge(min_speech_ms=300)
    b.onset(0.0, interruptible=True, playing=True)
    assert b.due(280) is Action.NONE
    assert b.due(300) is Action.CHECK
    assert b.due(320) is Action.NONE  # one check in flight at a time
    assert b.checked("stop") is Action.NONE
    assert b.due(480) is Action.NONE
    assert b.due(500) is Action.CHECK


def test_two_checks_agreeing_on_a_meaningful_word_cut():
    b = barge()
    b.onset(0.0, interruptible=True, playing=True)
    assert b.due(300) is Action.CHECK
    assert b.checked("Stop.") is Action.NONE  # one check alone may be a hallucination
    assert b.due(500) is Action.CHECK
    assert b.checked("Stop, I want") is Action.CUT


def test_checks_that_disagree_do_not_cut():
    b = barge()
    b.onset(0.0, interruptible=True, playing=True)
    b.due(300)
    assert b.checked("M. A.") is Action.NONE
    b.due(500)
    assert b.checked("Mother.") is Action.NONE  # stray letters, then one new word: nothing agrees


def test_a_streaming_engine_cuts_on_its_first_meaningful_partial():
    b = barge(streaming=True)
    b.onset(0.0, interruptible=True, playing=True)
    b.due(300)
    assert b.checked("wait") is Action.CUT


def test_a_failed_check_decides_nothing_and_allows_the_next():
    b = barge()
    b.onset(0.0, interruptible=True, playing=True)
    b.due(300)
    assert b.checked(None) is Action.NONE
    assert b.due(500) is Action.CHECK


@pytest.mark.parametrize("text", ["okay", "Mm-hmm.", "uh-huh", "Yeah, right.", "Hmm", "mmm", "Uh, m",
                                  "M. A.", "b", "OK okay sure"])
def test_backchannels_fillers_and_stray_letters_never_cut(text):
    b = barge()
    b.onset(0.0, interruptible=True, playing=True)
    for speech_ms in (300, 500, 700):
        assert b.due(speech_ms) is Action.CHECK
        assert b.checked(text) is Action.NONE
    assert b.utterance_end(text) is Action.RESUME
    assert meaningful(text, BargeInConfig()) == set()


def test_digits_are_words_and_cut():
    b = barge()
    b.onset(0.0, interruptible=True, playing=True)
    b.due(300)
    assert b.checked("7 8") is Action.NONE
    b.due(500)
    assert b.checked("7 8 9") is Action.CUT
    assert meaningful("7 8 9", BargeInConfig()) == {"7", "8", "9"}
    assert not fillers_only("7")


def test_min_words_zero_cuts_on_voice_activity_alone():
    b = barge(min_words=0, min_speech_ms=300)
    b.onset(0.0, interruptible=True, playing=True)
    assert b.due(280) is Action.NONE
    assert b.due(300) is Action.CUT


def test_min_words_counts_every_word_said():
    cfg = BargeInConfig(min_words=3)
    assert meaningful("stop now", cfg) == set()
    assert meaningful("okay stop now", cfg) == {"stop", "now"}


def test_backchannel_list_comes_from_the_config():
    cfg = BargeInConfig(backchannel_words=["gotcha"])
    assert meaningful("Gotcha.", cfg) == set()
    assert meaningful("okay", cfg) == {"okay"}


@pytest.mark.parametrize("text, agreed_with, streaming, min_words, action", [
    ("Stop please.", {"stop"}, False, 1, Action.CUT),  # the same word as the last check
    ("Stop please.", set(), False, 1, Action.RESUME),  # words, but never confirmed: a turn after the reply
    ("Stop please.", set(), True, 1, Action.CUT),  # a streaming engine's text is trusted
    ("Stop please.", set(), False, 0, Action.CUT),  # min_words 0: any words at the end cut
    ("Mm-hmm.", {"stop"}, False, 1, Action.RESUME),  # a backchannel at the end
    ("", set(), False, 0, Action.RESUME),  # no words at all
])
def test_end_of_utterance_rule(text, agreed_with, streaming, min_words, action):
    b = barge(streaming=streaming, min_words=min_words)
    b.onset(0.0, interruptible=True, playing=True)
    b.candidate.words = agreed_with
    assert b.utterance_end(text) is action


def test_take_ends_the_candidate_and_returns_its_onset():
    b = barge()
    b.onset(3.25, interruptible=True, playing=True)
    c = b.take()
    assert c is not None and c.onset_wall == 3.25
    assert not b.active and b.take() is None
    assert b.checked("stop") is Action.NONE  # a late check of a gone candidate decides nothing


@pytest.mark.parametrize("text, expected", [("Hmm.", True), ("Uh, m", True), ("", True), ("No.", False),
                                            ("I", False), ("a", False), ("7", False), ("Mm-hmm", True)])
def test_fillers_only(text, expected):
    assert fillers_only(text) is expected
