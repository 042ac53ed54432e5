"""Checks a pipe's config against what this machine can run, before it is stored.

The schema (`speechpipe.pipe_config`) says what a config may look like; this says whether its engines
exist here: the STT model resolves (a directory, a model under the models dir, or a name the engine can
fetch) and espeak-ng has the voice. Nothing is loaded: a check costs a directory lookup or one cached
`espeak-ng --voices`. VAD engines are a closed list the schema already enforces.
"""

from __future__ import annotations

import subprocess
from typing import Any

from speechpipe.pipe_config import PipeConfig

from . import tts
from .models import ModelUnavailable, check_model


def config_problems(config: PipeConfig, prefix: tuple[str, ...] = ("config",)) -> list[dict[str, Any]]:
    """Validation details (`loc`, `msg`, `type`) for each setting this machine cannot run; [] when none."""
    problems: list[dict[str, Any]] = []
    try:
        check_model(config.stt.engine, config.stt.model, config.stt.language)
    except ModelUnavailable as exc:
        problems.append({"loc": [*prefix, "stt", "model"], "msg": str(exc), "type": "model_unavailable"})
    try:
        tts.validate(config.tts.voice, config.tts.rate_wpm, config.tts.pitch)
    except ValueError as exc:
        problems.append({"loc": [*prefix, "tts", "voice"], "msg": str(exc), "type": "voice_unavailable"})
    except (OSError, subprocess.CalledProcessError) as exc:  # espeak-ng itself is missing or broken
        problems.append({"loc": [*prefix, "tts", "engine"], "msg": str(exc), "type": "engine_unavailable"})
    return problems
