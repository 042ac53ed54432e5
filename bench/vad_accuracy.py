"""Frame accuracy of the VAD engines on labelled audio: speech in noise, noise with no speech, real speech.

    .venv/bin/python -m bench.vad_accuracy        # from the repo root; prints the tables (~10 s)

Speech cases are espeak-ng sentences (three voices) with silence gaps, alone and mixed with white or pink
noise at 20/10/5 dB SNR, plus the phone leg: the same track at 8 kHz through μ-law, judged at 8 kHz as an
8 kHz session's VAD judges it (`vad_rate`), and, for comparison, the same 8 kHz audio upsampled to 16 kHz
(what sessions did before the VAD ran at 8 kHz). Noise cases hold no speech: noise floors, white/pink
noise up to -20 dBFS, mains hum, coughs, clicks. Ground truth comes from the clean speech energy: a 20 ms
frame is speech when its level is within 40 dB of the loudest frame, and gaps shorter than 100 ms inside
speech (stop closures, word joins) count as speech too.

Real-speech cases (when tests/realspeech.py's packages are installed): the 40 recorded prompts of the
development set, 0.8 s of digital silence between them, as the wideband original (16 kHz), as a PCMU call
carries them judged at native 8 kHz, and the same telephone audio upsampled to 16 kHz. Their truth is each
prompt's own wideband energy (frames within 30 dB of the prompt's loudest, gaps under 100 ms bridged), so
all three versions are scored against the same frames.

Every case is 20 ms frames at its own rate (`Case.rate`); the engine under test runs at that rate (a
detector with the same settings is made for a case at another rate, as `make_vad(config, rate)` does per
session). A frame is called speech when `vad.is_speech(frame)` says so: the VAD's own start/stop
hysteresis (Silero: start at `threshold`, stop below `neg_threshold`), which is what the session acts on;
the endpointer and barge-in add their own smoothing on top. `hysteresis=False` scores the raw
`speech_prob(frame) >= threshold` instead. Onset latency: from a sentence's first speech frame to the
first frame the VAD calls speech. Offset latency: from a sentence's last speech frame to the first frame
the VAD calls non-speech (the engine's hang-over). "Max FP run" is the longest run of false speech
frames, the figure a barge-in's min_speech_ms must exceed.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from speechpipe.pipeline.audio import Resampler, rms_dbfs, ulaw_decode, ulaw_encode
from speechpipe.pipeline.vad import VAD, SileroVAD, WebRtcVAD
from tests import sounds
from tests.speech import synth

RATE = 16000
NARROW = 8000
FRAME_MS = 20
FRAME_SAMPLES = RATE // 50  # 20 ms at 16 kHz (labels are computed on 16 kHz audio)
SENTENCES = (
    ("en-us", "Hello, I would like to check the status of my order please."),
    ("en-us+f3", "The delivery was supposed to arrive on Tuesday afternoon."),
    ("en-gb", "Could you tell me what time the pharmacy opens tomorrow?"),
    ("en-us", "Thanks, that is all I needed to know for now."),
)
GAPS_MS = (800, 900, 1300, 700, 1000)  # before, between, after the sentences
REAL_GAP_MS = 800  # between the real prompts
REAL_RANGE_DB = 30.0  # real prompts: frames within 30 dB of the prompt's loudest are speech


@dataclass
class Case:
    name: str
    audio: np.ndarray  # int16 at `rate`, a whole number of 20 ms frames
    labels: np.ndarray  # bool per frame: ground-truth speech
    # (first, end) frame index of each sentence's speech, end exclusive; empty for noise cases
    utterances: list[tuple[int, int]] = field(default_factory=list)
    rate: int = RATE

    @property
    def has_speech(self) -> bool:
        return bool(self.utterances)


def _frames(x: np.ndarray, rate: int = RATE) -> int:
    return len(x) // (rate // 50)


def _trim(x: np.ndarray, rate: int = RATE) -> np.ndarray:
    return x[: _frames(x, rate) * (rate // 50)]


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """`x` cut or zero-padded to exactly `n` samples."""
    return np.pad(x[:n], (0, max(0, n - len(x)))).astype(np.int16)


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


def stream_resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """The session's own streaming resampler over a whole signal, same duration out."""
    r = Resampler(from_rate, to_rate)
    return _fit(np.concatenate([r.process(x), r.flush()]), len(x) * to_rate // from_rate)


def phone_leg(x: np.ndarray) -> np.ndarray:
    """16 kHz audio as a PCMU call delivers it: 8 kHz, μ-law round trip (same number of 20 ms frames)."""
    return ulaw_decode(ulaw_encode(stream_resample(x, RATE, NARROW)))


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
    phone = phone_leg(floored)
    cases.append(Case("speech, phone μ-law 8k", phone, labels, spans, rate=NARROW))
    cases.append(Case("speech, phone μ-law 8k→16k", stream_resample(phone, NARROW, RATE), labels, spans))

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


def real_cases(limit: int | None = None) -> list[Case]:
    """The development set's real prompts as three cases (wideband 16k, telephone native 8k, telephone
    upsampled to 16k), all scored against the wideband original's frames; [] without the sound packages."""
    from tests import realspeech

    if realspeech.missing():
        return []
    gap = REAL_GAP_MS // FRAME_MS
    wide: list[np.ndarray] = [np.zeros(gap * FRAME_SAMPLES, np.int16)]
    tel: list[np.ndarray] = [np.zeros(gap * NARROW // 50, np.int16)]
    labels: list[np.ndarray] = [np.zeros(gap, bool)]
    spans: list[tuple[int, int]] = []
    pos = gap
    for u in realspeech.devset()[:limit]:
        wb, nb = realspeech.wideband(u), realspeech.telephone(u)
        n = min(_frames(wb), _frames(nb, NARROW))
        lab = energy_labels(wb[: n * FRAME_SAMPLES], range_db=REAL_RANGE_DB)
        on = np.flatnonzero(lab)
        spans.append((pos + int(on[0]), pos + int(on[-1]) + 1))
        wide += [wb[: n * FRAME_SAMPLES], np.zeros(gap * FRAME_SAMPLES, np.int16)]
        tel += [nb[: n * NARROW // 50], np.zeros(gap * NARROW // 50, np.int16)]
        labels += [lab, np.zeros(gap, bool)]
        pos += n + gap
    truth = np.concatenate(labels)
    narrow = np.concatenate(tel)
    return [Case("real speech, wideband 16k", np.concatenate(wide), truth, spans),
            Case("real speech, telephone 8k", narrow, truth, spans, rate=NARROW),
            Case("real speech, telephone 8k→16k", stream_resample(narrow, NARROW, RATE), truth, spans)]


def at_rate(vad: VAD, rate: int) -> VAD:
    """A detector with `vad`'s settings at `rate` (itself when it already runs there)."""
    if vad.rate == rate:
        return vad
    if isinstance(vad, WebRtcVAD):
        return WebRtcVAD(vad.aggressiveness, rate)
    if isinstance(vad, SileroVAD):
        return SileroVAD(vad.threshold, rate, vad.neg_threshold)
    raise TypeError(f"no {rate} Hz twin for {type(vad).__name__}")


def _runs(pred: np.ndarray, mask: np.ndarray) -> int:
    """Longest run of True in pred & mask, in frames."""
    best = cur = 0
    for v in pred & mask:
        cur = cur + 1 if v else 0
        best = max(best, cur)
    return best


def measure_vad_accuracy(vad: VAD, cases: Sequence[Case], *, hysteresis: bool = True) -> dict:
    """Run `vad` (or its twin at a case's rate) over every case, reset between cases; per-case and overall
    figures. Decisions are `is_speech()` (with the VAD's hysteresis), or with `hysteresis=False` the raw
    `speech_prob() >= threshold`.

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
        det = at_rate(vad, case.rate)
        det.reset()
        step = det.frame_samples
        n = _frames(case.audio, case.rate)
        frames = case.audio[: n * step].reshape(n, step)
        pred = np.zeros(n, dtype=bool)
        t0 = time.process_time_ns()
        if hysteresis:
            for i in range(n):
                pred[i] = det.is_speech(frames[i])
        else:
            for i in range(n):
                pred[i] = det.speech_prob(frames[i]) >= det.threshold
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
            "rate": case.rate,
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


def _case_table(cases: Sequence[Case], results: dict[str, dict]) -> None:
    names = list(results)
    print(f"{'case':34}" + "".join(f"{n:>24}" for n in names))
    for case in cases:
        row = f"{case.name:34}"
        for n in names:
            c = results[n]["cases"][case.name]
            row += f"{_fmt(c['accuracy'], True)}/{_fmt(c['fpr'], True)}/{c['max_fp_run_ms']}/" \
                   f"{_fmt(c['onset_ms'])}/{_fmt(c['offset_ms'])}".rjust(24)
        print(row)


def _summary_table(results: dict[str, dict]) -> None:
    print(f"{'engine':22}{'speech acc %':>13}{'recall %':>10}{'gap FP %':>10}{'noise FP %':>11}"
          f"{'noise max run':>14}{'onset ms':>9}{'offset ms':>10}{'missed':>7}{'CPU µs/frame':>13}")
    for n, r in results.items():
        o = r["overall"]
        print(f"{n:22}{_fmt(o['speech_accuracy'], True):>13}{_fmt(o['speech_recall'], True):>10}"
              f"{_fmt(o['gap_fpr'], True):>10}{_fmt(o['noise_fpr'], True):>11}{o['noise_max_fp_run_ms']:>14}"
              f"{_fmt(o['onset_ms']):>9}{_fmt(o['offset_ms']):>10}{o['missed']:>7}{o['cpu_us_per_frame']:>13.1f}")


def main() -> None:
    cases = build_cases()
    results = {label(v): measure_vad_accuracy(v, cases) for v in engines()}
    print("Decisions: is_speech() with the engine's hysteresis (Silero stops below threshold - 0.15);")
    print("each case judged at its own rate (the phone leg at 8 kHz, as an 8 kHz session's VAD judges it).\n")
    print("Per case: accuracy % / false-positive % / max false run ms / onset ms / offset ms")
    _case_table(cases, results)
    print()
    summary = dict(results)
    summary["silero t=0.5 raw"] = measure_vad_accuracy(SileroVAD(0.5), cases, hysteresis=False)
    _summary_table(summary)
    print("(raw: speech_prob >= threshold per frame, no hysteresis)")

    real = real_cases()
    if not real:
        print("\nReal speech: skipped (tests/realspeech.py needs its Debian and PyPI packages)")
        return
    print(f"\nReal speech: the {len(real[0].utterances)} development-set prompts (tests/realspeech.py); "
          f"truth from each wideband prompt (frames within {REAL_RANGE_DB:.0f} dB of its loudest)")
    print("Per case: accuracy % / false-positive % / max false run ms / onset ms / offset ms")
    real_results = {label(v): measure_vad_accuracy(v, real) for v in engines()}
    _case_table(real, real_results)
    print()
    print(f"{'case':34}" + "".join(f"{n:>16}" for n in real_results) + "   (recall in voiced frames %)")
    for case in real:
        print(f"{case.name:34}" + "".join(f"{_fmt(real_results[n]['cases'][case.name]['recall'], True):>16}"
                                          for n in real_results))


if __name__ == "__main__":
    main()
