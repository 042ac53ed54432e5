"""Speech Pipe: give any text-only agent a voice, on the phone and in the browser.

The public SDK surface: `from speechpipe import AgentRunner, CallContext, AsyncClient, Client, DialogMachine`.
Names load lazily, so importing the package (e.g. for the CLI) pulls in no agent or HTTP machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AgentRunner": "speechpipe.sdk",
    "CallContext": "speechpipe.sdk",
    "Session": "speechpipe.sdk",
    "DialogMachine": "speechpipe.sdk",
    "AsyncClient": "speechpipe.client",
    "Client": "speechpipe.client",
    "SpeechPipeError": "speechpipe.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'speechpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
