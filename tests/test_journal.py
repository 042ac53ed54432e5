"""The session journal's ownership rule on a real session and a real SQLite store: entries of a live owner
are never recovered; entries of a dead owner (gone, a zombie, or a later process with the same pid) are,
with the recording repaired and registered. The whole crash is in tests/test_crash_recovery.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speechpipe.pipeline.call import start_call
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.journal import SERVER_CRASHED, SessionJournal
from speechpipe.pipeline.session import Engines, SessionInfo
from speechpipe.storage import AsyncStore, Store

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_only_sessions_of_dead_owners_are_recovered(sqlite_store: Store, engines: Engines,
                                                          tmp_path: Path) -> None:
    store = AsyncStore(sqlite_store)
    pipe = sqlite_store.create_pipe({"agent_id": "journal"})
    journal = SessionJournal(tmp_path / "journal", SERVER_CRASHED)
    info = SessionInfo(pipe_id=pipe.id, agent_id="journal", direction="web")
    session = await start_call(info, PipeConfig(agent_id="journal", vad={"engine": "webrtc"}), engines,
                               input_rate=16000, output_rate=16000, store=store,
                               recordings_dir=tmp_path / "rec", journal=journal)
    sid = session.session_id
    entry = tmp_path / "journal" / f"{sid}.json"
    try:
        for _ in range(150):  # 3 s of audio: the recorder writes every second
            session.push_audio(np.full(320, 300, np.int16))
        await asyncio.sleep(0.5)
        assert json.loads(entry.read_text())["pid"] == os.getpid()

        # This process is alive: a second journal on the same directory (a second server on this data
        # dir) leaves the session alone.
        assert await SessionJournal(tmp_path / "journal", SERVER_CRASHED).recover(store) == []
        assert (await store.get_session(sid)).ended_at is None

        # The same pid but another process start (a restart that got the pid back): not the owner.
        data = json.loads(entry.read_text())
        entry.write_text(json.dumps({**data, "start_ticks": data["start_ticks"] + 1}))
        assert await journal.recover(store) == [sid]
        row = await store.get_session(sid)
        assert row.end_reason == SERVER_CRASHED and row.ended_at is not None
        rec = await store.get_recording(sid)
        assert rec.size_bytes == Path(rec.path).stat().st_size and rec.duration_s >= 1.0  # noqa: ASYNC240
        assert not entry.exists()
    finally:
        await session.end("test_over")
    assert (await store.get_session(sid)).end_reason == SERVER_CRASHED  # the first end stands


async def test_dead_and_zombie_owners_lose_their_entries(sqlite_store: Store, tmp_path: Path) -> None:
    store = AsyncStore(sqlite_store)
    pipe = sqlite_store.create_pipe({"agent_id": "journal"})
    journal = SessionJournal(tmp_path / "journal", "worker_crashed")
    # Exits, and is not waited for: a zombie until the end of the test.
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: ASYNC220
    await asyncio.sleep(0.5)
    owners = {"gone": _dead_pid(), "zombie": zombie.pid}
    sids = {}
    for name, pid in owners.items():
        sid = await store.create_session(pipe.id, "journal", "inbound_phone")
        sids[name] = sid
        (tmp_path / "journal").mkdir(exist_ok=True)
        (tmp_path / "journal" / f"{sid}.json").write_text(json.dumps(
            {"session_id": sid, "recording": None, "host": os.uname().nodename, "pid": pid,
             "start_ticks": None}))
    (tmp_path / "journal" / "torn.json").write_text('{"session_')  # a crash mid-write of another kind
    try:
        assert sorted(await journal.recover(store)) == sorted(sids.values())
    finally:
        zombie.wait()
    for sid in sids.values():
        assert (await store.get_session(sid)).end_reason == "worker_crashed"
    assert list((tmp_path / "journal").iterdir()) == []
