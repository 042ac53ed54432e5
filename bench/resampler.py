"""pipeline.audio.Resampler: streaming lag, passband, alias/image rejection, round trip and per-frame cost.

    .venv/bin/python -m bench.resampler            # from the repo root; prints the table (~10 s)

Everything but the last column is counted in samples, so it is the same on every machine:
- lag: fed 20 ms frames of noise for 4 s, how far the output count trails the ideal count (i * out/in
  after i input samples), on average and at worst over the frames, in ms; "gd" is the filter's group delay
  (half its length), the floor the lag cannot go under;
- tail: what flush() returns after those 4 s (the held-back part, in ms);
- flat: gain at 300 / 3400 Hz (8 kHz legs) or 300 / 7400 Hz (16 kHz and up), in dB;
- reject: the worst rejection, in dB, of every tone from the lower Nyquist frequency + 100 Hz up (its
  alias, going down) or of the images above the input's Nyquist frequency of passband tones (going up);
- SNR of espeak speech 16k→48k→16k (a round trip through both directions' filters).
The cost is timeit's best of 7 runs of 400 frames, µs per 20 ms frame (wall clock: it depends on the
machine and its load).
"""

from __future__ import annotations

import timeit

import numpy as np

from speechpipe.pipeline.audio import Resampler, _design, rms_dbfs
from tests.speech import synth

RATIOS = [(8000, 16000), (16000, 8000), (22050, 8000), (22050, 16000), (24000, 8000), (24000, 16000),
          (44100, 16000), (48000, 16000), (16000, 48000), (16000, 22050)]


def stream(x: np.ndarray, rs: Resampler, frame: int) -> np.ndarray:
    return np.concatenate([*(rs.process(x[i : i + frame]) for i in range(0, len(x), frame)), rs.flush()])


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def gain_db(freq: float, a: int, b: int) -> float:
    x = tone(freq, a)
    y = stream(x, Resampler(a, b), a // 50)
    return rms_dbfs(y[b // 10 : -b // 10]) - rms_dbfs(x)


def image_db(freq: float, a: int, b: int) -> float:
    """Energy above a's Nyquist frequency relative to the whole, after upsampling a tone (Hann window)."""
    y = stream(tone(freq, a), Resampler(a, b), a // 50)[b // 10 : -b // 10]
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y)))) ** 2
    return float(10 * np.log10(spec[np.fft.rfftfreq(len(y), 1 / b) > a / 2].sum() / spec.sum()))


def lag(a: int, b: int) -> tuple[float, float, float]:
    rs = Resampler(a, b)
    frame = np.random.default_rng(0).integers(-1000, 1000, a // 50).astype(np.int16)
    out, lags = 0, []
    for i in range(1, 201):
        out += len(rs.process(frame))
        lags.append((i * b / 50 - out) / b * 1000)
    return float(np.mean(lags)), max(lags), len(rs.flush()) / b * 1000


def cost_us(a: int, b: int) -> float:
    rs = Resampler(a, b)
    frame = np.random.default_rng(0).integers(-1000, 1000, a // 50).astype(np.int16)
    for _ in range(20):
        rs.process(frame)
    return min(timeit.repeat(lambda: rs.process(frame), number=400, repeat=7)) / 400 * 1e6


def main() -> None:
    print("ratio            lag avg / worst   gd     tail   flat lo / hi     reject   µs/frame")
    for a, b in RATIOS:
        d = _design(a, b)
        nyq = min(a, b) / 2
        avg, worst, tail = lag(a, b)
        edge = 3400 if nyq == 4000 else nyq - 600
        lo, hi = gain_db(300, a, b), gain_db(edge, a, b)
        if b < a:  # every tone that would alias, up to the input's Nyquist frequency
            freqs = np.arange(nyq + 100, a / 2, 250.0)
            reject = -max(gain_db(f, a, b) for f in freqs)
        else:  # the images of passband tones
            reject = -max(image_db(f, a, b) for f in np.arange(300, nyq - 500, 400.0))
        gd = d.half / (d.up * a) * 1000
        print(f"{a:>5}→{b:<5}   {avg:5.2f} / {worst:5.2f} ms  {gd:4.2f}  {tail:4.2f} ms"
              f"  {lo:+.3f} / {hi:+.3f} dB  {reject:5.1f} dB  {cost_us(a, b):6.1f}")
    speech = synth("The quick brown fox jumps over the lazy dog while the band plays on.", rate=16000)
    back = stream(stream(speech, Resampler(16000, 48000), 320), Resampler(48000, 16000), 960)
    r = speech[800:-800].astype(np.float64)
    e = r - back[800 : len(speech) - 800]
    print(f"speech 16k→48k→16k: {10 * np.log10(np.sum(r**2) / np.sum(e**2)):.1f} dB SNR")


if __name__ == "__main__":
    main()
