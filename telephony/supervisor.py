"""Starts and watches the SIP media workers for `speechpipe serve`: N processes on ports base..base+N-1.

A worker is its own process so that a pjsip crash (or a SIGKILL) never touches the web process: the
supervisor notices the exit, waits a backoff (0.5 s doubling to 30 s; back to 0.5 s after a worker has
stayed up a minute) and starts it again; the new worker closes its predecessor's calls (see worker.py).
Workers report over a pipe (JSON lines on `SPEECHPIPE_SIP_STATUS_FD`): `ready` once pjsua listens, then
`stats` every second. A worker silent for `heartbeat_timeout_s` is presumed hung and killed.

`health()` is the snapshot `/healthz` shows: per worker its state, calls, call limit, pjsua build and
memory (RSS and PSS from /proc: PSS splits shared pages between the processes that share them, so the PSS
figures add up to what the workers really cost), and for the whole: live calls, capacity, memory, and the
first PBX mismatch a worker saw (see pbx_check.py; it turns the health to error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from speechpipe.settings import Settings

from .pbx_check import check_at_start

log = logging.getLogger(__name__)


@dataclass
class WorkerSlot:
    index: int
    port: int
    state: str = "stopped"  # starting | up | backoff | stopped
    pid: int | None = None
    restarts: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    last_seen: float = 0.0
    last_exit: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    version: str | None = None  # pjsua's version, from the worker's `ready` line
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        st = self.status
        return {
            "index": self.index, "port": self.port, "state": self.state, "pid": self.pid,
            "restarts": self.restarts, "last_exit": self.last_exit,
            "uptime_s": round(now - self.ready_at, 1) if self.ready_at and self.state == "up" else 0.0,
            "last_seen_s": round(now - self.last_seen, 1) if self.last_seen else None,
            "calls": st.get("calls", 0), "max_calls": st.get("max_calls", 0),
            "rejected_busy": st.get("rejected_busy", 0), "answered": st.get("answered", 0),
            "late_frames": st.get("late_out", 0) + st.get("late_in", 0),
            "registration": st.get("registration"), "pjsua": self.version,
            "build_max_calls": st.get("build_max_calls", 0), "pbx_mismatch": st.get("pbx_mismatch"),
            **process_memory_mb(self.pid if self.state in ("starting", "up") else None),
        }


def process_memory_mb(pid: int | None) -> dict[str, float | None]:
    """{"rss_mb", "pss_mb"} of a process from /proc/<pid>/smaps_rollup (None where unknown)."""
    out: dict[str, float | None] = {"rss_mb": None, "pss_mb": None}
    if pid is None:
        return out
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss") and rest.split():
            out[f"{key.lower()}_mb"] = round(int(rest.split()[0]) / 1024, 1)
    return out


class SipSupervisor:
    def __init__(self, settings: Settings, *, workers: int | None = None, port_base: int | None = None,
                 agent_factory: str | None = None, command_prefix: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, python: str = sys.executable,
                 log_dir: Path | None = None, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 stable_after_s: float = 60.0, heartbeat_timeout_s: float = 15.0) -> None:
        self.settings = settings
        self.count = settings.sip_workers if workers is None else workers
        self.port_base = settings.sip_port_base if port_base is None else port_base
        self.agent_factory = agent_factory
        self.command_prefix = list(command_prefix)
        self.extra_env = dict(env or {})
        self.python = python
        self.log_dir = log_dir
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.slots = [WorkerSlot(i, self.port_base + i) for i in range(self.count)]
        self._stopping = False
        self._all_up = asyncio.Event()

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> SipSupervisor:
        """What `serve` uses: `settings.sip_workers` workers from `settings.sip_port_base`."""
        return cls(settings, **kwargs)

    # ---- control -----------------------------------------------------------------------------------
    async def start(self, wait_ready_s: float | None = 60.0) -> None:
        """Start every worker; with `wait_ready_s`, return once all report ready (or that time passed).

        With SPEECHPIPE_SIP_PBX_CONF set, first compare that Asterisk configuration with these workers and
        raise ConfigError on a mismatch (pbx_check.py), before any worker starts.
        """
        check_at_start(self.settings, self.count, self.port_base, {**os.environ, **self.extra_env})
        self._stopping = False
        for slot in self.slots:
            slot.task = asyncio.get_running_loop().create_task(self._supervise(slot),
                                                               name=f"sip-worker-{slot.index}")
        if wait_ready_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_up.wait(), wait_ready_s)
            for s in self.slots:
                if s.state != "up":
                    log.warning("SIP worker %d (port %d) not ready after %.0f s: %s", s.index, s.port,
                                wait_ready_s, s.state)

    async def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every worker (they end their calls with BYE), SIGKILL what is left after the timeout."""
        self._stopping = True
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGTERM)
            elif slot.task is not None:
                slot.task.cancel()  # waiting out a restart backoff: nothing to stop
        tasks = [s.task for s in self.slots if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for slot in self.slots:
                if slot.proc is not None and slot.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
            for t in pending:
                t.cancel()
        for slot in self.slots:
            slot.state = "stopped"

    def health(self) -> dict[str, Any]:
        workers = [s.snapshot() for s in self.slots]
        mismatch = next((w["pbx_mismatch"] for w in workers if w["pbx_mismatch"]), None)
        return {
            "ok": all(w["state"] == "up" for w in workers) and mismatch is None,
            "workers": workers,
            "calls": sum(w["calls"] for w in workers),
            "capacity": sum(w["max_calls"] for w in workers if w["state"] == "up"),
            "calls_per_worker": max((w["max_calls"] for w in workers), default=0),
            "rss_mb": round(sum(w["rss_mb"] or 0 for w in workers), 1),
            "pss_mb": round(sum(w["pss_mb"] or 0 for w in workers), 1),
            "pbx_mismatch": mismatch,
        }

    # ---- one worker --------------------------------------------------------------------------------
    def _env(self, status_fd: int) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update({
            "SPEECHPIPE_DATA_DIR": str(s.data_dir), "SPEECHPIPE_SIP_PORT_BASE": str(self.port_base),
            "SPEECHPIPE_SIP_WORKERS": str(self.count),  # a worker checks the PBX's hunt against it
            "SPEECHPIPE_SIP_STATUS_FD": str(status_fd), "SPEECHPIPE_LOG_FORMAT": s.log_format,
        })
        if s.database_url:
            env["SPEECHPIPE_DATABASE_URL"] = s.database_url
        if s.models_dir:
            env["SPEECHPIPE_MODELS_DIR"] = str(s.models_dir)
        if self.agent_factory:
            env["SPEECHPIPE_SIP_AGENT_FACTORY"] = self.agent_factory
        env.update(self.extra_env)
        return env

    def _stderr(self, slot: WorkerSlot) -> TextIO | int | None:
        if self.log_dir is None:
            return None  # inherit: worker log lines are prefixed with "worker:<port>"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"sip-worker-{slot.port}.log", "a")  # the child process writes to it

    async def _spawn(self, slot: WorkerSlot) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
        read_fd, write_fd = os.pipe()
        stderr = self._stderr(slot)
        try:
            argv = [*self.command_prefix, self.python, "-m", "speechpipe.telephony.worker",
                    "--index", str(slot.index), "--port", str(slot.port)]
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self._env(write_fd), pass_fds=(write_fd,), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        finally:
            os.close(write_fd)
            if stderr is not None and not isinstance(stderr, int):
                stderr.close()
        reader = asyncio.StreamReader(limit=1 << 20)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
        return proc, reader

    async def _supervise(self, slot: WorkerSlot) -> None:
        backoff = self.backoff_initial_s
        while not self._stopping:
            slot.state, slot.ready_at, slot.status = "starting", None, {}
            slot.started_at = time.monotonic()
            try:
                proc, reader = await self._spawn(slot)
            except Exception:
                log.exception("SIP worker %d: could not start", slot.index)
                proc = None
            if proc is not None:
                slot.proc, slot.pid = proc, proc.pid
                log.info("SIP worker %d started: pid %d, port %d", slot.index, proc.pid, slot.port)
                await self._follow(slot, proc, reader)
                code = await proc.wait()
                slot.last_exit = (f"signal {-code} ({signal.Signals(-code).name})" if code < 0
                                  else f"exit {code}")
                if self._stopping:
                    log.info("SIP worker %d stopped (%s)", slot.index, slot.last_exit)
                    break
                log.error("SIP worker %d (pid %d) died: %s", slot.index, proc.pid, slot.last_exit)
            if self._stopping:
                break
            if slot.ready_at is not None and time.monotonic() - slot.ready_at > self.stable_after_s:
                backoff = self.backoff_initial_s
            slot.state = "backoff"
            log.info("SIP worker %d restarts in %.1f s", slot.index, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)
            slot.restarts += 1
        slot.state = "stopped"

    async def _follow(self, slot: WorkerSlot, proc: asyncio.subprocess.Process,
                      reader: asyncio.StreamReader) -> None:
        """Read status lines until the worker closes the pipe; kill it if it goes silent."""
        while True:
            # Before `ready` a worker loads models: give it longer than the heartbeat.
            timeout = self.heartbeat_timeout_s if slot.ready_at else max(self.heartbeat_timeout_s, 120.0)
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError:
                log.error("SIP worker %d (pid %d) silent for %.0f s: killing it", slot.index, proc.pid,
                          timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            try:
                status = json.loads(line)
            except ValueError:
                continue
            slot.last_seen = time.monotonic()
            slot.status = status
            event = status.get("event")
            if event == "ready":
                slot.state, slot.ready_at = "up", time.monotonic()
                slot.version = status.get("version")
                if all(s.state == "up" for s in self.slots):
                    self._all_up.set()
                log.info("SIP worker %d ready on port %d (pjsua %s, %s calls)", slot.index, slot.port,
                         status.get("version"), status.get("max_calls"))
            elif event == "stopped":
                slot.state = "stopped"
