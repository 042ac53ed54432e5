"""`AsyncStore`: the `Store` API for asyncio code, each call run on a bounded thread pool.

Database drivers here are blocking; running them on a few worker threads keeps the event loop (which
carries real-time audio) free. The pool bounds how many queries run at once; callers queue beyond that.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from speechpipe.pipe_config import PipeConfig
from speechpipe.storage.records import (
    ApiKey,
    MintedToken,
    NewApiKey,
    Page,
    Pipe,
    Recording,
    SessionEvent,
    SessionRecord,
    TokenGrant,
    Turn,
    Workspace,
)
from speechpipe.storage.store import DEFAULT_WORKSPACE, UNSET, Store, _Unset

P = ParamSpec("P")
R = TypeVar("R")


class AsyncStore:
    """Awaitable twin of `Store` (same method names and arguments). Loop-agnostic: usable from any loop."""

    def __init__(self, store: Store, *, max_workers: int = 8) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="speechpipe-db")

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self, *, wait: bool = True) -> None:
        """Stops the worker threads (the Store itself stays open: its owner closes it)."""
        self._pool.shutdown(wait=wait)

    async def ping(self) -> None:
        await self._run(self.store.ping)

    # Workspaces (scoped methods below take the caller's `workspace_id`; None: the system, see Store)
    async def create_workspace(self, name: str) -> Workspace:
        return await self._run(self.store.create_workspace, name)

    async def list_workspaces(self) -> list[Workspace]:
        return await self._run(self.store.list_workspaces)

    async def get_workspace(self, name_or_id: str) -> Workspace:
        return await self._run(self.store.get_workspace, name_or_id)

    async def pipe_workspace(self, pipe_id: str) -> str:
        return await self._run(self.store.pipe_workspace, pipe_id)

    async def default_workspace_id(self) -> str:
        return await self._run(self.store.default_workspace_id)

    # API keys
    async def create_api_key(self, name: str | None = None, *,
                             workspace: str = DEFAULT_WORKSPACE) -> NewApiKey:
        return await self._run(self.store.create_api_key, name, workspace=workspace)

    async def list_api_keys(self, *, include_revoked: bool = True,
                            workspace_id: str | None = None) -> list[ApiKey]:
        return await self._run(self.store.list_api_keys, include_revoked=include_revoked,
                               workspace_id=workspace_id)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        return await self._run(self.store.revoke_api_key, key_id)

    async def verify_api_key(self, secret: str) -> ApiKey:
        return await self._run(self.store.verify_api_key, secret)

    # Pipes
    async def create_pipe(self, config: PipeConfig | Mapping[str, Any], name: str | None = None, *,
                          workspace_id: str | None = None) -> Pipe:
        return await self._run(self.store.create_pipe, config, name, workspace_id=workspace_id)

    async def get_pipe(self, pipe_id: str, *, workspace_id: str | None = None) -> Pipe:
        return await self._run(self.store.get_pipe, pipe_id, workspace_id=workspace_id)

    async def list_pipes(self, *, limit: int = 50, cursor: str | None = None,
                         agent_id: str | None = None, workspace_id: str | None = None) -> Page[Pipe]:
        return await self._run(self.store.list_pipes, limit=limit, cursor=cursor, agent_id=agent_id,
                               workspace_id=workspace_id)

    async def update_pipe(self, pipe_id: str, *, name: str | _Unset | None = UNSET,
                          config: PipeConfig | Mapping[str, Any] | None = None,
                          config_patch: Mapping[str, Any] | None = None,
                          workspace_id: str | None = None) -> Pipe:
        return await self._run(self.store.update_pipe, pipe_id, name=name, config=config,
                               config_patch=config_patch, workspace_id=workspace_id)

    async def delete_pipe(self, pipe_id: str, *, workspace_id: str | None = None) -> None:
        await self._run(self.store.delete_pipe, pipe_id, workspace_id=workspace_id)

    # Session tokens
    async def mint_token(self, pipe_id: str, *, api_key_id: str | None = None,
                         metadata: Mapping[str, Any] | None = None,
                         ttl_s: float | None = None, workspace_id: str | None = None) -> MintedToken:
        return await self._run(self.store.mint_token, pipe_id, api_key_id=api_key_id, metadata=metadata,
                               ttl_s=ttl_s, workspace_id=workspace_id)

    async def redeem_token(self, token: str, pipe_id: str) -> TokenGrant:
        return await self._run(self.store.redeem_token, token, pipe_id)

    # Sessions
    async def create_session(self, pipe_id: str, agent_id: str, direction: str, caller: str | None = None,
                             caller_name: str | None = None,
                             metadata: Mapping[str, Any] | None = None) -> str:
        return await self._run(self.store.create_session, pipe_id, agent_id, direction, caller, caller_name,
                               metadata)

    async def end_session(self, session_id: str, reason: str,
                          metrics: Mapping[str, Any] | None = None) -> bool:
        return await self._run(self.store.end_session, session_id, reason, metrics)

    async def update_session_metrics(self, session_id: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return await self._run(self.store.update_session_metrics, session_id, metrics)

    async def get_session(self, session_id: str, *, workspace_id: str | None = None) -> SessionRecord:
        return await self._run(self.store.get_session, session_id, workspace_id=workspace_id)

    async def list_sessions(self, *, pipe_id: str | None = None, agent_id: str | None = None,
                            direction: str | None = None, since: datetime | None = None,
                            until: datetime | None = None, limit: int = 50,
                            cursor: str | None = None,
                            workspace_id: str | None = None) -> Page[SessionRecord]:
        return await self._run(self.store.list_sessions, pipe_id=pipe_id, agent_id=agent_id,
                               direction=direction, since=since, until=until, limit=limit, cursor=cursor,
                               workspace_id=workspace_id)

    # Turns and recordings
    async def add_turn(self, session_id: str, seq: int, role: str, text: str, start_ms: int | None,
                       end_ms: int | None, interrupted: bool = False, heard_text: str | None = None,
                       kind: str = "turn", redacted: bool = False) -> Turn:
        return await self._run(self.store.add_turn, session_id, seq, role, text, start_ms, end_ms,
                               interrupted, heard_text, kind, redacted)

    async def add_session_event(self, session_id: str, kind: str, at_ms: int | None) -> SessionEvent:
        return await self._run(self.store.add_session_event, session_id, kind, at_ms)

    async def list_session_events(self, session_id: str, *,
                                  workspace_id: str | None = None) -> list[SessionEvent]:
        return await self._run(self.store.list_session_events, session_id, workspace_id=workspace_id)

    async def list_turns(self, session_id: str, *, workspace_id: str | None = None) -> list[Turn]:
        return await self._run(self.store.list_turns, session_id, workspace_id=workspace_id)

    async def add_recording(self, session_id: str, path: str, format: str, sample_rate: int, channels: int,
                            duration_s: float, size_bytes: int, sha256: str) -> Recording:
        return await self._run(self.store.add_recording, session_id, path, format, sample_rate, channels,
                               duration_s, size_bytes, sha256)

    async def get_recording(self, session_id: str, *, workspace_id: str | None = None) -> Recording:
        return await self._run(self.store.get_recording, session_id, workspace_id=workspace_id)
