"""Whisper speech-to-text via faster-whisper (CTranslate2, int8 on CPU), tuned for short turns.

Owns the decode of one utterance: log-mel features over a *short* window instead of Whisper's fixed 30 s
(CTranslate2's encoder accepts fewer frames; whisper.cpp calls this the "audio_ctx" trick), beam search with
a no-timestamps prompt, the guards against Whisper's failure modes on telephone-grade turns (hallucinated
text on silence and noise, repeat loops and restarts, stock junk phrases), and a second pass over Whisper's
own 30 s window when the first looks like a loop.

Figures below: tiny.en int8, beam 5, one thread; "dev set" is the 40 real prompts of tests/realspeech.py
(wideband / telephone: 8 kHz μ-law upsampled), "espeak" the 14 + 10 sentences of tests/test_stt.py and
bench/pipeline.py (16 kHz / μ-law); WER is corpus WER.

Window. The audio is zero-padded to `max(min_window_s, ceil(duration + margin_s))` seconds; padding the
*audio* before the mel transform (the silence Whisper was trained on) beats zero-padding the features. The
margin is what stops the decoder restarting: given too little silence after the last word, it begins the
utterance again into the padding ("Your call cannot be completed as dialed. Your call cannot be completed as
dial"). Raw decodes (no guards) on the dev set, WER and restarts per leg: margin 1 s 0.23/0.37 with 10/20
restarts; 3 s 0.12/0.18, 5/9; 4 s 0.09/0.15, 3/7; 5 s 0.04/0.07-0.10, 0/2-4; 6 s 0.043/0.035, 0/0; the 30 s
window 0.040/0.038, 0/0. On espeak, 6 s gives 0.063/0.184 (3 s: 0.090/0.242, 30 s: 0.067/0.229). The
encoder costs 35-60 ms over a 7-10 s window against ~350 ms over 30 s; with the restarts gone, a decode
costs ~7-10 % more CPU than with the 3 s margin (mean 149 against 139 ms over the 128 clean decodes, same
process, interleaved), and the second pass almost never runs (3 s would send 5/40 and 10/40 of the dev set
to it, mean 201 ms). Espeak at 240 words/min is the one set measured worse: 0.184 against 0.126 at 16 kHz.
The minimum window no longer matters (ceil(duration + 6) >= 7). Greedy search (beam_size=1) saved ~30-40 %
of the decode time but raised μ-law WER to ~0.3 (measured with the 3 s margin).

max_length is 8 tokens per second of audio + 8: generous next to the <= 4.6 tokens/s the dev set and espeak
references need, but digit strings come out at ~6/s, and a tighter cap (5/s + 4) only cuts restarts short
(1/40 and 3/40 left with the 3 s margin) instead of preventing them.

Guards, in order: an energy gate (no model call on silence); no speech when the no-speech probability is
above 0.8, or above 0.6 with average log-probability below -1 (faster-whisper's rule); `find_repeats`
(loops that cannot have been said in the voiced time, restarts, a restart's last word cut short); junk
phrases on weak evidence.

Second pass. When the first pass's raw text has Whisper's compression ratio above 2.4, or a repeat the guard
removed, or a cut-off repeated tail (`repeated_tail`), or a text that is one phrase said over again
(`echoed_text`: "Goodbye! Goodbye!" from a one-word turn on one CPU kernel), the audio is decoded again: first
over the same window with CTranslate2's repetition penalty (1.3; ~0.2 s of a core), kept when that pass is
clean (no repeat, inside Whisper's thresholds); otherwise over the 30 s window (0.4-0.9 s), and the pass
without a repeat is kept, then the one inside Whisper's thresholds, then the likelier (higher average
log-probability). `DecodeInfo.fallback` says why it ran and `.path` which pass was kept. It ran on 0-2 of the
108 decodes of the dev set and the test sentences (every CTranslate2 kernel: AVX512, AVX2, AVX, GENERIC); on
the dev set with noise, 0/80 at 10 dB SNR, 1/80 at 5 dB, 9/80 at 0 dB (unintelligible to tiny.en: WER > 1). On
17 decodes with a repeat (noisy and repeat-heavy sets) the 30 s pass lowered the summed WER from 17.0 to 15.4.
A window 3 s longer was tried first before, because at a pause the 30 s pass delayed the turn by ~0.5 s: among
~600 decodes (the dev set, bench/turns.py's sentences and their 0.5 s prefixes, both legs) 23 wanted a second
pass, and the longer window's text was the 30 s pass's in 19 (the rest were half-word prefixes); on the 11
noisy dev-set decodes (10/5/0 dB) that wanted one, it was clean in 2, and the summed WER was 11.8 against 11.7
with the 30 s pass alone. The repetition penalty then replaced the longer window, because on the phone leg
both the first window and the longer one looped on some sentences ("Can you tell me my account balance please?
Can you tell me my count", 1.5 s to decode with the 30 s pass, answered ~1.7 s after the user stopped). Among
1212 decodes (the dev set clean and at 10/5/0 dB SNR, bench/turns.py's sentences, all as wideband and as a
PCMU call, whole and cut at 30-90 %), 125 wanted a second pass: the penalised pass was clean in 75 (mean 197
ms), the 3 s longer window in 43 (248 ms); the 30 s pass (747 ms on average in that run) then ran 50 times
instead of 82, and the summed WER of the 12 whole utterances among them (mostly at 0 dB) was 10.03 against
10.19 with the longer window first and 10.43 with the 30 s pass alone. Partials skip the second pass
(`second_pass=False`): they are previews, and it would hold a core while the pause's decode, whose text ends
the turn, waits. Whisper's other trigger, average log-probability below -1, is not used: on the 19 noisy or
very fast decodes it flagged, the 30 s pass was better in 8 and worse in 9 (summed WER 21.1 -> 21.6), and
temperature sampling (faster-whisper's fallback) was no steadier while costing up to 25 samples and answering
differently on each run. """

from __future__ import annotations

import logging
import math
import re
import threading
import time
import zlib
from dataclasses import dataclass

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from speechpipe.pipeline.stt.base import STTEngine, STTStream, Transcript

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_WINDOW_MAX_S = 30  # Whisper's positional embeddings cover 30 s
_FRAME = SAMPLE_RATE // 50  # 20 ms, for the energy measurements
# Below this peak 20 ms RMS (-55 dBFS) there is nothing a person said: skip the model entirely. Whisper
# says "you" on digital silence with no-speech probability 0.99, so it must not even be asked.
_GATE_RMS = 32768 * 10 ** (-55 / 20)
# Speech-to-tokens ceiling for max_length: fast speech is ~4 words/s, ~1.4 tokens/word plus punctuation.
_TOKENS_PER_S = 8
# Measured no-speech probabilities: speech 0.12–0.45 (a lone "um" 0.6–0.73), silence/noise/hum 0.90–0.99.
_NO_SPEECH_HARD = 0.8
_NO_SPEECH_SOFT = 0.6  # ...and avg logprob below _LOGPROB_FLOOR: the rule faster-whisper uses
_LOGPROB_FLOOR = -1.0
_COMPRESSION_MAX = 2.4  # Whisper's compression_ratio_threshold
# The second pass first decodes the same window again with this CTranslate2 repetition_penalty (docstring).
_REPEAT_PENALTY = 1.3
# Phrases Whisper emits on near-silence (its subtitle training data); dropped only when the evidence for
# speech is weak, because "Thank you." is also a perfectly good thing to say on the phone.
_JUNK = frozenset({
    "you", "thank you", "thanks for watching", "thank you for watching", "thank you so much for watching",
    "please subscribe", "subtitles by the amara org community", "i'm sorry", "i don't know", "bye",
})
# Words per second of voiced audio above which repeated text cannot all have been said.
_MAX_WORDS_PER_VOICED_S = 4.5

_WORD_NORM = re.compile(r"[^\w']+")


def _norm_word(w: str) -> str:
    return _WORD_NORM.sub("", w.lower())


def _norm_text(text: str) -> str:
    return " ".join(w for w in (_norm_word(w) for w in text.split()) if w)


def frame_rms(pcm16: np.ndarray) -> np.ndarray:
    """RMS of each whole 20 ms frame (int16 scale)."""
    n = len(pcm16) // _FRAME
    if n == 0:
        return np.zeros(1) if len(pcm16) == 0 else np.array([np.sqrt(np.mean(pcm16.astype(np.float64) ** 2))])
    frames = pcm16[: n * _FRAME].astype(np.float64).reshape(n, _FRAME)
    return np.sqrt(np.mean(frames**2, axis=1))


def voiced_seconds(rms: np.ndarray) -> float:
    """Seconds of frames within 30 dB of the loudest frame and above the gate: a rough speech duration."""
    peak = float(rms.max()) if rms.size else 0.0
    floor = max(_GATE_RMS, peak * 10 ** (-30 / 20))
    return float(np.count_nonzero(rms >= floor)) * _FRAME / SAMPLE_RATE


def _copies(tail: list[str], src: list[str], *, cut: bool) -> bool:
    """Whether `tail` repeats the opening of `src`; with `cut`, its last word may be cut short ("dial" for
    "dialed"), as when the decoder stopped mid-word at the end of the window."""
    n = len(tail)
    if not tail or n > len(src) or tail[:-1] != src[: n - 1]:
        return False
    return tail[-1] == src[n - 1] or (cut and len(tail[-1]) >= 2 and src[n - 1].startswith(tail[-1]))


def find_repeats(text: str, *, voiced_s: float, hit_cap: bool) -> tuple[str, str]:
    """Remove Whisper's decode loops when they cannot be real speech; returns (text, what was removed).

    Three shapes. A run of one word block repeated ("Hello? Hello? Hello?"), collapsed to one copy when the
    decode hit its length cap or the text has more words than the voiced audio could hold ("loop"). A
    restart: after a sentence end the decoder begins an earlier sentence again and stops without an end
    of sentence, often mid-word ("Your call cannot be completed as dialed. Your call cannot be completed as
    dial"): the restarted tail goes ("restart"). Repeats a person could have said in that time ("No, no.",
    a sentence said twice, "Call me. Call me back tomorrow.") stay. What is removed is "" when nothing was.
    """
    words = text.split()
    if len(words) < 2:
        return text, ""
    norm = [_norm_word(w) for w in words]
    implausible = len(words) / max(voiced_s, 0.3) > _MAX_WORDS_PER_VOICED_S
    removed = ""
    keep: list[int] = []
    i = 0
    while i < len(words):
        best_p, best_n = 0, 1
        for p in range(1, (len(words) - i) // 2 + 1):
            block = norm[i : i + p]
            n = 1
            while norm[i + n * p : i + (n + 1) * p] == block:
                n += 1
            if n > 1 and n * p > best_n * best_p:
                best_p, best_n = p, n
        if best_n > 1 and (hit_cap or implausible):
            block = norm[i : i + best_p]
            keep.extend(range(i, i + best_p))  # keep the first copy, with its punctuation
            i += best_n * best_p
            rest = len(words) - i
            if hit_cap and 0 < rest < best_p and _copies(norm[i:], block, cut=True):
                i = len(words)  # the loop was cut mid-copy by the length cap
            removed = "loop"
            continue
        keep.append(i)
        i += 1
    words = [words[k] for k in keep]
    norm = [norm[k] for k in keep]
    # A restart: the text after some sentence end repeats the opening of an earlier sentence. Earliest
    # restart first, so the whole repeated tail goes.
    starts = [0] + [k + 1 for k, w in enumerate(words[:-1]) if w[-1] in ".?!"]
    cut_off = words[-1][-1] not in ".?!"
    for i in starts[1:]:
        tail = norm[i:]
        if not (implausible or hit_cap or (cut_off and len(tail) >= 2)):
            continue
        if any(_copies(tail, norm[j:i], cut=cut_off) for j in starts if j < i):
            words, removed = words[:i], "restart"
            break
    return (" ".join(words), removed) if removed else (text, "")


def collapse_repeats(text: str, *, voiced_s: float, hit_cap: bool) -> str:
    """`find_repeats` without the label: the text with the loops that cannot be real speech removed."""
    return find_repeats(text, voiced_s=voiced_s, hit_cap=hit_cap)[0]


def repeated_tail(text: str) -> str:
    """A cut-off text whose last words repeat an earlier run of it: the shape of a decode that jumped back
    and ran into the end of the window ("... the pound key the pound"). Returns the repeated words, or "".

    Only a suspicion, never deleted on its own: a phone number read out ("5 5 5 1 2 1 2") has the same
    shape. The engine decodes such audio a second time and keeps whichever decode has no repeat.
    """
    words = text.split()
    if len(words) < 4 or words[-1][-1] in ".?!":
        return ""
    norm = [_norm_word(w) for w in words]
    for i in range(2, len(norm) - 1):  # earliest start first: the longest tail
        tail = norm[i:]
        if any(_copies(tail, norm[j:i], cut=True) for j in range(i - len(tail) + 1)):
            return " ".join(words[i:])
    return ""


def echoed_text(text: str) -> str:
    """A text that is one block of words said two or more times over and nothing else ("Goodbye! Goodbye!"):
    the loop a short window gives on a one-phrase turn. Returns the block, or "".

    Only a suspicion, like `repeated_tail`: "No, no." is said too. Measured on "goodbye" (espeak, μ-law, the
    AVX kernel): the 7 s window gives "Goodbye! Goodbye!" (log-prob -0.68), the 30 s window "Goodbye."
    (-0.35), so the second pass decides and the decode a person would give wins.
    """
    norm = [w for w in (_norm_word(w) for w in text.split()) if w]
    for p in range(1, len(norm) // 2 + 1):
        if len(norm) % p == 0 and norm == norm[:p] * (len(norm) // p):
            return " ".join(text.split()[:p])
    return ""


def compression_ratio(text: str) -> float:
    """Whisper's loop detector (openai-whisper and faster-whisper alike): UTF-8 bytes over zlib-compressed
    bytes. Above 2.4 the text is mostly repetition."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def split_long(rms: np.ndarray, max_s: float) -> list[tuple[int, int]]:
    """Cut a long recording (given as 20 ms frame RMS) into chunks of at most `max_s`, each cut at the
    quietest 200 ms in the chunk's last third, so a cut rarely lands inside a word. Returns frame ranges."""
    max_frames = int(max_s * SAMPLE_RATE / _FRAME)
    smooth = np.convolve(rms, np.ones(10) / 10, mode="same")
    cuts, start = [], 0
    while len(rms) - start > max_frames:
        lo = start + (2 * max_frames) // 3
        cut = lo + int(np.argmin(smooth[lo : start + max_frames]))
        cuts.append((start, cut))
        start = cut
    cuts.append((start, len(rms) + 1))  # +1: the samples after the last whole frame
    return cuts


@dataclass(frozen=True)
class EndConfidence:
    """The decoder's probability of the last word (its tokens' product) and of the sentence mark after it
    (None when the text ends without one), each given the audio and the words before it."""

    last_word: float
    end_mark: float | None


_MARKS = frozenset(".?!")


def end_confidence(pieces: list[str], probs: list[float]) -> EndConfidence | None:
    """From the decoded tokens (their text pieces) and each one's probability: a word starts at a piece
    beginning with a space; trailing sentence marks are the end mark."""
    n = len(pieces)
    mark: float | None = None
    while n and pieces[n - 1].strip() and set(pieces[n - 1].strip()) <= _MARKS:
        mark = probs[n - 1] if mark is None else mark * probs[n - 1]
        n -= 1
    if not n:
        return None
    start = max((i for i in range(n) if pieces[i].startswith(" ")), default=0)
    return EndConfidence(float(np.prod(probs[start:n])), None if mark is None else float(mark))


@dataclass(frozen=True)
class DecodeInfo:
    """What one decode saw, for logs and tests (the kept pass's figures; times cover every pass)."""

    window_s: float
    no_speech_prob: float
    avg_logprob: float
    raw_text: str
    reason: str  # "ok", "gate", "no_speech", "junk", "chunked"
    encode_s: float = 0.0
    decode_s: float = 0.0
    compression_ratio: float = 0.0  # Whisper's: UTF-8 length over zlib-compressed length of raw_text
    # "loop" or "restart" removed by the guard, "tail" or "echo" suspected and kept, "" for none
    repeat: str = ""
    fallback: str = ""  # why a second pass ran (or was wanted): "compression" or "repeat"; "" when none was
    # "short": one pass; "penalty": the same window with a repetition penalty came out clean and was kept;
    # "short+full": the 30 s pass ran (after the penalised one) and the short one was kept; "full": the 30 s
    # one was;
    # "short-only": the first pass wanted a second one but the caller asked for one pass (a partial).
    path: str = "short"
    # The kept text's end, as sure as the decoder was of it (EndConfidence; None when the guards changed
    # the text, or end_confidence is off).
    end: EndConfidence | None = None


@dataclass(frozen=True)
class _Pass:
    """One encoder + decoder pass over one window."""

    window_s: float
    raw: str
    avg_logprob: float
    no_speech_prob: float
    hit_cap: bool
    encode_s: float
    decode_s: float
    end: EndConfidence | None = None

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.raw)


def _rank(p: _Pass, repeat: str) -> tuple[bool, bool, float]:
    """Order of preference between two passes over the same audio: lower is better."""
    failed = p.compression_ratio > _COMPRESSION_MAX or p.avg_logprob < _LOGPROB_FLOOR
    return bool(repeat), failed, -p.avg_logprob


def _clean(p: _Pass, repeat: str) -> bool:
    """No repeat, and inside Whisper's thresholds."""
    return _rank(p, repeat)[:2] == (False, False)


class WhisperEngine(STTEngine):
    """One loaded Whisper model, shared by every session in the process."""

    name = "whisper"
    sample_rate = SAMPLE_RATE
    streaming = False

    def __init__(
        self,
        model_path: str,
        *,
        cpu_threads: int = 1,
        num_workers: int = 2,
        compute_type: str = "int8",
        beam_size: int = 5,
        min_window_s: float = 4.0,
        margin_s: float = 6.0,
        partial_interval_s: float | None = None,
        end_confidence: bool = True,
    ) -> None:
        # cpu_threads=1 with num_workers=2: two sessions decode at once on a 2-core machine, each on its own
        # CTranslate2 replica, instead of queueing behind one multithreaded replica.
        self.model = WhisperModel(
            model_path, device="cpu", compute_type=compute_type, cpu_threads=cpu_threads,
            num_workers=num_workers,
        )
        self.model_path = model_path
        self.multilingual: bool = self.model.model.is_multilingual
        self.beam_size = beam_size
        self.min_window_s = min_window_s
        self.margin_s = margin_s
        # Server-wide partials override (SPEECHPIPE_WHISPER_PARTIAL_S): seconds of new audio between partial
        # decodes, 0 = no partials; None = each pipe's stt.partials / stt.partial_interval_s decide. Whisper
        # does not stream either way: the session's STT lane asks `WhisperStream.partial_decode` when the
        # machine has time for it (pipeline.stt_lane.DecodeGate).
        self.partial_interval_s = partial_interval_s
        # Score the decoded text's last word and sentence mark (Transcript.last_word_prob/end_mark_prob),
        # which the heuristic turn detector reads.
        self.end_confidence = end_confidence
        self._en_tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual, task="transcribe",
                                       language="en")
        self._suppress = list(get_suppressed_tokens(self._en_tokenizer, [-1]) or [])

    # --- public -------------------------------------------------------------------------------------------

    def new_stream(self, language: str | None = None) -> WhisperStream:
        return WhisperStream(self, self.check_language(language))

    def transcribe(self, pcm16: np.ndarray, language: str | None = None, *, second_pass: bool = True
                   ) -> tuple[str, DecodeInfo]:
        """Decode one utterance (int16 mono at 16 kHz); returns text ("" for no speech) and what was seen.
        `second_pass=False`: the first pass only (no second pass, ~0.1-0.4 s of a core), for decodes whose
        text is only a preview (partials); the result then says `path="short-only"` when it wanted one."""
        language = self.check_language(language)
        pcm16 = np.asarray(pcm16, dtype=np.int16)
        rms = frame_rms(pcm16)
        if len(pcm16) == 0 or float(rms.max()) < _GATE_RMS:
            return "", DecodeInfo(0.0, 1.0, 0.0, "", "gate")
        chunk_max_s = max(_WINDOW_MAX_S - self.margin_s, _WINDOW_MAX_S / 2)  # 24 s with the 6 s margin
        if len(pcm16) <= chunk_max_s * SAMPLE_RATE:
            return self._decode_window(pcm16, rms, language, second_pass)
        # Longer than one window: cut at the quietest moments into chunks that each get a full margin.
        texts, infos = [], []
        for start, end in split_long(rms, chunk_max_s):
            chunk = pcm16[start * _FRAME : end * _FRAME]
            text, info = self._decode_window(chunk, rms[start:end], language, second_pass)
            infos.append(info)
            if text:
                texts.append(text)
        info = DecodeInfo(
            sum(i.window_s for i in infos), min(i.no_speech_prob for i in infos),
            float(np.mean([i.avg_logprob for i in infos])), " | ".join(i.raw_text for i in infos),
            "chunked", sum(i.encode_s for i in infos), sum(i.decode_s for i in infos),
            max(i.compression_ratio for i in infos), ",".join(sorted({i.repeat for i in infos} - {""})),
            ",".join(sorted({i.fallback for i in infos} - {""})),
            next((p for p in ("full", "short+full", "penalty", "short-only")
                  if any(i.path == p for i in infos)), "short"),
        )
        return " ".join(texts), info

    # --- internals ----------------------------------------------------------------------------------------

    def check_language(self, language: str | None) -> str | None:
        if language in (None, "", "auto"):
            return None if self.multilingual else "en"
        lang = language.split("-")[0].lower()
        if not self.multilingual and lang != "en":
            raise ValueError(
                f"the Whisper model at {self.model_path} is English-only (*.en); language {language!r} needs "
                "a multilingual model (e.g. stt.model='base' or 'small')"
            )
        if self.multilingual and lang not in self.model.supported_languages:
            raise ValueError(f"Whisper does not know language {language!r}")
        return lang

    def _prompt(self, encoded: ctranslate2.StorageView, language: str | None) -> tuple[Tokenizer, list[int]]:
        if not self.multilingual:
            tok = self._en_tokenizer
        else:
            if language is None:
                lang_token = self.model.model.detect_language(encoded)[0][0][0]  # "<|xx|>"
                language = lang_token[2:-2]
            tok = Tokenizer(self.model.hf_tokenizer, True, task="transcribe", language=language)
        # <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>, ids from this model's tokenizer.
        return tok, [*tok.sot_sequence, tok.no_timestamps]

    def _guard(self, p: _Pass, voiced_s: float) -> tuple[str, str, str]:
        """(text, reason, repeat) for one pass: see DecodeInfo for the values."""
        nsp, avg_logprob = p.no_speech_prob, p.avg_logprob
        if nsp > _NO_SPEECH_HARD or (nsp > _NO_SPEECH_SOFT and avg_logprob < _LOGPROB_FLOOR):
            return "", "no_speech", ""
        text, removed = find_repeats(p.raw, voiced_s=voiced_s, hit_cap=p.hit_cap)
        norm = _norm_text(text)
        if not norm:
            return "", "junk", ""  # punctuation only (". .")
        if norm in _JUNK and (nsp > 0.4 or avg_logprob < _LOGPROB_FLOOR or voiced_s < 0.15):
            return "", "junk", ""
        suspect = "tail" if repeated_tail(text) else "echo" if echoed_text(text) else ""
        return text, "ok", removed or suspect

    @staticmethod
    def _failure(p: _Pass, reason: str, repeat: str) -> str:
        """Why a pass looks like a failed decode ("" if it does not): Whisper's compression-ratio rule, or a
        repeat the guard removed or suspects. Whisper's other rule, average log-probability below -1, is no
        reason here: on the passes it flagged a second pass was better as often as worse (module docstring).
        """
        if reason != "ok":
            return ""  # the guards found no speech: nothing a second pass could rescue
        if p.compression_ratio > _COMPRESSION_MAX:
            return "compression"
        return "repeat" if repeat else ""

    def _decode_window(self, pcm16: np.ndarray, rms: np.ndarray, language: str | None,
                       second_pass: bool = True) -> tuple[str, DecodeInfo]:
        dur = len(pcm16) / SAMPLE_RATE
        if float(rms.max()) < _GATE_RMS:
            return "", DecodeInfo(0.0, 1.0, 0.0, "", "gate")
        voiced_s = voiced_seconds(rms)
        # At most 30 s only as a safety net: transcribe() chunks audio too long for the full margin.
        window_s = min(_WINDOW_MAX_S, max(self.min_window_s, math.ceil(dur + self.margin_s)))
        passes = [self._pass(pcm16, window_s, language)]
        text, reason, repeat = self._guard(passes[0], voiced_s)
        fallback = self._failure(passes[0], reason, repeat) if window_s < _WINDOW_MAX_S else ""
        path = "short"
        kept = passes[0]
        if fallback and not second_pass:
            path = "short-only"
        elif fallback:
            # First the same window with a repetition penalty (~0.2 s): kept when it is clean (no repeat,
            # inside Whisper's thresholds), as it is for most loops. Otherwise Whisper's own 30 s window
            # (0.4-0.9 s of a core, the encoder over 30 s), where the short window's loops are rarely
            # repeated. Keep the pass without a repeat, then the one inside the thresholds, then the likelier;
            # a pass that hears no speech never replaces speech.
            passes.append(self._pass(pcm16, window_s, language, repetition_penalty=_REPEAT_PENALTY))
            text2, reason2, repeat2 = self._guard(passes[-1], voiced_s)
            if reason2 == "ok" and _clean(passes[-1], repeat2):
                text, reason, repeat, path, kept = text2, reason2, repeat2, "penalty", passes[-1]
            else:
                passes.append(self._pass(pcm16, _WINDOW_MAX_S, language))
                text2, reason2, repeat2 = self._guard(passes[-1], voiced_s)
                path = "short+full"
                if reason2 == "ok" and _rank(passes[-1], repeat2) < _rank(passes[0], repeat):
                    text, reason, repeat, path, kept = text2, reason2, repeat2, "full", passes[-1]
        return text, DecodeInfo(
            kept.window_s, kept.no_speech_prob, kept.avg_logprob, kept.raw, reason,
            sum(p.encode_s for p in passes), sum(p.decode_s for p in passes), kept.compression_ratio,
            repeat, fallback, path, kept.end if text == kept.raw else None,
        )

    def _pass(self, pcm16: np.ndarray, window_s: float, language: str | None,
              repetition_penalty: float = 1.0) -> _Pass:
        dur = len(pcm16) / SAMPLE_RATE
        audio = np.zeros(int(window_s * SAMPLE_RATE), dtype=np.float32)
        audio[: len(pcm16)] = pcm16.astype(np.float32) / 32768.0
        # Pad the audio, not the features: the padded region then looks like the silence Whisper was trained
        # on (measured: feature zero-padding gives more loops and a higher WER).
        features = self.model.feature_extractor(audio)[:, : int(window_s * 100)]

        t0 = time.perf_counter()
        encoded = self.model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])), to_cpu=False
        )
        t1 = time.perf_counter()
        tokenizer, prompt = self._prompt(encoded, language)
        max_new = min(448 - len(prompt), math.ceil(dur * _TOKENS_PER_S) + 8)
        result = self.model.model.generate(
            encoded, [prompt], beam_size=self.beam_size, max_length=len(prompt) + max_new,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=self._suppress, repetition_penalty=repetition_penalty,
        )[0]
        tokens = result.sequences_ids[0]
        end = None
        if self.end_confidence and tokens:
            # Each token's probability given the audio and the tokens before it: one more decoder pass over
            # the kept sequence (~30 ms for tiny.en on one thread; beam search does not return them).
            aligned = self.model.model.align(encoded, list(tokenizer.sot_sequence), [tokens],
                                             max(1, int(dur * 100)))[0]
            end = end_confidence([tokenizer.decode([t]) for t in tokens], list(aligned.text_token_probs))
        t2 = time.perf_counter()
        # faster-whisper's average log-probability (length_penalty=1): the EOT step counts as a token.
        avg_logprob = float(result.scores[0] * len(tokens) / (len(tokens) + 1))
        return _Pass(float(window_s), tokenizer.decode(tokens).strip(), avg_logprob,
                     float(result.no_speech_prob), len(tokens) >= max_new, t1 - t0, t2 - t1, end)


class WhisperStream(STTStream):
    """Buffers one utterance; decodes on final() and caches the result until more audio arrives.

    `accept`, `final`, `partial_decode` and `reset` may run on different threads at once (a partial decodes
    beside the session's STT lane): a decode that began before a reset never lands in the next utterance."""

    def __init__(self, engine: WhisperEngine, language: str | None) -> None:
        self._engine = engine
        self._language = language
        self._lock = threading.Lock()
        self._buf = np.zeros(SAMPLE_RATE * 4, dtype=np.int16)
        self._n = 0
        self._cached: Transcript | None = None
        self._cached_n = -1
        self._partial_n = 0
        self._partial_text: str | None = None
        self._gen = 0  # utterances reset so far: a decode of an earlier one is not cached
        self.last_info: DecodeInfo | None = None

    def accept(self, pcm16: np.ndarray) -> None:
        pcm16 = np.asarray(pcm16, dtype=np.int16).ravel()
        with self._lock:
            need = self._n + len(pcm16)
            if need > len(self._buf):
                grown = np.zeros(max(need, 2 * len(self._buf)), dtype=np.int16)
                grown[: self._n] = self._buf[: self._n]
                self._buf = grown
            self._buf[self._n : need] = pcm16
            self._n = need

    def partial(self) -> str | None:
        # Whisper does not stream: a partial is a full decode of the audio so far, 0.2-0.5 s of a core for
        # a 2-8 s turn. The pipeline does not ask this: its STT lane calls partial_decode() about every
        # stt.partial_interval_s of new speech, and only when no final decode wants the CPU
        # (pipeline.stt_lane.DecodeGate). Here, for callers that feed a stream by hand: None unless the
        # engine's partial_interval_s is set, then a decode at most once per that much new audio.
        interval = self._engine.partial_interval_s
        if not interval:
            return None
        with self._lock:
            if self._n - self._partial_n < interval * SAMPLE_RATE:
                return None
            self._partial_n = self._n
        text = self.final().text
        with self._lock:
            if text == self._partial_text:
                return None
            self._partial_text = text
        return text or None

    def partial_decode(self) -> str | None:
        """The text of the audio so far, for a partial the pipeline asks for when the STT is idle: final()'s
        decode (so an endpoint with no audio after it reuses the result) without the 30 s second pass: a
        partial is a preview, and that pass would hold a core ~0.4 s while the pause's decode waits for it.
        A result that wanted the second pass is not kept for the final. None when there is no text."""
        return self._decode(second_pass=False).text or None

    def final(self) -> Transcript:
        return self._decode(second_pass=True)

    def _decode(self, second_pass: bool) -> Transcript:
        with self._lock:
            if self._cached is not None and self._cached_n == self._n:
                return self._cached
            n, gen = self._n, self._gen
            audio = self._buf[:n].copy()
        t0 = time.perf_counter()
        text, info = self._engine.transcribe(audio, self._language, second_pass=second_pass)
        end = info.end
        result = Transcript(text=text, audio_s=n / SAMPLE_RATE, compute_s=time.perf_counter() - t0,
                            last_word_prob=None if end is None else end.last_word,
                            end_mark_prob=None if end is None else end.end_mark)
        with self._lock:
            if self._gen == gen:
                self.last_info = info
                # No audio arrived while decoding: the result covers everything, unless it is one pass short.
                if self._n == n and info.path != "short-only":
                    self._cached, self._cached_n = result, n
        return result

    def reset(self) -> None:
        with self._lock:
            self._gen += 1
            self._n = 0
            self._cached, self._cached_n = None, -1
            self._partial_n, self._partial_text = 0, None
            self.last_info = None
