"""Process logging: text or one JSON object per line, with the current session's ids on every line.

`configure_logging` installs the one root handler (`serve`, the SIP workers). `bind()` / `bound()` put a
session's ids (`session_id`, `pipe_id`, `direction`, `agent_id`) in context variables; a filter on the
handler stamps them on every record logged in that context. asyncio tasks copy the context when they are
created, so ids bound in a connection's task before the session's tasks start reach every line of that
session: pipeline, edge, dispatch, bridge. Executor threads do not inherit it: run work there through
`contextvars.copy_context().run` when it logs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

FIELDS = ("session_id", "pipe_id", "direction", "agent_id")
_VARS: dict[str, contextvars.ContextVar[str | None]] = {
    name: contextvars.ContextVar(f"speechpipe.log.{name}", default=None) for name in FIELDS}
# LogRecord's own attributes: everything else on a record came from `extra=` (or the filter) and is output.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                                      "taskName"}
_json_mode = False


def bind(**ids: str | None) -> list[contextvars.Token[str | None]]:
    """Set the given ids (None values are skipped) in the current context; returns tokens for `unbind`.

    Inside a task this binds the rest of that task and every task it creates from now on."""
    unknown = set(ids) - set(FIELDS)
    if unknown:
        raise TypeError(f"unknown log ids {sorted(unknown)}; known: {FIELDS}")
    return [_VARS[name].set(str(value)) for name, value in ids.items() if value is not None]


def unbind(tokens: list[contextvars.Token[str | None]]) -> None:
    for token in reversed(tokens):
        token.var.reset(token)


@contextlib.contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """`bind` for the duration of a block (then the previous values come back)."""
    tokens = bind(**ids)
    try:
        yield
    finally:
        unbind(tokens)


def current() -> dict[str, str]:
    """The ids bound in the current context."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Stamps the bound ids on each record, unless the call gave them itself (`extra=`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, logger, message, the bound ids, `extra=` fields,
    and `exc` / `stack` text when present."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {"ts": ts.replace("+00:00", "Z"), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        if self.process:
            out["process"] = self.process
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value is not None and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: [session_id] message` (the brackets only while a session is bound)."""

    def __init__(self, process: str | None = None) -> None:
        label = f" {process}" if process else ""
        super().__init__(f"%(asctime)s{label} %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        session_id = getattr(record, "session_id", None)
        if session_id:  # `message` is this formatter's scratch field: format() recomputes it every time
            record.message = f"[{session_id}] {record.message}"
        return super().formatMessage(record)


def configure_logging(log_format: str = "text", *, level: int | str = logging.INFO,
                      process: str | None = None) -> None:
    """The root handler on stderr: `log_format` "json" (one object per line) or "text". `process` labels
    this process's lines (e.g. "worker:5080"). In JSON mode Python warnings are logged too, so every line
    a process writes is JSON (see also `announce`)."""
    global _json_mode
    _json_mode = log_format == "json"
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter(process) if _json_mode else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.captureWarnings(_json_mode)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl ..." on every start is noise
    if _json_mode:
        sys.excepthook = _log_uncaught


def announce(text: str, **fields: Any) -> None:
    """Console output for people (the banner, "shutting down"): printed as is, or in JSON mode one log line
    (logger `speechpipe`) with `fields` as JSON fields."""
    if _json_mode:
        logging.getLogger("speechpipe").info(text, extra=fields)
    else:
        print(text, flush=True)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("speechpipe").critical("uncaught %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb))


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access line without secrets: a `token` query value (client WebSocket URLs) is masked."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        url = request.rel_url
        if "token" in url.query:
            url = url.update_query(token="***")
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.3fs', request.remote, request.method, url,
                         request.version.major, request.version.minor, response.status,
                         response.body_length, time)
