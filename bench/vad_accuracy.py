"""Frame accuracy of the VAD engines on labelled audio: speech in noise, and noise with no speech at all.

    .venv/bin/python -m bench.vad_accuracy        # from the repo root; prints the tables

Speech cases are espeak-ng sentences (three voices) with silence gaps, alone and mixed with white or pink
noise at 20/10/5 dB SNR, plus a phone leg (8 kHz μ-law and back). Noise cases hold no speech: noise
floors, white/pink noise up to -20 dBFS, mains hum, coughs, clicks. Ground truth comes from the clean
speech energy: a 20 ms frame is speech when its level is within 40 dB of the loudest frame, and gaps
shorter than 100 ms inside speech (stop closures, word joins) count as speech too.

A frame is called speech when `vad.speech_prob(frame) >= vad.threshold` (no smoothing: the endpointer and
barge-in logic add their own). Onset latency: from a sentence's first speech frame to the first frame the
VAD calls speech. Offset latency: from a sentence's last speech frame to the first frame the VAD calls
non-speech (the engine's hang-over). "Max FP run" is the longest run of false speech frames, the figure a
barge-in's min_speech_ms must exceed.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from speechpipe.pipeline.audio import Resampler, rms_dbfs, ulaw_decode, ulaw_encode
from speechpipe.pipeline.vad import FRAME_SAMPLES, VAD, SileroVAD, WebRtcVAD
from tests import sounds
from tests.speech import synth

RATE = 16000
FRAME_MS = 20
SENTENCES = (
    ("en-us", "Hello, I would like to check the status of my order please."),
    ("en-us+f3", "The delivery was supposed to arrive on Tuesday afternoon."),
    ("en-gb", "Could you tell me what time the pharmacy opens tomorrow?"),
    ("en-us", "Thanks, that is all I needed to know for now."),
)
GAPS_MS = (800, 900, 1300, 700, 1000)  # before, between, after the sentences


@dataclass
class Case:
    name: str
    audio: np.ndarray  # int16 at 16 kHz, a whole number of 20 ms frames
    labels: np.ndarray  # bool per frame: ground-truth speech
    # (first, end) frame index of each sentence's speech, end exclusive; empty for noise cases
    utterances: list[tuple[int, int]] = field(default_factory=list)

    @property
    def has_speech(self) -> bool:
        return bool(self.utterances)


def _frames(x: np.ndarray) -> int:
    return len(x) // FRAME_SAMPLES


def _trim(x: np.ndarray) -> np.ndarray:
    return x[: _frames(x) * FRAME_SAMPLES]


def energy_labels(clean: np.ndarray, range_db: float = 40.0, bridge_ms: int = 100) -> np.ndarray:
    frames = clean[: _frames(clean) * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    levels = np.array([rms_dbfs(f) for f in frames])
    on = levels > max(float(levels.max()) - range_db, -70.0)
    idx = np.flatnonzero(on)
    for a, b in itertools.pairwise(idx):
        if 1 < b - a <= bridge_ms // FRAME_MS + 1:
            on[a:b] = True
    return on


def speech_track() -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The clean sentences with silence gaps; returns (audio, labels, sentence spans)."""
    parts: list[np.ndarray] = [sounds.silence(GAPS_MS[0])]
    spans: list[tuple[int, int]] = []
    pos = _frames(parts[0])
    for (voice, text), gap in zip(SENTENCES, GAPS_MS[1:], strict=True):
        s = _trim(synth(text, rate=RATE, voice=voice))
        lab = energy_labels(s)
        on = np.flatnonzero(lab)
        spans.append((pos + int(on[0]), pos + int(on[-1]) + 1))
        parts += [s, sounds.silence(gap)]
        pos += _frames(s) + _frames(parts[-1])
    audio = np.concatenate(parts)
    return audio, energy_labels(audio), spans


def _phone_leg(x: np.ndarray) -> np.ndarray:
    down, up = Resampler(RATE, 8000), Resampler(8000, RATE)
    narrow = np.concatenate([down.process(x), down.flush()])
    g711 = ulaw_decode(ulaw_encode(narrow))
    return np.concatenate([up.process(g711), up.flush()])[: len(x)]


def build_cases() -> list[Case]:
    clean, labels, spans = speech_track()
    ms = len(clean) * 1000 / RATE
    floor = sounds.white_noise(ms, -70, seed=1)  # a quiet but not digital-zero floor
    floored = sounds.place([(0, clean)], ms, floor=floor)
    cases = [Case("speech, -70 dBFS floor", floored, labels, spans)]
    mask = np.repeat(labels, FRAME_SAMPLES)
    for kind, gen in (("white", sounds.white_noise), ("pink", sounds.pink_noise)):
        noise = gen(ms, -30, seed=2)
        for snr in (20, 10, 5):
            mixed = sounds.add_at_snr(clean, noise, snr, mask)
            cases.append(Case(f"speech + {kind} {snr} dB SNR", mixed, labels, spans))
    cases.append(Case("speech, phone μ-law 8k", _phone_leg(floored), labels, spans))

    def noise_case(name: str, audio: np.ndarray) -> None:
        audio = _trim(audio)
        cases.append(Case(name, audio, np.zeros(_frames(audio), dtype=bool)))

    noise_case("silence, -70 dBFS floor", floor[: 6 * RATE])
    for level in (-50, -35, -20):
        noise_case(f"white noise {level} dBFS", sounds.white_noise(6000, level, seed=3))
        noise_case(f"pink noise {level} dBFS", sounds.pink_noise(6000, level, seed=4))
    noise_case("hum 50 Hz -25 dBFS", sounds.hum(6000, -25))
    low = sounds.white_noise(6000, -60, seed=5)
    coughs = [(300 + 1100 * k, sounds.cough(seed=k)) for k in range(5)]
    noise_case("coughs (-6 dBFS peak)", sounds.place(coughs, 6000, floor=low))
    clicks = [(100 + 250 * k, sounds.click()) for k in range(23)]
    noise_case("clicks (-3 dBFS peak)", sounds.place(clicks, 6000, floor=low))
    return cases


def _runs(pred: np.ndarray, mask: np.ndarray) -> int:
    """Longest run of True in pred & mask, in frames."""
    best = cur = 0
    for v in pred & mask:
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best


def measure_vad_accuracy(vad: VAD, cases: Sequence[Case]) -> dict:
    """Run `vad` over every case (reset between cases); per-case and overall figures.

    Returns {"cases": {name: {...}}, "overall": {...}} with accuracy, recall, fpr (fractions), max_fp_run_ms,
    onset_ms / offset_ms (median over sentences; None without speech), missed sentences, and the engine's
    CPU time per 20 ms frame in µs.
    """
    per_case: dict[str, dict] = {}
    cpu_ns = 0
    nframes = 0
    onsets: list[float] = []
    offsets: list[float] = []
    for case in cases:
        vad.reset()
        n = _frames(case.audio)
        frames = case.audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
        pred = np.zeros(n, dtype=bool)
        t0 = time.process_time_ns()
        for i in range(n):
            pred[i] = vad.speech_prob(frames[i]) >= vad.threshold
        cpu_ns += time.process_time_ns() - t0
        nframes += n
        lab = case.labels[:n]
        neg = ~lab
        on_ms: list[float] = []
        off_ms: list[float] = []
        missed = 0
        for a, b in case.utterances:
            hits = np.flatnonzero(pred[a:b])
            if hits.size == 0:
                missed += 1
                continue
            on_ms.append(float(hits[0] * FRAME_MS))
            after = np.flatnonzero(~pred[b:])
            off_ms.append(float((after[0] if after.size else n - b) * FRAME_MS))
        onsets += on_ms
        offsets += off_ms
        per_case[case.name] = {
            "speech": case.has_speech,
            "accuracy": float(np.mean(pred == lab)),
            "recall": float(np.mean(pred[lab])) if lab.any() else None,
            "fpr": float(np.mean(pred[neg])) if neg.any() else 0.0,
            "max_fp_run_ms": _runs(pred, neg) * FRAME_MS,
            "onset_ms": statistics.median(on_ms) if on_ms else None,
            "offset_ms": statistics.median(off_ms) if off_ms else None,
            "missed": missed,
        }
    speech = [c for c in per_case.values() if c["speech"]]
    noise = [c for c in per_case.values() if not c["speech"]]
    overall = {
        "speech_accuracy": statistics.fmean(c["accuracy"] for c in speech) if speech else None,
        "speech_recall": statistics.fmean(c["recall"] for c in speech) if speech else None,
        "gap_fpr": statistics.fmean(c["fpr"] for c in speech) if speech else None,
        "noise_fpr": statistics.fmean(c["fpr"] for c in noise) if noise else None,
        "noise_max_fp_run_ms": max((c["max_fp_run_ms"] for c in noise), default=0),
        "onset_ms": statistics.median(onsets) if onsets else None,
        "offset_ms": statistics.median(offsets) if offsets else None,
        "missed": sum(c["missed"] for c in per_case.values()),
        "cpu_us_per_frame": cpu_ns / 1000 / max(nframes, 1),
    }
    return {"cases": per_case, "overall": overall}


def _fmt(v: object, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * float(v):.1f}"  # type: ignore[arg-type]
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def engines() -> list[VAD]:
    return [WebRtcVAD(a) for a in range(4)] + [SileroVAD(t) for t in (0.3, 0.5, 0.7)]


def label(vad: VAD) -> str:
    return f"webrtc a={vad.aggressiveness}" if isinstance(vad, WebRtcVAD) else f"silero t={vad.threshold}"


def main() -> None:
    cases = build_cases()
    results = {label(v): measure_vad_accuracy(v, cases) for v in engines()}
    names = list(results)
    print("Per case: accuracy % / false-positive % / max false run ms / onset ms / offset ms")
    print(f"{'case':32}" + "".join(f"{n:>24}" for n in names))
    for case in cases:
        row = f"{case.name:32}"
        for n in names:
            c = results[n]["cases"][case.name]
            row += f"{_fmt(c['accuracy'], True)}/{_fmt(c['fpr'], True)}/{c['max_fp_run_ms']}/" \
                   f"{_fmt(c['onset_ms'])}/{_fmt(c['offset_ms'])}".rjust(24)
        print(row)
    print()
    print(f"{'engine':16}{'speech acc %':>13}{'recall %':>10}{'gap FP %':>10}{'noise FP %':>11}"
          f"{'noise max run':>14}{'onset ms':>9}{'offset ms':>10}{'missed':>7}{'CPU µs/frame':>13}")
    for n in names:
        o = results[n]["overall"]
        print(f"{n:16}{_fmt(o['speech_accuracy'], True):>13}{_fmt(o['speech_recall'], True):>10}"
              f"{_fmt(o['gap_fpr'], True):>10}{_fmt(o['noise_fpr'], True):>11}{o['noise_max_fp_run_ms']:>14}"
              f"{_fmt(o['onset_ms']):>9}{_fmt(o['offset_ms']):>10}{o['missed']:>7}{o['cpu_us_per_frame']:>13.1f}")


if __name__ == "__main__":
    main()
