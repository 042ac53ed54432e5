"""Turn taking, measured from the caller's side: how fast a finished sentence is answered, and how often a
sentence with a pause in the middle is cut at the pause. Web and phone legs, one session each.

    .venv/bin/python -m bench.turns                          # both legs, every item (~12 min on 2 cores)
    .venv/bin/python -m bench.turns --legs web --limit 10    # a quick look
    .venv/bin/python -m bench.turns --detector silence       # the same with silence endpointing

Speech (docs/test-speech.md): real recorded prompts (Asterisk's core prompts, the eligible ones of
tests/realspeech.py that are one sentence: a turn of two sentences with a pause between is two turns
here by design) and espeak-ng sentences.
- complete: 30 of the one-sentence prompts (evenly spaced) and 10 espeak questions and requests, as they
  are;
- paused: sentences with a 400-800 ms silence (cycling 400, 500, 600, 700, 800) inserted at a natural
  break where the first half is plainly unfinished: after a word a sentence cannot end on (an article,
  preposition, conjunction, possessive, auxiliary or "to"), at least a third of the way in and two words
  before the end: every one-sentence prompt where the rule finds a break (the first one), with word
  positions from faster-whisper's word timestamps on the clean audio and the cut at a quiet 10 ms between
  the two words where Whisper hears the first half end on the first word and the second half start with
  the next (tiny.en's timestamps can be a word off); and 12 espeak sentences spoken whole with an SSML
  break at such a word (espeak runs words together, so its audio cannot be cut cleanly).

Legs:
- `web`: the real app on a loopback port (WebSocket edge, SQLite, whisper tiny.en, espeak-ng), one raw
  WebSocket client streaming 16 kHz at real time in 20 ms frames and reading everything the server sends;
- `phone`: a PipelineSession at 8 kHz in and out (the pipeline a SIP worker runs, without pjsua) on a
  real-time 20 ms line (pipeline/realtime.py), the audio as a PCMU call carries it (300-3400 Hz, μ-law).
The agent answers every turn with "Okay." so the next sentence is not kept waiting.

Figures per leg:
- latency (complete sentences): the last voiced 20 ms frame of the sentence sent (frames within 40 dB
  of its loudest 10 ms) to the first agent audio frame received, p50/p95/max; the endpoint silences the
  turn detector chose, p50;
- cut (paused sentences): a user turn ended in the inserted pause (its end, the last voiced frame, within
  400 ms before the break or inside it) with more of the sentence after it: the agent had half a thought
  to answer. `split`: items (of either set) that became several turns at some other gap: the recorded
  prompts have natural pauses of their own between phrases ("After the tone say your busy message |
  then press the pound key"), where a finished-sounding phrase may rightly end a turn;
- misjudged (complete sentences): how many were held to the longest silence (judged unfinished);
- WER of the user turns against the references (the turns of a sentence joined).
Targets (issue 13): complete p50 ≤ 400 ms, p95 ≤ 600 ms; ≤ 5 % cut; the phone leg within 50 ms of the
web leg.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.web_sessions import FRAME, RATE, PacedSender, last_voiced_sample
from speechpipe.pipeline.audio import ulaw_decode, ulaw_encode
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.session import Engines
from tests import realspeech
from tests.speech import silence, synth, wer

PAUSES_MS = (400, 500, 600, 700, 800)
COMPLETE_ESPEAK = (
    "What time does the pharmacy open tomorrow?",
    "Can you tell me my account balance please?",
    "I need to change the delivery address on my order.",
    "Please send the invoice to my email address.",
    "Is the train to Boston running on time today?",
    "I would like to speak to a manager.",
    "Could you check whether my package has been shipped?",
    "My card was charged twice for the same order.",
    "How much does the premium plan cost per month?",
    "Thank you, that is all I needed.",
)
PAUSED_ESPEAK = (  # (first half, second half): the break goes between them, inside the sentence
    ("I'd like to order a large pizza with", "olives and mushrooms."),
    ("My phone number is", "five five five, one two three four."),
    ("Can you send the package to", "my office instead of my home?"),
    ("I want to cancel the", "appointment I made for Thursday."),
    ("The problem is that the", "router keeps restarting every night."),
    ("Please transfer me to the", "billing department."),
    ("We need a table for four people at", "eight o'clock."),
    ("I was charged for a subscription that", "I never ordered."),
    ("Could you tell me when the next bus to", "the airport leaves?"),
    ("I'm calling because my", "internet has been down since Monday."),
    ("The account is under the name of", "my husband."),
    ("I would like to book a flight from", "Paris to Rome."),
)
# Words a sentence cannot end on: a break after one leaves the first half plainly unfinished.
OPEN_WORDS = frozenset(
    "a an the to of for with and or but my your our their his her its is are was were be been at in on "
    "from by into about than that because if as can could would will should do does did have has had "
    "i'd i'm i'll we're you're".split())
AGENT_REPLY = "Okay."
SLOW_MS = 600  # a finished sentence answered later than the p95 target is listed with its endpoint


@dataclass
class Item:
    name: str
    text: str
    pcm: np.ndarray  # 16 kHz int16, the whole utterance (the pause inserted)
    pause_at: int | None = None  # sample where the inserted silence starts
    pause_ms: int = 0
    first_half: str = ""


def settled(events: list[dict[str, Any]], since: int) -> bool:
    """The item is over: it was answered, the answer was played out, and no utterance is in progress (the
    last speech start has its turn or non-turn)."""
    new = events[since:]
    kinds = [e["type"] for e in new]
    if "user_turn" not in kinds:
        return False
    last_turn = len(kinds) - 1 - kinds[::-1].index("user_turn")
    ends = [i for i, k in enumerate(kinds) if k in ("user_turn", "user.non_turn")]
    starts = [i for i, k in enumerate(kinds) if k == "user.speech_started"]
    in_progress = bool(starts) and (not ends or starts[-1] > ends[-1])
    return not in_progress and "agent.speech_done" in kinds[last_turn:]


@dataclass
class LegResult:
    latencies_ms: list[float] = field(default_factory=list)
    endpoints_ms: list[float] = field(default_factory=list)
    held: int = 0  # complete sentences held to the longest silence
    complete: int = 0
    paused: int = 0
    cut: list[tuple[str, list[str]]] = field(default_factory=list)  # a turn ended in the inserted pause
    split: list[tuple[str, list[str]]] = field(default_factory=list)  # split elsewhere (a natural gap)
    wers: list[float] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    misheard: list[tuple[str, str]] = field(default_factory=list)
    slow: list[tuple[str, float, float | None, str]] = field(default_factory=list)  # over the p95 target


# ---- the speech -----------------------------------------------------------------------------------------
def word_ends(model: Any, pcm: np.ndarray) -> list[tuple[str, float, float]]:
    """(word, start_s, end_s) per word, from faster-whisper's word timestamps."""
    segments, _ = model.transcribe(pcm.astype(np.float32) / 32768, language="en", beam_size=5,
                                   word_timestamps=True, condition_on_previous_text=False)
    return [(w.word.strip(), w.start, w.end) for s in segments for w in s.words]


def _norm(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum() or c == "'")


def break_point(pcm: np.ndarray, words: list[tuple[str, float, float]],
                engine: Any) -> tuple[int, int] | None:
    """(word index the first half ends on, sample to cut at) for the first natural break, or None. Word
    timestamps of tiny.en can be a word off, so a cut is kept only where Whisper hears the first half end
    on that word and the second half begin with the next one: the quietest 10 ms blocks between the two
    words' midpoints are tried in order."""
    n = len(words)
    for k in range(max(1, n // 3), n - 2):
        if _norm(words[k][0]) not in OPEN_WORDS:
            continue
        lo = int((words[k][1] + words[k][2]) / 2 * RATE)
        hi = int((words[k + 1][1] + words[k + 1][2]) / 2 * RATE)
        blocks = (hi - lo) // 160
        if blocks < 2:
            continue
        energy = (pcm[lo:lo + blocks * 160].astype(np.float64).reshape(blocks, 160) ** 2).mean(axis=1)
        for b in np.argsort(energy)[:6]:
            at = lo + int(b) * 160 + 80
            first, _ = engine.transcribe(np.concatenate([pcm[:at], silence(1000)]))
            second, _ = engine.transcribe(np.concatenate([silence(300), pcm[at:]]))
            head, tail = first.split(), second.split()
            if head and tail and _norm(head[-1]) == _norm(words[k][0]) \
                    and _norm(tail[0]) == _norm(words[k + 1][0]):
                return k, at
    return None


def with_pause(pcm: np.ndarray, at: int, ms: int) -> np.ndarray:
    return np.concatenate([pcm[:at], silence(ms), pcm[at:]]).astype(np.int16)


def build_items(limit: int | None) -> tuple[list[Item], list[Item]]:
    from faster_whisper import WhisperModel

    from speechpipe.pipeline.models import get_stt_engine, loaded_models

    engine = get_stt_engine("whisper", None, "en")
    aligner = WhisperModel(loaded_models()[0].location, device="cpu", compute_type="int8", cpu_threads=2)
    prompts = [(u.name, u.text, np.asarray(realspeech.wideband(u))) for u in realspeech.single_sentences()]
    espeak_complete = [(f"espeak-{i}", t, synth(t)) for i, t in enumerate(COMPLETE_ESPEAK)]
    complete = [Item(n, t, p) for n, t, p in prompts[::len(prompts) // 30 or 1][:30] + espeak_complete]
    paused: list[Item] = []
    for name, text, pcm in prompts:
        words = word_ends(aligner, pcm)
        found = break_point(pcm, words, engine)
        if found is None:
            continue
        k, at = found
        ms = PAUSES_MS[len(paused) % len(PAUSES_MS)]
        first = " ".join(w for w, _, _ in words[:k + 1])
        paused.append(Item(name, text, with_pause(pcm, at, ms), at, ms, first))
    for i, (head, tail) in enumerate(PAUSED_ESPEAK):
        ms = PAUSES_MS[len(paused) % len(PAUSES_MS)]
        pcm = synth(f'<speak>{head} <break time="{ms}ms"/> {tail}</speak>', ssml=True)
        paused.append(Item(f"espeak-p{i}", f"{head} {tail}", pcm, len(synth(head)), ms, head))
    if limit:
        complete, paused = complete[:limit], paused[:limit]
    return complete, paused


def to_telephone(pcm: np.ndarray) -> np.ndarray:
    """16 kHz → 8 kHz as a PCMU call carries it (tests/realspeech.py's chain)."""
    fmt = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1"]
    argv = ["sox", "-D", *fmt, "-r", "16000", "-", *fmt, "-r", "8000", "-", "sinc", "300-3400", "rate", "-v",
            "8000"]
    out = subprocess.run(argv, input=pcm.astype("<i2").tobytes(), capture_output=True, check=True).stdout
    return ulaw_decode(ulaw_encode(np.frombuffer(out, "<i2").astype(np.int16)))


# ---- scoring ------------------------------------------------------------------------------------------
def score(result: LegResult, item: Item, turns: list[dict[str, Any]], latency_ms: float | None,
          endpoint_ms: float | None, longest_ms: int, start_ms: int) -> None:
    """`start_ms`: where the item's audio began on the session clock (the turns' start_ms/end_ms)."""
    texts = [t["text"] for t in turns]
    if not texts:
        result.missed.append(item.name)
        return
    heard = " ".join(texts)
    result.wers.append(wer(item.text, heard))
    if result.wers[-1] > 0.3:
        result.misheard.append((item.text, heard))
    if item.pause_at is None:
        result.complete += 1
        if latency_ms is not None:
            result.latencies_ms.append(latency_ms)
            if latency_ms > SLOW_MS:
                result.slow.append((item.name, latency_ms, endpoint_ms, heard))
        if endpoint_ms is not None:
            result.endpoints_ms.append(endpoint_ms)
            result.held += endpoint_ms >= longest_ms
    else:
        result.paused += 1
        assert item.pause_at is not None
        at_ms = start_ms + item.pause_at * 1000 // RATE
        pause = (at_ms, at_ms + item.pause_ms)
        # A turn that ends just before the break (the VAD places the end at the last voiced frame) or in it,
        # with more of the sentence after it, was cut at the pause.
        if any(pause[0] - 400 <= t["end_ms"] <= pause[1] for t in turns[:-1]):
            result.cut.append((item.name, texts))
            return
    if len(texts) > 1:
        result.split.append((item.name, texts))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---- web leg ------------------------------------------------------------------------------------------
async def run_web(items: list[Item], config: dict[str, Any], engines: Engines, workdir: Path) -> LegResult:
    from speechpipe.settings import Settings
    from speechpipe.storage import Store
    from tests.fixtures_web import REPLIES, start_web_server

    REPLIES["bench-turns"] = lambda text: AGENT_REPLY
    settings = Settings(data_dir=workdir, database_url=f"sqlite:///{workdir / 'bench.db'}")
    settings.ensure_dirs()
    store = Store(settings.db_url)
    store.upgrade()
    server = start_web_server(settings, store, engines)
    result = LegResult()
    longest = PipeConfig(**config).endpointing.silence_range_ms[2]
    try:
        pipe_id = store.create_pipe(config).id
        url = server.ws_url(pipe_id, server.token(pipe_id))
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            await ws.send_json({"type": "start", "sample_rate": RATE})
            audio: list[float] = []
            events: list[dict[str, Any]] = []

            async def read() -> None:
                async for m in ws:
                    if m.type is aiohttp.WSMsgType.BINARY:
                        audio.append(time.monotonic())
                    elif m.type is aiohttp.WSMsgType.TEXT:
                        events.append({"_t": time.monotonic(), **json.loads(m.data)})

            reader = asyncio.ensure_future(read())
            line = PacedSender(ws)
            send = line.send

            await send(silence(500))
            for item in items:
                speech = np.pad(item.pcm, (0, -len(item.pcm) % FRAME))
                end_frame = line.sent + (last_voiced_sample(speech) + FRAME - 1) // FRAME
                n_events, n_audio = len(events), len(audio)
                start_ms = line.sent * 20  # the session clock counts the 16 kHz audio it was sent
                await send(speech)
                deadline = time.monotonic() + longest / 1000 + 15
                while not settled(events, n_events) and time.monotonic() < deadline:
                    await send(silence(100))
                await send(silence(400))
                new = events[n_events:]
                turns = [e for e in new if e["type"] == "user_turn"]
                metrics = [e["values"] for e in new if e["type"] == "metric" and e["name"] == "turn"]
                speech_end = line.t0 + end_frame * 0.02
                reply = [t for t in audio[n_audio:] if t > speech_end]
                latency = (reply[0] - speech_end) * 1000 if reply else None
                score(result, item, turns, latency, metrics[0]["endpoint_silence_ms"] if metrics else None,
                      longest, start_ms)
            await ws.send_json({"type": "stop"})
            await asyncio.wait_for(reader, 10)
    finally:
        server.stop()
        store.close()
    return result


# ---- phone leg ----------------------------------------------------------------------------------------
async def run_phone(items: list[Item], config: dict[str, Any], engines: Engines) -> LegResult:
    from speechpipe.pipeline.agent import CallbackAgent
    from speechpipe.pipeline.realtime import RealtimeLine
    from speechpipe.pipeline.session import PipelineSession, SessionInfo

    cfg = PipeConfig(**config)
    session = PipelineSession(SessionInfo("bench", cfg.agent_id, "inbound_phone"), cfg, engines,
                              input_rate=8000, output_rate=8000)
    events: list[dict[str, Any]] = []
    session.subscribe(lambda e: events.append(e.to_json()))
    await session.start()
    await session.attach_agent(CallbackAgent(lambda text: AGENT_REPLY))
    line = RealtimeLine(session)
    result = LegResult()
    longest = cfg.endpointing.silence_range_ms[2]
    try:
        await line.silence(0.5)
        for item in items:
            phone = to_telephone(item.pcm)
            phone = np.pad(phone, (0, -len(phone) % 160))
            start_tick = line.ticks
            end_tick = start_tick + (last_voiced_sample(item.pcm) + FRAME - 1) // FRAME
            n_events = len(events)
            await line.play(phone)
            await line.until(lambda n=n_events: settled(events, n), longest / 1000 + 15)  # type: ignore[misc]
            await line.silence(0.4)
            received = line.received()
            heard = np.nonzero(np.abs(received[end_tick * 160:]) > 0)[0]
            latency = (heard[0] // 160) * 20.0 if len(heard) else None
            new = events[n_events:]
            turns = [e for e in new if e["type"] == "user_turn"]
            metrics = [e["values"] for e in new if e["type"] == "metric" and e["name"] == "turn"]
            endpoint = metrics[0]["endpoint_silence_ms"] if metrics else None
            score(result, item, turns, latency, endpoint, longest, start_tick * 20)
    finally:
        await session.end("bench_over")
    return result


# ---- report -------------------------------------------------------------------------------------------
def report(leg: str, r: LegResult, longest: int) -> dict[str, Any]:
    row = {"leg": leg, "complete": r.complete, "p50": pct(r.latencies_ms, 50), "p95": pct(r.latencies_ms, 95),
           "max": max(r.latencies_ms, default=float("nan")), "endpoint_p50": pct(r.endpoints_ms, 50),
           "held": r.held, "paused": r.paused, "cut": len(r.cut), "split": len(r.split),
           "cut_pct": 100.0 * len(r.cut) / r.paused if r.paused else float("nan"),
           "wer": statistics.fmean(r.wers) if r.wers else float("nan"), "missed": len(r.missed)}
    print(f"{leg:>6} {row['complete']:>8} {row['p50']:>6.0f} {row['p95']:>6.0f} {row['max']:>6.0f} "
          f"{row['endpoint_p50']:>9.0f} {row['held']:>5} {row['paused']:>7} {row['cut']:>4} "
          f"{row['cut_pct']:>6.1f} {row['split']:>6} {row['wer']:>6.3f} {row['missed']:>6}", flush=True)
    for name, texts in r.cut:
        print(f"{'':>6} cut at the pause: {name}: {texts}")
    for name, texts in r.split:
        print(f"{'':>6} split elsewhere: {name}: {texts}")
    for name, ms, endpoint, heard in r.slow:
        print(f"{'':>6} slow: {name}: {ms:.0f} ms (endpoint {endpoint} ms): {heard!r}")
    for said, heard in r.misheard[:5]:
        print(f"{'':>6} misheard: {said!r} → {heard!r}")
    for name in r.missed:
        print(f"{'':>6} no turn: {name}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--legs", default="web,phone", help="comma-separated: web, phone")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per set")
    p.add_argument("--detector", choices=("heuristic", "silence"), default="heuristic")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    complete, paused = build_items(args.limit)
    items = [x for pair in zip(complete, paused, strict=False) for x in pair]
    items += complete[len(paused):] + paused[len(complete):]
    config = {"agent_id": "bench-turns", "endpointing": {"turn_detector": args.detector}}
    engines = Engines()
    engines.warm_up(PipeConfig(**config))
    longest = PipeConfig(**config).endpointing.silence_range_ms[2]
    print(f"turn detector {args.detector}: {len(complete)} complete sentences, {len(paused)} with a "
          f"{min(PAUSES_MS)}-{max(PAUSES_MS)} ms pause at a natural break")
    print(f"{'leg':>6} {'complete':>8} {'p50':>6} {'p95':>6} {'max':>6} {'endpoint':>9} {'held':>5} "
          f"{'paused':>7} {'cut':>4} {'cut %':>6} {'split':>6} {'WER':>6} {'missed':>6}")
    rows = {}
    for leg in args.legs.split(","):
        if leg == "web":
            with tempfile.TemporaryDirectory(prefix="speechpipe-turns-") as tmp:
                r = asyncio.run(run_web(items, config, engines, Path(tmp)))
        else:
            r = asyncio.run(run_phone(items, config, engines))
        rows[leg] = report(leg, r, longest)
    if "web" in rows and "phone" in rows:
        print(f"phone - web: p50 {rows['phone']['p50'] - rows['web']['p50']:+.0f} ms, "
              f"p95 {rows['phone']['p95'] - rows['web']['p95']:+.0f} ms")


if __name__ == "__main__":
    main()
