"""Phone-call fixtures: a private network namespace, real media workers, real SIP peers (baresip, SIPp).

Everything SIP runs inside a fresh `ip netns` (loopback only), so no SIP or RTP ever leaves the machine: the
worker processes, baresip and SIPp are all started with `ip netns exec`. The database is a SQLite file the
test process and the workers share through the filesystem.

`probe_agent` is the agent the workers load in tests (`--agent-factory tests.fixtures_sip:probe_agent`):
every message it gets is a JSON line in $PROBE_LOG, and the pipe's agent_id picks what it does:
  probe-echo      answer every user turn with ANSWER
  probe-end       answer with GOODBYE, then end the call
  probe-transfer  on the first user turn, transfer to "1002" (the pipe allows it)
  probe-refuse    on the first user turn, transfer to "9999" (not allowed); on the error, end the call
  probe-long      answer with a long reply (for hanging up mid-reply)
  probe-slow      the agent arrives 4 s after the session starts (for hanging up during dispatch)
  probe-busy      no agent takes the call: the factory says `at_capacity`, as the hub does
  probe-none      no agent (the factory returns None)
Besides the messages, the probe logs `factory` (the session was offered, with its caller) and `closed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from speechpipe.pipeline import agent as msg
from speechpipe.pipeline.agent import AgentGone, AgentLink, AgentUnavailable

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ANSWER = "The weather will be sunny and warm all week."
GOODBYE = "Thank you for calling. Goodbye."
LONG = ("This is a long answer that keeps going for quite a while. It talks about the weather, the trains, "
        "the opening hours of every shop in town, and then it starts all over again with the weather.")
WORKER_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SPEECHPIPE_TEST_CACHE")


# ------------------------------------------------------------------------------------------ probe agent


class ProbeAgent(AgentLink):
    """An in-worker agent that logs what it hears and acts by agent_id (see the module docstring)."""

    def __init__(self, behaviour: str, session_id: str, log_path: str) -> None:
        self.behaviour = behaviour
        self.session_id = session_id
        self.log_path = log_path
        self._out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._closed = False
        self._acted = False

    def _log(self, message: dict[str, Any]) -> None:
        line = json.dumps({"t": time.time(), "session_id": self.session_id, "agent": self.behaviour,
                           **message}, default=str)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def send(self, message: dict[str, Any]) -> None:
        if self._closed:
            raise AgentGone("closed")
        self._log(message)
        kind = message.get("type")
        if kind == msg.USER_TEXT:
            turn = int(message["turn_id"])
            if self.behaviour in ("probe-transfer", "probe-refuse") and not self._acted:
                self._acted = True
                target = "1002" if self.behaviour == "probe-transfer" else "9999"
                await self._out.put({"type": msg.TRANSFER, "target": target, "mode": "blind"})
                return
            text = {"probe-end": GOODBYE, "probe-long": LONG}.get(self.behaviour, ANSWER)
            await self._out.put({"type": msg.TEXT_DELTA, "turn_id": turn, "text": text})
            await self._out.put({"type": msg.TEXT_END, "turn_id": turn})
            if self.behaviour == "probe-end":
                await self._out.put({"type": msg.END_CALL, "reason": "agent_goodbye"})
        elif kind == msg.ERROR and self.behaviour == "probe-refuse":
            await self._out.put({"type": msg.SAY, "text": "That transfer is not allowed."})
            await self._out.put({"type": msg.END_CALL, "reason": "transfer_refused"})

    async def recv(self) -> dict[str, Any]:
        if self._closed:
            raise AgentGone("closed")
        return await self._out.get()

    async def close(self, reason: str) -> None:
        self._closed = True
        self._log({"type": "closed", "reason": reason})


async def probe_agent(session: Any) -> AgentLink | None:
    """The workers' agent factory in tests: `tests.fixtures_sip:probe_agent`."""
    behaviour = session.info.agent_id
    probe = ProbeAgent(behaviour, str(session.session_id), os.environ["PROBE_LOG"])
    probe._log({"type": "factory", "caller": session.info.caller})
    if behaviour == "probe-none":
        return None
    if behaviour == "probe-busy":
        raise AgentUnavailable("at_capacity")
    if behaviour == "probe-slow":
        await asyncio.sleep(4)
    return probe


# ------------------------------------------------------------------------------------------ netns


class NetNS:
    """A private network namespace with only loopback up; `argv()` prefixes a command to run inside."""

    def __init__(self) -> None:
        self.name = f"sp-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run([*self.prefix(), *argv], **kw)

    def interfaces(self) -> list[str]:
        out = self.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        return [line.split(":")[1].strip() for line in out.splitlines()]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def netns_available() -> str | None:
    """None if `ip netns` works here, else why not."""
    if os.geteuid() != 0:
        return "private network namespaces need root"
    for tool in ("ip", "baresip", "sipp"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


# ------------------------------------------------------------------------------------------ workers


def worker_env(data_dir: Path, probe_log: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in WORKER_ENV_KEEP}
    env.update({
        "PYTHONPATH": str(ROOT), "SPEECHPIPE_DATA_DIR": str(data_dir), "PROBE_LOG": str(probe_log),
        "SPEECHPIPE_SIP_HOST": "127.0.0.1", "SPEECHPIPE_SIP_AGENT_FACTORY": "tests.fixtures_sip:probe_agent",
        "SPEECHPIPE_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------ baresip


BARESIP_MODULES = ("stdio.so", "g711.so", "g722.so", "aufile.so", "sndfile.so", "alsa.so", "menu.so",
                   "account.so")


@dataclass
class Baresip:
    """One baresip call: plays `wav` as its microphone, records what it hears (sndfile), then quits."""

    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def recordings(self) -> list[Path]:
        return sorted(self.dir.glob("dump-*.wav"))

    def heard(self) -> Path:
        """The decoded (received) side of the call: what the caller heard."""
        dec = [p for p in self.recordings() if "-dec" in p.name]
        if not dec:
            raise AssertionError(f"baresip recorded nothing in {self.dir}: {list(self.dir.iterdir())}\n"
                                 f"{self.log_tail()}")
        return dec[0]

    def log_tail(self, n: int = 60) -> str:
        p = self.dir / "baresip.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""


def baresip_call(ns: NetNS, workdir: Path, uri: str, wav: Path, *, codecs: str, seconds: float,
                 local_port: int = 5070, user: str = "1001", display: str = "Alice") -> Baresip:
    """Start baresip in `ns` dialling `uri`; it hangs up (BYE) and exits after `seconds`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config").write_text("\n".join([
        "poll_method epoll",
        f"sip_listen 127.0.0.1:{local_port}",
        "net_interface 127.0.0.1",
        "audio_player alsa,null",
        f"audio_source aufile,{wav}",
        "audio_alert alsa,null",
        "audio_srate 8000-48000",
        "rtp_ports 30000-30999",
        "module_path /usr/lib/baresip/modules",
        *[f"module {m}" for m in BARESIP_MODULES],
        "module_app menu.so",
        f"snd_path {workdir}",
        "",
    ]))
    (workdir / "accounts").write_text(
        f'"{display}" <sip:{user}@127.0.0.1:{local_port}>;regint=0;audio_codecs={codecs}\n')
    (workdir / "contacts").write_text("")
    log = open(workdir / "baresip.log", "wb")
    # nice: baresip's ALSA "null" player never blocks, so its player thread spins; keep it off the CPU the
    # worker under test needs (on a 2-core machine three callers would otherwise take 1.5 cores).
    argv = [*ns.prefix(), "nice", "-n", "10", "baresip", "-f", str(workdir), "-e", f"/dial {uri}",
            "-t", str(int(seconds))]
    proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return Baresip(workdir, proc)


# ------------------------------------------------------------------------------------------ SIPp


@dataclass
class SippRun:
    returncode: int
    stdout: str
    workdir: Path
    scenario: Path

    def messages(self) -> str:
        """Every SIP message SIPp sent and received (-trace_msg)."""
        return "\n".join(p.read_text(errors="replace")
                         for p in self.workdir.glob(f"{self.scenario.stem}_*_messages.log"))

    def errors(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in self.workdir.glob(f"{self.scenario.stem}_*_errors.log"))

    def explain(self) -> str:
        return f"sipp exit {self.returncode}\n{self.stdout[-3000:]}\nerrors:\n{self.errors()[-3000:]}"


async def sipp(ns: NetNS, scenario: Path, target: str, *, service: str, calls: int = 1, rate: float = 1.0,
               local_port: int = 5090, timeout_s: float = 60, extra: list[str] | None = None) -> SippRun:
    """Run one SIPp client scenario to completion inside the namespace (exit code 0 = every call passed).

    The scenario's folder is SIPp's working directory: pcaps resolve there and the traces land there."""
    workdir = scenario.parent
    for trace in ("messages", "errors"):
        for old in workdir.glob(f"{scenario.stem}_*_{trace}.log"):
            old.unlink()
    argv = [*ns.prefix(), "sipp", target, "-sf", str(scenario), "-s", service, "-i", "127.0.0.1",
            "-p", str(local_port), "-m", str(calls), "-r", str(rate), "-l", str(calls),
            "-mp", str(local_port + 2000), "-timeout", f"{int(timeout_s)}s", "-timeout_error",
            "-trace_err", "-trace_msg", "-nostdin", *(extra or [])]
    done = await asyncio.to_thread(subprocess.run, argv, cwd=workdir, capture_output=True, text=True,
                                   timeout=timeout_s + 30)
    return SippRun(done.returncode, done.stdout + done.stderr, workdir, scenario)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


async def wait_for(pred: Callable[[], Any], within_s: float, what: str, tail: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within_s} s waiting for {what}\n{tail()}")


# ------------------------------------------------------------------------------------------ the lab

PIPES = {  # extension -> (agent_id / behaviour)
    "2000": "probe-echo", "2001": "probe-end", "2002": "probe-transfer", "2003": "probe-refuse",
    "2004": "probe-long", "2005": "probe-slow", "2006": "probe-busy", "2009": "probe-none",
}


@dataclass
class PhoneLab:
    """A netns with a supervised media worker on `port`, a SQLite database with the probe pipes."""

    ns: NetNS
    dir: Path
    settings: Any
    store: Any
    pipes: dict[str, Any]
    probe_log: Path
    supervisor: Any
    port: int

    def probe(self, session_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        return [m for m in read_jsonl(self.probe_log)
                if session_id in (None, m["session_id"]) and kind in (None, m["type"])]

    def worker_log(self, n: int = 60) -> str:
        logs = sorted((self.dir / "logs").glob("*.log"))
        return "\n".join("\n".join(p.read_text(errors="replace").splitlines()[-n:]) for p in logs)

    async def session_of(self, caller: str, within_s: float = 20, kind: str = "call.started") -> str:
        """The id of the (latest) session whose caller is `caller` (by its `kind` line in the probe log)."""
        def find() -> str | None:
            found = [m for m in self.probe(kind=kind) if m.get("caller") == caller]
            return found[-1]["session_id"] if found else None
        return await wait_for(find, within_s, f"a session from caller {caller}", self.worker_log)

    async def ended(self, session_id: str, within_s: float = 30) -> Any:
        def done() -> Any:
            rec = self.store.get_session(session_id)
            return rec if rec.ended_at is not None else None
        return await wait_for(done, within_s, f"session {session_id} to end", self.worker_log)

    async def idle(self, within_s: float = 30) -> None:
        await wait_for(lambda: self.supervisor.health()["calls"] == 0 and self.supervisor.health()["ok"],
                       within_s, "the worker to be up with no calls", self.worker_log)


def make_lab(tmp: Path, ns: NetNS, port: int, max_calls: int | None = None, workers: int = 1,
             extra_env: dict[str, str] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    from speechpipe.settings import Settings
    from speechpipe.storage import Store
    from speechpipe.telephony.supervisor import SipSupervisor

    settings = Settings.from_env({}, data_dir=tmp / "data")
    settings.ensure_dirs()
    store = Store.from_settings(settings, upgrade=True)
    pipes = {ext: store.create_pipe({"agent_id": agent, "sip_extension": ext, "transfer_targets": ["1002"]})
             for ext, agent in PIPES.items()}
    extra = {"SPEECHPIPE_SIP_MAX_CALLS": str(max_calls)} if max_calls else {}
    extra.update(extra_env or {})
    env = worker_env(settings.data_dir, tmp / "probe.jsonl", **extra)
    sup = SipSupervisor(settings, workers=workers, port_base=port, command_prefix=ns.prefix(), env=env,
                        log_dir=tmp / "logs", backoff_initial_s=0.5, heartbeat_timeout_s=30)
    return store, sup, pipes


@pytest.fixture(scope="module")
async def phone_lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    why = netns_available()
    if why:
        pytest.fail(f"phone tests need a private network namespace: {why}", pytrace=False)
    tmp = tmp_path_factory.mktemp("phone")
    ns = NetNS()
    store, sup, pipes = make_lab(tmp, ns, 5080, max_calls=3)
    try:
        await sup.start(wait_ready_s=120)
        if not sup.health()["ok"]:
            logs = "\n".join(p.read_text(errors="replace")[-4000:] for p in (tmp / "logs").glob("*.log"))
            pytest.fail(f"the media worker did not come up: {sup.health()}\n{logs}", pytrace=False)
        yield PhoneLab(ns, tmp, sup.settings, store, pipes, tmp / "probe.jsonl", sup, 5080)
    finally:
        await sup.stop()
        ns.close()
        store.close()


@pytest.fixture
def netns() -> Iterator[NetNS]:
    why = netns_available()
    if why:
        pytest.fail(f"phone tests need a private network namespace: {why}", pytrace=False)
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.close()


# ------------------------------------------------------------------------------------------ greeting probe
# Added for tests/test_phone_speech.py; everything above is unchanged. Workers load this factory with
# SPEECHPIPE_SIP_AGENT_FACTORY=tests.fixtures_sip:greeting_probe_agent (see GREETING_FACTORY).

GREETING = ("Hello, you have reached the speech pipe test line. This greeting is long on purpose, "
            "so you can talk over it.")
SHORT_ANSWER = "Okay."
GREETING_FACTORY = "tests.fixtures_sip:greeting_probe_agent"


class GreetingProbe(ProbeAgent):
    """probe-greet: says GREETING when the call starts and answers every user turn with SHORT_ANSWER
    (short, so it fits in the pause before a caller's next sentence)."""

    async def send(self, message: dict[str, Any]) -> None:
        if self._closed:
            raise AgentGone("closed")
        self._log(message)
        kind = message.get("type")
        if kind == msg.CALL_STARTED:
            await self._out.put({"type": msg.SAY, "text": GREETING})
        elif kind == msg.USER_TEXT:
            turn = int(message["turn_id"])
            await self._out.put({"type": msg.TEXT_DELTA, "turn_id": turn, "text": SHORT_ANSWER})
            await self._out.put({"type": msg.TEXT_END, "turn_id": turn})


async def greeting_probe_agent(session: Any) -> AgentLink | None:
    """`probe_agent` plus the probe-greet behaviour."""
    if session.info.agent_id == "probe-greet":
        return GreetingProbe("probe-greet", str(session.session_id), os.environ["PROBE_LOG"])
    return await probe_agent(session)
