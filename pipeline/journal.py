"""Which live sessions a process owns, on its own disk, so the next process can close what a crash left.

A crash (SIGKILL, OOM, power) skips `PipelineSession.end`: the turns are already in SQL (they are written
turn by turn) but the session row stays open, the recording's WAV header still says it is empty, and no
`recordings` row exists. So each session a process starts gets a small JSON file here (its id, its
recording's path, the owning process), removed once the session's end is stored. A process that starts
recovers the files of owners that are gone: repairs the WAV (`repair_wav`), registers it (duration, size,
sha256) unless a row exists, and ends the session with the journal's crash reason (`server_crashed` for
web sessions in `serve`, `worker_crashed` for a SIP media worker's calls).

The directory belongs to one node (one `serve` port, one worker port), and an entry whose owner process
is still alive (same host, same pid, same process start time) is never touched: a node never closes
sessions another live process owns, even when a restarted process reuses a pid.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechpipe import logs
from speechpipe.errors import NotFoundError

from .recorder import repair_wav
from .session import PipelineSession

log = logging.getLogger(__name__)

SERVER_CRASHED = "server_crashed"  # a web session whose `serve` died
WORKER_CRASHED = "worker_crashed"  # a phone call whose SIP media worker died


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process (Linux), None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields 3 and 22; the command name (field 2) may hold spaces and parentheses, so count from its end.
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the process that wrote an entry is still running: not a later process that got its pid,
    and not a zombie (a SIGKILLed child its orphaned parent's reaper has not collected yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    state, ticks = stat
    return state not in ("Z", "X", "x") and (start_ticks is None or ticks == start_ticks)


@dataclass(frozen=True)
class WavFacts:
    """What a `recordings` row needs of a PCM16 WAV."""

    sample_rate: int
    channels: int
    duration_s: float
    size_bytes: int
    sha256: str


def wav_facts(path: Path) -> WavFacts:
    data = path.read_bytes()
    channels, rate = struct.unpack("<HI", data[22:28])
    frames = (len(data) - 44) // (2 * channels)
    return WavFacts(rate, channels, frames / rate, len(data), hashlib.sha256(data).hexdigest())


class SessionJournal:
    """One directory of live-session entries; `crash_reason` is what recovered sessions end as."""

    def __init__(self, directory: Path, crash_reason: str) -> None:
        self.directory = Path(directory)
        self.crash_reason = crash_reason
        pid = os.getpid()
        self._owner = {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid)}

    def record(self, session: PipelineSession, note: Mapping[str, Any] | None = None) -> None:
        """Note a started session as this process's (atomically: a crash never leaves half an entry)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        recording = session.recording_path
        data = {"session_id": session.session_id, "recording": str(recording) if recording else None,
                **self._owner, "started": time.time(), **(note or {})}
        path = self._path(str(session.session_id))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def forget(self, session_id: str | None) -> None:
        """The session's end is stored: nothing left to recover."""
        if session_id is not None:
            try:
                self._path(session_id).unlink(missing_ok=True)
            except OSError:
                log.exception("could not remove the journal entry of session %s", session_id)

    def _path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}.json"

    async def recover(self, store: Any) -> list[str]:
        """Close every session a dead owner left here; returns their ids. Entries of live owners stay."""
        if not self.directory.is_dir():
            return []
        recovered = []
        for entry in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(entry.read_text())
                session_id = str(data["session_id"])
            except (OSError, ValueError, KeyError):
                log.warning("journal entry %s is unreadable; removing it", entry)
                entry.unlink(missing_ok=True)
                continue
            if data.get("host") == self._owner["host"] and _alive(int(data.get("pid", 0)),
                                                                  data.get("start_ticks")):
                continue  # another live process's session (a second server on this data dir)
            try:
                with logs.bound(session_id=session_id):
                    await self._recover_one(store, session_id, data)
            except Exception:
                log.exception("could not recover session %s from %s; keeping the entry", session_id, entry)
                continue
            entry.unlink(missing_ok=True)
            recovered.append(session_id)
        if recovered:
            log.warning("recovered %d session(s) a crashed process left open (%s): %s", len(recovered),
                        self.crash_reason, ", ".join(recovered))
        return recovered

    async def _recover_one(self, store: Any, session_id: str, data: dict[str, Any]) -> None:
        path = Path(data["recording"]) if data.get("recording") else None
        if path is not None and path.exists():
            try:
                fixed = await asyncio.to_thread(repair_wav, path)
            except ValueError:  # torn inside the header itself: nothing playable was written
                log.warning("recovered session %s: recording %s has no usable header; not registered",
                            session_id, path)
                path = None
        if path is not None and path.exists():
            facts = await asyncio.to_thread(wav_facts, path)
            try:
                await store.get_recording(session_id)
            except NotFoundError:
                await store.add_recording(session_id, str(path), "wav", facts.sample_rate, facts.channels,
                                          facts.duration_s, facts.size_bytes, facts.sha256)
            log.info("recovered session %s: recording %s (%s, %.1f s)", session_id, path,
                     "header repaired" if fixed else "header intact", facts.duration_s)
        ended = await store.end_session(session_id, self.crash_reason)
        log.info("recovered session %s: %s", session_id,
                 f"ended ({self.crash_reason})" if ended else "already ended")
