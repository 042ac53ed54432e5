"""Fixtures for pipeline sessions: one Engines per test run (models load once), and a session factory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from speechpipe.pipeline.agent import AgentLink, CallbackAgent, echo_reply
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.events import Event
from speechpipe.pipeline.realtime import RealtimeLine
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo


@pytest.fixture(scope="session")
def engines() -> Engines:
    eng = Engines()
    eng.warm_up(PipeConfig(agent_id="warmup"))  # load whisper and run it once, before any timing
    return eng


class Talk:
    """A session on a real-time line, with every event it emitted."""

    def __init__(self, session: PipelineSession, line: RealtimeLine) -> None:
        self.session = session
        self.line = line
        self.events: list[Event] = []
        session.subscribe(self.events.append)

    def of(self, kind: type[Event]) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
async def talk(engines: Engines, tmp_path: Path):
    made: list[Talk] = []

    async def make(config: PipeConfig | None = None, agent: AgentLink | None = None, *,
                   input_rate: int = 16000, output_rate: int = 16000, store=None,
                   direction: str = "web", pipe_id: str = "pipe_test") -> Talk:
        config = config or PipeConfig(agent_id="test")
        info = SessionInfo(pipe_id=pipe_id, agent_id=config.agent_id, direction=direction)
        session = PipelineSession(info, config, engines, input_rate=input_rate, output_rate=output_rate,
                                  store=store, recordings_dir=tmp_path)
        t = Talk(session, RealtimeLine(session))
        await session.start()
        await session.attach_agent(agent or CallbackAgent(echo_reply))
        made.append(t)
        return t

    yield make
    for t in made:
        await asyncio.wait_for(t.session.end("test_over"), 30)
