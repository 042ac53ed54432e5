"""Product-path accuracy on real recorded speech, per leg, beside the engine alone on the same audio.

    .venv/bin/python -m bench.accuracy                       # every leg (~6 min on 2 cores)
    .venv/bin/python -m bench.accuracy --legs web8,sip-pcmu --limit 10
    .venv/bin/python -m bench.accuracy --sip-every 1         # SIP legs on all 40 prompts (~10 min)

The speech is tests/realspeech.py's development set: 40 recorded prompts with reference transcripts, as
the wideband original (16 kHz, G.722-decoded) or as a PCMU call carries it (8 kHz, 300-3400 Hz, μ-law).
Each prompt is placed after 1.0 s of silence with 1.5 s of silence after it, so consecutive prompts are
2.5 s apart (the endpoint is 500 ms). The agent never speaks, so no playback interferes.

Legs:
- `web16`, `web8`: a real PipelineSession in this process (input rate 16000 with the wideband audio, 8000
  with the telephone audio), default pipe config, its turns stored in a real SQLite store;
  `web16-noisy`, `web8-noisy`: the same with realspeech.noisy() noise at 10 dB SNR over each prompt and
  its silences (the noise runs through the gaps too).
- `sip-pcmu`, `sip-g722`: a real call (baresip in a private network namespace, codec forced by its codec
  list) into a real pjsua2 media worker started by the supervisor, playing one WAV of the prompts (the
  telephone version for PCMU, the wideband one for G.722). The calls run one after the other: two
  baresip calls at once on a 2-core machine garbled the audio as sent (the cross-correlation of sent and
  received audio fell from 1.00 to 0.1-0.5 in places, with dropped stretches; a single call stays at 1.00
  throughout with a constant lag), which is the test rig, not the product. SIP legs run in real time, so
  they play every `--sip-every`-th prompt (default 2: 20 prompts, ~2 min a call); the in-process rows
  then also give their WER on that subset, for a like-for-like comparison.

In-process sessions are fed as fast as the session takes the audio (`--pace fast`: frames are pushed as
the session's input queue drains, so the decode at each endpoint holds the line as it would at real
time); `--pace realtime` uses pipeline.realtime.RealtimeLine. Nothing in the session's decisions reads the
wall clock (endpointing counts frames, the STT lane runs in order, the agent is silent), and both paces
gave the same turns, word for word, on the legs checked (see the commit that added this file).

Whisper's text for the same audio is repeatable within a process but not between processes (three
processes decoding the same 20 noisy prompts disagreed on 6 of them), so a leg's WERs move between runs:
by up to ~0.008 on clean legs and ~0.02 on noisy ones here. Read the differences between rows of one run
(the in-process rows decode product and engine alone in the same process) and treat smaller changes
across runs as noise.

Per leg, utterances are matched to the session's stored user rows (`turns`, role user): the shift between
the sent audio and the session's clock is found by cross-correlating the 20 ms energy envelopes of the
sent track and the session recording's left channel (the caller as the session received it), then each
row goes to the prompt its [start_ms, end_ms] overlaps most.

Columns:
- product WER: corpus WER (jiwer, all prompts pooled, normalise_text on both sides) of the user turns'
  text (a prompt's turns joined; "" when it has none) against the references;
- engine WER: the same for Whisper alone (`get_stt_engine(...).transcribe`) on each prompt cut from the
  recording's left channel (the prompt's span ± 300 ms at the found shift): the same audio the pipeline
  heard, one decode per prompt, no VAD or endpointing; Δ = product - engine (what the pipeline loses);
- no turn: prompts with no user turn; lost: of those, prompts with no stored user row of any kind either
  (no backchannel/noise row: `turns.kind`, where that column exists);
- tails P/E: prompts whose text has a repeated tail, product path / engine alone. A repeated tail is
  (a) a sentence (split after . ? !) whose first m ≥ 2 words equal the first m words of an earlier
  sentence in the same text, where that m-word sequence occurs more often in the text than in the
  reference, or (b) a word n-gram (n ≥ 2) repeated back to back ("a b a b") whose doubled form does not
  occur in the reference. Words are compared after normalise_text;
- split: prompts that became two or more user turns (an utterance cut in two); strays: user turns that
  overlap no prompt;
- late start: prompts whose first turn starts more than the session's 300 ms pre-roll after the prompt's
  voiced onset (wideband frames within 30 dB of its peak), so its first sounds never reached the STT;
  onset p50: the median of that delay (turn start_ms is the VAD onset; the STT also gets the 300 ms
  before it). The details list each worse/split/repeated prompt with its onset and end delays.

Then the VAD's per-frame accuracy on the narrowband prompts, the measurement the default threshold for 8
kHz legs is chosen on: SileroVAD(rate=8000) on the telephone audio vs SileroVAD(rate=16000) on it
upsampled (what 8 kHz sessions did before), at thresholds 0.3-0.6 with the default hysteresis
(neg_threshold = threshold - 0.15), each prompt alone with 0.5 s of silence either side and a fresh
detector. Truth: tests.sounds.active_mask(wideband, 16000, range_db=30) per 20 ms frame of the wideband
original. Recall: voiced frames called speech, pooled; "cold" the same with the prompt starting on the
detector's first frame (as tests/test_vad.py measures it; the 16 kHz branch is slowest to wake up); at
10 dB SNR too. False in gaps: unvoiced frames (by the wideband truth, so hang-over after a word and
speech quieter than 30 dB under the peak count here) of the 10 dB SNR prompts called speech. False on
noise: frames called speech on noise-only narrowband audio (every prompt's line noise alone at 10 dB and
at 0 dB below its speech, and bench/vad_accuracy.py's noise cases through the phone leg: noise floors,
white/pink noise up to -20 dBFS, hum, coughs, clicks), pooled, with the longest false run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
import numpy as np

from speechpipe.pipeline.agent import AgentGone, AgentLink
from tests import realspeech, sounds
from tests.speech import normalise_text, read_wav, write_wav

LEAD_S = 1.0  # silence before each prompt
TRAIL_S = 1.5  # silence after each prompt
SNR_DB = 10.0
MARGIN_MS = 300  # around each prompt when it is cut from the recording for the engine alone
PREROLL_MS = 300  # audio the session hands the STT from before the VAD's onset (session.PREROLL_FRAMES)
SIP_LEAD_S = 1.0  # extra silence at the start of a call (media starts before the session does)
SIP_TAIL_S = 3.0  # after the last prompt's trailing silence, before baresip hangs up
SIP_EXTENSION = "2100"
SILENT_FACTORY = "bench.accuracy:silent_agent"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


@dataclass(frozen=True)
class Leg:
    name: str
    rate: int  # the caller's audio rate (and the session's input rate)
    snr_db: float | None = None
    codec: str | None = None  # baresip's codec list entry for a SIP leg

    @property
    def sip(self) -> bool:
        return self.codec is not None


LEGS = {leg.name: leg for leg in (
    Leg("web16", 16000), Leg("web8", 8000),
    Leg("web16-noisy", 16000, SNR_DB), Leg("web8-noisy", 8000, SNR_DB),
    Leg("sip-pcmu", 8000, codec="PCMU/8000/1"), Leg("sip-g722", 16000, codec="G722/16000/1"),
)}


@dataclass
class Placed:
    utterance: realspeech.Utterance
    start_ms: int  # the prompt's span in the sent track
    end_ms: int
    voiced_ms: tuple[int, int] = (0, 0)  # its voiced span (wideband frames within 30 dB of its peak)


@dataclass
class Row:
    seq: int
    text: str
    start_ms: int | None
    end_ms: int | None
    kind: str = "turn"


@dataclass
class Outcome:
    """What one leg produced: the sent track, the session's user rows and its recording."""

    leg: Leg
    placed: list[Placed]
    track: np.ndarray  # at leg.rate
    rows: list[Row]
    recording: np.ndarray  # left channel (the caller as the session received it), 16 kHz
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ audio


def prompt_audio(u: realspeech.Utterance, rate: int) -> np.ndarray:
    return realspeech.wideband(u) if rate == 16000 else realspeech.telephone(u)


def build_track(utterances: Sequence[realspeech.Utterance], rate: int, snr_db: float | None = None,
                lead_s: float = 0.0) -> tuple[np.ndarray, list[Placed]]:
    """Every prompt after LEAD_S of silence and before TRAIL_S; with `snr_db`, each prompt's stretch
    (silences included) carries realspeech.noisy() noise at that SNR."""
    parts = [np.zeros(round(lead_s * rate), np.int16)]
    at = len(parts[0])
    placed = []
    lead, trail = np.zeros(round(LEAD_S * rate), np.int16), np.zeros(round(TRAIL_S * rate), np.int16)
    for i, u in enumerate(utterances):
        pcm = prompt_audio(u, rate)
        seg = np.concatenate([lead, pcm, trail])
        if snr_db is not None:
            seg = realspeech.noisy(seg, rate, snr_db, seed=i)
        start = at + len(lead)
        t0 = start * 1000 // rate
        voiced = np.flatnonzero(sounds.active_mask(realspeech.wideband(u), 16000, range_db=30)[::320])
        span = (t0 + int(voiced[0]) * 20, t0 + (int(voiced[-1]) + 1) * 20) if voiced.size else (t0, t0)
        placed.append(Placed(u, t0, (start + len(pcm)) * 1000 // rate, span))
        parts.append(seg)
        at += len(seg)
    return np.concatenate(parts), placed


def envelope(pcm: np.ndarray, rate: int) -> np.ndarray:
    """log energy per 20 ms frame."""
    n = rate // 50
    frames = np.asarray(pcm[: len(pcm) // n * n], np.float64).reshape(-1, n)
    return np.log10(np.mean(frames**2, axis=1) + 1.0)


def find_shift_ms(track: np.ndarray, rate: int, recording16: np.ndarray, max_s: float = 10.0) -> int:
    """Where the sent track sits in the recording: recording time = track time + shift (20 ms steps)."""
    a, b = envelope(track, rate), envelope(recording16, 16000)
    a, b = a - a.mean(), b - b.mean()
    n = 1 << math.ceil(math.log2(len(a) + len(b)))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    lim = int(max_s * 50)
    lags = np.r_[np.arange(0, lim + 1), np.arange(-lim, 0)]
    best = int(lags[np.argmax(np.r_[corr[: lim + 1], corr[n - lim:]])])
    return best * 20


# ------------------------------------------------------------------------------------------ scoring


def _words(text: str) -> list[str]:
    return normalise_text(text).split()


def _count(seq: list[str], gram: list[str]) -> int:
    m = len(gram)
    return sum(seq[i : i + m] == gram for i in range(len(seq) - m + 1))


def repeated_tail(hypothesis: str, reference: str) -> str | None:
    """The repeated tail in `hypothesis` (see the module docstring for the definition), or None."""
    ref, hyp = _words(reference), _words(hypothesis)
    sentences = [_words(s) for s in re.split(r"(?<=[.?!])\s+", hypothesis.strip()) if _words(s)]
    for k in range(1, len(sentences)):
        for j in range(k):
            m = 0
            while m < min(len(sentences[k]), len(sentences[j])) and sentences[k][m] == sentences[j][m]:
                m += 1
            if m >= 2 and _count(hyp, sentences[k][:m]) > _count(ref, sentences[k][:m]):
                return "sentence restarts with " + repr(" ".join(sentences[k][:m]))
    for n in range(2, len(hyp) // 2 + 1):
        for i in range(len(hyp) - 2 * n + 1):
            if hyp[i : i + n] == hyp[i + n : i + 2 * n] and not _count(ref, hyp[i : i + 2 * n]):
                return "back to back " + repr(" ".join(hyp[i : i + n]))
    return None


def assign(rows: list[Row], placed: list[Placed], shift_ms: int) -> tuple[list[list[Row]], list[Row]]:
    """Each timed row to the prompt it overlaps most (prompt spans moved by `shift_ms`); rows that overlap
    none come back as strays."""
    groups: list[list[Row]] = [[] for _ in placed]
    strays = []
    for r in rows:
        if r.start_ms is None or r.end_ms is None:
            strays.append(r)
            continue
        overlaps = [max(0, min(r.end_ms, p.end_ms + shift_ms) - max(r.start_ms, p.start_ms + shift_ms))
                    for p in placed]
        best = int(np.argmax(overlaps)) if overlaps else 0
        if overlaps and overlaps[best] > 0:
            groups[best].append(r)
        else:
            strays.append(r)
    return groups, strays


def engine_texts(outcome: Outcome, shift_ms: int, engine: Any, language: str) -> list[str]:
    """Whisper alone on each prompt as the session received it (the recording's left channel)."""
    rec = outcome.recording
    out = []
    for p in outcome.placed:
        a = max(0, (p.start_ms + shift_ms - MARGIN_MS) * 16)
        b = min(len(rec), (p.end_ms + shift_ms + MARGIN_MS) * 16)
        text, _ = engine.transcribe(rec[a:b], language) if b > a else ("", None)
        out.append(text)
    return out


def score(outcome: Outcome, engine: Any, language: str, subset: set[str] | None = None) -> dict[str, Any]:
    shift = find_shift_ms(outcome.track, outcome.leg.rate, outcome.recording)
    groups, strays = assign(outcome.rows, outcome.placed, shift)
    turns = [[r for r in g if r.kind == "turn"] for g in groups]
    product = [" ".join(r.text for r in g) for g in turns]
    alone = engine_texts(outcome, shift, engine, language)
    refs = [normalise_text(p.utterance.text) for p in outcome.placed]
    detail = []
    for p, g, t, prod, eng in zip(outcome.placed, groups, turns, product, alone, strict=True):
        timed = [r for r in t if r.start_ms is not None and r.end_ms is not None]
        detail.append({
            # first turn's start after the prompt's voiced onset; last turn's end after its voiced end
            "onset_ms": min(r.start_ms for r in timed) - p.voiced_ms[0] - shift if timed else None,
            "end_ms": max(r.end_ms for r in timed) - p.voiced_ms[1] - shift if timed else None,
            "name": p.utterance.name, "ref": p.utterance.text, "product": prod, "engine": eng,
            "turns": sum(r.kind == "turn" for r in g), "rows": len(g),
            "kinds": [r.kind for r in g if r.kind != "turn"],
            "product_wer": jiwer.wer(normalise_text(p.utterance.text), normalise_text(prod)),
            "engine_wer": jiwer.wer(normalise_text(p.utterance.text), normalise_text(eng)),
            "product_tail": repeated_tail(prod, p.utterance.text),
            "engine_tail": repeated_tail(eng, p.utterance.text),
        })
    sub = {}
    if subset and not outcome.leg.sip:
        pick = [i for i, p in enumerate(outcome.placed) if p.utterance.name in subset]
        sub = {"subset_product_wer": float(jiwer.wer([refs[i] for i in pick],
                                                     [normalise_text(product[i]) for i in pick])),
               "subset_engine_wer": float(jiwer.wer([refs[i] for i in pick],
                                                    [normalise_text(alone[i]) for i in pick])),
               "subset_size": len(pick)}
    return {
        **sub,
        "leg": outcome.leg.name, "utterances": len(refs), "words": sum(len(r.split()) for r in refs),
        "shift_ms": shift,
        "product_wer": float(jiwer.wer(refs, [normalise_text(t) for t in product])),
        "engine_wer": float(jiwer.wer(refs, [normalise_text(t) for t in alone])),
        "no_turn": sum(d["turns"] == 0 for d in detail),
        "lost": sum(d["rows"] == 0 for d in detail),
        "product_tails": sum(d["product_tail"] is not None for d in detail),
        "engine_tails": sum(d["engine_tail"] is not None for d in detail),
        "split": sum(d["turns"] >= 2 for d in detail),
        "late_start": sum(d["onset_ms"] is not None and d["onset_ms"] > PREROLL_MS for d in detail),
        "onset_p50": float(np.median([d["onset_ms"] for d in detail if d["onset_ms"] is not None] or [0])),
        "strays": [r.text for r in strays if r.kind == "turn"],
        "detail": detail, "info": outcome.info,
    }


# ------------------------------------------------------------------------------------------ in process


def _user_rows(store: Any, session_id: str) -> list[Row]:
    return [Row(t.seq, t.text, t.start_ms, t.end_ms, getattr(t, "kind", "turn"))
            for t in store.list_turns(session_id) if t.role == "user"]


async def _backlog_at_most(session: Any, chunks: int) -> None:
    """Until the session's input queue holds at most `chunks` (polled: the session has no event for it)."""
    while True:
        if session._input.qsize() <= chunks:
            return
        await asyncio.sleep(0.002)


async def _feed_fast(session: Any, track: np.ndarray, rate: int, ahead: int = 4) -> None:
    """Push 20 ms frames as fast as the session's input loop takes them (at most `ahead` queued)."""
    n = rate // 50
    for i in range(0, len(track) - n + 1, n):
        session.push_audio(track[i : i + n])
        session.pull_frame()
        await _backlog_at_most(session, ahead)


async def run_web(leg: Leg, utterances: Sequence[realspeech.Utterance], engines: Any, workdir: Path,
                  pace: str, vad_threshold: float | None) -> Outcome:
    from speechpipe.pipeline.agent import CallbackAgent
    from speechpipe.pipeline.config import PipeConfig
    from speechpipe.pipeline.realtime import RealtimeLine
    from speechpipe.pipeline.session import PipelineSession, SessionInfo
    from speechpipe.settings import Settings
    from speechpipe.storage import Store
    from speechpipe.storage.async_store import AsyncStore

    settings = Settings.from_env({}, data_dir=workdir / leg.name)
    store = Store.from_settings(settings, upgrade=True)
    astore = AsyncStore(store)
    try:
        cfg = _pipe_config("bench-accuracy", vad_threshold)
        pipe = store.create_pipe(cfg)
        config = PipeConfig(**cfg)
        session = PipelineSession(SessionInfo(pipe.id, config.agent_id, "web"), config, engines,
                                  input_rate=leg.rate, output_rate=16000, store=astore,
                                  recordings_dir=settings.recordings_dir)
        track, placed = build_track(utterances, leg.rate, leg.snr_db)
        t0 = time.monotonic()
        await session.start()
        await session.attach_agent(CallbackAgent(lambda text: None))
        if pace == "realtime":
            await RealtimeLine(session).play(track)
        else:
            await _feed_fast(session, track, leg.rate)
        await _backlog_at_most(session, 0)
        await asyncio.sleep(0.2)  # the last queued frame is taken; let its processing finish
        await session.end("bench_over")
        wall = time.monotonic() - t0
        sid = str(session.session_id)
        rec, rate = read_wav(store.get_recording(sid).path)
        assert rate == 16000, rate
        return Outcome(leg, placed, track, _user_rows(store, sid), rec,
                       {"wall_s": wall, "audio_s": len(track) / leg.rate})
    finally:
        astore.close()
        store.close()


def _pipe_config(agent_id: str, vad_threshold: float | None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"agent_id": agent_id, **extra}
    if vad_threshold is not None:  # on every leg: 8 kHz legs start at vad.narrowband_threshold
        cfg["vad"] = {"threshold": vad_threshold, "narrowband_threshold": vad_threshold}
    return cfg


# ------------------------------------------------------------------------------------------ SIP


class SilentProbe(AgentLink):
    """The workers' agent here: logs every message as a JSON line in $PROBE_LOG, never says a word."""

    def __init__(self, session_id: str, log_path: str) -> None:
        from tests.fixtures_sip import ProbeAgent

        self._probe = ProbeAgent("silent", session_id, log_path)
        self._closed = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if self._closed.is_set():
            raise AgentGone("closed")
        self._probe._log(message)

    async def recv(self) -> dict[str, Any]:
        await self._closed.wait()
        raise AgentGone("closed")

    async def close(self, reason: str) -> None:
        self._closed.set()


async def silent_agent(session: Any) -> AgentLink | None:
    """SPEECHPIPE_SIP_AGENT_FACTORY=bench.accuracy:silent_agent (loaded by the media workers)."""
    return SilentProbe(str(session.session_id), os.environ["PROBE_LOG"])


async def run_sip(legs: Sequence[Leg], utterances: Sequence[realspeech.Utterance], workdir: Path,
                  vad_threshold: float | None) -> list[Outcome]:
    """One media worker; one baresip call per leg, one after the other (two at once on a 2-core machine
    garble the audio baresip sends: its spinning null player starves its own sender); each call plays its
    leg's track."""
    from tests.fixtures_sip import NetNS, baresip_call, make_lab, netns_available, read_jsonl, wait_for

    why = netns_available()
    if why:
        raise SystemExit(f"the SIP legs need a private network namespace: {why}")
    tmp = workdir / "sip"
    tmp.mkdir(parents=True)
    ns = NetNS()
    store, sup, _ = make_lab(tmp, ns, 5080, max_calls=2,
                             extra_env={"SPEECHPIPE_SIP_AGENT_FACTORY": SILENT_FACTORY})
    store.create_pipe(_pipe_config("bench-silent", vad_threshold, sip_extension=SIP_EXTENSION))
    probe = tmp / "probe.jsonl"

    def session_of(user: str) -> str | None:
        found = [m for m in read_jsonl(probe) if m["type"] == "call.started" and m.get("caller") == user]
        return found[-1]["session_id"] if found else None

    out = []
    try:
        await sup.start(wait_ready_s=180)
        if not sup.health()["ok"]:
            raise SystemExit(f"the media worker did not come up: {sup.health()}")
        for k, leg in enumerate(legs):
            await wait_for(lambda: sup.health()["calls"] == 0, 30, "the worker to be idle")
            track, placed = build_track(utterances, leg.rate, leg.snr_db, lead_s=SIP_LEAD_S)
            wav = tmp / f"{leg.name}.wav"
            seconds = len(track) / leg.rate + SIP_TAIL_S
            # The WAV outlasts the call: baresip hangs up (BYE) after `seconds`, mid-silence.
            write_wav(wav, np.concatenate([track, np.zeros(30 * leg.rate, np.int16)]), leg.rate)
            user = f"30{k}"
            t0 = time.monotonic()
            uri = f"sip:{SIP_EXTENSION}@127.0.0.1:5080"
            call = baresip_call(ns, tmp / f"baresip-{leg.name}", uri, wav, codecs=leg.codec or "",
                                seconds=math.ceil(seconds), user=user, display=leg.name)
            sid = await wait_for(lambda u=user: session_of(u), 40, f"the call from {user}", call.log_tail)
            await wait_for(lambda c=call: c.proc.poll() is not None, seconds + 60, f"baresip ({leg.name})",
                           call.log_tail)
            await wait_for(lambda s=sid: store.get_session(s).ended_at is not None, 60,
                           f"session {sid} to end")
            record = store.get_session(sid)
            meta = (record.metadata or {}).get("sip", {})
            media = (record.metrics or {}).get("media", {})
            rec, rate = read_wav(store.get_recording(sid).path)
            assert rate == 16000, rate
            out.append(Outcome(leg, placed, track, _user_rows(store, sid), rec, {
                "codec": meta.get("codec"), "rate": meta.get("rate"), "wall_s": time.monotonic() - t0,
                "audio_s": len(track) / leg.rate,
                "late_in": media.get("late_in"), "frames_in": media.get("frames_in")}))
        return out
    finally:
        await sup.stop()
        ns.close()
        store.close()


# ------------------------------------------------------------------------------------------ VAD


def _frames(x: np.ndarray, n: int) -> np.ndarray:
    return x[: len(x) // n * n].reshape(-1, n)


def _decide(vad: Any, audio: np.ndarray) -> np.ndarray:
    vad.reset()
    return np.array([vad.is_speech(f) for f in _frames(audio, vad.frame_samples)], dtype=bool)


def _longest(x: np.ndarray) -> int:
    best = cur = 0
    for v in x:
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best


def vad_table(utterances: Sequence[realspeech.Utterance]) -> list[dict[str, Any]]:
    """Per-frame VAD accuracy on the narrowband prompts (see the module docstring)."""
    from bench.vad_accuracy import build_cases, phone_leg, stream_resample
    from speechpipe.pipeline.vad import SileroVAD
    from tests import sounds

    lead = 25  # frames of silence (0.5 s) either side of each prompt
    prompts: list[dict[str, Any]] = []
    noise8: list[np.ndarray] = []
    for i, u in enumerate(utterances):
        wb, tel = realspeech.wideband(u), realspeech.telephone(u)
        n = min(len(wb) // 320, len(tel) // 160)
        truth = sounds.active_mask(wb[: n * 320], 16000, range_db=30)[::320][:n]
        pad8, pad16 = np.zeros(lead * 160, np.int16), np.zeros(lead * 320, np.int16)
        t = np.r_[pad8, tel[: n * 160], pad8]
        noisy = realspeech.noisy(t, 8000, SNR_DB, seed=i)
        prompts.append({"truth": np.r_[np.zeros(lead, bool), truth, np.zeros(lead, bool)],
                        "8k": t, "8k noisy": noisy, "wide": np.r_[pad16, wb[: n * 320], pad16]})
        for snr in (SNR_DB, 0.0):  # the line noise alone, 10 dB and 0 dB below the prompt's speech
            mixed = noisy if snr == SNR_DB else realspeech.noisy(t, 8000, snr, seed=i)
            noise8.append((mixed.astype(np.int32) - t).clip(-32768, 32767).astype(np.int16))
    for case in build_cases():
        if not case.has_speech and case.rate == 16000:
            noise8.append(phone_leg(case.audio))
    noise = {"8k": [_frames(x, 160).ravel() for x in noise8]}
    noise["up"] = [stream_resample(x, 8000, 16000) for x in noise["8k"]]
    for p in prompts:
        p["up"] = stream_resample(p["8k"], 8000, 16000)
        p["up noisy"] = stream_resample(p["8k noisy"], 8000, 16000)

    def run(make: Any, variant: str) -> dict[str, Any]:
        c = dict.fromkeys(("hit", "cold", "voiced", "cold_voiced", "noisy", "gap_fp", "gaps", "missed",
                           "fp", "noise", "worst"), 0)
        for p in prompts:
            truth = p["truth"]
            got = _decide(make(), p[variant])[: len(truth)]
            m = truth[: len(got)]
            c["hit"] += int(got[m].sum())
            c["voiced"] += int(m.sum())
            c["missed"] += not got[m].any()
            if variant == "wide":
                continue
            # Cold: the prompt from the detector's first frame on, no silence before it.
            fs = 160 if variant == "8k" else 320
            cold = _decide(make(), p[variant][lead * fs :])
            cm = truth[lead : lead + len(cold)]
            c["cold"] += int(cold[: len(cm)][cm].sum())
            c["cold_voiced"] += int(cm.sum())
            got = _decide(make(), p[variant + " noisy"])[: len(truth)]
            c["noisy"] += int(got[m].sum())
            c["gap_fp"] += int(got[~m].sum())
            c["gaps"] += int((~m).sum())
        if variant != "wide":
            for x in noise[variant]:
                got = _decide(make(), x)
                c["fp"] += int(got.sum())
                c["noise"] += len(got)
                c["worst"] = max(c["worst"], _longest(got))
        narrow = variant != "wide"
        return {"recall": c["hit"] / max(c["voiced"], 1),
                "recall_cold": c["cold"] / max(c["cold_voiced"], 1) if narrow else None,
                "recall_noisy": c["noisy"] / max(c["voiced"], 1) if narrow else None,
                "gap_false": c["gap_fp"] / max(c["gaps"], 1) if narrow else None,
                "missed": c["missed"], "false": c["fp"] / c["noise"] if narrow else None,
                "max_false_ms": c["worst"] * 20 if narrow else None, "noise_s": c["noise"] * 0.02}

    rows = []
    for t in THRESHOLDS:
        rows.append({"vad": f"silero 8k native t={t}", **run(lambda t=t: SileroVAD(t, 8000), "8k")})
        rows.append({"vad": f"silero 16k upsampled t={t}", **run(lambda t=t: SileroVAD(t, 16000), "up")})
    rows.append({"vad": "silero 16k wideband t=0.5", **run(lambda: SileroVAD(0.5, 16000), "wide")})
    return rows


# ------------------------------------------------------------------------------------------ report


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'leg':12} {'prompts':>7} {'words':>5} {'product WER':>11} {'engine WER':>10} {'Δ':>7} "
          f"{'no turn':>7} {'lost':>4} {'tails P/E':>9} {'split':>5} {'strays':>6} {'late start':>10} "
          f"{'onset p50':>9}  notes")
    for r in results:
        notes = [f"shift {r['shift_ms']} ms"]
        info = r["info"]
        if "codec" in info:
            notes.append(f"{info['codec']}/{info['rate']}")
        if info.get("late_in") is not None:
            notes.append(f"late in {info['late_in']}/{info['frames_in']} frames")
        if "wall_s" in info:
            notes.append(f"{info['audio_s']:.0f} s audio in {info['wall_s']:.0f} s")
        if "subset_size" in r:
            notes.append(f"on the {r['subset_size']} SIP prompts {r['subset_product_wer']:.3f} vs "
                         f"{r['subset_engine_wer']:.3f}")
        print(f"{r['leg']:12} {r['utterances']:>7} {r['words']:>5} {r['product_wer']:>11.3f} "
              f"{r['engine_wer']:>10.3f} {r['product_wer'] - r['engine_wer']:>+7.3f} {r['no_turn']:>7} "
              f"{r['lost']:>4} {r['product_tails']:>4}/{r['engine_tails']:<4} {r['split']:>5} "
              f"{len(r['strays']):>6} {r['late_start']:>10} {r['onset_p50']:>6.0f} ms  {', '.join(notes)}")


def print_details(results: list[dict[str, Any]], limit: int) -> None:
    for r in results:
        bad = [d for d in r["detail"] if d["product_wer"] > d["engine_wer"] or d["turns"] != 1
               or d["product_tail"] or d["engine_tail"]]
        bad.sort(key=lambda d: (d["engine_wer"] - d["product_wer"], d["turns"] == 1))
        if not bad and not r["strays"]:
            continue
        print(f"\n{r['leg']}: {len(bad)} prompts where the product path did worse, split, lost or repeated"
              + (f"; stray turns {r['strays']}" if r["strays"] else ""))
        for d in bad[:limit]:
            extra = []
            if d["product_tail"]:
                extra.append(f"product tail: {d['product_tail']}")
            if d["engine_tail"]:
                extra.append(f"engine tail: {d['engine_tail']}")
            if d["kinds"]:
                extra.append(f"non-turn rows: {d['kinds']}")
            timing = ("" if d["onset_ms"] is None
                      else f", turn onset {d['onset_ms']:+d} end {d['end_ms']:+d} ms")
            print(f"  {d['name']} (turns {d['turns']}, WER {d['product_wer']:.2f} vs {d['engine_wer']:.2f}"
                  f"{timing})" + (f" [{'; '.join(extra)}]" if extra else ""))
            print(f"    ref:     {d['ref']}")
            print(f"    product: {d['product']}")
            print(f"    engine:  {d['engine']}")
        if len(bad) > limit:
            print(f"  … {len(bad) - limit} more (--details N)")


def print_vad(rows: list[dict[str, Any]], prompts: int) -> None:
    noise_s = next((r["noise_s"] for r in rows if r["noise_s"]), 0)
    print(f"\nVAD per 20 ms frame on the {prompts} narrowband prompts (truth: wideband frames within 30 dB "
          f"of the prompt's peak; 0.5 s of silence before each, fresh detector; cold: no silence before)")
    print(f"False speech: gaps = unvoiced frames of the 10 dB SNR prompts; noise = {noise_s:.0f} s of "
          "narrowband noise-only audio")
    print(f"{'detector':28} {'recall':>7} {'cold':>7} {'10 dB SNR':>9} {'missed':>6} {'false in gaps':>13} "
          f"{'false on noise':>14} {'longest':>8}")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    for r in rows:
        longest = "-" if r["max_false_ms"] is None else f"{r['max_false_ms']} ms"
        print(f"{r['vad']:28} {pct(r['recall']):>7} {pct(r['recall_cold']):>7} {pct(r['recall_noisy']):>9} "
              f"{r['missed']:>6} {pct(r['gap_false']):>13} {pct(r['false']):>14} {longest:>8}")


async def main_async(args: argparse.Namespace) -> None:
    from speechpipe.pipeline.config import PipeConfig
    from speechpipe.pipeline.models import get_stt_engine
    from speechpipe.pipeline.session import Engines

    why = realspeech.missing()
    if why:
        raise SystemExit(why)
    legs = [LEGS[name] for name in args.legs.split(",") if name]
    utterances = realspeech.devset()[: args.limit]
    engines = Engines()
    config = PipeConfig(agent_id="bench")
    engines.warm_up(config)
    engine = get_stt_engine(config.stt.engine, config.stt.model, config.stt.language)
    print(f"Speech Pipe accuracy on real speech · {len(utterances)} prompts · {os.cpu_count()} cores · "
          f"{config.stt.engine} {config.stt.model or 'default model'} · VAD {config.vad.engine} "
          f"t={args.vad_threshold or config.vad.threshold} (8 kHz legs "
          f"{args.vad_threshold or config.vad.narrowband_threshold}) · pace {args.pace}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    t0 = time.monotonic()
    try:
        outcomes = [await run_web(leg, utterances, engines, workdir, args.pace, args.vad_threshold)
                    for leg in legs if not leg.sip]
        sip = [leg for leg in legs if leg.sip]
        sip_utterances = utterances[:: args.sip_every]
        if sip:
            outcomes += await run_sip(sip, sip_utterances, workdir, args.vad_threshold)
        subset = {u.name for u in sip_utterances} if sip and args.sip_every > 1 else None
        results = [score(o, engine, config.stt.language, subset) for o in outcomes]
        print_table(results)
        print_details(results, args.details)
        if not args.no_vad:
            print_vad(vad_table(utterances), len(utterances))
        print(f"\n({time.monotonic() - t0:.0f} s)")
    finally:
        if args.keep:
            print(f"database, recordings and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--legs", default=",".join(LEGS), help=f"comma list of {', '.join(LEGS)}")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of the 40")
    p.add_argument("--pace", choices=("fast", "realtime"), default="fast",
                   help="how in-process sessions are fed (SIP legs are always real time)")
    p.add_argument("--sip-every", type=int, default=2,
                   help="SIP legs (real time) play every Nth of the prompts (1: all; ~4 min per leg for 40)")
    p.add_argument("--vad-threshold", type=float, default=None,
                   help="the pipes' vad.threshold and vad.narrowband_threshold (default: 0.5 and 0.3)")
    p.add_argument("--details", type=int, default=6, help="worst prompts listed per leg")
    p.add_argument("--no-vad", action="store_true", help="skip the VAD frame table")
    p.add_argument("--keep", action="store_true", help="keep the run's folder")
    args = p.parse_args()
    for name in args.legs.split(","):
        if name and name not in LEGS:
            p.error(f"unknown leg {name!r}; legs: {', '.join(LEGS)}")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
