"""Reply books on plain values: text as it arrives, what was heard at a playback position, cuts."""

import asyncio

from speechpipe.pipeline.reply import Replies, ReplyHandle, UserTurn
from speechpipe.pipeline.speaker import Reply, Sentence

RATE = 16000


def spoken(*sentences: tuple[str, int, int]) -> Reply:
    """A speaker reply whose sentences were synthesised to `samples` and played up to `played`."""
    return Reply(turn_id=1, sentences=[Sentence(text, samples, played, synthesized=True)
                                       for text, samples, played in sentences], synth_done=True)


def test_text_accumulates_as_sent():
    h = ReplyHandle(1)
    for delta in [" Sure,", " the ", "number is", " 42. "]:
        h.add_text(delta)
    assert h.text == "Sure, the number is 42."


def test_heard_text_follows_the_frames_played():
    audio = spoken(("One two three four.", 8000, 8000), ("Five six seven eight.", 8000, 4100))
    h = ReplyHandle(1, audio=audio)
    assert h.heard_text(RATE) == "One two three four. Five six"


def test_heard_text_prefers_the_clients_own_count():
    # The server sent it all, the client says it played 0.75 s (the web client's `playback: stopped`).
    audio = spoken(("One two three four.", 8000, 8000), ("Five six seven eight.", 8000, 8000))
    h = ReplyHandle(1, audio=audio)
    h.client_stopped = asyncio.Event()
    h.client_report(0.75)
    assert h.client_stopped.is_set()
    assert h.heard_text(RATE) == "One two three four. Five six"
    assert h.heard_text(RATE) == "One two three four. Five six seven eight."  # a report counts once


def test_nothing_heard_before_the_audio_exists():
    assert ReplyHandle(1).heard_text(RATE) == ""
    assert not ReplyHandle(1).started


def test_cut_remembers_where_a_heard_answer_began():
    audio = spoken(("Hello there.", 8000, 3000))
    audio.started_at, audio.first_frame_pos = 10.0, 48000
    h = ReplyHandle(1, audio=audio)
    assert h.started and h.playing
    h.mark_cut()
    assert h.cut and h.cut_at == 48000


def test_cut_before_any_audio_has_no_position():
    h = ReplyHandle(1, audio=spoken(("Hello there.", 8000, 0)))
    h.mark_cut()
    assert h.cut and h.cut_at is None


def test_finish_books_the_interruption():
    h = ReplyHandle(1)
    h.finish(interrupted=True, heard="One two")
    assert (h.done, h.interrupted, h.heard) == (True, True, "One two")


def test_replies_track_answers_owed_and_says():
    replies = Replies()
    first, second = UserTurn(1, "hi", 0.0), UserTurn(2, "and", 1.0)
    a1, a2 = replies.answer(first), replies.answer(second)
    say = replies.say(-1, spoken(("Please hold.", 100, 0)), "Please hold.")
    assert first.answer is a1 and a1.user is first
    assert [h.turn_id for h in replies.answering()] == [1, 2]  # says owe nobody an answer
    assert replies.audio(1) is None and replies.audio(-1) is say.audio
    assert say.text == "Please hold."
    assert replies.close(1) is a1 and 1 not in replies and replies.get(1) is None
    assert first.answer is a1  # the user turn keeps its answer's books after it closed
    assert [h.turn_id for h in replies] == [2, -1]
    assert replies.close(1) is None and a2.user is second
