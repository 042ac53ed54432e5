"""Talk to a Speech Pipe pipe from a WAV file over a plain WebSocket, and print the conversation.

Needs only `aiohttp` (any WebSocket library works the same way; the protocol is in
docs/client-protocol.md). Mint a token with your API key, then stream a WAV:

    TOKEN=$(curl -s -X POST http://127.0.0.1:8780/v1/sessions/tokens \\
              -H "Authorization: Bearer $SPEECHPIPE_API_KEY" -d '{"pipe_id": "pipe_..."}' | jq -r .token)
    python examples/raw_client.py --url ws://127.0.0.1:8780 --pipe pipe_... --token "$TOKEN" hello.wav

In demo mode (`speechpipe serve --demo`), leave out --pipe and --token: the demo endpoint supplies both.
The WAV (mono or stereo PCM16, any rate) is resampled to 16 kHz and sent in 20 ms frames at real time, the
way a microphone would; the agent's audio can be saved with --save-reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave

import aiohttp
import numpy as np

RATE = 16000
FRAME = RATE // 50  # 20 ms


def read_wav(path: str, rate: int = RATE) -> np.ndarray:
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise SystemExit(f"{path}: only 16-bit PCM WAV files are supported")
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())[:, 0]
        src = w.getframerate()
    if src != rate:  # plain linear interpolation keeps this example dependency-free
        t = np.arange(int(len(pcm) * rate / src)) * src / rate
        pcm = np.interp(t, np.arange(len(pcm)), pcm.astype(np.float64))
    return np.asarray(pcm, np.int16)


async def demo_token(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    async with http.post(base.replace("ws", "http", 1) + "/v1/demo/token") as resp:
        body = await resp.json()
        if resp.status != 201:
            raise SystemExit(f"demo token: {body.get('error', body)}")
        return body["pipe_id"], body["token"]


async def talk(url: str, pipe: str | None, token: str | None, pcm: np.ndarray, *, tail_s: float,
               save_reply: str | None) -> int:
    async with aiohttp.ClientSession() as http:
        if not (pipe and token):
            pipe, token = await demo_token(http, url)
        async with http.ws_connect(f"{url}/v1/pipes/{pipe}/connect", params={"token": token}) as ws:
            await ws.send_json({"type": "start", "sample_rate": RATE})
            reply = bytearray()
            done = asyncio.Event()

            async def receive() -> None:
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        reply.extend(msg.data)
                        continue
                    event = json.loads(msg.data)
                    kind = event["type"]
                    if kind == "session.started":
                        print(f"session {event['session_id']} started", flush=True)
                    elif kind == "user_turn":
                        print(f"you:   {event['text']}", flush=True)
                    elif kind == "agent_reply":
                        print(f"agent: {event['text']}", flush=True)
                    elif kind == "barge_in":
                        print(f"       (cut off; you heard: {event['heard_text']!r})", flush=True)
                    elif kind == "metric" and event["name"] == "turn":
                        ms = event["values"]["response_latency_ms"]
                        print(f"       response latency {ms:.0f} ms", flush=True)
                    elif kind == "error":
                        print(f"error {event['code']}: {event['message']}", file=sys.stderr, flush=True)
                    elif kind == "session.ended":
                        print(f"session ended: {event['reason']}", flush=True)
                done.set()

            reader = asyncio.ensure_future(receive())
            # Real time, on an absolute schedule: the server rate-limits audio that runs far ahead.
            audio = np.concatenate([pcm, np.zeros(int(tail_s * RATE), np.int16)])
            t0 = time.monotonic()
            for i, start in enumerate(range(0, len(audio), FRAME)):
                if done.is_set():
                    break
                await ws.send_bytes(audio[start:start + FRAME].astype("<i2").tobytes())
                await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
            if not done.is_set():
                await ws.send_json({"type": "stop"})
            await asyncio.wait_for(reader, 15)
            print(f"closed: {ws.close_code} {ws.exception() or ''}".rstrip(), flush=True)
    if save_reply:
        with wave.open(save_reply, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(bytes(reply))
    return 0 if ws.close_code == 1000 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wav", help="16-bit PCM WAV file to speak")
    p.add_argument("--url", default="ws://127.0.0.1:8780", help="server base URL (ws:// or wss://)")
    p.add_argument("--pipe", help="pipe id (default: the demo pipe)")
    p.add_argument("--token", help="session token (default: ask the demo endpoint)")
    p.add_argument("--tail", type=float, default=8.0, help="seconds of silence after the WAV (to answer)")
    p.add_argument("--save-reply", help="write the agent's audio to this WAV file")
    args = p.parse_args()
    return asyncio.run(talk(args.url.rstrip("/"), args.pipe, args.token, read_wav(args.wav),
                            tail_s=args.tail, save_reply=args.save_reply))


if __name__ == "__main__":
    sys.exit(main())
