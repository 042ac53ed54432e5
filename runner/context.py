"""`CallContext` and `Session`: one call as the agent's code sees it, text only, phone or web alike.

The runner builds a `CallContext` when the platform's `call.started` arrives and hands it to the
entrypoint. `Session` carries the controls (`say`, `interrupt`, `transfer`, `end`, `dispatch`,
`recording.pause/resume`), per-call `data`, the hooks (`on(event)`), an optional `dialog_machine`, and
`run()`, which serves the call until it ends. Hooks are isolated: one that raises is logged, counted, and
reported to the `error` hooks; the call goes on.

Failures the caller would otherwise meet as dead air are also reported to the platform (`agent.error`, a
stable code and a one-line message, never a stack trace), which tells the client and speaks the pipe's
apology once per user turn: a user turn left unanswered because its `user_turn` hook raised
(`hook_failed`), a reply or DialogMachine step that raised (`reply_failed`, `dialog_failed`), a
`call_start`, `dtmf` or `silence` hook that raised (`hook_failed`), and the entrypoint raising
(`entrypoint_failed`). Hooks that only observe (`user_partial`, `agent_turn`, `interruption`, `metric`,
`call_end`, `error`) stay local. `session.report_error()` sends one from the agent's own code.

Hooks and what they receive (one argument each):
  call_start(ctx)  user_partial(text)  user_turn(UserTurn)  agent_turn(AgentTurn)  interruption(Interruption)
  dtmf(digit)  silence(seconds)  metric(Metric)  call_end(reason)  error(ChannelError)
A `user_turn` hook may return the reply: a str, an async iterator of str (streamed as deltas), or an
awaitable of either. Without one, the `dialog_machine` answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from speechpipe import protocol as p

if TYPE_CHECKING:
    from .dialog import DialogMachine, DialogReply

log = logging.getLogger(__name__)

HOOKS = ("call_start", "user_partial", "user_turn", "agent_turn", "interruption", "dtmf", "silence", "metric",
         "call_end", "error")
# Hooks whose failure the platform hears of (`agent.error`): they act for the caller. `user_turn` is reported
# by the turn's answer, only when the turn is left without one.
REPORTED_HOOKS = frozenset({"call_start", "dtmf", "silence"})


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`, short: what `agent.error` carries (no stack trace)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:200]


@dataclass(frozen=True)
class UserTurn:
    turn_id: int
    text: str


@dataclass(frozen=True)
class AgentTurn:
    """A reply the user heard to the end. `turn_id` < 0 for `say()` (platform-numbered)."""

    turn_id: int
    text: str


@dataclass(frozen=True)
class Interruption:
    """The user cut in: `heard_text` is what they heard of the reply, `user_text` what they said."""

    turn_id: int
    heard_text: str
    user_text: str
    text: str = ""  # the reply's full text, as far as it was sent


@dataclass(frozen=True)
class Metric:
    turn_id: int | None
    values: dict[str, float]


@dataclass(frozen=True)
class ChannelError:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


Reply = str | AsyncIterator[str] | None
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Recording:
    """`session.recording.pause()` / `.resume()`: e.g. while the caller reads out a card number. While
    paused the recording holds silence and the user's words still reach this agent, but the session
    stores them, shows them to the client and logs them as "[redacted]" (also on a pipe that does not
    record)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.paused = False

    async def pause(self) -> None:
        self.paused = True
        await self._session._send({"type": p.RECORDING_PAUSE})

    async def resume(self) -> None:
        self.paused = False
        await self._session._send({"type": p.RECORDING_RESUME})


class Session:
    def __init__(self, send: Send, *, stats: collections.Counter[str] | None = None) -> None:
        self._send_frame = send
        self.stats: collections.Counter[str] = stats if stats is not None else collections.Counter()
        self.data: dict[str, Any] = {}
        self.recording = Recording(self)
        self.dialog_machine: DialogMachine | None = None
        self.ctx: CallContext | None = None
        self.history: list[tuple[str, str]] = []  # (role, text) of turns heard, in order
        self.ended = False
        self.end_reason: str | None = None
        self._hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOKS}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._turns: asyncio.Queue[UserTurn] = asyncio.Queue()
        self._current: tuple[int, asyncio.Task[None]] | None = None
        self._reply_text: dict[int, str] = {}
        self._says: dict[int, str] = {}
        self._say_count = 0
        self._ended = asyncio.Event()
        self._running = False
        self._ending = False
        self.setup_error: str | None = None  # set when the entrypoint raised (the runner does it)

    # ---- hooks --------------------------------------------------------------------------------------------
    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register a hook: `session.on("dtmf", fn)` or `@session.on("dtmf")`."""
        if event not in self._hooks:
            raise ValueError(f"unknown hook {event!r}; hooks are: {', '.join(HOOKS)}")

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._hooks[event].append(fn)
            return fn

        return add(handler) if handler is not None else add

    async def _fire(self, event: str, arg: Any) -> list[Any]:
        """Run the hooks for `event`; a raising hook is logged and reported, the others still run."""
        results, failures = await self._run_hooks(event, arg)
        if failures and event in REPORTED_HOOKS:
            await self.report_error(p.AgentErrorCodes.HOOK_FAILED,
                                    f"{event} hook raised {describe(failures[0])}")
        return results

    async def _run_hooks(self, event: str, arg: Any) -> tuple[list[Any], list[Exception]]:
        """The hooks' results, and what the ones that raised raised (each logged, counted, and given to the
        `error` hooks)."""
        results: list[Any] = []
        failures: list[Exception] = []
        for fn in list(self._hooks[event]):
            try:
                result = fn(arg)
                if inspect.isawaitable(result):
                    result = await result
                results.append(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats["hook_errors"] += 1
                failures.append(exc)
                log.exception("session %s: %s hook %s raised; the call goes on", self.session_id, event,
                              getattr(fn, "__qualname__", fn))
                if event != "error":
                    await self._fire("error", ChannelError("hook_failed", f"{event} hook raised "
                                                           f"{type(exc).__name__}: {exc}", {"hook": event}))
        return results, failures

    @property
    def session_id(self) -> str | None:
        return self.ctx.session_id if self.ctx else None

    # ---- controls -----------------------------------------------------------------------------------------
    async def say(self, text: str, interruptible: bool = True) -> None:
        """Speak `text` now (queued after what is already playing)."""
        text = str(text)
        if not text.strip():
            return
        self._say_count += 1
        self._says[-self._say_count] = text
        await self._send({"type": p.SAY, "text": text, "interruptible": bool(interruptible)})

    async def interrupt(self) -> None:
        """Stop talking: the reply being generated stops, and the platform cuts the audio now."""
        if self._current is not None:
            self._current[1].cancel()
        await self._send({"type": p.INTERRUPT})

    async def transfer(self, target: str, mode: str = "blind") -> None:
        """Hand a phone call to `target` (SIP URI or extension). A refusal arrives as an `error` hook."""
        await self._send({"type": p.TRANSFER, "target": target, "mode": mode})

    async def end(self, reason: str = "agent_ended") -> None:
        """Hang up once what is queued has been spoken; `call_end` fires when the platform confirms."""
        self._ending = True
        await self._send({"type": p.END_CALL, "reason": reason})

    async def dispatch(self, agent_id: str, data: dict[str, Any] | None = None) -> None:
        """Hand the call to another agent_id; `data` reaches it as `ctx.metadata['handoff']`. On success
        this call ends here with reason `dispatched`; a failure arrives as an `error` hook
        (`dispatch_failed`) and the call stays with us."""
        frame: dict[str, Any] = {"type": p.DISPATCH, "agent_id": agent_id}
        if data is not None:
            frame["data"] = data
        await self._send(frame)

    async def report_error(self, code: str, message: str = "", turn_id: int | None = None) -> None:
        """Tell the platform this agent failed (`agent.error`): it tells the client and apologises to the
        caller, at most once per user turn (the pipe's `agent_error_message`); the call goes on. `code` is
        short and stable (lowercase, digits, `_.-`), `message` one line for the server's log; `turn_id` the
        user turn left unanswered, if any. The SDK calls this itself for the failures it catches."""
        if not p.AGENT_ERROR_CODE_RE.match(code):
            raise ValueError(f"agent error code must match {p.AGENT_ERROR_CODE_RE.pattern}, got {code!r}")
        frame: dict[str, Any] = {"type": p.AGENT_ERROR, "code": code,
                                 "message": " ".join(str(message).split())[:p.AGENT_ERROR_MESSAGE_CHARS]}
        if turn_id is not None:
            frame["turn_id"] = int(turn_id)
        self.stats["errors_reported"] += 1
        await self._send(frame)

    async def reply(self, turn_id: int, reply: Reply | Awaitable[Reply]) -> str:
        """Stream `reply` as the answer to user turn `turn_id` (user_turn hooks' returns go through here)."""
        if inspect.isawaitable(reply):
            reply = await reply
        sent: list[str] = []
        try:
            if isinstance(reply, str):
                if reply:
                    sent.append(reply)
                    await self._send({"type": p.TEXT_DELTA, "turn_id": turn_id, "text": reply})
            elif reply is not None:
                async for delta in reply:
                    if delta:
                        sent.append(str(delta))
                        self._reply_text[turn_id] = "".join(sent)
                        await self._send({"type": p.TEXT_DELTA, "turn_id": turn_id, "text": str(delta)})
        finally:
            # Sent even when cancelled (interrupt, barge-in): the platform closes the reply either way.
            self._reply_text[turn_id] = "".join(sent)
            await self._send({"type": p.TEXT_END, "turn_id": turn_id})
        return "".join(sent)

    async def _send(self, frame: dict[str, Any]) -> None:
        if self.ended:
            return
        self.stats["verbs_sent"] += 1
        await self._send_frame(frame)

    # ---- serving the call ---------------------------------------------------------------------------------
    def deliver(self, frame: dict[str, Any] | None) -> None:
        """A platform frame for this call (None: the bridge is gone for good)."""
        self._events.put_nowait(frame)

    async def run(self) -> None:
        """Serve the call until it ends: hooks fire, user turns get replies, controls take effect."""
        if self._running:
            await self._ended.wait()
            return
        self._running = True
        worker = asyncio.get_running_loop().create_task(self._turn_worker(), name=f"turns:{self.session_id}")
        try:
            await self._fire("call_start", self.ctx)
            if self.dialog_machine is not None:
                await self._dialog(self.dialog_machine.start())
            while not self.ended:
                frame = await self._events.get()
                if frame is None:
                    self._finish("bridge_lost")
                    await self._fire("call_end", "bridge_lost")
                    break
                await self._on_event(frame)
        finally:
            worker.cancel()
            if self._current is not None:
                self._current[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            if self.dialog_machine is not None:
                with contextlib.suppress(Exception):
                    await self.dialog_machine.aclose()
            self._finish(self.end_reason or "run_ended")

    def _finish(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.end_reason = reason
        self._ended.set()

    async def wait_ended(self) -> str:
        await self._ended.wait()
        return self.end_reason or ""

    async def _on_event(self, m: dict[str, Any]) -> None:
        kind = m["type"]
        self.stats[f"event_{kind}"] += 1
        if kind == p.USER_TEXT:
            turn = UserTurn(m["turn_id"], m["text"])
            self.history.append(("user", turn.text))
            self._turns.put_nowait(turn)
        elif kind == p.USER_PARTIAL:
            await self._fire("user_partial", m["text"])
        elif kind == p.USER_INTERRUPTED:
            turn_id = m["turn_id"]
            if self._current is not None and self._current[0] == turn_id:
                self._current[1].cancel()
            text = self._reply_text.pop(turn_id, None) or self._says.pop(turn_id, "")
            heard = m.get("heard_text") or ""
            if heard:
                self.history.append(("agent", heard))
            await self._fire("interruption", Interruption(turn_id, heard, m.get("user_text") or "", text))
        elif kind == p.AGENT_SPEECH_DONE:
            turn_id = m["turn_id"]
            text = m.get("text") or self._reply_text.pop(turn_id, None) or self._says.pop(turn_id, "")
            self.history.append(("agent", text))
            await self._fire("agent_turn", AgentTurn(turn_id, text))
        elif kind == p.DTMF:
            await self._fire("dtmf", m["digit"])
            if self.dialog_machine is not None and not self._ending:
                await self._dialog(self.dialog_machine.on_dtmf(m["digit"]))
        elif kind == p.SILENCE:
            seconds = float(m.get("seconds") or 0.0)
            await self._fire("silence", seconds)
            if self.dialog_machine is not None and not self._ending:
                await self._dialog(self.dialog_machine.on_silence(seconds))
        elif kind == p.METRIC:
            values = {k: float(v) for k, v in m.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "turn_id"}
            await self._fire("metric", Metric(m.get("turn_id"), values))
        elif kind == p.ERROR:
            details = {k: v for k, v in m.items() if k not in ("type", "code", "message")}
            await self._fire("error", ChannelError(m["code"], m["message"], details))
        elif kind == p.CALL_ENDED:
            reason = m.get("reason") or "ended"
            self._finish(reason)
            await self._fire("call_end", reason)
        elif kind == p.CALL_STARTED:
            log.warning("session %s: a second call.started was ignored", self.session_id)

    async def _turn_worker(self) -> None:
        """User turns are answered one at a time, in order; an interruption cancels the one in progress."""
        while True:
            turn = await self._turns.get()
            task = asyncio.get_running_loop().create_task(self._answer(turn), name=f"turn:{turn.turn_id}")
            self._current = (turn.turn_id, task)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._current = None

    async def _answer(self, turn: UserTurn) -> None:
        reply: Any = None
        results, failures = await self._run_hooks("user_turn", turn)
        for result in results:
            if result is not None:
                reply = result
                break
        if reply is None and self.dialog_machine is not None and not self._ending:
            await self._dialog(self.dialog_machine.respond(turn.text), turn.turn_id)
            return
        try:
            await self.reply(turn.turn_id, reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats["reply_errors"] += 1
            log.exception("session %s: reply to turn %d failed", self.session_id, turn.turn_id)
            await self._fire("error", ChannelError("reply_failed", f"{type(exc).__name__}: {exc}",
                                                   {"turn_id": turn.turn_id}))
            await self.report_error(p.AgentErrorCodes.REPLY_FAILED, f"reply raised {describe(exc)}",
                                    turn.turn_id)
            return
        if reply is not None or self._ending:
            return
        if failures:  # the turn is left unanswered because a hook raised
            await self.report_error(p.AgentErrorCodes.HOOK_FAILED,
                                    f"user_turn hook raised {describe(failures[0])}", turn.turn_id)
        elif self.setup_error is not None and not self._hooks["user_turn"]:
            # handle_call raised before anything that could answer was set up
            await self.report_error(p.AgentErrorCodes.ENTRYPOINT_FAILED,
                                    f"nothing answers user turns: handle_call raised {self.setup_error}",
                                    turn.turn_id)

    async def _dialog(self, step: Awaitable[DialogReply | None], turn_id: int | None = None) -> None:
        """Speak a DialogMachine step (as the reply to `turn_id`, or as a `say`) and apply its action."""
        try:
            result = await step
            if result is None:
                return
            if turn_id is None:
                text = "".join([chunk async for chunk in result.chunks])
                await self.say(text)
            else:
                await self.reply(turn_id, result.chunks)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats["reply_errors"] += 1
            log.exception("session %s: dialog step failed", self.session_id)
            if turn_id is not None:
                await self._send({"type": p.TEXT_END, "turn_id": turn_id})
            await self._fire("error", ChannelError("dialog_failed", f"{type(exc).__name__}: {exc}"))
            await self.report_error(p.AgentErrorCodes.DIALOG_FAILED, f"dialog step raised {describe(exc)}",
                                    turn_id)
            return
        if result.transfer is not None:
            await self.transfer(*result.transfer)
        elif result.dispatch is not None:
            await self.dispatch(result.dispatch, {"slots": dict(self.dialog_machine.slots)}
                                if self.dialog_machine is not None else None)
        elif result.end is not None:
            await self.end(result.end)


@dataclass
class CallContext:
    """How the session arrived and who it is with; `session` holds the controls."""

    session_id: str
    direction: p.Direction
    pipe_id: str | None
    agent_id: str
    caller: str | None
    caller_name: str | None
    metadata: dict[str, Any]
    session: Session
    job_id: str | None = None

    @classmethod
    def from_call_started(cls, m: dict[str, Any], session: Session, job_id: str | None = None) -> CallContext:
        ctx = cls(session_id=m["session_id"], direction=m["direction"], pipe_id=m.get("pipe_id"),
                  agent_id=m.get("agent_id") or "", caller=m.get("caller"), caller_name=m.get("caller_name"),
                  metadata=dict(m.get("metadata") or {}), session=session, job_id=job_id)
        session.ctx = ctx
        return ctx

    @property
    def is_phone(self) -> bool:
        return self.direction.endswith("_phone")
