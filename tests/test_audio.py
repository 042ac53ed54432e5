"""pipeline.audio: frame sizes, streaming resampling quality and lag, G.711 against sox, level, re-framing."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechpipe.pipeline.audio import (
    SILENCE_DBFS,
    FrameChunker,
    Resampler,
    alaw_decode,
    alaw_encode,
    pcm16_from_bytes,
    rms_dbfs,
    samples_per_frame,
    ulaw_decode,
    ulaw_encode,
)
from tests import sounds
from tests.speech import synth

SENTENCE = "The quick brown fox jumps over the lazy dog while the band plays on."


def _stream(x: np.ndarray, rs: Resampler, frame: int) -> np.ndarray:
    out = [rs.process(x[i : i + frame]) for i in range(0, len(x), frame)]
    return np.concatenate([*out, rs.flush()])


def _snr_db(ref: np.ndarray, got: np.ndarray, trim: int) -> float:
    r = ref[trim:-trim].astype(np.float64)
    e = r - got[trim : len(ref) - trim]
    return 10 * np.log10(np.sum(r**2) / np.sum(e**2))


def _tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def _gain_db(x: np.ndarray, y: np.ndarray, trim: int) -> float:
    return rms_dbfs(y[trim:-trim]) - rms_dbfs(x)


def test_samples_per_frame() -> None:
    assert [samples_per_frame(r) for r in (8000, 16000, 22050, 24000, 48000)] == [160, 320, 441, 480, 960]
    for bad in (0, -8000, 11025):
        with pytest.raises(ValueError):
            samples_per_frame(bad)


def test_resampler_identity_passes_audio_through() -> None:
    rs = Resampler(16000, 16000)
    x = synth(SENTENCE)[:3200]
    assert rs.identity
    assert np.array_equal(rs.process(x), x)
    assert rs.flush().size == 0


def test_resampler_round_trip_16k_48k_16k_keeps_speech() -> None:
    speech = synth(SENTENCE, rate=16000)
    up = _stream(speech, Resampler(16000, 48000), 320)
    assert len(up) == 3 * len(speech)  # flush() delivers every sample: nothing lost, nothing added
    back = _stream(up, Resampler(48000, 16000), 960)
    assert len(back) == len(speech)
    # Measured 43.5 dB (the 16 kHz speech has content past soxr's 91 % passband edge, lost twice).
    assert _snr_db(speech, back, 800) > 40.0


def test_resampler_phone_band_is_flat_and_images_rejected() -> None:
    for freq in (300, 1000, 3000, 3400):
        tone = _tone(freq, 8000)
        up = _stream(tone, Resampler(8000, 16000), 160)
        assert abs(_gain_db(tone, up, 1600)) < 0.1, freq
        # What remains above 4 kHz (the image band) after upsampling is negligible.
        spectrum = np.abs(np.fft.rfft(up[1600:-1600] * np.hanning(len(up) - 3200))) ** 2
        freqs = np.fft.rfftfreq(len(up) - 3200, 1 / 16000)
        assert 10 * np.log10(spectrum[freqs > 4500].sum() / spectrum.sum()) < -70, freq


def test_resampler_downsampling_filters_aliases() -> None:
    # A 10 kHz tone would alias to 6 kHz at 16 kHz; a 7 kHz one to 1 kHz at 8 kHz (TTS to phone).
    for freq, a, b in ((10000, 48000, 16000), (7000, 22050, 8000)):
        tone = _tone(freq, a)
        assert _gain_db(tone, _stream(tone, Resampler(a, b), a // 50), b // 10) < -70


# soxr HQ holds audio back in DFT blocks; these are the worst cases measured (module docstring) + 10 %.
@pytest.mark.parametrize(("a", "b", "max_lag_ms"), [(8000, 16000, 127), (48000, 16000, 41), (22050, 8000, 88),
                                                    (22050, 16000, 44)])
def test_resampler_streaming_lag_is_bounded(a: int, b: int, max_lag_ms: float) -> None:
    rs = Resampler(a, b)
    frame = np.random.default_rng(0).integers(-1000, 1000, a // 50).astype(np.int16)
    out = 0
    worst = 0.0
    for i in range(1, 201):
        out += len(rs.process(frame))
        worst = max(worst, (i * b / 50 - out) / b * 1000)
    assert 0 < worst <= max_lag_ms


def test_resampler_is_deterministic_and_keeps_digital_silence() -> None:
    # soxr's own int16 mode dithers: silence would come out as ±1 noise, and no two runs would match.
    silent = _stream(np.zeros(8000, dtype=np.int16), Resampler(8000, 16000), 160)
    assert len(silent) == 16000 and not silent.any()


def test_resampler_flush_resets_for_the_next_utterance() -> None:
    speech = synth(SENTENCE, rate=22050)[:22050]
    rs = Resampler(22050, 8000)
    first = _stream(speech, rs, 441)
    second = _stream(speech, rs, 441)
    assert np.array_equal(first, second)
    rs.process(speech[:4410])
    rs.reset()  # drop, as a barge-in does
    assert np.array_equal(_stream(speech, rs, 441), first)


# --- G.711 against sox -------------------------------------------------------------------------------------

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)


def _sox(data: bytes, in_enc: list[str], out_enc: list[str]) -> bytes:
    # -D: no dither, or sox would add noise when going down to 8 bits.
    cmd = ["sox", "-D", "-t", "raw", "-r", "8000", "-c", "1", *in_enc, "-", "-t", "raw", *out_enc, "-"]
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize(("encoding", "encode"), [("u-law", ulaw_encode), ("a-law", alaw_encode)])
def test_g711_encode_is_bit_exact_with_sox(encoding: str, encode) -> None:
    raw = _sox(ALL_SAMPLES.tobytes(), ["-e", "signed", "-b", "16"], ["-e", encoding, "-b", "8"])
    ref = np.frombuffer(raw, dtype=np.uint8)
    got = encode(ALL_SAMPLES)
    assert got.dtype == np.uint8 and len(ref) == 65536
    assert np.array_equal(got, ref), f"{np.count_nonzero(got != ref)} of 65536 samples differ"


@pytest.mark.parametrize(("encoding", "decode"), [("u-law", ulaw_decode), ("a-law", alaw_decode)])
def test_g711_decode_is_bit_exact_with_sox(encoding: str, decode) -> None:
    ref = np.frombuffer(_sox(ALL_CODES.tobytes(), ["-e", encoding, "-b", "8"], ["-e", "signed", "-b", "16"]),
                        dtype=np.int16)
    assert np.array_equal(decode(ALL_CODES), ref)
    assert np.array_equal(decode(ALL_CODES.tobytes()), ref)  # RTP payload bytes work as well


def test_g711_codes_survive_decode_then_encode() -> None:
    # Every code but μ-law's negative zero (0x7F, which decodes to 0 = code 0xFF) maps back to itself.
    u = ulaw_encode(ulaw_decode(ALL_CODES))
    assert np.array_equal(u[ALL_CODES != 0x7F], ALL_CODES[ALL_CODES != 0x7F]) and u[0x7F] == 0xFF
    assert np.array_equal(alaw_encode(alaw_decode(ALL_CODES)), ALL_CODES)


def test_g711_round_trip_keeps_speech_at_telephone_quality() -> None:
    speech = synth(SENTENCE, rate=8000)
    for enc, dec in ((ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)):
        # G.711's companding gives ~38 dB SNR on speech at normal levels.
        assert _snr_db(speech, dec(enc(speech)), 1) > 30


# --- level and re-framing -----------------------------------------------------------------------------------


def test_rms_dbfs() -> None:
    assert rms_dbfs(_tone(1000, 16000, amp=32767)) == pytest.approx(-3.01, abs=0.01)
    assert rms_dbfs(_tone(1000, 16000, amp=3277)) == pytest.approx(-23.01, abs=0.01)
    assert rms_dbfs(np.full(320, -32768, dtype=np.int16)) == pytest.approx(0.0)
    assert rms_dbfs(sounds.white_noise(200, -30)) == pytest.approx(-30, abs=0.05)
    assert rms_dbfs(np.zeros(320, dtype=np.int16)) == SILENCE_DBFS
    assert rms_dbfs(np.zeros(0, dtype=np.int16)) == SILENCE_DBFS


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 2000), min_size=1, max_size=30), as_bytes=st.booleans())
def test_frame_chunker_carries_remainders(sizes: list[int], as_bytes: bool) -> None:
    rate = 8000
    total = sum(sizes)
    signal = (np.arange(total // 2 + 1, dtype=np.int64) * 7919 % 65536 - 32768).astype(np.int16)
    raw = signal.tobytes()[:total] if as_bytes else signal[: total // 2].copy()
    chunker = FrameChunker(rate)
    frames: list[np.ndarray] = []
    pos = 0
    for size in sizes:
        step = size if as_bytes else size // 2
        frames += chunker.push(raw[pos : pos + step])
        pos += step
    frames += chunker.push(raw[pos:])  # whatever the rounding left
    assert all(f.shape == (160,) and f.dtype == np.int16 for f in frames)
    held = chunker.pending
    tail = chunker.flush()
    expect = total // 2 if as_bytes else len(raw)
    assert len(frames) * 160 + held == expect
    got = np.concatenate([*frames, tail[:held] if tail is not None else np.zeros(0, np.int16)])
    assert np.array_equal(got, signal[:expect])
    assert (tail is None) == (held == 0)
    if tail is not None:
        assert tail.shape == (160,) and not tail[held:].any()
    assert chunker.pending == 0 and chunker.flush() is None


def test_frame_chunker_frames_do_not_alias_input() -> None:
    chunker = FrameChunker(16000)
    x = np.ones(700, dtype=np.int16)
    frames = chunker.push(x)
    x[:] = 5
    assert len(frames) == 2 and all((f == 1).all() for f in frames)
    assert pcm16_from_bytes(b"\x01\x00\xff\xff").tolist() == [1, -1]
    with pytest.raises(ValueError):
        pcm16_from_bytes(b"\x01")


def test_test_signals_are_what_they_claim() -> None:
    """tests/sounds.py feeds the VAD benchmark and the false barge-in tests; check levels and shapes."""
    def octave_tilt_db(x: np.ndarray) -> float:
        """Energy of the 2-4 kHz octave over the 250-500 Hz octave, in dB."""
        spec = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
        f = np.fft.rfftfreq(len(x), 1 / 16000)
        return float(10 * np.log10(spec[(f >= 2000) & (f < 4000)].sum() / spec[(f >= 250) & (f < 500)].sum()))

    for gen in (sounds.white_noise, sounds.pink_noise):
        assert rms_dbfs(gen(2000, -35)) == pytest.approx(-35, abs=0.05)
    white, pink = sounds.white_noise(4000, -30), sounds.pink_noise(4000, -30)
    # White: equal energy per Hz, so the 2-4 kHz octave holds 8x the 250-500 Hz one; pink: equal per octave.
    assert octave_tilt_db(white) == pytest.approx(9.0, abs=1)
    assert octave_tilt_db(pink) == pytest.approx(0.0, abs=1)
    assert rms_dbfs(sounds.hum(1000, -25)) == pytest.approx(-25, abs=0.05)
    cough = sounds.cough()
    assert len(cough) == 4000 and np.abs(cough).max() == pytest.approx(32767 * 10 ** (-6 / 20), rel=0.01)
    # Loud at the start, decayed by the end: a burst, not a steady noise.
    assert rms_dbfs(cough[:800]) - rms_dbfs(cough[-800:]) > 20
    click = sounds.click()
    assert len(click) == 80 and np.abs(click).max() > 20000
    assert not np.array_equal(sounds.cough(seed=1), cough)
    assert np.array_equal(sounds.white_noise(100, -20, seed=3), sounds.white_noise(100, -20, seed=3))
