"""One conversation: audio in, turns to the agent, agent speech out, everything recorded and stored.

Transports create a `PipelineSession`, push input audio with `push_audio()` (any chunk size, at the
session's input rate) and pull 20 ms output frames with `pull_frame()` at their own clock. Nothing here
knows SIP or HTTP: a transport names its `direction` and optional hooks (transfer, hang-up).

Per input frame (20 ms at 16 kHz, on the event loop): record → VAD → endpointing → STT feed. The session
owns the call's lifecycle and acts; its parts decide and keep books: `STTLane` runs every STT call in order
in the shared executor (Whisper decodes speculatively when a pause begins and the endpoint reuses that
result when no speech came in between; its partials are decoded beside the lane only while no final waits,
and shed otherwise), `BargeIn` decides when speech over the agent pauses, cuts or
resumes it, `Replies` holds one `ReplyHandle` per agent reply, and `Speaker` turns the agent's text into
the frames the transport pulls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speechpipe import logs
from speechpipe.protocol import Direction

from . import agent as msg
from . import events as ev
from .agent import AgentGone, AgentLink
from .audio import FrameChunker, Resampler
from .barge_in import Action, BargeIn, fillers_only
from .config import PipeConfig
from .decode_pool import DecodePool
from .recorder import StereoRecorder
from .reply import Replies, ReplyHandle, UserTurn
from .speaker import Reply, Speaker
from .stt.base import STTEngine, Transcript
from .stt_lane import STTLane
from .tts import EspeakTTS, TTSEngine
from .turns import (
    Endpointer,
    Signal,
    State,
    TurnCues,
    endpoint_for,
    looks_unfinished,
    make_turn_detector,
    prosody,
)
from .vad import make_vad, vad_rate

log = logging.getLogger(__name__)

PROCESS_RATE = 16000  # VAD, STT and the recording run at this rate
FRAME = PROCESS_RATE // 50
PREROLL_FRAMES = 15  # 300 ms of audio before the onset goes to the STT too
# A pause is decoded after this much VAD silence when the turn detector reads the words: with Silero's
# hang-over that is ~150 ms after the voice stopped, and a ~150 ms decode is in before min_silence_ms.
SPECULATE_MS = 40
# How long the frame loop waits for a pause's verdict before it goes on without one (a stuck decode).
VERDICT_WAIT_S = 10.0


class Engines:
    """Process-wide engines: models load once and every session shares them."""

    def __init__(self, stt_threads: int | None = None) -> None:
        self.tts: TTSEngine = EspeakTTS()
        # Bounded to the cores: more decodes at once only slice the same CPU thinner.
        self.executor = DecodePool(max_workers=stt_threads or os.cpu_count() or 2, thread_name_prefix="stt")

    def stt(self, config: PipeConfig) -> STTEngine:
        from .models import get_stt_engine

        return get_stt_engine(config.stt.engine, config.stt.model, config.stt.language)

    def warm_up(self, config: PipeConfig) -> None:
        """Load the pipe's STT model and run one decode on faint noise (blocking): a model's first
        inference allocates its buffers and costs several times a normal one, which the first caller
        must not pay."""
        stream = self.stt(config).new_stream(config.stt.language)
        noise = np.random.default_rng(0).normal(0, 300, PROCESS_RATE).astype(np.int16)  # ~-40 dBFS
        stream.accept(noise)
        stream.final()
        stream.close()


@dataclass
class SessionInfo:
    pipe_id: str
    agent_id: str
    direction: Direction
    caller: str | None = None
    caller_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None  # given by the store when the session starts


# A spoken turn that starts before the answer to an unfinished-looking turn is audible, or within this much
# of it, continues that turn: the agent hears both halves as one ("four five six" … "seven eight nine").
JOIN_WINDOW_MS = 2000


TransferHook = Callable[[str, str], Awaitable[str | None]]  # (target, mode) -> error code or None
EndHook = Callable[[str], Awaitable[None]]


class PipelineSession:
    def __init__(self, info: SessionInfo, config: PipeConfig, engines: Engines, *,
                 input_rate: int = 16000, output_rate: int = 16000, store: Any = None,
                 recordings_dir: Path | None = None, on_transfer: TransferHook | None = None,
                 on_end: EndHook | None = None,
                 on_open: Callable[[PipelineSession], None] | None = None) -> None:
        self.info = info
        self.config = config
        self.engines = engines
        self.input_rate = input_rate
        self.output_rate = output_rate
        self.store = store
        self.recordings_dir = recordings_dir
        self.on_transfer = on_transfer
        self.on_end = on_end
        self.on_open = on_open  # called once the session has its id (its row), before the engines load
        self._listeners: list[Callable[[ev.Event], None]] = []
        self.agent: AgentLink | None = None
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.metrics: dict[str, list[float]] = collections.defaultdict(list)
        self.counts: collections.Counter[str] = collections.Counter()  # turns, interruptions (stored at end)
        self._apologised: set[int] = set()  # user turns the agent_error_message was spoken for
        # What start() was doing (for CallStartFailed); "" once it has finished.
        self.start_stage = "not_started"
        # Recording paused by the agent (`recording.pause`): since when (session clock ms), None when not;
        # and the closed spans so far. User words said in a paused span reach only the agent: stored,
        # shown to the client and logged as ev.REDACTED. Also without a recording (it protects the text).
        self._paused_at: int | None = None
        self._paused_spans: list[tuple[int, int]] = []
        self._redacted_seqs: set[int] = set()  # user turns stored redacted

    # ---- wiring ------------------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[ev.Event], None]) -> None:
        """`listener` gets every event, synchronously on the loop: it must not block."""
        self._listeners.append(listener)

    def _emit(self, event: ev.Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event.type)

    @property
    def session_id(self) -> str | None:
        return self.info.session_id

    @property
    def recording_path(self) -> Path | None:
        """Where this session's WAV is (or will be) written; None when it does not record."""
        if not self.config.recording.enabled or self.recordings_dir is None or self.info.session_id is None:
            return None
        return Path(self.recordings_dir) / f"{self.info.session_id}.wav"

    @property
    def log_ids(self) -> dict[str, str | None]:
        """What `speechpipe.logs` stamps on every line this session logs."""
        return {"session_id": self.info.session_id, "pipe_id": self.info.pipe_id,
                "direction": self.info.direction, "agent_id": self.info.agent_id}

    async def start(self) -> None:
        """Open the session row and the recording, load the engines, start listening."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        cfg = self.config
        self.start_stage = "store"
        if self.store is not None:
            self.info.session_id = await self.store.create_session(
                pipe_id=self.info.pipe_id, agent_id=self.info.agent_id, direction=self.info.direction,
                caller=self.info.caller, caller_name=self.info.caller_name, metadata=self.info.metadata)
        elif self.info.session_id is None:
            self.info.session_id = f"local_{os.urandom(6).hex()}"
        if self.on_open is not None:
            self.on_open(self)
        # From here the caller's task (the transport's, one per session) and every task the session makes
        # log with its ids: tasks copy the context they are created in.
        logs.bind(**self.log_ids)
        self.start_stage = "stt"
        self.stt_engine = await loop.run_in_executor(self.engines.executor, contextvars.copy_context().run,
                                                     self.engines.stt, cfg)
        partial_interval = self._partial_interval()
        self._partials_on = cfg.stt.partials if self.stt_engine.streaming else partial_interval is not None
        self.stt = STTLane(self.engines.executor, self.stt_engine.new_stream(cfg.stt.language),
                           streaming=self.stt_engine.streaming, on_partial=self._on_partial,
                           partial_interval_s=partial_interval, on_shed=self._partial_shed,
                           on_queue_wait=self._stt_queue_wait)
        self.start_stage = "vad"
        self.vad = make_vad(cfg.vad, vad_rate(self.input_rate))
        # A narrowband leg's VAD judges the native frames. Their votes wait here for the 16 kHz frame that
        # covers the same 20 ms: the resampler's output lags its input, never leads it.
        self._vad_chunker = FrameChunker(self.vad.rate) if self.vad.rate == self.input_rate != PROCESS_RATE \
            else None
        self._vad_votes: collections.deque[bool] = collections.deque()
        self._votes_seen = self._votes_used = self._native_run = 0
        self._early_pause: int | None = None  # the vote that paused the agent ahead of the detector
        self.turn_detector = make_turn_detector(cfg.endpointing)
        # A detector that reads the words holds each pause open until the pause's decode is judged.
        reads_words = self.turn_detector.needs_text
        self.detector = Endpointer(cfg.endpointing, speculate_ms=SPECULATE_MS if reads_words else 200,
                                   undecided_ms=cfg.endpointing.silence_range_ms[2] if reads_words else None)
        self._pause_no = 0  # pauses and resumptions so far: a verdict for an earlier pause is stale
        self._verdict: tuple[float, int] | None = None  # (end probability, endpoint ms) of this pause
        self._pause_decode: asyncio.Future[Any] | None = None  # the decode this pause's verdict comes from
        self._voiced_tail: collections.deque[np.ndarray] = collections.deque(maxlen=25)  # last 0.5 s voiced
        self.start_stage = "tts"
        self.speaker = Speaker(self.engines.tts, cfg.tts, self.output_rate)
        self.speaker.on_metric = lambda values: self._emit(ev.Metric("tts", values))
        self.speaker.on_error = lambda detail: self._engine_failed(
            TTS_FAILED, "a sentence could not be spoken", detail)
        self.start_stage = "recording"
        self.recorder: StereoRecorder | None = None
        if self.recording_path is not None:
            self.recorder = StereoRecorder(self.recording_path, PROCESS_RATE)
        self._in_resampler = Resampler(self.input_rate, PROCESS_RATE)
        self._in_chunker = FrameChunker(PROCESS_RATE)
        # Lead the resampled input with its group delay in silence, so each 20 ms frame is whole as soon as
        # the input frame that ends it arrives: otherwise the resampler's ~4 ms lag holds every frame back
        # until the next input frame, 20 ms later (every endpoint on a phone leg came 20 ms late). The
        # session clock then runs ~4 ms behind the caller's audio, which is the filter's delay in any case.
        self._in_chunker.push(np.zeros(self._in_resampler.lag, np.int16))
        self._out_to_rec = Resampler(self.output_rate, PROCESS_RATE)
        self._clock = 0  # samples of input processed at PROCESS_RATE (the session clock)
        self._agent_cursor = 0  # where the next agent sample goes in the recording
        self._input: asyncio.Queue[tuple[np.ndarray, float] | None] = asyncio.Queue()
        self._preroll: collections.deque[np.ndarray] = collections.deque(maxlen=PREROLL_FRAMES)
        self._onset_wall = 0.0
        self._last_voiced_wall = 0.0
        self._seq = 0  # turns rows, in the order turns end
        self._turn_ids = 0
        self._say_ids = 0
        self._pending_user: list[UserTurn] = []  # waiting for an agent to attach
        self._last_user: UserTurn | None = None
        self._replies = Replies()  # answers owed or playing, and `say`s
        self.barge = BargeIn(cfg.barge_in, streaming=self.stt_engine.streaming)
        self._writes: set[asyncio.Task[Any]] = set()
        self._end_after_speech: str | None = None
        self._last_pull_wall = 0.0
        self._quiet_since = time.monotonic()  # neither side has spoken since (for the `silence` event)
        self._client_reports = False  # the transport's client reports its own playback (web)
        self._tasks = [loop.create_task(self._input_loop(), name=f"input:{self.session_id}")]
        self._emit(ev.SessionStarted(self.info.session_id, self.input_rate, self.output_rate,
                                     self.info.direction))
        self.start_stage = ""
        log.info("session %s started: pipe=%s direction=%s stt=%s vad=%s", self.session_id,
                 self.info.pipe_id, self.info.direction, cfg.stt.engine, cfg.vad.engine)

    async def attach_agent(self, agent: AgentLink) -> None:
        """Connect the agent and tell it the call started; user turns so far are delivered now."""
        self.agent = agent
        await self._to_agent({
            "type": msg.CALL_STARTED, "session_id": self.session_id, "direction": self.info.direction,
            "pipe_id": self.info.pipe_id, "agent_id": self.info.agent_id, "caller": self.info.caller,
            "caller_name": self.info.caller_name, "metadata": self.info.metadata,
        })
        self._tasks.append(self._loop.create_task(self._agent_loop(), name=f"agent:{self.session_id}"))
        for turn in self._pending_user:
            await self._to_agent({"type": msg.USER_TEXT, "turn_id": turn.seq, "text": turn.text})
        self._pending_user.clear()

    async def no_agent(self, reason: str = "no_agent") -> None:
        """No agent can take this session: apologise, then end it."""
        log.warning("session %s: %s; speaking the apology and ending", self.session_id, reason)
        self._say(self.config.no_agent_message, interruptible=False)
        self._end_after_speech = reason

    # ---- transport side ----------------------------------------------------------------------------
    def push_audio(self, pcm: bytes | np.ndarray) -> None:
        """Input audio (PCM16 mono at input_rate). Call on the session's loop."""
        if self.ended.is_set():
            return
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            pcm = np.frombuffer(pcm, np.int16)
        self._input.put_nowait((pcm, time.monotonic()))

    def pull_frame(self) -> bytes | None:
        """The next 20 ms of agent audio at output_rate, or None for silence. Safe from any thread."""
        return self.speaker.pull() if not self.ended.is_set() else None

    def push_text(self, text: str) -> None:
        """Typed user input: a whole user turn, no audio."""
        text = text.strip()
        if text and not self.ended.is_set():
            self._loop.create_task(self._user_turn(text, self._clock_ms(), self._clock_ms(), typed=True))

    def dtmf(self, digit: str) -> None:
        self._spawn(self._to_agent({"type": msg.DTMF, "digit": digit}))

    # ---- the frame loop ----------------------------------------------------------------------------
    def _clock_ms(self) -> int:
        return self._clock * 1000 // PROCESS_RATE

    async def _input_loop(self) -> None:
        try:
            # Checks `ended` too: 3.11's wait_for can swallow a cancel that races its timeout.
            while not self.ended.is_set():
                try:
                    item = await asyncio.wait_for(self._input.get(), 0.05)
                except TimeoutError:
                    self._book_playback()  # no input for a while: keep the agent-side books anyway
                    await self._maybe_end_after_speech()
                    self._check_silence()
                    continue
                if item is None:
                    return
                pcm, wall = item
                if self._vad_chunker is not None:
                    for f in self._vad_chunker.push(pcm):
                        self._native_vote(self.vad.is_speech(f))
                for frame in self._in_chunker.push(self._in_resampler.process(pcm)):
                    if self._vad_chunker is None:
                        voiced = self.vad.is_speech(frame)
                    else:
                        voiced = self._vad_votes.popleft() if self._vad_votes else False
                        self._votes_used += 1
                    await self._on_frame(frame, voiced, wall)
                if self._early_pause is not None and self._votes_used > self._early_pause:
                    self._early_pause = None  # the votes reached the detector: it has decided
                    if not self.barge.active:
                        self.speaker.paused = False
                await self._maybe_end_after_speech()
                self._check_silence()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("session %s: input processing failed", self.session_id)
            self._engine_failed(PIPELINE_FAILED, "the session's audio processing failed; it ends",
                                f"{type(exc).__name__}: {exc}")
            self._spawn(self.end("error"))

    def _native_vote(self, voiced: bool) -> None:
        """A narrowband leg's VAD vote, cast on the caller's own 8 kHz frame. The detector declares speech
        only after `onset_frames` votes, so the first voiced vote over the agent pauses the agent's audio
        here, at once (barge-in reaction); once the detector has seen the votes its onset needs, it
        confirms the barge-in or the audio resumes. Silero scores 32 ms windows, so waiting for a second
        voiced 20 ms frame here would often mean waiting for a second window."""
        self._vad_votes.append(voiced)
        self._votes_seen += 1
        self._native_run = self._native_run + 1 if voiced else 0
        active = self.speaker.active
        if (self._native_run == 1 and not self.barge.active and active is not None
                and active.interruptible and active.started_at is not None and self.config.barge_in.enabled
                and self.detector.state is not State.SPEAKING):
            self.speaker.paused = True
            # The index of the last vote the detector needs before it can decide.
            self._early_pause = self._votes_seen - 1 + self.detector.onset_frames - 1

    async def _on_frame(self, frame: np.ndarray, voiced: bool, wall: float) -> None:
        if self._verdict_owed():
            await self._await_verdict()
        self._book_playback()
        if self.recorder:
            self.recorder.add_user(frame)
        self._clock += len(frame)
        signals = self.detector.process(voiced)
        if voiced and self.detector.in_utterance:
            self._last_voiced_wall = wall
            self._voiced_tail.append(frame)

        if not self.detector.in_utterance and not signals:
            self._preroll.append(frame)
            return
        for signal in signals:
            if signal is Signal.SPEECH_START:
                self._new_pause_state()
                self._voiced_tail.clear()
                self._voiced_tail.append(frame)
                self.stt.new_utterance()
                self._onset_wall = wall - (self.detector.onset_frames - 1) * 0.02
                self._last_voiced_wall = wall
                for f in self._preroll:
                    self.stt.feed(f)
                self._preroll.clear()
                self.stt.feed(frame)
                self._emit(ev.UserSpeechStarted(self.detector.start_ms()))
                self._barge_onset()
            elif signal is Signal.RESUME:
                self._new_pause_state()
                self.stt.release_held()
                if not self.barge.active:
                    self._onset_wall = wall
                    self._barge_onset()
            elif signal is Signal.PAUSE:
                # Decode now, speculatively: if no speech comes before the endpoint, the stream's cached
                # result is the turn's text and the endpoint costs no decode at all. A barge-in candidate
                # stays paused through the pause: "Stop, I want..." must not make the agent stutter.
                self.stt.release_held()
                speculation = self.stt.speculate()
                if self.turn_detector.needs_text:
                    pause = self._pause_no
                    speculation.add_done_callback(lambda f, pause=pause: self._judge_pause(f, pause))
                    self._pause_decode = speculation
            elif signal in (Signal.END, Signal.MAX_LENGTH):
                await self._end_of_utterance(forced=signal is Signal.MAX_LENGTH)
            elif signal is Signal.DISCARD:
                # Too short to be a turn by the VAD's count, but a short "No." is still words: decode it
                # (off the frame loop; the lane keeps the order) and let the words decide.
                fut = self.stt.final()
                self.stt.reset()
                self._spawn(self._short_utterance(fut, self.detector.start_ms(), self.detector.end_ms()))
        if self.detector.in_utterance and Signal.SPEECH_START not in signals:
            if self.detector.state.value == "speaking" and Signal.RESUME not in signals:
                self.stt.feed(frame)
            elif self.detector.state.value == "paused":
                self.stt.hold(frame)
            self._barge_check()

    # ---- turn detection --------------------------------------------------------------------------------
    def _new_pause_state(self) -> None:
        self._pause_no += 1
        self._verdict = None
        self._pause_decode = None

    def _verdict_owed(self) -> bool:
        """The next frame could reach the shortest endpoint, and this pause's decode is still running. On
        an idle machine the verdict is in by then (the decode starts at SPECULATE_MS); judging the frame
        without it would let a late decode change where the turn ends (speech resuming first makes the
        verdict stale), so the frame waits for it."""
        fut = self._pause_decode
        return (fut is not None and not fut.done() and self._verdict is None
                and self.detector.state is State.PAUSED
                and self.detector.silence_ms + self.detector.frame_ms
                >= self.config.endpointing.silence_range_ms[0])

    async def _await_verdict(self) -> None:
        fut = self._pause_decode
        assert fut is not None
        self.stt.promote_speculation()  # the turn waits for its text: ahead of other speculations
        t0 = time.monotonic()
        done, _ = await asyncio.wait([fut], timeout=VERDICT_WAIT_S)
        await asyncio.sleep(0)  # the verdict's own done-callback runs first
        if not done:
            log.warning("session %s: the pause's decode took over %.0f s; the turn goes on without its "
                        "verdict (it ends at the longest silence)", self.session_id, VERDICT_WAIT_S)
            self._pause_decode = None
        elif (waited := time.monotonic() - t0) > 0.05:
            log.debug("session %s: input waited %.0f ms for the pause's verdict", self.session_id,
                      waited * 1000)

    def _judge_pause(self, fut: asyncio.Future[Any], pause: int) -> None:
        """The pause's speculative text is in: the turn detector says how long this silence must last.
        The endpointer applies it on the next frame, so the verdict is the same on a slow machine; only
        when it comes changes."""
        if pause != self._pause_no or self.detector.state is not State.PAUSED or self.ended.is_set():
            return
        if fut.cancelled() or fut.exception() is not None or fut.result() is None:
            return  # stale or failed: the pause runs to the longest silence (and the endpoint decodes)
        heard = fut.result()
        text = heard.text.strip()
        slope, decay = prosody(np.concatenate(self._voiced_tail)) if self._voiced_tail else (None, None)
        cues = TurnCues(text, self.detector.speech_ms / 1000, slope, decay, heard.last_word_prob,
                        heard.end_mark_prob)
        p = self.turn_detector.end_probability(cues)
        endpoint_ms = endpoint_for(p, self.config.endpointing)
        self._verdict = (p, endpoint_ms)
        self.detector.endpoint_ms = endpoint_ms
        log.debug("session %s: pause at %d ms judged %.2f finished (%r, last word p %s, mark p %s, pitch %s "
                  "st/s, decay %s dB): the turn ends after %d ms of silence", self.session_id,
                  self.detector.end_ms(), p, ev.REDACTED if self._utterance_redacted() else text,
                  _round(heard.last_word_prob, 2), _round(heard.end_mark_prob, 2), _round(slope, 1),
                  _round(decay, 1), endpoint_ms)

    def _stt_queue_wait(self, kind: str, wait_s: float) -> None:
        """A decode waited `wait_s` in the process's decode pool before it ran."""
        self.metrics[f"stt_{kind}_wait_ms"].append(wait_s * 1000)
        self._emit(ev.Metric("stt_queue", {f"{kind}_wait_ms": wait_s * 1000}))

    def _check_silence(self) -> None:
        """Tell the agent when nobody has spoken for `silence_timeout_s` (then start counting again)."""
        timeout = self.config.silence_timeout_s
        if timeout is None or self.agent is None:
            return
        now = time.monotonic()
        if self.detector.in_utterance or self.speaker.active is not None or self._replies.answering():
            self._quiet_since = now
        elif now - self._quiet_since >= timeout:
            self._spawn(self._to_agent({"type": msg.SILENCE, "seconds": round(now - self._quiet_since, 2)}))
            self._quiet_since = now

    def _partial_interval(self) -> float | None:
        """Seconds of new speech between partial decodes of an engine that does not stream (Whisper); None:
        no partials. The engine's server-wide override (SPEECHPIPE_WHISPER_PARTIAL_S, 0 = off) wins over
        the pipe's stt.partials / stt.partial_interval_s."""
        override = getattr(self.stt_engine, "partial_interval_s", None)
        if override is not None:
            return float(override) or None
        stt = self.config.stt
        return stt.partial_interval_s if stt.partials else None

    def _partial_shed(self) -> None:
        """A partial decode skipped because the STT had better things to do (a final, another partial)."""
        self.counts["partials_shed"] += 1
        self._emit(ev.Metric("stt_partial_shed", {"count": 1.0}))

    def _on_partial(self, text: str) -> None:
        if not self._partials_on or self.ended.is_set():
            return
        self.counts["partials"] += 1
        redacted = self._utterance_redacted()
        self._emit(ev.UserPartial(ev.REDACTED if redacted else text, redacted))
        self._spawn(self._to_agent({"type": msg.USER_PARTIAL, "text": text}))

    # ---- recording pause: redaction --------------------------------------------------------------------
    @property
    def recording_paused(self) -> bool:
        return self._paused_at is not None

    def _pause_recording(self) -> None:
        """`recording.pause` from the agent: the recording keeps time but writes silence, and user words
        from now until the resume reach only the agent. Without a recording it still protects the text."""
        if self._paused_at is not None:
            return
        at_ms = self._clock_ms()
        self._paused_at = at_ms
        if self.recorder:
            self.recorder.pause()
        self._emit(ev.RecordingPaused(at_ms))
        self._store("add_session_event", self.session_id, "recording_paused", at_ms)
        log.info("session %s: recording paused at %d ms; user speech is redacted until it resumes",
                 self.session_id, at_ms)

    def _resume_recording(self) -> None:
        if self._paused_at is None:
            return
        at_ms = self._clock_ms()
        self._paused_spans.append((self._paused_at, at_ms))
        self._paused_at = None
        if self.recorder:
            self.recorder.resume()
        self._emit(ev.RecordingResumed(at_ms))
        self._store("add_session_event", self.session_id, "recording_resumed", at_ms)
        log.info("session %s: recording resumed at %d ms", self.session_id, at_ms)

    def _redact(self, start_ms: int, end_ms: int) -> bool:
        """Whether user words at start_ms..end_ms (session clock) are to be redacted: the recording is
        paused now (also when the words were decoded before the pause came), or they overlap a paused span
        (begun before the pause, or running past the resume)."""
        if self._paused_at is not None:
            return True
        return any(a < end_ms and start_ms < b for a, b in self._paused_spans)

    def _utterance_redacted(self) -> bool:
        """`_redact` for the utterance in progress (partials, barge-in checks), or for now."""
        if self.detector.in_utterance:
            return self._redact(self.detector.start_ms(), self._clock_ms())
        return self._paused_at is not None

    # ---- user turns ------------------------------------------------------------------------------------
    async def _end_of_utterance(self, forced: bool) -> None:
        start_ms, end_ms = self.detector.start_ms(), self.detector.end_ms()
        endpoint_ms = self.detector.endpoint_ms
        end_wall = self._last_voiced_wall
        if forced:
            self.stt.release_held()
        fut = self.stt.final()  # after a PAUSE with no new speech, the stream answers from its cache
        self.stt.reset()
        endpoint_wall = time.monotonic()
        try:
            transcript: Transcript = await fut
        except Exception as exc:
            log.exception("session %s: STT failed; the utterance is lost", self.session_id)
            self._engine_failed(STT_FAILED, "speech could not be transcribed", f"{type(exc).__name__}: {exc}")
            self._barge_resume("stt failed")
            return
        text = transcript.text.strip()
        final_ms = (time.monotonic() - endpoint_wall) * 1000  # endpoint decision → final text
        self.metrics["stt_ms"].append(transcript.compute_s * 1000)
        self.metrics["final_ms"].append(final_ms)
        self._emit(ev.Metric("stt", {"final_ms": final_ms, "compute_ms": transcript.compute_s * 1000,
                                     "audio_s": transcript.audio_s}))
        await self._judge_utterance(text, start_ms, end_ms, end_wall, endpoint_ms=endpoint_ms)

    async def _short_utterance(self, fut: asyncio.Future[Transcript], start_ms: int, end_ms: int) -> None:
        try:
            text = (await fut).text.strip()
        except Exception as exc:
            log.exception("session %s: STT failed on a short utterance %d-%d ms", self.session_id,
                          start_ms, end_ms)
            self._engine_failed(STT_FAILED, "speech could not be transcribed", f"{type(exc).__name__}: {exc}")
            self._barge_resume("stt failed")
            return
        await self._judge_utterance(text, start_ms, end_ms, self._last_voiced_wall, short=True)

    async def _judge_utterance(self, text: str, start_ms: int, end_ms: int, end_wall: float, *,
                               short: bool = False, endpoint_ms: int | None = None) -> None:
        """Every finished utterance ends here, and none vanishes: it becomes a user turn, or a stored,
        marked non-turn (a backchannel over the agent; noise), with an event, a metric and a log line."""
        verdict = self.barge.utterance_end(text)  # NONE: the agent was not talking (or not interruptible)
        redacted = self._redact(start_ms, end_ms)
        shown = ev.REDACTED if redacted and text else text
        if verdict is not Action.NONE:
            if verdict is Action.CUT:
                self._barge_in(text, redacted=redacted)
            else:
                self._barge_resume(f"not an interruption: {shown!r}")
                if not self.barge.meaningful(text):
                    self._non_turn("backchannel" if text else "noise", text, start_ms, end_ms)
                    return
                # Real words that did not earn a cut: the agent finishes its sentence, then hears them.
                log.info("session %s: %r said over the agent becomes a turn after the reply",
                         self.session_id, shown)
        elif not text or (short and fillers_only(text)):
            # A blip shorter than min_speech_ms that says only "hm" is not a turn; a short "No." is.
            self._non_turn("noise", text, start_ms, end_ms)
            return
        await self._user_turn(text, start_ms, end_ms, end_wall=end_wall, endpoint_ms=endpoint_ms)

    def _non_turn(self, kind: str, text: str, start_ms: int, end_ms: int) -> None:
        self.counts["non_turns"] += 1
        redacted = bool(text) and self._redact(start_ms, end_ms)
        shown = ev.REDACTED if redacted else text
        self._emit(ev.UserNonTurn(kind, shown, start_ms, end_ms, redacted))
        if text:
            self._store("add_turn", self.session_id, self._next_seq(), "user", shown, start_ms, end_ms,
                        False, None, kind, redacted)
        log.info("session %s: user speech %d-%d ms kept as %s, not a turn: %r", self.session_id, start_ms,
                 end_ms, kind, shown)

    async def _user_turn(self, text: str, start_ms: int, end_ms: int, *, typed: bool = False,
                         end_wall: float | None = None, endpoint_ms: int | None = None) -> None:
        if self.ended.is_set():
            return
        # Said (or typed) while the recording was paused: the agent gets the words; the row, the client's
        # event and the log get ev.REDACTED.
        redacted = self._redact(start_ms, end_ms)
        shown = ev.REDACTED if redacted else text
        if typed and self.speaker.active is not None:
            self._barge_in(text, redacted=redacted)
        fragment = None if typed else self._fragment_continued(text, start_ms, redacted)
        self._supersede_unspoken()
        seq = self._next_seq()
        self.counts["user_turns"] += 1
        if redacted:
            self._redacted_seqs.add(seq)
        turn = UserTurn(seq, text, end_wall if end_wall is not None else time.monotonic(), typed,
                        endpoint_ms=endpoint_ms)
        self._replies.answer(turn)
        self._last_user = turn
        self._emit(ev.UserTurn(seq, shown, start_ms, end_ms, typed, redacted))
        self._store("add_turn", self.session_id, seq, "user", shown, start_ms, end_ms, False, None, "turn",
                    redacted)
        log.info("session %s: user turn %d: %r", self.session_id, seq, shown)
        message: dict[str, Any] = {"type": msg.USER_TEXT, "turn_id": seq, "text": text}
        if fragment is not None:
            # The rows keep what was said in each half; the agent hears the whole thought once.
            message.update(text=f"{fragment.text} {text}", continues=fragment.seq)
            joined = ev.REDACTED if redacted or fragment.seq in self._redacted_seqs else message["text"]
            log.info("session %s: user turn %d continues turn %d: %r", self.session_id, seq, fragment.seq,
                     joined)
        if self.agent is None:
            self._pending_user.append(turn)
        else:
            await self._to_agent(message)

    def _fragment_continued(self, text: str, start_ms: int, redacted: bool = False) -> UserTurn | None:
        """The previous spoken turn, when the one that started at `start_ms` continues it: it read as
        unfinished, and the user went on before its answer was audible or within its first JOIN_WINDOW_MS
        (session clock, so a slow machine does not change the verdict). An answer still playing to half a
        thought is cut: the user talked over it with the rest."""
        prev = self._last_user
        if prev is None or prev.typed or not looks_unfinished(prev.text):
            return None
        reply = self._replies.audio(prev.seq)
        if prev.answer is not None and prev.answer.cut:
            answer_pos = prev.answer.cut_at
        elif prev.seq in self._replies:
            answer_pos = reply.first_frame_pos if reply is not None and reply.started_at is not None else None
        else:
            return None  # answered in full: the new turn stands on its own
        if answer_pos is not None and start_ms - answer_pos * 1000 // PROCESS_RATE > JOIN_WINDOW_MS:
            return None
        if reply is not None and reply.started_at is not None and not reply.finished and not reply.cancelled:
            self._barge_in(text, redacted=redacted)
        return prev

    def _supersede_unspoken(self) -> None:
        """A new user turn replaces answers the user has not started hearing yet."""
        for answer in self._replies.answering():
            if answer.started:
                continue
            if answer.audio is not None:
                self.speaker.cancel(answer.audio)
                self._finish_reply(answer.audio, interrupted=True)
            self._replies.close(answer.turn_id)
            self._spawn(self._to_agent({"type": msg.USER_INTERRUPTED, "turn_id": answer.turn_id,
                                        "heard_text": "", "user_text": ""}))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ---- barge-in: `BargeIn` decides, the session acts ---------------------------------------------
    def _barge_onset(self) -> None:
        active = self.speaker.active
        action = self.barge.onset(self._onset_wall, interruptible=active is not None and active.interruptible,
                                  playing=active is not None and active.started_at is not None)
        if action is Action.PAUSE:
            self.speaker.paused = True  # stop sending now; words decide later whether this is a cut

    def _barge_check(self) -> None:
        action = self.barge.due(self.detector.speech_ms)
        if action is Action.CUT:
            self._barge_in("")
        elif action is Action.CHECK:
            self.stt.latest().add_done_callback(self._barge_checked)

    def _barge_checked(self, fut: asyncio.Future[Any]) -> None:
        text = None  # the check failed: it decides nothing
        if not fut.cancelled() and fut.exception() is None:
            result = fut.result()
            text = result.text if isinstance(result, Transcript) else (result or "")
        if self.barge.checked(text) is Action.CUT:
            self._barge_in(text or "")

    def _barge_resume(self, why: str) -> None:
        if self.barge.take() is None:
            return
        log.info("session %s: no barge-in (%s); agent audio resumes", self.session_id, why)
        self.counts["false_barge_ins"] += 1
        self.speaker.paused = False

    def _barge_in(self, user_text: str, *, redacted: bool | None = None) -> None:
        """Cut every live reply: drop queued audio, tell the transport and the agent what was heard.
        `redacted` (default: the utterance in progress was said while paused): the client's `barge_in` and
        the log get ev.REDACTED for the user's words; the agent gets them."""
        if redacted is None:
            redacted = self._utterance_redacted()
        shown = ev.REDACTED if redacted and user_text else user_text
        candidate = self.barge.take()
        onset = candidate.onset_wall if candidate is not None else time.monotonic()
        cut = self.speaker.cancel_all()
        self.speaker.paused = False
        self._emit(ev.Clear())
        if cut:
            self.counts["interruptions"] += 1
        for reply in cut:
            handle = self._replies.get(reply.turn_id) or ReplyHandle(reply.turn_id, audio=reply)
            handle.mark_cut()
            if reply.started_at is not None:
                reaction = max(0.0, self._last_pull_wall - onset) * 1000
                self.metrics["barge_in_ms"].append(reaction)
                self._emit(ev.Metric("barge_in", {"reaction_ms": reaction}))
            self._spawn(self._interrupted(handle, user_text, shown))
        log.info("session %s: barge-in by %r cut %d replies", self.session_id, shown, len(cut))

    async def _interrupted(self, handle: ReplyHandle, user_text: str, shown: str) -> None:
        """Book a cut reply. A web client holds up to ~100 ms of audio the server already sent, so when it
        plays audio itself, wait briefly for its `playback: stopped` report and trust that over our count."""
        reply = handle.audio
        assert reply is not None
        if reply.started_at is not None and self._client_reports and not self.ended.is_set():
            if handle.client_stopped is None:
                handle.client_stopped = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handle.client_stopped.wait(), 0.3)
        heard = handle.heard_text(self.output_rate)
        handle.client_stopped = None
        self._emit(ev.BargeIn(reply.turn_id, heard, shown))
        self._finish_reply(reply, interrupted=True, heard=heard)
        await self._to_agent({"type": msg.USER_INTERRUPTED, "turn_id": reply.turn_id,
                              "heard_text": heard, "user_text": user_text})

    def client_playback(self, state: str, seconds: float, turn_id: int | None) -> None:
        """What the client reports it played of a reply (web): `stopped` after a clear, `ended` when done."""
        self._client_reports = True
        if turn_id is None or state not in ("stopped", "ended"):
            return
        handle = self._replies.get(turn_id)  # a report for a reply already booked is too late to matter
        if handle is not None:
            handle.client_report(seconds)

    # ---- agent side ------------------------------------------------------------------------------------
    async def _to_agent(self, message: dict[str, Any]) -> None:
        if self.agent is None or (self.ended.is_set() and message["type"] != msg.CALL_ENDED):
            return
        try:
            await self.agent.send(message)
        except AgentGone as exc:
            self._agent_gone(str(exc))

    def _engine_failed(self, code: str, message: str, detail: str) -> None:
        """An engine failed mid-session: the client gets an `error` event and the agent an `error` frame
        with the same stable code (`stt_failed`, `tts_failed`, `pipeline_failed`); the cause (`detail`,
        which may name server paths) goes to the log only. Counted in the session's metrics."""
        self.counts[code] += 1
        self._emit(ev.Error(code, message))
        if self.agent is not None and not self.ended.is_set():
            self._spawn(self._to_agent({"type": msg.ERROR, "code": code, "message": message}))
        log.warning("session %s: %s (%s)", self.session_id, code, detail[:300])

    def _agent_gone(self, why: str) -> None:
        if self._end_after_speech or self.ended.is_set():
            return
        log.warning("session %s: agent gone (%s)", self.session_id, why)
        self.agent = None
        for reply in self.speaker.cancel_all():
            self._finish_reply(reply, interrupted=True)
        self._say(self.config.no_agent_message, interruptible=False)
        self._end_after_speech = "agent_gone"

    async def _agent_loop(self) -> None:
        agent = self.agent
        assert agent is not None
        while not self.ended.is_set():
            try:
                message = await agent.recv()
            except AgentGone as exc:
                self._agent_gone(str(exc))
                return
            try:
                await self._on_agent_message(message)
            except Exception:
                log.exception("session %s: agent message %r failed", self.session_id, message.get("type"))
                await self._to_agent({"type": msg.ERROR, "code": "bad_message",
                                      "message": f"could not handle {message.get('type')!r}"})

    async def _on_agent_message(self, m: dict[str, Any]) -> None:
        match m.get("type"):
            case msg.TEXT_DELTA:
                self._on_text_delta(int(m["turn_id"]), str(m.get("text", "")))
            case msg.TEXT_END:
                self._on_text_end(int(m["turn_id"]))
            case msg.SAY:
                self._say(str(m["text"]), interruptible=bool(m.get("interruptible", True)))
            case msg.END_CALL:
                self._end_after_speech = str(m.get("reason") or "agent_ended")
            case msg.TRANSFER:
                await self._transfer(str(m.get("target", "")), str(m.get("mode", "blind")))
            case msg.INTERRUPT:
                self._on_interrupt()
            case msg.RECORDING_PAUSE:
                self._pause_recording()
            case msg.RECORDING_RESUME:
                self._resume_recording()
            case msg.AGENT_ERROR:
                self._on_agent_error(str(m.get("code") or "agent_error"), str(m.get("message") or ""),
                                     m.get("turn_id"))
            case kind:
                await self._to_agent({"type": msg.ERROR, "code": "unsupported",
                                      "message": f"message type {kind!r} is not supported here"})

    def _on_agent_error(self, code: str, message: str, turn_id: Any) -> None:
        """The agent failed on its side: log it, tell the client, and apologise once for the user turn it
        concerns (a failure not about one turn counts against the latest turn), unless the user has moved
        on to a later turn or the call is ending. The agent's message goes to the log only."""
        turn_id = turn_id if isinstance(turn_id, int) and not isinstance(turn_id, bool) else None
        latest = self._last_user.seq if self._last_user is not None else 0
        key = latest if turn_id is None else turn_id
        apology = self.config.agent_error_message.strip()
        speak = (bool(apology) and key not in self._apologised and key >= latest
                 and not self._end_after_speech and not self.ended.is_set())
        log.warning("session %s: agent error %s on turn %s: %s%s", self.session_id, code,
                    turn_id if turn_id is not None else "-", message[:300] or "(no message)",
                    "; apologising" if speak else "")
        self._emit(ev.AgentError("agent_error", f"the agent failed on its side ({code})", turn_id, code))
        if speak:
            self._apologised.add(key)
            self._say(apology)

    def _on_text_delta(self, turn_id: int, text: str) -> None:
        handle = self._reply_for(turn_id)
        if handle is not None and handle.audio is not None:
            handle.add_text(text)
            self.speaker.push_text(handle.audio, text)

    def _on_text_end(self, turn_id: int) -> None:
        handle = self._replies.get(turn_id)
        if handle is not None and handle.audio is not None and not handle.audio.cancelled:
            self.speaker.end_text(handle.audio)
            self._emit(ev.AgentReply(turn_id, handle.text))

    def _on_interrupt(self) -> None:
        """The agent cuts its own speech: no barge-in, nothing counted."""
        self.barge.take()
        cut = self.speaker.cancel_all()
        self.speaker.paused = False
        if cut:
            self._emit(ev.Clear())
        for reply in cut:
            self._finish_reply(reply, interrupted=True)

    def _reply_for(self, turn_id: int) -> ReplyHandle | None:
        handle = self._replies.get(turn_id)
        if handle is None:  # stale: already cut by barge-in, or never asked
            return None
        if handle.audio is None:
            handle.audio = self.speaker.begin(turn_id)
        return None if handle.audio.cancelled else handle

    def _say(self, text: str, interruptible: bool = True) -> None:
        self._say_ids -= 1
        self._replies.say(self._say_ids, self.speaker.say(text, self._say_ids, interruptible), text)
        self._emit(ev.AgentReply(self._say_ids, text))

    async def _transfer(self, target: str, mode: str) -> None:
        error = "transfer_unsupported"
        if self.on_transfer is not None:
            error = await self.on_transfer(target, mode)
        if error:
            await self._to_agent({"type": msg.ERROR, "code": error,
                                  "message": f"transfer to {target!r} refused"})
        else:
            self._end_after_speech = "transferred"

    async def _maybe_end_after_speech(self) -> None:
        if self._end_after_speech and self.speaker.active is None and not self.ended.is_set():
            await self.end(self._end_after_speech)

    # ---- playback books ------------------------------------------------------------------------------
    def _book_playback(self) -> None:
        for p in self.speaker.take_played():
            reply = p.reply
            self._last_pull_wall = p.wall
            pos = max(self._agent_cursor, self._clock)
            if reply.started_at is None:
                reply.started_at = p.wall
                reply.first_frame_pos = pos
                self._emit(ev.AgentSpeechStarted(reply.turn_id, pos * 1000 // PROCESS_RATE))
                handle = self._replies.get(reply.turn_id)
                turn = handle.user if handle is not None else None
                if turn is not None:
                    latency = (p.wall - turn.end_wall) * 1000
                    self.metrics["response_ms"].append(latency)
                    endpoint = turn.endpoint_ms if turn.endpoint_ms is not None else \
                        self.config.endpointing.silence_ms
                    values = {"response_latency_ms": latency, "endpoint_silence_ms": float(endpoint)}
                    self._emit(ev.Metric("turn", values))
                    self._spawn(self._to_agent({"type": msg.METRIC, "turn_id": reply.turn_id, **values}))
            if self.recorder:
                pcm = self._out_to_rec.process(np.frombuffer(p.pcm, np.int16))
                self.recorder.add_agent(pcm, pos)
                self._agent_cursor = pos + len(pcm)
            else:
                self._agent_cursor = pos + FRAME
            reply.last_frame_pos = self._agent_cursor
        for reply in list(self.speaker.replies):
            done = reply.played_all and reply.started_at is not None
            if done and not reply.cancelled and not reply.finished:
                self._finish_reply(reply, interrupted=False)
            elif reply.finished and reply.started_at is None:
                self.speaker.forget(reply)

    def _finish_reply(self, reply: Reply, *, interrupted: bool, heard: str | None = None) -> None:
        if reply.finished:
            return
        reply.finished = True
        self.speaker.forget(reply)
        handle = self._replies.close(reply.turn_id)
        text = (handle.text if handle is not None else "") or reply.text
        if heard is None:
            heard = reply.heard_text() if interrupted else text
        if handle is not None:
            handle.finish(interrupted=interrupted, heard=heard)
        start = (reply.first_frame_pos or self._clock) * 1000 // PROCESS_RATE
        end = (reply.last_frame_pos or self._clock) * 1000 // PROCESS_RATE
        if not text:
            return
        seq = self._next_seq()
        self.counts["agent_turns"] += 1
        self._emit(ev.AgentSpeechDone(reply.turn_id, text, interrupted, heard, start, end))
        self._store("add_turn", self.session_id, seq, "agent", text, start, end, interrupted, heard)
        if not interrupted:
            self._spawn(self._to_agent({"type": msg.AGENT_SPEECH_DONE, "turn_id": reply.turn_id,
                                        "text": text}))

    # ---- storage and tasks -------------------------------------------------------------------------------
    def _store(self, method: str, *args: Any) -> None:
        if self.store is not None:
            self._spawn(getattr(self.store, method)(*args))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._writes.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: background task failed", self.session_id, exc_info=task.exception())

    # ---- the end -------------------------------------------------------------------------------------
    async def end(self, reason: str) -> None:
        """End the session (idempotent): keep every finished turn, finalise the recording, tell everyone."""
        with logs.bound(**self.log_ids):  # also when called from outside the session's tasks (shutdown)
            await self._end(reason)

    async def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        self.end_reason = reason
        if self.start_stage:
            await self._end_unstarted(reason)
            return
        self._input.put_nowait(None)  # the input loop's own way out, whatever happens to the cancel
        current = asyncio.current_task()
        others = [t for t in self._tasks if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._book_playback()
        if self.detector.in_utterance and self.detector.speech_ms >= self.config.endpointing.min_speech_ms:
            # The line dropped mid-sentence: what the user said so far is still a turn.
            self.stt.release_held()
            with contextlib.suppress(Exception):
                t = await asyncio.wait_for(self.stt.final(), 5)
                if t.text.strip():
                    seq = self._next_seq()
                    start_ms, end_ms = self.detector.start_ms(), self._clock_ms()
                    redacted = self._redact(start_ms, end_ms)
                    self._store("add_turn", self.session_id, seq, "user",
                                ev.REDACTED if redacted else t.text.strip(), start_ms, end_ms, False, None,
                                "turn", redacted)
        for reply in list(self.speaker.replies):
            self._finish_reply(reply, interrupted=True)
        await self.speaker.close()
        self.stt.close()
        if self.recorder is not None:
            info = self.recorder.close()
            self._store("add_recording", self.session_id, str(info.path), "wav", info.sample_rate,
                        info.channels, info.duration_s, info.size_bytes, info.sha256)
        summary = self.metrics_summary()
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        if self.store is not None:
            await self.store.end_session(self.session_id, reason, metrics=summary)
        if self.agent is not None:
            await self._to_agent({"type": msg.CALL_ENDED, "reason": reason})
            with contextlib.suppress(Exception):
                await self.agent.close(reason)
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        self._emit(ev.SessionEnded(reason, summary))
        log.info("session %s ended: %s", self.session_id, reason)
        if self.on_end is not None:
            await self.on_end(reason)

    async def _end_unstarted(self, reason: str) -> None:
        """The end of a session whose start() failed part way: none of the audio machinery exists, but the
        row (if it was opened) is closed and listeners hear of the end. `on_end` is not called: the
        transport learns of it from start_call's CallStartFailed and closes its side there."""
        if self.store is not None and self.info.session_id is not None:
            await self.store.end_session(self.session_id, reason, metrics={})
        self._emit(ev.SessionEnded(reason, {}))
        log.info("session %s ended before it started (%s failed): %s", self.session_id, self.start_stage,
                 reason)

    def metrics_summary(self) -> dict[str, Any]:
        """What `sessions.metrics` stores and `session.ended` carries: each turn's response latency (ms,
        in order, at most MAX_TURN_LATENCIES), counts, and p50/p95/max of every measured series."""
        latencies = self.metrics.get("response_ms", [])
        counts = {k: self.counts[k] for k in COUNTED}
        errors = {k: self.counts[k] for k in ENGINE_ERRORS if self.counts[k]}
        partials = {"sent": self.counts["partials"], "shed": self.counts["partials_shed"]}
        return {**counts, "turn_latencies_ms": [round(v) for v in latencies[:MAX_TURN_LATENCIES]],
                **({"engine_errors": errors} if errors else {}),
                **({"stt_partials": partials} if any(partials.values()) else {}),
                **{k: _summary(v) for k, v in self.metrics.items() if v}}


MAX_TURN_LATENCIES = 500  # keeps a very long call's metrics JSON small; the summaries still count all
# interruptions: barge-ins that cut agent speech; false_barge_ins: speech over the agent that paused it,
# then turned out to be noise or a backchannel (the agent resumed).
# non_turns: user speech kept but not made a turn (`user.non_turn`: backchannels, noise).
COUNTED = ("user_turns", "agent_turns", "interruptions", "false_barge_ins", "non_turns")
# Partial transcripts (`stt_partials`, only when any was tried): `sent` to the client and agent, and `shed`,
# Whisper partial decodes skipped because a final (any session's) or another partial wanted the STT.
# Engine failures mid-session: `error` events to the client and the agent, counted under `engine_errors`.
STT_FAILED, TTS_FAILED, PIPELINE_FAILED = "stt_failed", "tts_failed", "pipeline_failed"
ENGINE_ERRORS = (STT_FAILED, TTS_FAILED, PIPELINE_FAILED)


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"count": len(arr), "p50": round(float(np.percentile(arr, 50)), 1),
            "p95": round(float(np.percentile(arr, 95)), 1), "max": round(float(arr.max()), 1)}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
