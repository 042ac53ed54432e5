"""The aiohttp application factory: `create_app(settings, store)` builds the one web app `serve` runs.

Route groups are plain functions `setup(app) -> None` that add routes (and startup/cleanup hooks) to the
app; `default_route_groups()` lists the ones `serve` mounts. To add a group (client WebSocket, agent
channel, test page, metrics), write its `setup_xxx(app)` in its own module and append it there.

Shared state lives under typed keys, defined in `keys` and re-exported here: `app[SETTINGS_KEY]`,
`app[STORE_KEY]` (AsyncStore, for handlers), `app[SYNC_STORE_KEY]` (the Store) and, in demo mode,
`app[DEMO_KEY]`. Every error leaves as JSON `{"error": {"code", "message"}}` through `error_middleware`;
an unexpected exception is logged and answered with a 500 `internal_error`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiohttp import web

from speechpipe.errors import AuthenticationError, Code, SpeechPipeError
from speechpipe.settings import Settings
from speechpipe.storage import AsyncStore, Store
from speechpipe.storage.demo import DemoInfo, ensure_demo

# The keys live in `keys` (below every handler); re-exported here, where `create_app` fills them.
from .keys import (
    AGENT_FACTORY_KEY,
    DEMO_KEY,
    HUB_KEY,
    SETTINGS_KEY,
    SIP_HEALTH_KEY,
    STORE_KEY,
    SYNC_STORE_KEY,
)

log = logging.getLogger("speechpipe.web")

RouteGroup = Callable[[web.Application], None]

__all__ = ["DEMO_KEY", "SETTINGS_KEY", "SIP_HEALTH_KEY", "STORE_KEY", "SYNC_STORE_KEY", "RouteGroup",
           "create_app", "default_route_groups", "error_middleware", "error_response"]

_CODE_BY_STATUS = {
    400: Code.INVALID_JSON,
    401: Code.UNAUTHORIZED,
    404: Code.NOT_FOUND,
    405: Code.METHOD_NOT_ALLOWED,
    413: Code.PAYLOAD_TOO_LARGE,
    415: Code.UNSUPPORTED_MEDIA_TYPE,
    429: Code.RATE_LIMITED,
}


def default_route_groups() -> list[RouteGroup]:
    """Every route group `speechpipe serve` mounts, in order. Append new groups here."""
    # Loaded on first use, so importing this module (the CLI does) loads no pipeline code.
    from speechpipe.websocket_edge.agent_channel import setup_agent_channel
    from speechpipe.websocket_edge.client_ws import setup_client_ws
    from speechpipe.websocket_edge.metrics import setup_metrics
    from speechpipe.websocket_edge.rest import setup_rest
    from speechpipe.websocket_edge.static_routes import setup_test_page

    return [
        setup_rest,  # /v1 REST, /healthz, /v1/openapi.json
        setup_agent_channel,  # /v1/agents/connect, /v1/agents/bridge/{session_id}
        setup_client_ws,  # /v1/pipes/{pipe_id}/connect
        setup_test_page,  # /, /sdk/speechpipe.js
        setup_metrics,  # /metrics (Prometheus)
    ]


def create_app(settings: Settings, store: Store, *, route_groups: Sequence[RouteGroup] | None = None,
               demo: DemoInfo | None = None, db_workers: int = 8) -> web.Application:
    """Builds the app. `store` must already be migrated; the caller owns it (and closes it).

    In demo mode (`settings.demo`) the demo key and pipe are ensured now unless `demo` is passed in.
    """
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    app[SETTINGS_KEY] = settings
    app[SYNC_STORE_KEY] = store
    app[STORE_KEY] = AsyncStore(store, max_workers=db_workers)
    if settings.demo:
        app[DEMO_KEY] = demo or ensure_demo(store, settings.data_dir)
    app.on_cleanup.append(_close_async_store)
    for setup in default_route_groups() if route_groups is None else route_groups:
        setup(app)
    _connect_sessions_to_agents(app)
    return app


def _connect_sessions_to_agents(app: web.Application) -> None:
    """Web sessions get their agent from the hub when both the client edge and the agent channel run."""
    if HUB_KEY in app and AGENT_FACTORY_KEY not in app:
        app[AGENT_FACTORY_KEY] = app[HUB_KEY].dispatch


async def _close_async_store(app: web.Application) -> None:
    app[STORE_KEY].close(wait=False)


def error_response(exc: SpeechPipeError) -> web.Response:
    resp = web.json_response(exc.to_dict(), status=exc.status or 500)
    if isinstance(exc, AuthenticationError):
        resp.headers["WWW-Authenticate"] = 'Bearer realm="speechpipe"'
    return resp


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:  # type: ignore[type-arg]
    try:
        return await handler(request)
    except SpeechPipeError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like pass through
        code = _CODE_BY_STATUS.get(exc.status, f"http_{exc.status}")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        resp = web.json_response({"error": {"code": code, "message": message}}, status=exc.status)
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):  # keep the headers the status needs
            if name in exc.headers:
                resp.headers[name] = exc.headers[name]
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        if _is_websocket(request):
            raise  # a WebSocket handler owns its connection; aiohttp closes it
        return web.json_response({"error": {"code": Code.INTERNAL_ERROR, "message": "internal server error"}},
                                 status=500)
