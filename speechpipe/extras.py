"""Which parts of Speech Pipe need the `server` extra, and the clear error when it is not installed.

`pip install speechpipe` is the customer side (the runner SDK and the REST client); `serve` and its
packages (`pipeline`, `storage`, `telephony`, `websocket_edge`) need `pip install 'speechpipe[server]'`.
Each of those packages calls `require_server()` before anything else, so importing one on the light
install fails at once with a message naming the extra instead of deep inside an engine import.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

SERVER_INSTALL = "pip install 'speechpipe[server]'"


def require_server(package: str, modules: Iterable[str]) -> None:
    """Raise ImportError naming the server extra when any of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{package} needs the server extra: {SERVER_INSTALL} "
                          f"(missing: {', '.join(missing)})", name=package)
