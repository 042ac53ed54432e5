"""Phone calls under load: concurrent SIPp calls with real speech over every media worker.

    .venv/bin/python -m bench.phone_calls                          # 2 workers; 1, 2, 4, 6 calls; 3 turns
    .venv/bin/python -m bench.phone_calls --workers 1 --calls 1,2,3,4 --turns 4

Needs root (a private network namespace: nothing leaves loopback), sipp, espeak-ng. The real supervisor
starts the workers (pjsua2, Silero VAD, whisper tiny.en, espeak-ng; the probe agent answers every turn
with one fixed sentence). Each level's calls are spread evenly over the workers (one SIPp per worker) and
their starts evenly over one turn (`--no-stagger`: all at once, so every turn ends on the same frame, the
STT's worst case); every call plays the same G.711 pcap: questions, each followed by silence long enough
for the answer.

Figures, per concurrency level:
- response latency (docs/architecture.md § Timing definitions, phone path): the last voiced 10 ms of the
  caller's speech as it reached the worker to the first agent sample handed to the conference bridge (the
  worker's `metric` per turn), p50/p95 over every turn, endpointing silence named beside it;
- frames late: bridge ticks that ran > 40 ms behind the 20 ms schedule (out) and caller frames the event
  loop took > 40 ms to take (in), over all frames; the worst lateness;
- CPU per call: the workers' user+system CPU time over the level, per second of call (% of one core);
- accuracy: mean WER of the user turns.
A level holds when late frames stay under 1 % (p99 within 40 ms), WER ≤ 0.15 and every call was
answered. Calls held per machine: the largest level that held here, and what the measured CPU per call
allows on this machine's cores (the number SIPp cannot reach on a 2-core box shared with the engines).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from speechpipe.telephony.sip_checks import RtpStream, scenario
from tests.fixtures_sip import NetNS, make_lab, netns_available, read_jsonl
from tests.speech import synth, wer

SENTENCES = ["What time does the library open tomorrow?", "Can I bring my dog on the train?",
             "I need to change my address."]
ANSWER_GAP_S = 5.0  # silence after each question: the answer (~2.5 s) plus the response latency


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of one process (and its reaped children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _delayed(delay_s: float, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    await asyncio.sleep(delay_s)
    return await asyncio.to_thread(subprocess.run, argv, cwd=cwd, capture_output=True, text=True)


def build_pcap(path: Path, turns: int) -> tuple[Path, float]:
    stream = RtpStream().silence(300)
    for i in range(turns):
        stream.speech(synth(SENTENCES[i % len(SENTENCES)], rate=8000)).silence(ANSWER_GAP_S * 1000)
    return stream.write_pcap(path), stream.duration_s


async def run_level(lab: dict[str, Any], level: int, turns: int, pcap: Path, seconds: float,
                    stagger_s: float) -> dict[str, Any]:
    ns, sup, store, pipe = lab["ns"], lab["sup"], lab["store"], lab["pipe"]
    workers = sup.health()["workers"]
    per = [level // len(workers) + (1 if i < level % len(workers) else 0) for i in range(len(workers))]
    pids = [w["pid"] for w in workers]
    cpu0 = sum(_cpu_s(p) for p in pids)
    runs = []
    for i, (w, n) in enumerate(zip(workers, per, strict=True)):
        if n == 0:
            continue
        # Calls start evenly over `stagger_s` across all workers (instance i is offset by i slots, then
        # starts its own n calls every len(workers) slots), so turns do not all end on the same frame.
        period_ms = max(1, int(stagger_s * 1000 * n / level))
        scn = scenario(lab["dir"] / f"l{level}w{i}.xml", "call", pcap=pcap.name,
                       hold_ms=int(seconds * 1000) + 1000,
                       caller=f"7{level:02d}{i}[call_number]")
        argv = [*ns.prefix(), "sipp", f"127.0.0.1:{w['port']}", "-sf", str(scn), "-s", "2000",
                "-i", "127.0.0.1", "-p", str(6000 + 10 * i), "-mp", str(8000 + 100 * i), "-m", str(n),
                "-l", str(n), "-r", str(n), "-rp", str(period_ms),
                "-timeout", f"{int(seconds + stagger_s + 60)}s", "-nostdin", "-trace_err"]
        runs.append(_delayed(i * stagger_s / level, argv, lab["dir"]))
    results = await asyncio.gather(*runs)
    cpu = sum(_cpu_s(p) for p in pids) - cpu0
    failed = sum(1 for r in results if r.returncode != 0)
    await asyncio.sleep(2.0)  # let the last sessions end and their metrics reach SQL

    sessions = [s for s in store.list_sessions(pipe_id=pipe.id, limit=200).items
                if (s.caller or "").startswith(f"7{level:02d}")]
    ids = {s.id for s in sessions}
    probe = [m for m in read_jsonl(lab["probe_log"]) if m["session_id"] in ids]
    latencies = [m["response_latency_ms"] for m in probe if m["type"] == "metric"]
    errors = []
    for s in sessions:
        texts = [m["text"] for m in probe if m["session_id"] == s.id and m["type"] == "user.text"]
        for i, text in enumerate(texts[:turns]):
            errors.append(wer(SENTENCES[i % len(SENTENCES)], text))
        errors += [1.0] * max(0, turns - len(texts))
    media = [(s.metrics or {}).get("media", {}) for s in sessions]
    frames = sum(m.get("frames_out", 0) for m in media)
    late = sum(m.get("late_out", 0) + m.get("late_in", 0) for m in media)
    late_share = late / max(1, 2 * frames)
    out = {
        "calls": level, "answered": len(sessions), "sipp_failed": failed, "turns": len(latencies),
        "p50_ms": _pct(latencies, 50), "p95_ms": _pct(latencies, 95),
        "late_frames": late, "frames": 2 * frames, "late_share": late_share,
        "max_late_ms": max((max(m.get("max_late_ms", 0), m.get("max_loop_lag_ms", 0)) for m in media),
                           default=0),
        "cpu_pct_per_call": 100 * cpu / max(1e-9, level * seconds),  # per second of call time
        "wer": statistics.mean(errors) if errors else 1.0,
        "bridge_cpu_us": statistics.mean([m.get("callback_cpu_us", 0) for m in media]) if media else 0,
    }
    out["holds"] = (late_share < 0.01 and out["wer"] <= 0.15 and len(sessions) == level and not failed)
    return out


async def main_async(args: argparse.Namespace) -> None:
    why = netns_available()
    if why:
        raise SystemExit(f"bench.phone_calls needs a private network namespace: {why}")
    levels = [int(x) for x in args.calls.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="phone-bench-"))
    ns = NetNS()
    store, sup, pipes = make_lab(tmp, ns, args.port_base, workers=args.workers)
    pcap, seconds = build_pcap(tmp / "speech.pcap", args.turns)
    stagger = seconds / args.turns if args.stagger else 0.0  # one turn: question + answer
    try:
        await sup.start(wait_ready_s=180)
        health = sup.health()
        if not health["ok"]:
            raise SystemExit(f"workers did not come up: {health}")
        capacity = health["capacity"]
        print(f"{args.workers} worker(s), {capacity} calls of capacity (pjsua limit per worker "
              f"{health['workers'][0]['max_calls']}); {args.turns} turns per call, {seconds:.1f} s calls, "
              f"endpointing silence 500 ms; {os.cpu_count()} CPU cores")
        print(f"{'calls':>5} {'answered':>8} {'turns':>5} {'p50 ms':>7} {'p95 ms':>7} {'late':>9} "
              f"{'worst ms':>8} {'CPU%/call':>9} {'bridge µs':>9} {'WER':>5}  holds")
        lab = {"ns": ns, "sup": sup, "store": store, "pipe": pipes["2000"], "dir": tmp,
               "probe_log": tmp / "probe.jsonl"}
        results = []
        for level in levels:
            if level > capacity:
                print(f"{level:>5}  skipped: more than the workers' {capacity} call slots")
                continue
            r = await run_level(lab, level, args.turns, pcap, seconds, stagger)
            results.append(r)
            print(f"{r['calls']:>5} {r['answered']:>8} {r['turns']:>5} {r['p50_ms']:>7.0f} "
                  f"{r['p95_ms']:>7.0f} {r['late_frames']:>4}/{r['frames']:<5} {r['max_late_ms']:>7.0f} "
                  f"{r['cpu_pct_per_call']:>8.1f}% {r['bridge_cpu_us']:>9.1f} {r['wer']:>5.2f}  "
                  f"{'yes' if r['holds'] else 'NO'}", flush=True)
            await asyncio.sleep(1.0)
        held = max((r["calls"] for r in results if r["holds"]), default=0)
        per_call = statistics.median([r["cpu_pct_per_call"] for r in results]) if results else float("nan")
        cores = os.cpu_count() or 1
        print(f"calls held here: {held} (largest level that kept real time and accuracy)")
        fit = int(cores * 100 * 0.8 // per_call) if per_call > 0 else 0
        print(f"CPU per call: {per_call:.1f}% of one core (median over levels) -> about {fit} calls on "
              f"{cores} cores at 80% load, given enough workers (PJSUA_MAX_CALLS per worker)")
    finally:
        await sup.stop()
        ns.close()
        store.close()
        if args.keep:
            print(f"logs, probe log, database and recordings kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calls", default="1,2,4,6", help="comma-separated concurrency levels")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--port-base", type=int, default=5080)
    p.add_argument("--keep", action="store_true", help="keep the run's folder (logs, database, recordings)")
    p.add_argument("--no-stagger", dest="stagger", action="store_false",
                   help="start every call at once (all turns end together: the STT's worst case)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
