"""Non-speech test signals: noise, hum, a cough, a click, and mixing at a chosen level or SNR.

These are what a VAD must NOT call speech (false barge-ins, false turns). All functions return mono int16
arrays and are deterministic for a given `seed`. Levels are RMS dBFS as `speechpipe.pipeline.audio.rms_dbfs`
measures them (0 dBFS = RMS 32768); the cough and the click are set by peak level, as transients are.
"""

from __future__ import annotations

import numpy as np

from speechpipe.pipeline.audio import rms_dbfs


def _n(ms: float, rate: int) -> int:
    return round(rate * ms / 1000.0)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def _at_rms_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    return _to_int16(x * (32768.0 * 10 ** (dbfs / 20.0) / rms)) if rms > 0 else _to_int16(x)


def _at_peak_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
    peak = float(np.max(np.abs(x)))
    return _to_int16(x * (32767.0 * 10 ** (dbfs / 20.0) / peak)) if peak > 0 else _to_int16(x)


def _shaped_noise(n: int, rate: int, gain_of_freq, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose amplitude spectrum is multiplied by gain_of_freq(f in Hz)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec *= gain_of_freq(np.fft.rfftfreq(n, 1.0 / rate))
    return np.fft.irfft(spec, n)


def silence(ms: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(_n(ms, rate), dtype=np.int16)


def white_noise(ms: float, dbfs: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Gaussian white noise at `dbfs` RMS."""
    return _at_rms_dbfs(np.random.default_rng(seed).standard_normal(_n(ms, rate)), dbfs)


def pink_noise(ms: float, dbfs: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """1/f (pink) noise at `dbfs` RMS: equal energy per octave, from 20 Hz up (no DC)."""
    n = _n(ms, rate)

    def gain(f: np.ndarray) -> np.ndarray:
        g = np.zeros_like(f)
        g[f >= 20.0] = 1.0 / np.sqrt(f[f >= 20.0])
        return g

    return _at_rms_dbfs(_shaped_noise(n, rate, gain, np.random.default_rng(seed)), dbfs)


def hum(ms: float, dbfs: float, rate: int = 16000, freq: float = 50.0, harmonics: int = 6) -> np.ndarray:
    """Mains hum: `freq` and its harmonics with 1/k amplitudes (odd ones stronger, as rectifiers make)."""
    t = np.arange(_n(ms, rate)) / rate
    x = np.zeros_like(t)
    for k in range(1, harmonics + 1):
        if k * freq < rate / 2:
            x += (1.0 if k % 2 else 0.5) / k * np.sin(2 * np.pi * k * freq * t + 0.3 * k)
    return _at_rms_dbfs(x, dbfs)


def cough(rate: int = 16000, peak_dbfs: float = -6.0, seed: int = 0) -> np.ndarray:
    """A cough-like burst, 250 ms: an explosive broadband onset (5 ms attack, ~40 ms), then a turbulent
    decay shaped by broad vocal-tract resonances (~500, 1500, 2800 Hz), with a faint glottal buzz at
    ~180 Hz in its first 120 ms, as real coughs have. Loud and short: what a barge-in must shrug off."""
    rng = np.random.default_rng(seed)
    n = _n(250, rate)
    t = np.arange(n) / rate

    def tract(f: np.ndarray) -> np.ndarray:
        g = 0.25 + sum(a * np.exp(-0.5 * ((f - fc) / bw) ** 2) for fc, bw, a in
                       ((500, 250, 1.0), (1500, 400, 0.8), (2800, 600, 0.6)))
        return g * (f > 80)

    burst = _shaped_noise(n, rate, lambda f: (f > 80) * 1.0, rng) * np.exp(-t / 0.012)
    turbulence = _shaped_noise(n, rate, tract, rng) * np.exp(-t / 0.07)
    buzz_env = np.clip(t / 0.01, 0, 1) * np.exp(-t / 0.05) * (t < 0.12)
    buzz = sum(np.sin(2 * np.pi * 180 * k * t) / k for k in range(1, 8)) * buzz_env
    attack = np.clip(t / 0.005, 0.0, 1.0)
    x = attack * (1.5 * burst / np.std(burst) + turbulence / np.std(turbulence) + 0.3 * buzz)
    return _at_peak_dbfs(x, peak_dbfs)


def click(rate: int = 16000, peak_dbfs: float = -3.0) -> np.ndarray:
    """A mechanical click, 5 ms: a damped 3 kHz ring after a step (handset knock, key press, relay)."""
    t = np.arange(_n(5, rate)) / rate
    x = np.exp(-t / 0.0008) * np.sin(2 * np.pi * 3000 * t + np.pi / 2)
    return _at_peak_dbfs(x, peak_dbfs)


def place(events: list[tuple[float, np.ndarray]], total_ms: float, rate: int = 16000,
          floor: np.ndarray | None = None) -> np.ndarray:
    """Lay `(start_ms, signal)` events onto `total_ms` of silence (or onto `floor`), summing with clipping."""
    out = np.zeros(_n(total_ms, rate), dtype=np.float64)
    if floor is not None:
        out[: min(len(out), len(floor))] += floor[: len(out)]
    for start_ms, sig in events:
        i = _n(start_ms, rate)
        j = min(len(out), i + len(sig))
        out[i:j] += sig[: j - i]
    return _to_int16(out)


def add_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float, speech_mask: np.ndarray | None = None,
               ) -> np.ndarray:
    """speech + noise, with the noise scaled so that active-speech power / noise power = `snr_db`.

    `speech_mask` (bool per sample) says which samples are speech; without it, active_mask() finds them
    from the clean speech energy (20 ms frames within 40 dB of the loudest).
    """
    s = speech.astype(np.float64)
    nz = np.resize(noise.astype(np.float64), s.shape)  # loop the noise if it is shorter
    if speech_mask is None:
        speech_mask = active_mask(speech)
    p_speech = float(np.mean(s[speech_mask] ** 2))
    p_noise = float(np.mean(nz**2))
    if p_noise == 0:
        return speech.copy()
    return _to_int16(s + nz * np.sqrt(p_speech / p_noise / 10 ** (snr_db / 10.0)))


def active_mask(speech: np.ndarray, rate: int = 16000, frame_ms: int = 20, range_db: float = 40.0
                ) -> np.ndarray:
    """Per-sample bool: in a 20 ms frame whose energy is within `range_db` of the loudest frame."""
    n = _n(frame_ms, rate)
    frames = len(speech) // n
    levels = np.array([rms_dbfs(speech[i * n : (i + 1) * n]) for i in range(frames)])
    on = levels > max(levels.max() - range_db, -70.0) if frames else np.zeros(0, bool)
    mask = np.zeros(len(speech), dtype=bool)
    mask[: frames * n] = np.repeat(on, n)
    return mask
