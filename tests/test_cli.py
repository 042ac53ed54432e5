"""The `speechpipe` command as users run it: real subprocesses of the installed entry point."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from speechpipe.client import AsyncClient
from speechpipe.storage import Store
from speechpipe.storage.migrate import head_revision
from tests.fixtures_db import DbFactory
from tests.procs import stop_process

SPEECHPIPE = str(Path(sys.executable).parent / "speechpipe")


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHPIPE_")}
    return {**env, "SPEECHPIPE_DATA_DIR": str(data_dir), **extra}


def run(data_dir: Path, *args: str, ok: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([SPEECHPIPE, *args], env=cli_env(data_dir, **extra), capture_output=True, text=True,
                          timeout=120)
    if ok:
        assert proc.returncode == 0, f"speechpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_demo_creates_once_then_shows_the_same_key_and_pipe(tmp_path: Path) -> None:
    first = run(tmp_path, "demo")
    db_path = tmp_path / "speechpipe.db"
    assert "created the demo API key and pipe" in first.stdout
    assert str(tmp_path) in first.stdout and str(db_path) in first.stdout
    key = re.search(r"API key:\s+(spk_\S+)", first.stdout).group(1)
    pipe = re.search(r"pipe:\s+(pipe_\w+)", first.stdout).group(1)

    again = json.loads(run(tmp_path, "demo", "--json").stdout)
    assert (again["api_key"], again["pipe_id"], again["created"]) == (key, pipe, False)
    assert again["db_path"] == str(db_path) and again["agent_id"] == "demo-echo"
    saved = tmp_path / "demo.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600  # it holds a secret
    store = Store(f"sqlite:///{db_path}")
    try:
        assert store.verify_api_key(key).id == again["api_key_id"]
        assert store.get_pipe(pipe).agent_id == "demo-echo"
    finally:
        store.close()


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    created = json.loads(run(tmp_path, "keys", "create", "--name", "backend", "--json").stdout)
    assert created["secret"].startswith("spk_") and created["name"] == "backend"
    plain = run(tmp_path, "keys", "create")
    assert "shown only once" in plain.stdout
    listed = json.loads(run(tmp_path, "keys", "list", "--json").stdout)
    assert len(listed) == 2 and all("secret" not in k for k in listed)
    assert created["secret"] not in run(tmp_path, "keys", "list").stdout
    revoked = run(tmp_path, "keys", "revoke", created["id"])
    assert f"revoked API key {created['id']}" in revoked.stdout
    after = {k["id"]: k for k in json.loads(run(tmp_path, "keys", "list", "--json").stdout)}
    assert after[created["id"]]["revoked_at"] is not None
    missing = run(tmp_path, "keys", "revoke", "key_000000000000000000000000", ok=False)
    assert missing.returncode == 2 and "api_key_not_found" in missing.stderr


def test_pipes_create_list(tmp_path: Path) -> None:
    made = json.loads(run(tmp_path, "pipes", "create", "--agent-id", "sales", "--name", "Sales",
                          "--json").stdout)
    assert made["agent_id"] == "sales" and made["config"]["stt"]["engine"] == "whisper"
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps({"agent_id": "ivr", "endpointing": {"silence_ms": 900},
                               "sip_extension": "2000"}))
    from_file = json.loads(run(tmp_path, "pipes", "create", "--config", f"@{cfg}", "--json").stdout)
    assert from_file["config"]["endpointing"]["silence_ms"] == 900
    listed = run(tmp_path, "pipes", "list")
    assert made["id"] in listed.stdout and from_file["id"] in listed.stdout and "ivr" in listed.stdout
    bad = run(tmp_path, "pipes", "create", "--config", '{"agent_id": "x", "tts": {"pitch": 500}}', ok=False)
    assert bad.returncode == 2 and "validation_error" in bad.stderr and "pitch" in bad.stderr
    assert run(tmp_path, "pipes", "create", ok=False).returncode == 2  # no agent id


def test_db_upgrade_on_an_empty_database(db_factory: DbFactory, tmp_path: Path) -> None:
    url = db_factory.new_url()
    out = run(tmp_path, "--database-url", url, "db", "upgrade")
    assert f"schema revision {head_revision()}" in out.stdout
    store = Store(url)
    try:
        assert store.list_api_keys() == [] and store.list_pipes().items == []
    finally:
        store.close()


def test_bad_settings_exit_with_a_message(tmp_path: Path) -> None:
    proc = run(tmp_path, "keys", "list", ok=False, SPEECHPIPE_PORT="eighty")
    assert proc.returncode == 2 and "SPEECHPIPE_PORT must be an integer" in proc.stderr


class Serve:
    """`speechpipe serve --port 0` as a subprocess; collects its stdout lines."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen([SPEECHPIPE, "serve", "--port", "0", *args], env=cli_env(data_dir),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, "serve exited early:\n" + "".join(self.output)
                continue
            self.output.append(line)
            if needle in line:
                return line
        raise AssertionError(f"serve never printed {needle!r}:\n" + "".join(self.output))

    def stop(self) -> int | None:
        return stop_process(self.proc)


@pytest.fixture
def serve_factory() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        s.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def wait_healthy(base: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def test_serve_prints_its_urls_and_serves_tokens_into_sqlite(tmp_path: Path,
                                                                   serve_factory: list[Serve]) -> None:
    key = json.loads(run(tmp_path, "keys", "create", "--name", "backend", "--json").stdout)["secret"]
    pipe_id = json.loads(run(tmp_path, "pipes", "create", "--agent-id", "support", "--json").stdout)["id"]
    server = Serve(tmp_path)
    serve_factory.append(server)
    base = server.wait_for("listening on").split("listening on", 1)[1].strip()
    labels = ("REST API", "OpenAPI", "client WebSocket", "agent channel", "test page", "health:", "metrics:")
    banner = "".join(server.output) + "".join(server.wait_for(m) for m in labels)
    ws = "ws" + base[4:]
    for url in (f"{base}/v1", f"{ws}/v1/pipes/{{pipe_id}}/connect", f"{ws}/v1/agents/connect", f"{base}/",
                f"{base}/healthz", f"{base}/v1/openapi.json", f"{base}/metrics"):
        assert url in banner, (url, banner)
    assert str(tmp_path) in banner and "speechpipe.db" in banner
    assert wait_healthy(base)["status"] == "ok"
    assert "speechpipe_sessions_live" in fetch(base + "/metrics")

    # The README's flow: a backend mints a token with AsyncClient ...
    async with AsyncClient(api_key=key, base_url=base) as client:
        token = await client.sessions.create_token(pipe_id=pipe_id, metadata={"user_id": "u1"})
    # ... the pipeline redeems it and writes the session (the WebSocket edge does this in production) ...
    db = tmp_path / "speechpipe.db"
    store = Store(f"sqlite:///{db}")
    try:
        grant = store.redeem_token(token.token, pipe_id)
        sid = store.create_session(pipe_id, "support", "web", metadata=grant.metadata)
        store.add_turn(sid, 0, "user", "hello", 0, 700)
        store.end_session(sid, "client_closed")
    finally:
        store.close()
    # ... and the user reads the rows with plain SQL in the sqlite3 shell, while the server runs.
    def sql(query: str) -> str:
        proc = subprocess.run(["sqlite3", str(db), query], capture_output=True, text=True, check=True)
        return proc.stdout.strip()

    row = sql("SELECT id, pipe_id, direction, json_extract(metadata, '$.user_id'), end_reason FROM sessions")
    assert row == f"{sid}|{pipe_id}|web|u1|client_closed"
    assert sql("SELECT role || ': ' || text FROM turns ORDER BY seq") == "user: hello"
    token_row = sql("SELECT token_hash, used_at IS NOT NULL FROM session_tokens")
    assert token_row == f"{hashlib.sha256(token.token.encode()).hexdigest()}|1"

    assert server.stop() == 0
    assert any("shutting down" in line for line in [*server.output, *list(server.lines.queue)])


def test_serve_demo_mode_prints_the_demo_key_and_mints_demo_tokens(tmp_path: Path,
                                                                   serve_factory: list[Serve]) -> None:
    server = Serve(tmp_path, "--demo")
    serve_factory.append(server)
    base = server.wait_for("listening on").split("listening on", 1)[1].strip()
    key_line = server.wait_for("API key:")
    pipe_line = server.wait_for("pipe:")
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo["api_key"] in key_line and demo["pipe_id"] in pipe_line
    wait_healthy(base)
    req = urllib.request.Request(base + "/v1/demo/token", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as resp:
        tok = json.loads(resp.read())
    assert resp.status == 201 and tok["pipe_id"] == demo["pipe_id"]
    assert server.stop() == 0
