"""One call's lifecycle, the same on every transport: start the session, hand it an agent, end it right.

Both transports (`telephony.worker` for phone calls, `websocket_edge.client_ws` for web sessions) build a
session through `start_call` and give it its agent through `connect_agent`; what differs between them
(how audio arrives and leaves, what hangs up) stays in the transport. See docs/architecture.md § Call
lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from speechpipe import logs
from speechpipe.pipe_config import PipeConfig

from .agent import AgentLink, AgentUnavailable, CallbackAgent, echo_reply
from .journal import SessionJournal
from .session import EndHook, Engines, PipelineSession, SessionInfo, TransferHook

log = logging.getLogger(__name__)

AgentFactory = Callable[[PipelineSession], Awaitable[AgentLink | None]]
"""The session → its agent; None or `AgentUnavailable(reason)` when there is none."""

PHONE_GREETING = "Hello, this is Speech Pipe. Say something."
START_FAILED = "start_failed"
NO_AGENT = "no_agent"


async def echo_agent(session: PipelineSession) -> AgentLink:
    """The built-in agent when none is wired: it repeats the user (greeting callers on the phone)."""
    greeting = PHONE_GREETING if session.info.direction == "inbound_phone" else None
    return CallbackAgent(echo_reply, greeting=greeting)


class CallStartFailed(Exception):
    """The session could not start; its row is ended as `start_failed` and the cause is logged.

    `stage` is what failed (`store`, `stt`, `vad`, `tts`, `recording`): safe to show a client, unlike the
    exception's own text, which may name server paths."""

    def __init__(self, stage: str, cause: str) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause


async def start_call(info: SessionInfo, config: PipeConfig, engines: Engines | None, *, input_rate: int,
                     output_rate: int, store: Any = None, recordings_dir: str | Path | None = None,
                     on_end: EndHook | None = None, on_transfer: TransferHook | None = None,
                     prepare: Callable[[PipelineSession], None] | None = None,
                     early_audio: Iterable[np.ndarray] = (), journal: SessionJournal | None = None,
                     journal_note: Mapping[str, Any] | None = None) -> PipelineSession:
    """Build and start a call's session: bind the call's log fields, `prepare(session)` (the transport
    subscribes its outputs before anything can happen), start, then replay the audio that arrived while
    it started. Raises CallStartFailed after ending what was created. With a `journal`, the started
    session is noted there (with `journal_note`) until its end is stored, so a process that starts after
    a crash can close it.

    Returns with no await between the replay and the caller: audio the transport receives from then on
    can go straight to `session.push_audio`.
    """
    logs.bind(pipe_id=info.pipe_id, direction=info.direction, agent_id=config.agent_id)

    def opened(session: PipelineSession) -> None:
        if journal is not None:  # as soon as the row exists: a crash while the engines load is covered
            try:
                journal.record(session, journal_note)
            except OSError:
                log.exception("session %s: could not write its journal entry", session.session_id)

    async def ended(reason: str) -> None:
        if journal is not None:
            journal.forget(session.session_id)  # its end and recording are stored
        if on_end is not None:
            await on_end(reason)

    session = PipelineSession(info, config, engines, input_rate=input_rate, output_rate=output_rate,
                              store=store, recordings_dir=recordings_dir, on_transfer=on_transfer,
                              on_end=ended, on_open=opened)
    if prepare is not None:
        prepare(session)
    try:
        await session.start()
    except Exception as exc:
        stage = session.start_stage
        log.exception("%s session on pipe %s could not start (%s failed)", info.direction, info.pipe_id,
                      stage)
        try:
            await asyncio.wait_for(session.end(START_FAILED), 10)
        except Exception:
            log.exception("session %s: ending the failed start failed", session.session_id)
        else:
            if journal is not None:
                journal.forget(session.session_id)
        raise CallStartFailed(stage, f"{type(exc).__name__}: {exc}") from exc
    for pcm in early_audio:
        session.push_audio(pcm)
    return session


async def connect_agent(session: PipelineSession, factory: AgentFactory,
                        on_unavailable: Callable[[str], None] | None = None) -> bool:
    """Give `session` its agent, or let it apologise and end with the reason there was none (the hub's:
    `no_runner`, `at_capacity`, `ack_timeout`, ...). An agent that arrives after the session ended is
    closed, not left holding a runner. True if an agent took the session."""
    if session.ended.is_set():
        return False  # the caller left while the session started: no runner is asked
    reason = NO_AGENT
    agent: AgentLink | None = None
    try:
        agent = await factory(session)
    except AgentUnavailable as exc:
        reason = exc.reason or NO_AGENT
        log.warning("session %s: no agent (%s)", session.session_id, reason)
    except Exception:
        log.exception("session %s: the agent factory failed", session.session_id)
    else:
        if agent is None:
            log.warning("session %s: no agent", session.session_id)
    if agent is None and on_unavailable is not None:
        on_unavailable(reason)
    if session.ended.is_set():
        if agent is not None:
            log.info("session %s ended while its agent was found; closing the agent", session.session_id)
            with contextlib.suppress(Exception):
                await agent.close("session_ended")
        return False
    if agent is None:
        await session.no_agent(reason)
        return False
    await session.attach_agent(agent)
    return True
