"""SQL storage: models, migrations and the queries the rest of the product calls.

`Store` is the synchronous, thread-safe API; `AsyncStore` wraps it for asyncio code.
"""

from speechpipe.extras import require_server

require_server(__name__, ("sqlalchemy", "alembic"))

from speechpipe.storage.async_store import AsyncStore  # noqa: E402 (after the extra's check)
from speechpipe.storage.records import (  # noqa: E402
    ApiKey,
    MintedToken,
    NewApiKey,
    Page,
    Pipe,
    Recording,
    SessionRecord,
    TokenGrant,
    Turn,
    Workspace,
)
from speechpipe.storage.store import Store  # noqa: E402

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
    "Workspace",
]
