"""The test page's Session panel in Debian's Chromium: live figures while the session runs, then the end
reason and the summary the server stored in `sessions.metrics`, which must equal what SQL holds.

A WAV file is the microphone: a question to the `long-talker` agent, then an interruption over its reply.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from .fixtures_web import ARTIFACTS
from .speech import silence, synth, write_wav
from .test_browser import open_page, page_log, playwright_instance, wait_log  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

PANEL = ("sv-state", "sv-turns", "sv-last", "sv-avg", "sv-interruptions", "sv-end-reason", "sv-p50", "sv-p95",
         "sv-latencies")


async def panel(page) -> dict[str, str]:
    return {i: (await page.text_content(f"#{i}") or "").strip() for i in PANEL}


def js_round(x: float) -> int:
    return math.floor(x + 0.5)  # Math.round: halves go up (Python's round() goes to even)


async def test_session_panel_shows_live_figures_then_what_sql_stored(web_server, playwright_instance,  # noqa: F811
                                                                     tmp_path):
    srv = web_server
    pipe = srv.pipe("long-talker")
    wav = tmp_path / "mic.wav"
    mic = np.concatenate([silence(1500), synth("What are your opening hours?"), silence(4500),
                          synth("I want to speak to a person please."), silence(8000)])
    write_wav(wav, mic, 16000)
    browser, page, messages = await open_page(playwright_instance, wav,
                                              f"{srv.url}/?pipe={pipe}&token={srv.token(pipe)}")
    try:
        assert (await panel(page))["sv-state"] == "not started"
        await page.click("#start")
        # Live, after the first answer starts: one turn, its latency as last and average, no interruption.
        await wait_log(page, "log.some(e => e.type === 'metric' && e.name === 'turn')", 40, messages)
        first = next(e["values"]["response_latency_ms"] for e in await page_log(page)
                     if e["type"] == "metric" and e["name"] == "turn")
        live = await panel(page)
        assert (live["sv-state"], live["sv-turns"], live["sv-interruptions"]) == ("live", "1", "0"), live
        assert live["sv-last"] == live["sv-avg"] == str(js_round(first)), live
        assert live["sv-end-reason"] == live["sv-latencies"] == "–"

        # The user cuts the long reply off; the agent answers the interruption too.
        await wait_log(page, "log.filter(e => e.type === 'metric' && e.name === 'turn').length === 2", 40,
                       messages)
        log = await page_log(page)
        latencies = [e["values"]["response_latency_ms"] for e in log
                     if e["type"] == "metric" and e["name"] == "turn"]
        assert len([e for e in log if e["type"] == "barge_in"]) == 1
        live = await panel(page)
        assert (live["sv-turns"], live["sv-interruptions"]) == ("2", "1"), live
        assert live["sv-last"] == str(js_round(latencies[1]))
        assert live["sv-avg"] == str(js_round(sum(latencies) / 2))

        await page.click("#stop")
        await wait_log(page, "log.some(e => e.type === 'close')", 15, messages)
        started = next(e for e in await page_log(page) if e["type"] == "session.started")
        shown = await panel(page)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-session-view.png"))
    finally:
        await browser.close()

    rec = await srv.ended(started["session_id"])
    m = rec.metrics
    assert rec.end_reason == "client_stop"
    assert (m["user_turns"], m["interruptions"]) == (2, 1), m
    assert m["agent_turns"] >= 2  # the cut reply and the answer to the interruption (cut by the stop)
    assert [abs(s - x) <= 1 for s, x in zip(m["turn_latencies_ms"], latencies, strict=True)] == [True, True]
    assert m["response_ms"]["count"] == 2 and m["barge_in_ms"]["count"] == 1
    # The panel's ended view is exactly the stored row.
    assert shown == {
        "sv-state": "ended", "sv-turns": "2", "sv-interruptions": "1", "sv-end-reason": "client_stop",
        "sv-last": live["sv-last"], "sv-avg": live["sv-avg"],
        "sv-p50": str(js_round(m["response_ms"]["p50"])), "sv-p95": str(js_round(m["response_ms"]["p95"])),
        "sv-latencies": ", ".join(str(v) for v in m["turn_latencies_ms"]),
    }, (shown, m)
