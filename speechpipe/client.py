"""Python client for the REST API: `AsyncClient` (asyncio, aiohttp) and its blocking twin `Client`.

    async with AsyncClient(api_key="spk_...") as client:      # or SPEECHPIPE_API_KEY / SPEECHPIPE_URL
        token = await client.sessions.create_token(pipe_id=pipe.id, metadata={"user_id": "u1"})
        token.token, token.expires_at                          # single-use, expires in 60 s

Responses parse into the API's own pydantic models (`speechpipe.api_models`); errors raise
`speechpipe.errors` exceptions that carry the API's `code` and HTTP `status`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import pydantic

from speechpipe.api_models import (
    Health,
    Pipe,
    PipeList,
    Session,
    SessionList,
    SessionToken,
    Transcript,
)
from speechpipe.errors import APIConnectionError, APITimeoutError, SpeechPipeError, error_from_code
from speechpipe.pipe_config import PipeConfig

DEFAULT_URL = "http://127.0.0.1:8780"
M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")


class _Unset:
    pass


_UNSET = _Unset()


class AsyncClient:
    """Async REST client. Use as `async with AsyncClient(...) as client:` or call `await close()`."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *,
                 timeout: float = 30.0) -> None:
        self.api_key = api_key or os.environ.get("SPEECHPIPE_API_KEY") or None
        self.base_url = (base_url or os.environ.get("SPEECHPIPE_URL") or DEFAULT_URL).rstrip("/")
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None
        self.pipes = Pipes(self)
        self.sessions = Sessions(self)
        self.transcripts = Transcripts(self)
        self.recordings = Recordings(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def health(self) -> Health:
        return Health.model_validate(await self._request("GET", "/healthz"))

    def _session(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session must be made inside the loop that uses it.
        if self._http is None or self._http.closed:
            headers = {"User-Agent": "speechpipe-python"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._http = aiohttp.ClientSession(headers=headers,
                                               timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._http

    async def _request(self, method: str, path: str, *, json: Any = None,
                       params: Mapping[str, Any] | None = None) -> Any:
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with self._session().request(method, self.base_url + path, json=json, params=query) as resp:
                if resp.status >= 400:
                    raise await _error(resp)
                if resp.status == 204:
                    return None
                return await resp.json(content_type=None)
        except SpeechPipeError:
            raise
        except TimeoutError:
            raise APITimeoutError(f"{method} {path} timed out after {self.timeout} s") from None
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc

    async def _download(self, path: str, dest: Path) -> Path:
        tmp = dest.with_name(dest.name + ".part")
        try:
            async with self._session().get(self.base_url + path) as resp:
                if resp.status >= 400:
                    raise await _error(resp)
                with tmp.open("wb") as f:
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        f.write(chunk)
            tmp.replace(dest)
            return dest
        except TimeoutError:
            raise APITimeoutError(f"GET {path} timed out after {self.timeout} s") from None
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)


class Pipes:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, config: PipeConfig | Mapping[str, Any] | None = None, *, name: str | None = None,
                     agent_id: str | None = None) -> Pipe:
        """A new pipe. `agent_id=` is a shortcut for `config={"agent_id": ...}` (and overrides it)."""
        cfg = config.model_dump(mode="json") if isinstance(config, PipeConfig) else dict(config or {})
        if agent_id is not None:
            cfg["agent_id"] = agent_id
        body: dict[str, Any] = {"config": cfg}
        if name is not None:
            body["name"] = name
        return Pipe.model_validate(await self._c._request("POST", "/v1/pipes", json=body))

    async def list(self, *, limit: int = 50, cursor: str | None = None,
                   agent_id: str | None = None) -> PipeList:
        return PipeList.model_validate(await self._c._request(
            "GET", "/v1/pipes", params={"limit": limit, "cursor": cursor, "agent_id": agent_id}))

    async def get(self, pipe_id: str) -> Pipe:
        return Pipe.model_validate(await self._c._request("GET", f"/v1/pipes/{_seg(pipe_id)}"))

    async def update(self, pipe_id: str, *, name: str | _Unset | None = _UNSET,
                     config: Mapping[str, Any] | None = None) -> Pipe:
        """Changes the name and/or merges `config` into the pipe's config (JSON merge patch)."""
        body: dict[str, Any] = {}
        if not isinstance(name, _Unset):
            body["name"] = name
        if config is not None:
            body["config"] = dict(config)
        return Pipe.model_validate(await self._c._request("PATCH", f"/v1/pipes/{_seg(pipe_id)}", json=body))

    async def delete(self, pipe_id: str) -> None:
        await self._c._request("DELETE", f"/v1/pipes/{_seg(pipe_id)}")


class Sessions:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create_token(self, *, pipe_id: str, metadata: Mapping[str, Any] | None = None) -> SessionToken:
        """A single-use token a client passes to the pipe's WebSocket; expires 60 s after minting."""
        body = {"pipe_id": pipe_id, "metadata": dict(metadata or {})}
        return SessionToken.model_validate(await self._c._request("POST", "/v1/sessions/tokens", json=body))

    async def list(self, *, pipe_id: str | None = None, agent_id: str | None = None,
                   direction: str | None = None, since: datetime | None = None, until: datetime | None = None,
                   limit: int = 50, cursor: str | None = None) -> SessionList:
        params = {"pipe_id": pipe_id, "agent_id": agent_id, "direction": direction, "since": since,
                  "until": until, "limit": limit, "cursor": cursor}
        return SessionList.model_validate(await self._c._request("GET", "/v1/sessions", params=params))

    async def get(self, session_id: str) -> Session:
        return Session.model_validate(await self._c._request("GET", f"/v1/sessions/{_seg(session_id)}"))


class Transcripts:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def get(self, session_id: str) -> Transcript:
        return Transcript.model_validate(
            await self._c._request("GET", f"/v1/sessions/{_seg(session_id)}/transcript"))


class Recordings:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def download(self, session_id: str, path: str | os.PathLike[str]) -> Path:
        """Streams the session's recording to `path` (written atomically); returns the path."""
        return await self._c._download(f"/v1/sessions/{_seg(session_id)}/recording", Path(path))


def _seg(value: str) -> str:
    return quote(value, safe="")


def _param(value: Any) -> str:
    if isinstance(value, datetime):  # naive datetimes are taken as UTC
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _error(resp: aiohttp.ClientResponse) -> SpeechPipeError:
    text = await resp.text(errors="replace")
    try:
        err = (await resp.json(content_type=None))["error"]
        return error_from_code(str(err["code"]), str(err.get("message", "")), resp.status, err.get("details"))
    except (ValueError, KeyError, TypeError):
        return error_from_code(f"http_{resp.status}", text[:500] or resp.reason or "", resp.status)


# ----------------------------------------------------------------------------------- blocking twin


class _LoopThread:
    """A private event loop on a daemon thread: the blocking client runs its coroutines there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="speechpipe-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Client:
    """Blocking client with the same surface as `AsyncClient` (`with Client(...) as client:`)."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *,
                 timeout: float = 30.0) -> None:
        self._aio = AsyncClient(api_key, base_url, timeout=timeout)
        self._loop = _LoopThread()
        self.pipes = SyncPipes(self._aio.pipes, self._loop)
        self.sessions = SyncSessions(self._aio.sessions, self._loop)
        self.transcripts = SyncTranscripts(self._aio.transcripts, self._loop)
        self.recordings = SyncRecordings(self._aio.recordings, self._loop)
        self._closed = False

    @property
    def base_url(self) -> str:
        return self._aio.base_url

    def health(self) -> Health:
        return self._loop.run(self._aio.health())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.run(self._aio.close())
            self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class SyncPipes:
    def __init__(self, aio: Pipes, loop: _LoopThread) -> None:
        self._a, self._l = aio, loop

    def create(self, config: PipeConfig | Mapping[str, Any] | None = None, *, name: str | None = None,
               agent_id: str | None = None) -> Pipe:
        return self._l.run(self._a.create(config, name=name, agent_id=agent_id))

    def list(self, *, limit: int = 50, cursor: str | None = None, agent_id: str | None = None) -> PipeList:
        return self._l.run(self._a.list(limit=limit, cursor=cursor, agent_id=agent_id))

    def get(self, pipe_id: str) -> Pipe:
        return self._l.run(self._a.get(pipe_id))

    def update(self, pipe_id: str, *, name: str | _Unset | None = _UNSET,
               config: Mapping[str, Any] | None = None) -> Pipe:
        return self._l.run(self._a.update(pipe_id, name=name, config=config))

    def delete(self, pipe_id: str) -> None:
        self._l.run(self._a.delete(pipe_id))


class SyncSessions:
    def __init__(self, aio: Sessions, loop: _LoopThread) -> None:
        self._a, self._l = aio, loop

    def create_token(self, *, pipe_id: str, metadata: Mapping[str, Any] | None = None) -> SessionToken:
        return self._l.run(self._a.create_token(pipe_id=pipe_id, metadata=metadata))

    def list(self, *, pipe_id: str | None = None, agent_id: str | None = None, direction: str | None = None,
             since: datetime | None = None, until: datetime | None = None, limit: int = 50,
             cursor: str | None = None) -> SessionList:
        return self._l.run(self._a.list(pipe_id=pipe_id, agent_id=agent_id, direction=direction, since=since,
                                        until=until, limit=limit, cursor=cursor))

    def get(self, session_id: str) -> Session:
        return self._l.run(self._a.get(session_id))


class SyncTranscripts:
    def __init__(self, aio: Transcripts, loop: _LoopThread) -> None:
        self._a, self._l = aio, loop

    def get(self, session_id: str) -> Transcript:
        return self._l.run(self._a.get(session_id))


class SyncRecordings:
    def __init__(self, aio: Recordings, loop: _LoopThread) -> None:
        self._a, self._l = aio, loop

    def download(self, session_id: str, path: str | os.PathLike[str]) -> Path:
        return self._l.run(self._a.download(session_id, path))
