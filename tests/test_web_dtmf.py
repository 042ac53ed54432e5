"""Web DTMF: a web client's `dtmf` message reaches a real runner's `dtmf` hook, digit by digit, in order.

The whole path is real: `create_app` with `serve`'s route groups (the client WebSocket and the agent channel,
whose hub is the web sessions' agent factory) listens on a loopback port in the test's loop; the probe runner
(tests/agent_probe.py, a subprocess) registers over the agent channel and logs every `dtmf` hook call; a
raw WebSocket client (or the test page in Chromium) opens a web session on the probe's pipe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from speechpipe.settings import Settings
from speechpipe.storage import Store
from speechpipe.websocket_edge.app import STORE_KEY, create_app
from speechpipe.websocket_edge.client_ws import CLIENT_EDGE_KEY, CLOSE_CODES, ClientEdge
from speechpipe.websocket_edge.keys import HUB_KEY

from .fixtures_agents import Channel, RunnerProc
from .fixtures_web import RawClient
from .speech import silence, write_wav

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

AGENT_ID = "probe"
WAIT_S = 60.0  # generous: the machine is shared with other test runs


@dataclass
class DtmfServer:
    url: str
    store: Store
    app: web.Application
    channel: Channel
    runner: RunnerProc
    pipe_id: str

    @property
    def edge(self) -> ClientEdge:
        return self.app[CLIENT_EDGE_KEY]

    def ws_url(self) -> str:
        token = self.store.mint_token(self.pipe_id).token
        return self.url.replace("http://", "ws://") + f"/v1/pipes/{self.pipe_id}/connect?token={token}"

    def digits(self) -> list[str]:
        """Every digit the probe's `dtmf` hook got, in order."""
        return [e["digit"] for e in self.runner.events("dtmf")]


@pytest.fixture
async def dtmf_server(agent_engines, tmp_path: Path) -> AsyncIterator[DtmfServer]:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, database_url=f"sqlite:///{tmp_path / 'speechpipe.db'}")
    settings.ensure_dirs()
    store = Store(settings.db_url)
    store.upgrade()
    app = create_app(settings, store)  # serve's route groups: web sessions get their agent from the hub
    app[CLIENT_EDGE_KEY].use(engines=agent_engines)  # the run's engines, loaded once
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    key = store.create_api_key("web-dtmf-tests")
    runners = tmp_path / "runners"
    runners.mkdir()
    channel = Channel(app[HUB_KEY], url, store, app[STORE_KEY], key.secret, runners, agent_engines)
    pipe_id = store.create_pipe({"agent_id": AGENT_ID}, name="dtmf-probe").id
    try:
        probe = await channel.runner(AGENT_ID)
        yield DtmfServer(url, store, app, channel, probe, pipe_id)
    finally:
        await channel.close()  # kills the runner
        await runner.cleanup()
        store.close()


async def started_with_agent(srv: DtmfServer, client: RawClient) -> str:
    """Send `start`; the session id once the probe's entrypoint runs (digits before that have no agent)."""
    await client.send_json({"type": "start", "sample_rate": 16000})
    (started,) = await client.wait_for("session.started", timeout_s=WAIT_S)
    sid = started["session_id"]
    await srv.runner.wait_event("call_start", lambda e: e["session_id"] == sid, within_s=WAIT_S)
    return sid


async def wait_digits(srv: DtmfServer, count: int) -> list[str]:
    for _ in range(int(WAIT_S / 0.05)):
        if len(srv.digits()) >= count:
            break
        await asyncio.sleep(0.05)
    return srv.digits()


async def test_web_dtmf_reaches_the_agents_dtmf_hook_in_order(dtmf_server, raw_connect) -> None:
    srv = dtmf_server
    client = await raw_connect(srv.ws_url())
    await started_with_agent(srv, client)
    await client.send_json({"type": "dtmf", "digits": "12#"})
    assert await wait_digits(srv, 3) == ["1", "2", "#"]
    # Lowercase a-d are the same keys as A-D; a second message follows the first.
    await client.send_json({"type": "dtmf", "digits": "0*ad"})
    assert await wait_digits(srv, 7) == ["1", "2", "#", "0", "*", "A", "D"]
    assert not client.of("error")
    await client.send_json({"type": "stop"})
    assert await client.closed(WAIT_S) == (1000, "normal: client_stop")
    await asyncio.sleep(0.3)
    assert srv.digits() == ["1", "2", "#", "0", "*", "A", "D"]  # one hook call per digit, nothing more


INVALID = [
    {"type": "dtmf", "digits": "12x"},  # a character that is no key
    {"type": "dtmf", "digits": "1 2"},
    {"type": "dtmf", "digits": "E"},
    {"type": "dtmf", "digits": ""},
    {"type": "dtmf", "digits": "1" * 33},
    {"type": "dtmf", "digits": 12},
    {"type": "dtmf", "digits": ["1"]},
    {"type": "dtmf", "digits": None},
    {"type": "dtmf"},
]


async def test_invalid_dtmf_messages_are_error_events_and_the_session_goes_on(dtmf_server,
                                                                              raw_connect) -> None:
    srv = dtmf_server
    srv.edge.limits = dataclasses.replace(srv.edge.limits, max_bad_messages=len(INVALID) + 5)
    client = await raw_connect(srv.ws_url())
    await client.send_json({"type": "dtmf", "digits": "1"})  # before `start`
    (early,) = await client.wait_for("error", timeout_s=WAIT_S)
    assert early["code"] == "not_started"
    await started_with_agent(srv, client)
    for message in INVALID:
        await client.ws.send_str(json.dumps(message))
    errors = await client.wait_for("error", 1 + len(INVALID), timeout_s=WAIT_S)
    assert [e["code"] for e in errors] == ["not_started"] + ["bad_message"] * len(INVALID)
    assert all("dtmf" in e["message"] for e in errors[1:])
    # The session goes on: the next valid digits arrive, and none of the refused ones (nor the early one) did.
    await client.send_json({"type": "dtmf", "digits": "5" * 32})
    assert await wait_digits(srv, 32) == ["5"] * 32
    await client.send_json({"type": "stop"})
    assert await client.closed(WAIT_S) == (1000, "normal: client_stop")


async def test_invalid_dtmf_messages_count_towards_the_bad_message_close(dtmf_server, raw_connect) -> None:
    srv = dtmf_server
    assert srv.edge.limits.max_bad_messages == 5
    client = await raw_connect(srv.ws_url())
    await started_with_agent(srv, client)
    for message in INVALID[:5]:
        await client.ws.send_str(json.dumps(message))
    code, reason = await client.closed(WAIT_S)
    assert [e["code"] for e in client.of("error")] == ["bad_message"] * 4  # the fifth closes instead
    assert code == CLOSE_CODES["bad_message"] and reason.startswith("bad_message: 5 invalid messages")
    assert srv.digits() == []


# ---------------------------------------------------------------------------------------- the test page

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
async def test_page_keypad_sends_dtmf_to_the_agent(dtmf_server, tmp_path: Path) -> None:
    if not await asyncio.to_thread(Path(CHROMIUM).exists):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium", pytrace=False)
    from playwright.async_api import async_playwright

    from .test_browser import open_page, wait_log

    srv = dtmf_server
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence(20000)]), 16000)
    token = srv.store.mint_token(srv.pipe_id).token
    async with async_playwright() as pw:
        browser, page, messages = await open_page(pw, wav, f"{srv.url}/?pipe={srv.pipe_id}&token={token}")
        try:
            assert await page.is_disabled('#keypad button[data-digit="1"]')  # no session yet
            await page.click("#start")
            await wait_log(page, "log.some(e => e.type === 'session.started')", WAIT_S, messages)
            sid = next(e for e in await page.evaluate("window.speechpipePage.log")
                       if e["type"] == "session.started")["session_id"]
            await srv.runner.wait_event("call_start", lambda e: e["session_id"] == sid, within_s=WAIT_S)
            for key in ["1", "2", "#", "0", "*"]:
                await page.click(f'#keypad button[data-digit="{key}"]')
            assert await wait_digits(srv, 5) == ["1", "2", "#", "0", "*"], messages
            # The agent answers "0" out loud: the page gets the reply and plays it to the end.
            await wait_log(page, "log.some(e => e.type === 'agent.speech_done' && !e.interrupted && "
                           "e.text.startsWith('You pressed zero'))", WAIT_S, messages)
            # The SDK checks digits itself: a bad one throws and sends nothing.
            thrown = await page.evaluate("""() => { try { window.speechpipePage.session.sendDtmf("12x");
                return null; } catch (e) { return e.name + ": " + e.message; } }""")
            assert thrown is not None and thrown.startswith("RangeError")
            assert await page.evaluate("window.speechpipePage.session.sendDtmf('b') ?? 'sent'") == "sent"
            assert await wait_digits(srv, 6) == ["1", "2", "#", "0", "*", "B"]
            log = await page.evaluate("window.speechpipePage.log")
            assert not [e for e in log if e["type"] == "error"], log
            await page.click("#stop")
            await wait_log(page, "log.some(e => e.type === 'close')", WAIT_S, messages)
            assert await page.is_disabled('#keypad button[data-digit="1"]')
        finally:
            await browser.close()
    assert srv.digits() == ["1", "2", "#", "0", "*", "B"]
