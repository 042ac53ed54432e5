"""Web sessions under load: N concurrent raw WebSocket clients, real speech, real engines.

    .venv/bin/python -m bench.web_sessions                    # 1, 5, 10, 15 sessions; 5 turns each
    .venv/bin/python -m bench.web_sessions --sessions 1,3,5 --turns 8

Runs the real app (client WebSocket, SQLite storage, whisper tiny.en, espeak-ng, the in-process echo agent)
on a loopback port; each client streams espeak-ng sentences at real time in 20 ms frames with 16 kHz in
and out, reads everything the server sends, and waits for the reply before its next sentence. Clients
start staggered over one turn so their turns do not all end on the same frame.

Figures, per concurrency level:
- response latency (docs/architecture.md § Timing definitions): end of the user's speech (the last voiced
  10 ms of the sentence sent) to the first agent audio frame received, p50/p95 over every turn
  (the endpointing named beside it).
  The server's own figure (`metric` events: last voiced frame → first frame out) is shown too.
- real time: how late each agent audio frame arrived against the pacing schedule (the first 100 ms of a
  reply at once, then one frame per 20 ms after the first arrived), p99 and max; and how late the
  server's pacing ticks ran (p99).
- accuracy: mean WER of the user turns.
A level "holds" when output frames are late by no more than 40 ms at p99 and mean WER stays ≤ 0.15; the
largest level that holds is printed as this machine's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.session import Engines
from speechpipe.settings import Settings
from speechpipe.storage import Store
from speechpipe.websocket_edge.client_ws import EdgeLimits
from tests.fixtures_web import start_web_server
from tests.speech import silence, synth, wer

RATE = 16000
FRAME = RATE // 50
SENTENCES = (
    "Hello, I would like to check the status of my order please.",
    "The delivery was supposed to arrive on Tuesday afternoon.",
    "Can you tell me when the pharmacy opens tomorrow?",
    "I need to change the delivery address on my account.",
    "Could you check whether my package has been shipped?",
    "Please send the invoice to my email address.",
)
LATE_BOUND_MS = 40.0
AHEAD_FRAMES = round(EdgeLimits().ahead_s / 0.02)
WER_BOUND = 0.15


@dataclass
class ClientResult:
    latencies_ms: list[float] = field(default_factory=list)
    server_latencies_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)
    wers: list[float] = field(default_factory=list)
    misheard: list[tuple[str, str]] = field(default_factory=list)
    missed: int = 0


def last_voiced_sample(pcm: np.ndarray) -> int:
    """End of the last 10 ms block within 40 dB of the loudest block: where the speech ends."""
    blocks = len(pcm) // 160
    rms = np.sqrt(np.mean(pcm[: blocks * 160].astype(np.float64).reshape(blocks, 160) ** 2, axis=1))
    voiced = np.nonzero(rms > rms.max() * 0.01)[0]
    return int((voiced[-1] + 1) * 160)


class PacedSender:
    """Sends 16 kHz int16 audio on a WebSocket in 20 ms frames on an absolute real-time schedule (a slow
    send does not shift the rest). `sent`: frames so far; frame k is due at `t0 + k * 0.02`."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.t0 = time.monotonic()
        self.sent = 0

    async def send(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), FRAME):
            await self.ws.send_bytes(pcm[i:i + FRAME].astype("<i2").tobytes())
            self.sent += 1
            await asyncio.sleep(max(0.0, self.t0 + self.sent * 0.02 - time.monotonic()))


async def client(url: str, turns: int, offset: int, start_delay_s: float) -> ClientResult:
    result = ClientResult()
    await asyncio.sleep(start_delay_s)
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_json({"type": "start", "sample_rate": RATE})
        audio: list[float] = []
        events: list[dict] = []

        async def read() -> None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    audio.append(time.monotonic())
                else:
                    events.append({"_t": time.monotonic(), **json.loads(msg.data)})

        reader = asyncio.ensure_future(read())
        line = PacedSender(ws)
        send = line.send

        for k in range(turns):
            sentence = SENTENCES[(offset + k) % len(SENTENCES)]
            speech = np.concatenate([synth(sentence), silence(200)])
            speech = np.pad(speech, (0, -len(speech) % FRAME))
            end_frame = line.sent + (last_voiced_sample(speech) + FRAME - 1) // FRAME
            n_done = sum(e["type"] == "agent.speech_done" for e in events)
            n_audio = len(audio)
            await send(speech)
            speech_end = line.t0 + end_frame * 0.02  # when the last voiced frame was due to leave
            # Silence while the agent answers, until its reply has been fully sent (or 15 s pass).
            deadline = time.monotonic() + 15
            def answered() -> bool:
                return sum(e["type"] == "agent.speech_done" for e in events) > n_done  # noqa: B023

            while not answered() and time.monotonic() < deadline:
                await send(silence(100))
            await send(silence(300))
            reply = audio[n_audio:]
            turn = [e for e in events if e["type"] == "user_turn"][-1:] if len(audio) > n_audio else []
            if not reply or not turn:
                result.missed += 1
                continue
            result.latencies_ms.append((reply[0] - speech_end) * 1000)
            result.wers.append(wer(sentence, turn[0]["text"]))
            if result.wers[-1] > WER_BOUND:
                result.misheard.append((sentence, turn[0]["text"]))
            # The pacer's schedule: the first AHEAD frames at once (the jitter allowance), then one per 20 ms.
            arrivals = np.asarray(reply) - reply[0]
            due = np.maximum(0, np.arange(len(arrivals)) - (AHEAD_FRAMES - 1)) * 0.02
            result.late_ms.extend((np.maximum(0.0, arrivals - due) * 1000).tolist())
        result.server_latencies_ms = [e["values"]["response_latency_ms"] for e in events
                                      if e["type"] == "metric" and e["name"] == "turn"]
        await ws.send_json({"type": "stop"})
        await asyncio.wait_for(reader, 10)
    return result


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_level(server, n: int, turns: int) -> dict:
    pipe = server.pipe("echo")
    urls = [server.ws_url(pipe, server.token(pipe)) for _ in range(n)]
    pacer_before = {id(c) for c in server.edge.connections}
    stagger = 3.0 / max(n, 1)
    tasks = [asyncio.ensure_future(client(u, turns, i, i * stagger)) for i, u in enumerate(urls)]
    await asyncio.sleep(1.0)
    pacers = [c.pacer for c in list(server.edge.connections) if id(c) not in pacer_before and c.pacer]
    results = await asyncio.gather(*tasks)
    late = [x for r in results for x in r.late_ms]
    lat = [x for r in results for x in r.latencies_ms]
    srv_lat = [x for r in results for x in r.server_latencies_ms]
    wers = [x for r in results for x in r.wers]
    ticks = [x for p in pacers for x in p.late_ms]
    row = {
        "sessions": n, "turns": len(lat), "missed": sum(r.missed for r in results),
        "lat_p50": pct(lat, 50), "lat_p95": pct(lat, 95),
        "srv_p50": pct(srv_lat, 50), "srv_p95": pct(srv_lat, 95),
        "late_p99": pct(late, 99), "late_max": max(late, default=float("nan")), "tick_p99": pct(ticks, 99),
        "wer": statistics.fmean(wers) if wers else float("nan"),
    }
    row["misheard"] = [m for r in results for m in r.misheard]
    row["holds"] = bool(row["missed"] == 0 and row["late_p99"] <= LATE_BOUND_MS and row["wer"] <= WER_BOUND)
    return row


def serve(data: Path) -> tuple[object, Store]:
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data / 'bench.db'}")
    settings.ensure_dirs()
    store = Store(settings.db_url)
    store.upgrade()
    engines = Engines()
    engines.stt(PipeConfig(agent_id="warmup"))  # load the model before any timing
    return start_web_server(settings, store, engines), store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="1,5,10,15", help="comma-separated concurrency levels")
    p.add_argument("--turns", type=int, default=5, help="turns per session")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = [int(x) for x in args.sessions.split(",")]
    ep = PipeConfig(agent_id="x").endpointing
    finished, undecided, unfinished = ep.silence_range_ms
    endpointing = (f"turn detector {ep.turn_detector}: {finished} ms after a finished sentence, "
                   f"{undecided}-{unfinished} ms otherwise")
    with tempfile.TemporaryDirectory(prefix="speechpipe-bench-") as tmp:
        server, store = serve(Path(tmp))
        try:
            print(f"response latency: end of user speech → first agent audio received "
                  f"({endpointing}); 'server' = the server's own metric")
            print(f"{'sessions':>8} {'turns':>5} {'missed':>6} {'p50 ms':>7} {'p95 ms':>7} "
                  f"{'server p50/p95':>15} {'late p99/max ms':>16} {'tick p99':>8} {'WER':>5}  holds")
            capacity = 0
            for n in levels:
                r = asyncio.run(run_level(server, n, args.turns))
                print(f"{r['sessions']:>8} {r['turns']:>5} {r['missed']:>6} {r['lat_p50']:>7.0f} "
                      f"{r['lat_p95']:>7.0f} {r['srv_p50']:>7.0f}/{r['srv_p95']:<7.0f} "
                      f"{r['late_p99']:>7.1f}/{r['late_max']:<8.1f} {r['tick_p99']:>8.1f} {r['wer']:>5.2f}  "
                      f"{'yes' if r['holds'] else 'NO'}", flush=True)
                for said, heard in r["misheard"][:3]:
                    print(f"{'':>8} misheard: {said!r} → {heard!r}")
                if r["holds"]:
                    capacity = max(capacity, n)
            print(f"capacity: this machine holds {capacity} concurrent web session(s) in real time "
                  f"(output late ≤ {LATE_BOUND_MS:.0f} ms at p99, WER ≤ {WER_BOUND}) among levels {levels}")
        finally:
            server.stop()
            store.close()


if __name__ == "__main__":
    main()
