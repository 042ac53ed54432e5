"""SQL storage: models, migrations and the queries the rest of the product calls.

`Store` is the synchronous, thread-safe API; `AsyncStore` wraps it for asyncio code.
"""

from speechpipe.storage.async_store import AsyncStore
from speechpipe.storage.records import (
    ApiKey,
    MintedToken,
    NewApiKey,
    Page,
    Pipe,
    Recording,
    SessionRecord,
    TokenGrant,
    Turn,
)
from speechpipe.storage.store import Store

__all__ = [
    "ApiKey",
    "AsyncStore",
    "MintedToken",
    "NewApiKey",
    "Page",
    "Pipe",
    "Recording",
    "SessionRecord",
    "Store",
    "TokenGrant",
    "Turn",
]
