"""LLM providers for `DialogMachine(llm=...)`: streaming chat over HTTP, no vendor SDK needed.

`make_llm("openai/<model>")` talks to any OpenAI-compatible `/chat/completions` endpoint (OpenAI, a local
llama.cpp server, vLLM, Ollama's /v1): base URL from `base_url=` or `OPENAI_BASE_URL`, key from `api_key=`
or `OPENAI_API_KEY` (optional for local servers). `make_llm("anthropic/<model>")` talks to Anthropic's
Messages API (`ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY`). Both stream server-sent events and yield text
deltas as they arrive.

Any object with this method can stand in for a provider (the documented protocol):

    def stream(self, text: str, **context) -> AsyncIterator[str]

`context` carries `history` (earlier turns as [{"role": "user"|"assistant", "content": str}]) and
`system` (instructions); an object whose `stream` takes only `text` is called with the text alone.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import aiohttp


@runtime_checkable
class LLM(Protocol):
    def stream(self, text: str, **context: Any) -> AsyncIterator[str]: ...


class LLMError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ChatProvider:
    """Shared plumbing: one aiohttp session (made lazily, inside the loop that uses it), SSE parsing."""

    provider = "base"

    def __init__(self, model: str, *, base_url: str, api_key: str | None = None, temperature: float = 0.3,
                 max_tokens: int = 300, timeout_s: float = 60.0) -> None:
        if not model:
            raise ValueError(f"{self.provider}: a model name is required")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                             sock_read=self.timeout_s))
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def complete(self, text: str, **context: Any) -> str:
        return "".join([delta async for delta in self.stream(text, **context)])

    def stream(self, text: str, **context: Any) -> AsyncIterator[str]:
        raise NotImplementedError

    async def _events(self, url: str, headers: dict[str, str], body: dict[str, Any]
                      ) -> AsyncIterator[tuple[str, str]]:
        """POST `body`; yield (event, data) for each server-sent event of the streamed answer."""
        async with self._session().post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                detail = (await resp.text())[:300]
                raise LLMError(f"{self.provider} {self.model}: HTTP {resp.status}: {detail}", resp.status)
            event, data = "message", []
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield event, "\n".join(data)
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
            if data:
                yield event, "\n".join(data)


def _messages(text: str, history: list[dict[str, str]] | None) -> list[dict[str, str]]:
    return [*(history or []), {"role": "user", "content": text}]


class OpenAIChat(ChatProvider):
    provider = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 **options: Any) -> None:
        super().__init__(model, base_url=base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
                         api_key=api_key or os.environ.get("OPENAI_API_KEY"), **options)

    async def stream(self, text: str, *, history: list[dict[str, str]] | None = None,  # type: ignore[override]
                     system: str | None = None, **_: Any) -> AsyncIterator[str]:
        messages = _messages(text, history)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": messages, "stream": True, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        async for _event, data in self._events(f"{self.base_url}/chat/completions", headers, body):
            if data.strip() == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise LLMError(f"openai {self.model}: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    yield delta


class AnthropicChat(ChatProvider):
    """Anthropic Messages API, streamed (`content_block_delta` events carrying `text_delta`)."""

    provider = "anthropic"
    version = "2023-06-01"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 **options: Any) -> None:
        super().__init__(model, base_url=base_url or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com",
                         api_key=api_key or os.environ.get("ANTHROPIC_API_KEY"), **options)

    async def stream(self, text: str, *, history: list[dict[str, str]] | None = None,  # type: ignore[override]
                     system: str | None = None, **_: Any) -> AsyncIterator[str]:
        headers = {"anthropic-version": self.version, "content-type": "application/json"}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        body: dict[str, Any] = {"model": self.model, "messages": _messages(text, history), "stream": True,
                                "max_tokens": self.max_tokens, "temperature": self.temperature}
        if system:
            body["system"] = system
        async for event, data in self._events(f"{self.base_url}/v1/messages", headers, body):
            payload = json.loads(data)
            kind = payload.get("type", event)
            if kind == "content_block_delta":
                delta = payload.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    yield delta["text"]
            elif kind == "message_stop":
                return
            elif kind == "error":
                raise LLMError(f"anthropic {self.model}: {payload.get('error')}")


PROVIDERS: dict[str, type[ChatProvider]] = {"openai": OpenAIChat, "anthropic": AnthropicChat}


def make_llm(spec: str | LLM, **options: Any) -> LLM:
    """`"openai/<model>"`, `"anthropic/<model>"`, or an object with `stream(text)` (returned as is)."""
    if not isinstance(spec, str):
        if not callable(getattr(spec, "stream", None)):
            raise TypeError("llm must be 'provider/model' or an object with a stream(text) method")
        return spec
    provider, _, model = spec.partition("/")
    cls = PROVIDERS.get(provider)
    if cls is None or not model:
        raise ValueError(f"llm {spec!r}: use 'openai/<model>' or 'anthropic/<model>'")
    return cls(model, **options)


def stream_from(llm: LLM, text: str, **context: Any) -> AsyncIterator[str]:
    """Call `llm.stream` with the context it accepts (objects may take just the text)."""
    params = inspect.signature(llm.stream).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return llm.stream(text, **context)
    names = {p.name for p in params}
    return llm.stream(text, **{k: v for k, v in context.items() if k in names})
