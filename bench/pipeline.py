"""Pipeline benchmark: multi-turn conversations at real-time pace, measured as docs/architecture.md
§ Timing definitions defines.

    .venv/bin/python -m bench.pipeline                 # everything (~10 min on 2 cores)
    .venv/bin/python -m bench.pipeline --turns 30 --sessions 1,6,10,12 --silence-ms 500
    .venv/bin/python -m bench.pipeline --rate 8000 --skip latency,vad,capacity   # the PCMU leg

Prints response latency p50/p95 (end of the user's last voiced frame → first agent frame leaving the
session) beside the endpoint silence; barge-in reaction p50/p95 (user speech onset → last agent frame
sent); false barge-ins on noise, coughs and backchannels; VAD frame accuracy for both engines; WER; and how
many concurrent sessions keep real time (p99 tick lateness ≤ 40 ms, WER unchanged) with CPU and memory per
session. The agent answers instantly (an in-process CallbackAgent), so the figures are the pipeline's own.

`--rate 8000` runs the session as a G.711 call delivers it: 8 kHz in and out, every sound μ-law
round-tripped. Barge-in trials interrupt with espeak sentences and with real recorded speech
(tests/realspeech.py, wideband or telephone version by leg) in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import time
from collections.abc import Callable

import numpy as np

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.agent import CallbackAgent
from speechpipe.pipeline.config import PipeConfig
from speechpipe.pipeline.realtime import RealtimeLine
from speechpipe.pipeline.session import Engines, PipelineSession, SessionInfo
from tests import realspeech, sounds
from tests.speech import g711_roundtrip, resample, synth, wer

SENTENCES = [
    "I would like to book a table for dinner on Friday.",
    "Can you tell me when the pharmacy opens tomorrow?",
    "I want to speak to a person please.",
    "Please check the status of my order.",
    "Is the swimming pool open on Sunday morning?",
    "I need to change the address on my account.",
    "Could you send me the receipt by email?",
    "What time does the last train leave tonight?",
    "My package has not arrived yet.",
    "Thank you, that is all for today.",
]
LONG_REPLY = ("Thank you for calling. Our opening hours are from nine in the morning until six in the "
              "evening on weekdays, and from ten until four on Saturdays. We are closed on Sundays and "
              "on public holidays.")
INTERRUPTIONS = ["Stop, I want to speak to a person please.", "Wait, that is not what I asked.",
                 "No, I need the address instead."]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


RATE = 16000  # the leg: 16000 (web) or 8000 (PCMU), set by --rate
REAL_INTERRUPTIONS = ["conf-invalid", "vm-sorry", "please-try-call-later"]


def leg(pcm16k: np.ndarray) -> np.ndarray:
    """A 16 kHz sound as this leg carries it: unchanged, or 8 kHz μ-law."""
    return pcm16k if RATE == 16000 else g711_roundtrip(resample(pcm16k, 16000, 8000))


def real(name: str) -> np.ndarray:
    u = realspeech.prompt(name)
    return np.asarray(realspeech.wideband(u) if RATE == 16000 else realspeech.telephone(u))


class Run:
    def __init__(self, engines: Engines, config: PipeConfig, reply: Callable[[str], str]) -> None:
        direction = "web" if RATE == 16000 else "inbound_phone"
        self.session = PipelineSession(SessionInfo("pipe_bench", config.agent_id, direction), config, engines,
                                       input_rate=RATE, output_rate=RATE)
        self.line = RealtimeLine(self.session)
        self.events: list[ev.Event] = []
        self.session.subscribe(self.events.append)
        self.reply = reply

    async def start(self) -> None:
        await self.session.start()
        await self.session.attach_agent(CallbackAgent(self.reply))

    def of(self, kind: type[ev.Event]) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    async def turn(self, sentence: str, timeout_s: float = 15) -> bool:
        n = len(self.of(ev.AgentSpeechDone))
        await self.line.play(leg(synth(sentence)))
        ok = await self.line.until(lambda: len(self.of(ev.AgentSpeechDone)) > n, timeout_s)
        await self.line.silence(0.3)
        return ok


async def conversation(engines: Engines, turns: int, silence_ms: int) -> dict:
    config = PipeConfig(agent_id="bench", endpointing={"silence_ms": silence_ms})
    run = Run(engines, config, lambda text: "Okay.")
    await run.start()
    for i in range(turns):
        await run.turn(SENTENCES[i % len(SENTENCES)])
    await run.session.end("bench")
    users = run.of(ev.UserTurn)
    wers = [wer(SENTENCES[i % len(SENTENCES)], u.text) for i, u in enumerate(users)]
    latency = [m.values["response_latency_ms"] for m in run.of(ev.Metric) if m.name == "turn"]
    return {"turns": len(users), "latency": latency, "wer": float(np.mean(wers)) if wers else float("nan"),
            "stt_ms": run.session.metrics["stt_ms"]}


async def barge_ins(engines: Engines, trials: int) -> dict:
    reactions, cut = [], 0
    for i in range(trials):
        run = Run(engines, PipeConfig(agent_id="bench"), lambda text: LONG_REPLY)
        await run.start()
        await run.line.play(leg(synth("What are your opening hours?")))
        await run.line.until(lambda r=run: r.of(ev.AgentSpeechStarted), 10)
        await run.line.silence(1.0 + 0.37 * i)
        use_real = i % 2 == 1 and not realspeech.missing()
        speech = real(REAL_INTERRUPTIONS[i // 2 % 3]) if use_real else leg(synth(INTERRUPTIONS[i // 2 % 3]))
        # Onset measured from the audio itself (first 10 ms above -40 dBFS), not from the VAD's view of it.
        lead = int(np.argmax(np.abs(speech.astype(np.int32)) > 328)) // (RATE // 100) * 10
        onset_ms = run.line.ticks * 20 + lead
        await run.line.play(speech)
        await run.line.silence(0.3)
        cut += bool(run.of(ev.BargeIn))
        if run.of(ev.BargeIn):
            out = run.line.received().reshape(-1, RATE // 50)
            # The last agent frame of the run that was playing at onset (a 200 ms gap ends the run).
            voiced = np.flatnonzero(np.abs(out[onset_ms // 20:]).max(axis=1) > 0)
            gaps = np.diff(voiced) if len(voiced) else []
            run_end = next((int(v) for v, g in zip(voiced, gaps, strict=False) if g > 10),
                           int(voiced[-1]) if len(voiced) else -1)
            last = onset_ms // 20 + run_end
            reactions.append(max(0, (last + 1) * 20 - onset_ms))
        await run.session.end("bench")
    return {"trials": trials, "cut": cut, "reaction": reactions}


def noise_set() -> dict[str, np.ndarray]:
    return {
        "cough": sounds.cough(),
        "two coughs": np.concatenate([sounds.cough(), sounds.silence(150), sounds.cough(seed=1)]),
        "click": sounds.click(),
        "white -30 dBFS 0.8 s": sounds.white_noise(800, -30),
        "pink -25 dBFS 1.5 s": sounds.pink_noise(1500, -25),
        "hum -25 dBFS 1 s": sounds.hum(1000, -25),
        "okay": synth("okay"),
        "right": synth("right"),
        "uh-huh": synth("uh-huh"),
        "yes": synth("yes"),
    }


async def false_barge_ins(engines: Engines) -> dict[str, int]:
    out = {}
    for name, sound in noise_set().items():
        run = Run(engines, PipeConfig(agent_id="bench"), lambda text: LONG_REPLY)
        await run.start()
        await run.line.play(leg(synth("What are your opening hours?")))
        await run.line.until(lambda r=run: r.of(ev.AgentSpeechStarted), 10)
        await run.line.silence(1.0)
        await run.line.play(leg(sound))
        await run.line.silence(1.0)
        out[name] = len(run.of(ev.BargeIn))
        await run.session.end("bench")
    return out


async def capacity(engines: Engines, n: int, turns: int) -> dict:
    gc.collect()
    rss0 = rss_mb()
    runs = [Run(engines, PipeConfig(agent_id="bench"), lambda text: "Okay, noted.") for _ in range(n)]
    for r in runs:
        await r.start()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()

    async def talk(k: int, r: Run) -> None:
        await r.line.silence(0.1 * k)  # stagger so turns do not all end on the same frame
        for i in range(turns):
            await r.turn(SENTENCES[(k + i) % len(SENTENCES)], timeout_s=30)

    await asyncio.gather(*(talk(k, r) for k, r in enumerate(runs)))
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
    rss1 = rss_mb()
    late = [x for r in runs for x in r.line.late_ms]
    wers = []
    for k, r in enumerate(runs):
        for i, u in enumerate(r.of(ev.UserTurn)):
            wers.append(wer(SENTENCES[(k + i) % len(SENTENCES)], u.text))
    latency = [m.values["response_latency_ms"] for r in runs for m in r.of(ev.Metric) if m.name == "turn"]
    answered = sum(len(r.of(ev.AgentSpeechDone)) for r in runs)
    partials = sum(len(r.of(ev.UserPartial)) for r in runs)
    shed = sum(r.session.counts["partials_shed"] for r in runs)
    for r in runs:
        await r.session.end("bench")
    cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime)
    return {"n": n, "late_p99": pct(late, 99), "late_max": max(late) if late else 0.0,
            "wer": float(np.mean(wers)) if wers else float("nan"),
            "answered": answered, "expected": n * turns,
            "latency_p50": pct(latency, 50), "latency_p95": pct(latency, 95),
            "cpu_per_session": cpu / wall / n * 100, "rss_per_session": (rss1 - rss0) / n,
            "partials": partials, "shed": shed}


def vad_accuracy() -> list[tuple[str, dict]]:
    from bench.vad_accuracy import build_cases, engines, label, measure_vad_accuracy

    cases = build_cases()
    return [(label(v), measure_vad_accuracy(v, cases)) for v in engines()]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--silence-ms", type=int, default=500)
    ap.add_argument("--barge-trials", type=int, default=12)
    ap.add_argument("--sessions", default="1,4,8,10,12")
    ap.add_argument("--capacity-turns", type=int, default=3)
    ap.add_argument("--rate", type=int, choices=(16000, 8000), default=16000,
                    help="the leg: 16000 (web) or 8000 (a PCMU call: 8 kHz, μ-law)")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: latency,barge,false,vad,capacity")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    global RATE
    RATE = args.rate
    engines = Engines()
    engines.stt(PipeConfig(agent_id="warmup"))
    print(f"Speech Pipe pipeline benchmark · {os.cpu_count()} cores · whisper tiny.en int8 · silero VAD · "
          f"{'web 16 kHz' if RATE == 16000 else 'PCMU 8 kHz (μ-law)'}\n")

    if "latency" not in skip:
        c = await conversation(engines, args.turns, args.silence_ms)
        lat = c["latency"]
        s = args.silence_ms
        print(f"Response latency over {len(lat)} turns (endpoint silence {s} ms): p50 {pct(lat, 50):.0f} ms, "
              f"p95 {pct(lat, 95):.0f} ms  (targets ≤ {s + 150} / ≤ {s + 300} ms)")
        print(f"  STT decode at the endpoint p50 {pct(c['stt_ms'], 50):.0f} ms · WER {c['wer']:.3f} "
              f"over {c['turns']} turns\n")
    if "barge" not in skip:
        b = await barge_ins(engines, args.barge_trials)
        print(f"Barge-in: {b['cut']}/{b['trials']} interruptions cut the agent; reaction p50 "
              f"{pct(b['reaction'], 50):.0f} ms, p95 {pct(b['reaction'], 95):.0f} ms (target p95 ≤ 200 ms)\n")
    if "false" not in skip:
        f = await false_barge_ins(engines)
        print(f"False barge-ins on the noise/cough/backchannel set: {sum(f.values())} of {len(f)}")
        for name, count in f.items():
            print(f"  {name:24s} {count}")
        print()
    if "vad" not in skip:
        print("VAD frame accuracy (bench/vad_accuracy.py cases):")
        for name, r in vad_accuracy():
            o = r["overall"]
            print(f"  {name:14s} speech accuracy {o['speech_accuracy']:.3f}  "
                  f"recall {o['speech_recall']:.3f}  false speech in gaps {o['gap_fpr']:.3f}  "
                  f"on noise {o['noise_fpr']:.3f}  "
                  f"onset {o['onset_ms']} ms  {o['cpu_us_per_frame']:.0f} µs/frame")
        print()
    if "capacity" not in skip:
        print("Concurrent sessions (one process, one event loop, shared models):")
        print("  n   late p99  late max  WER    answered  resp p50  resp p95  CPU%/session  MB/session  "
              "partials sent/shed")
        for n in (int(x) for x in args.sessions.split(",")):
            r = await capacity(engines, n, args.capacity_turns)
            ok = r["late_p99"] <= 40 and r["answered"] == r["expected"]
            verdict = "real time" if ok else "LATE"
            print(f"  {n:<3d} {r['late_p99']:6.1f} ms {r['late_max']:6.0f} ms  {r['wer']:.3f}  "
                  f"{r['answered']:3d}/{r['expected']:<3d}  {r['latency_p50']:6.0f} ms "
                  f"{r['latency_p95']:6.0f} ms  {r['cpu_per_session']:8.1f}     "
                  f"{r['rss_per_session']:6.1f}  {r['partials']:5d}/{r['shed']:<5d}  {verdict}")


if __name__ == "__main__":
    asyncio.run(main())
