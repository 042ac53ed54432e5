"""No word the user says vanishes: speech over the agent becomes a user turn, or a stored, marked non-turn.

Real recorded speech (tests/realspeech.py: Asterisk's prompts, a human voice), on the 16 kHz leg and on
the 8 kHz μ-law leg a PCMU call delivers. The two cases are the ones that used to vanish with no turn, no
event and no log line: a two-word utterance said while the greeting plays, and the second half of a
number dictated while the agent was already answering the first half.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client import generate_latest
from sqlalchemy import text as sql

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import CallbackAgent
from speechpipe.pipeline.config import PipeConfig
from speechpipe.storage import AsyncStore, Store
from speechpipe.websocket_edge.metrics import Telemetry
from tests import realspeech
from tests.speech import synth

pytestmark = pytest.mark.skipif(bool(realspeech.missing()), reason=realspeech.missing() or "")

GREETING = ("Thank you for calling the city library. Our opening hours are from nine in the morning until "
            "six in the evening on weekdays, and from ten until four on Saturdays.")
LONG_ANSWER = ("Let me read that back to you slowly and carefully, so that we are sure that every digit "
               "is right before we go on to the next step of your booking.")
LEGS = [pytest.param(16000, id="web16k"), pytest.param(8000, id="pcmu8k")]
DIGIT_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())}


def _voice(name: str, rate: int) -> np.ndarray:
    u = realspeech.prompt(name)
    return np.asarray(realspeech.wideband(u) if rate == 16000 else realspeech.telephone(u))


def _digits(name_digits: str, rate: int, gap_ms: int = 120) -> np.ndarray:
    gap = np.zeros(rate * gap_ms // 1000, np.int16)
    parts = [p for d in name_digits for p in (_voice(f"digits/{d}", rate), gap)]
    return np.concatenate(parts[:-1])


def _as_digits(text: str) -> str:
    """'Four, five, 6.' → '456'."""
    out = []
    for token in re.findall(r"[a-z]+|\d", text.lower()):
        out.append(DIGIT_WORDS.get(token, token if token.isdigit() else ""))
    return "".join(out)


@pytest.fixture
def sql_store(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'speech.db'}")
    store.upgrade()
    yield store
    store.close()


async def _open(talk, sql_store: Store, agent: CallbackAgent, rate: int):
    pipe = sql_store.create_pipe({"agent_id": "test"})
    return await talk(PipeConfig(agent_id="test"), agent, input_rate=rate, output_rate=rate,
                      store=AsyncStore(sql_store), direction="web" if rate == 16000 else "inbound_phone",
                      pipe_id=pipe.id)


def _user_rows(store: Store, session_id: str) -> list[tuple[str, str]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sql("SELECT text, kind FROM turns WHERE session_id = :s AND role = 'user' "
                                "ORDER BY seq"), {"s": session_id}).all()
    return [(r[0], r[1]) for r in rows]


@pytest.mark.parametrize("rate", LEGS)
async def test_two_words_over_the_greeting_become_a_turn(talk, sql_store: Store, rate: int) -> None:
    t = await _open(talk, sql_store, CallbackAgent(lambda text: "Certainly.", greeting=GREETING), rate)
    assert await t.line.until(lambda: t.of(ev.AgentSpeechStarted), 10)
    await t.line.silence(1.0)
    await t.line.play(_voice("call-waiting", rate))  # "Call waiting." (1.1 s), over the greeting
    assert await t.line.until(lambda: any("wait" in u.text.lower() for u in t.of(ev.UserTurn)), 30), \
        [(type(e).__name__, getattr(e, "text", getattr(e, "kind", ""))[:30]) for e in t.events
         if not isinstance(e, ev.Metric)]
    session_id = t.session.session_id
    await t.session.end("test_over")
    rows = _user_rows(sql_store, session_id)
    assert any("wait" in text.lower() and kind == "turn" for text, kind in rows), rows


@pytest.mark.parametrize("rate", LEGS)
async def test_a_number_dictated_over_the_answer_is_all_heard(talk, sql_store: Store, rate: int) -> None:
    agent_heard: list[str] = []
    answer = CallbackAgent(lambda text: agent_heard.append(text) or LONG_ANSWER)
    t = await _open(talk, sql_store, answer, rate)
    await t.line.play(_digits("456", rate))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechStarted), 10)  # the agent answers the first half
    await t.line.silence(0.3)
    await t.line.play(_digits("789", rate))  # ...and the caller goes on over it
    assert await t.line.until(lambda: "789" in "".join(_as_digits(u.text) for u in t.of(ev.UserTurn)), 30), \
        [(type(e).__name__, getattr(e, "text", getattr(e, "kind", ""))[:30]) for e in t.events
         if not isinstance(e, ev.Metric)]
    heard = "".join(_as_digits(u.text) for u in t.of(ev.UserTurn))
    assert "456" in heard and heard.index("456") < heard.index("789")
    # The second half continues the first: the agent hears the whole number as one turn.
    assert await t.line.until(lambda: len(agent_heard) >= 2, 10), agent_heard
    assert "456789" in _as_digits(agent_heard[-1]), agent_heard
    session_id = t.session.session_id
    await t.session.end("test_over")
    stored = "".join(_as_digits(text) for text, kind in _user_rows(sql_store, session_id) if kind == "turn")
    assert stored == heard


@pytest.mark.parametrize("word", ["okay", "uh-huh"])
async def test_a_backchannel_over_the_agent_is_stored_and_marked(talk, sql_store: Store, word: str) -> None:
    """espeak here: the real-speech set has no backchannels. The agent carries on; the word is kept."""
    t = await _open(talk, sql_store, CallbackAgent(lambda text: "ok", greeting=GREETING), 16000)
    telemetry = Telemetry()
    telemetry.observe(t.session)
    assert await t.line.until(lambda: t.of(ev.AgentSpeechStarted), 10)
    await t.line.silence(1.5)
    await t.line.play(synth(word))
    assert await t.line.until(lambda: t.of(ev.AgentSpeechDone), 30)
    (done,) = t.of(ev.AgentSpeechDone)
    assert not done.interrupted and not t.of(ev.UserTurn)
    (kept,) = t.of(ev.UserNonTurn)
    assert kept.kind == "backchannel" and kept.text
    session_id = t.session.session_id
    await t.session.end("test_over")
    assert _user_rows(sql_store, session_id) == [(kept.text, "backchannel")]
    assert t.session.metrics_summary()["non_turns"] == 1
    scrape = generate_latest(telemetry.registry).decode()
    assert 'speechpipe_user_non_turns_total{direction="web",kind="backchannel"} 1.0' in scrape


async def test_a_finished_question_is_not_joined_to_what_cuts_its_answer(talk, sql_store: Store) -> None:
    agent_heard: list[str] = []
    answer = CallbackAgent(lambda text: agent_heard.append(text) or LONG_ANSWER)
    t = await _open(talk, sql_store, answer, 16000)
    await t.line.play(_voice("vm-sorry", 16000))  # "I'm sorry I did not understand your response."
    assert await t.line.until(lambda: t.of(ev.AgentSpeechStarted), 10)
    await t.line.silence(0.3)
    await t.line.play(_voice("please-try-call-later", 16000))  # "Please try your call again later."
    assert await t.line.until(lambda: len(agent_heard) >= 2, 30), agent_heard
    assert "sorry" not in agent_heard[1].lower() and "later" in agent_heard[1].lower(), agent_heard
