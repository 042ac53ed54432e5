"""Speech-to-text engines behind one interface (base.py), and a factory that loads one from a directory.

Engine modules import their native libraries (CTranslate2, Kaldi) on first use only, so importing this
package stays cheap. Model *resolution* (names, packaged models, downloads, the per-process cache) lives in
speechpipe.pipeline.models; call its get_stt_engine() rather than this factory from the pipeline.
"""

from __future__ import annotations

from typing import Any

from speechpipe.pipeline.stt.base import STTEngine, STTStream, Transcript

ENGINES = ("whisper", "vosk")

__all__ = ["ENGINES", "STTEngine", "STTStream", "Transcript", "build_engine"]


def build_engine(engine: str, model_path: str, **options: Any) -> STTEngine:
    """Load `engine` ("whisper" | "vosk") from a model directory. Options go to the engine's constructor."""
    if engine == "whisper":
        from speechpipe.pipeline.stt.whisper import WhisperEngine

        return WhisperEngine(model_path, **options)
    if engine == "vosk":
        from speechpipe.pipeline.stt.vosk import VoskEngine

        return VoskEngine.from_path(model_path, **options)
    raise ValueError(f"unknown STT engine {engine!r}; expected one of {', '.join(ENGINES)}")
