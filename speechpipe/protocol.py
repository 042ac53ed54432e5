"""The agent channel's wire protocol: frame types, their fields, validation, and reliable-delivery books.

Both ends import this module, so a frame the server accepts is a frame the runner may send and vice
versa. Every frame is one JSON object in one WebSocket text message, with a `type`. `parse()` turns a raw
message into a dict or raises `ProtocolError(code, message)`; the receiving end answers with an `error`
frame carrying that code and goes on (it never crashes on input).

Two sockets:
- control (`/v1/agents/connect`, API key): register / registered, heartbeat both ways, job.assign /
  job.ack / job.cancel, drain.
- bridge (`/v1/agents/bridge/{session_id}`, call token): hello / hello.ack, then the session's events
  (platform → runner) and the agent's verbs (runner → platform). Bridge frames carry `seq` (per-direction
  sequence number) and may carry `ack` (the highest peer `seq` received) so that a dropped bridge can be
  redialled with the same call token and both sides replay what the other missed (`Outbox`).
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

PROTOCOL_VERSION: Final = 1

# How a session reached the platform: `ctx.direction` for the agent, `sessions.direction` in SQL.
Direction = Literal["web", "inbound_phone", "outbound_phone"]
DIRECTIONS: Final[tuple[Direction, ...]] = get_args(Direction)

MAX_FRAME_BYTES: Final = 64 * 1024
MAX_TEXT_CHARS: Final = 16 * 1024
MAX_METADATA_BYTES: Final = 16 * 1024
AGENT_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")

# ---- control socket -----------------------------------------------------------------------------------
REGISTER = "register"
REGISTERED = "registered"
HEARTBEAT = "heartbeat"
JOB_ASSIGN = "job.assign"
JOB_ACK = "job.ack"
JOB_CANCEL = "job.cancel"
DRAIN = "drain"
ERROR = "error"

# ---- bridge socket --------------------------------------------------------------------------------------
HELLO = "hello"
HELLO_ACK = "hello.ack"
ACK = "ack"
# platform → runner (speechpipe.pipeline.agent uses these names too)
CALL_STARTED = "call.started"
USER_PARTIAL = "user.partial"
USER_TEXT = "user.text"
USER_INTERRUPTED = "user.interrupted"
AGENT_SPEECH_DONE = "agent.speech_done"
DTMF = "dtmf"
SILENCE = "silence"
METRIC = "metric"
CALL_ENDED = "call.ended"
# runner → platform
TEXT_DELTA = "agent.text.delta"
TEXT_END = "agent.text.end"
SAY = "agent.say"
INTERRUPT = "agent.interrupt"
TRANSFER = "agent.transfer"
END_CALL = "agent.end_call"
DISPATCH = "agent.dispatch"
RECORDING_PAUSE = "recording.pause"
RECORDING_RESUME = "recording.resume"
# The agent failed on its side (a hook or the entrypoint raised, a reply stream broke): a stable `code`,
# a short `message` (no stack trace), the user `turn_id` it concerns if any. The platform tells the client
# and speaks the pipe's `agent_error_message`, at most once per user turn; the call goes on.
AGENT_ERROR = "agent.error"

PLATFORM_EVENTS: Final = (CALL_STARTED, USER_PARTIAL, USER_TEXT, USER_INTERRUPTED, AGENT_SPEECH_DONE, DTMF,
                          SILENCE, METRIC, CALL_ENDED, ERROR)
AGENT_VERBS: Final = (TEXT_DELTA, TEXT_END, SAY, INTERRUPT, TRANSFER, END_CALL, DISPATCH, RECORDING_PAUSE,
                      RECORDING_RESUME, AGENT_ERROR)

# The internal relay: serve's own SIP media workers dial this path (with serve's internal secret) to reach
# the agent hub and /metrics for their sessions. Not for runners.
RELAY_PATH: Final = "/v1/internal/agents/relay"

# job.ack rejection reasons
REJECT_AT_CAPACITY = "at_capacity"
REJECT_AGENT_MISMATCH = "agent_id_mismatch"
REJECT_DRAINING = "draining"
REJECT_REFUSED = "refused"  # the runner's on_job filter said no

# `agent.error` codes the runner SDK sends (an agent may send its own, same shape: AGENT_ERROR_CODE_RE).
AGENT_ERROR_CODE_RE: Final = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}\Z")
AGENT_ERROR_MESSAGE_CHARS: Final = 300


class AgentErrorCodes:
    """Codes of `agent.error` frames the SDK sends."""

    HOOK_FAILED = "hook_failed"  # a call_start, user_turn, dtmf or silence hook raised
    REPLY_FAILED = "reply_failed"  # the reply to a user turn raised while it was produced or streamed
    DIALOG_FAILED = "dialog_failed"  # a DialogMachine step raised (e.g. its LLM is unreachable)
    ENTRYPOINT_FAILED = "entrypoint_failed"  # handle_call raised (and, later, a turn it left with no answer)


class Codes:
    """Codes of `error` frames (and of ProtocolError)."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_TYPE = "missing_type"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    TOO_LARGE = "too_large"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    OUT_OF_ORDER = "out_of_order"
    UNKNOWN_JOB = "unknown_job"
    UNKNOWN_TURN = "unknown_turn"
    BAD_TOKEN = "bad_token"
    PROTOCOL_UNSUPPORTED = "protocol_unsupported"
    UNAUTHORIZED = "unauthorized"
    CALL_ENDED = "call_ended"
    DISPATCH_FAILED = "dispatch_failed"
    RESUME_FAILED = "resume_failed"
    TOO_MANY_ERRORS = "too_many_errors"


# WebSocket close codes the channel uses (4000-4999 is the application range).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_CALL_OVER = 4410  # the call this bridge served is over (or the token is): do not redial
CLOSE_HEARTBEAT = 4408
CLOSE_REPLACED = 4409  # a newer socket took over (same worker re-registered / same token redialled)
NO_REDIAL_CLOSES: Final = frozenset({CLOSE_NORMAL, CLOSE_PROTOCOL, CLOSE_UNAUTHORIZED, CLOSE_CALL_OVER,
                                     CLOSE_REPLACED})


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def frame(self) -> dict[str, Any]:
        return error_frame(self.code, self.message)


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": ERROR, "code": code, "message": message[:500], **extra}


# ---- field specs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class F:
    """One field: its JSON kind ('str', 'int', 'num', 'bool', 'obj', 'list'), whether required, limits."""

    kind: str
    required: bool = True
    max_len: int | None = None
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    minimum: float | None = None
    nullable: bool = False


_SEQ = {"seq": F("int", False, minimum=0), "ack": F("int", False, minimum=0)}
_TEXT = F("str", max_len=MAX_TEXT_CHARS)
_OPT_TEXT = F("str", False, max_len=MAX_TEXT_CHARS, nullable=True)
_TURN = F("int")
_AGENT_ID = F("str", pattern=AGENT_ID_RE)
_META = F("obj", False, max_len=MAX_METADATA_BYTES, nullable=True)
_ID = F("str", max_len=128)
_REASON = F("str", False, max_len=200, nullable=True)

Spec = Mapping[str, Mapping[str, F]]

CONTROL_FROM_RUNNER: Spec = {
    REGISTER: {"agent_id": _AGENT_ID, "capacity": F("int", minimum=1),
               "worker_id": F("str", False, max_len=128), "protocol": F("int", False, minimum=0),
               "active": F("int", False, minimum=0),
               "sdk": F("str", False, max_len=128), "pid": F("int", False, minimum=0)},
    HEARTBEAT: {"active": F("int", False, minimum=0)},
    JOB_ACK: {"job_id": _ID, "accepted": F("bool"), "reason": _REASON},
    DRAIN: {},
}
CONTROL_FROM_SERVER: Spec = {
    REGISTERED: {"runner_id": _ID, "heartbeat_interval_ms": F("int", minimum=1),
                 "heartbeat_timeout_ms": F("int", minimum=1), "protocol": F("int", minimum=0)},
    HEARTBEAT: {},
    JOB_ASSIGN: {"job_id": _ID, "session_id": _ID, "agent_id": _AGENT_ID,
                 "bridge_url": F("str", max_len=2048), "call_token": F("str", max_len=256),
                 "deadline_ms": F("int", minimum=0), "metadata": _META},
    JOB_CANCEL: {"job_id": _ID, "reason": _REASON},
    ERROR: {"code": F("str", max_len=64), "message": F("str", max_len=1000)},
}
BRIDGE_FROM_RUNNER: Spec = {
    HELLO: {"call_token": F("str", max_len=256), "protocol": F("int", minimum=0),
            "last_seq": F("int", False, minimum=0), "events": F("list", False, max_len=64),
            "verbs": F("list", False, max_len=64), "sdk": F("str", False, max_len=128)},
    ACK: {},
    TEXT_DELTA: {"turn_id": _TURN, "text": _TEXT},
    TEXT_END: {"turn_id": _TURN},
    SAY: {"text": _TEXT, "interruptible": F("bool", False)},
    INTERRUPT: {},
    TRANSFER: {"target": F("str", max_len=512), "mode": F("str", False, choices=("blind", "attended"))},
    END_CALL: {"reason": _REASON},
    DISPATCH: {"agent_id": _AGENT_ID, "data": _META},
    RECORDING_PAUSE: {},
    RECORDING_RESUME: {},
    AGENT_ERROR: {"code": F("str", pattern=AGENT_ERROR_CODE_RE),
                  "message": F("str", False, max_len=AGENT_ERROR_MESSAGE_CHARS),
                  "turn_id": F("int", False, nullable=True)},
}
BRIDGE_FROM_SERVER: Spec = {
    HELLO_ACK: {"protocol": F("int", minimum=0), "session_id": _ID, "resumed": F("bool"),
                "last_seq": F("int", minimum=0), "events": F("list", False), "verbs": F("list", False)},
    ACK: {},
    CALL_STARTED: {"session_id": _ID, "direction": F("str", max_len=32),
                   "pipe_id": F("str", False, nullable=True), "agent_id": F("str", False),
                   "caller": F("str", False, nullable=True),
                   "caller_name": F("str", False, nullable=True), "metadata": _META},
    USER_PARTIAL: {"text": _TEXT},
    USER_TEXT: {"turn_id": _TURN, "text": _TEXT},
    USER_INTERRUPTED: {"turn_id": _TURN, "heard_text": _OPT_TEXT, "user_text": _OPT_TEXT},
    AGENT_SPEECH_DONE: {"turn_id": _TURN, "text": _OPT_TEXT},
    DTMF: {"digit": F("str", max_len=8)},
    SILENCE: {"seconds": F("num", False, minimum=0)},
    METRIC: {"turn_id": F("int", False)},
    CALL_ENDED: {"reason": _REASON},
    ERROR: {"code": F("str", max_len=64), "message": F("str", max_len=1000)},
}
for _spec in (BRIDGE_FROM_RUNNER, BRIDGE_FROM_SERVER):
    for _fields in _spec.values():
        _fields.update(_SEQ)  # type: ignore[attr-defined]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(raw: str | bytes) -> Any:
    """JSON text → Python value; NaN/Infinity and absurd nesting are refused as invalid JSON."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(Codes.BINARY_NOT_SUPPORTED, "the agent channel carries JSON text frames only")
    if len(raw) > MAX_FRAME_BYTES:  # chars ≤ bytes: a cheap first bound
        raise ProtocolError(Codes.TOO_LARGE, f"frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(Codes.INVALID_JSON, f"not valid JSON: {str(exc)[:120]}") from None


def parse(raw: str | bytes, spec: Spec) -> dict[str, Any]:
    """Decode and validate one frame against `spec` (one of the four tables above)."""
    return validate(decode(raw), spec)


def validate(frame: Any, spec: Spec) -> dict[str, Any]:
    if not isinstance(frame, dict):
        raise ProtocolError(Codes.NOT_AN_OBJECT, "a frame must be a JSON object")
    kind = frame.get("type")
    if kind is None:
        raise ProtocolError(Codes.MISSING_TYPE, "a frame needs a 'type'")
    if not isinstance(kind, str) or kind not in spec:
        shown = kind[:64] if isinstance(kind, str) else type(kind).__name__
        raise ProtocolError(Codes.UNKNOWN_TYPE, f"unknown frame type {shown!r} here")
    for name, f in spec[kind].items():
        if name not in frame:
            if f.required:
                raise ProtocolError(Codes.MISSING_FIELD, f"{kind}: missing field {name!r}")
            continue
        _check(kind, name, frame[name], f)
    return frame


def _check(kind: str, name: str, value: Any, f: F) -> None:
    def bad(why: str) -> ProtocolError:
        return ProtocolError(Codes.BAD_FIELD, f"{kind}: field {name!r} {why}")

    if value is None:
        if f.nullable:
            return
        raise bad("must not be null")
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "num": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "obj": isinstance(value, dict),
        "list": isinstance(value, list),
    }[f.kind]
    if not ok:
        raise bad(f"must be {f.kind}, got {type(value).__name__}")
    if f.kind == "num" and not math.isfinite(value):
        raise bad("must be finite")
    if f.minimum is not None and value < f.minimum:
        raise bad(f"must be >= {f.minimum:g}")
    if f.kind == "int" and abs(value) > 2**53:
        raise bad("is out of range")
    if f.max_len is not None:
        size = len(json.dumps(value)) if f.kind == "obj" else len(value)
        if size > f.max_len:
            raise bad(f"is longer than {f.max_len}")
    if f.choices is not None and value not in f.choices:
        raise bad(f"must be one of {', '.join(f.choices)}")
    if f.pattern is not None and not f.pattern.match(value):
        raise bad(f"does not match {f.pattern.pattern}")
    if f.kind == "str" and "\x00" in value:
        raise bad("must not contain NUL")


def encode(frame: Mapping[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


# ---- reliable delivery over a redialable bridge -----------------------------------------------------------
class Outbox:
    """Numbers outgoing bridge frames and keeps the unacknowledged ones for replay after a redial.

    The peer acknowledges with `ack` (on any frame it sends, or an `ack` frame); `replay_after(n)` gives
    every frame with seq > n, or None when some of them were dropped for space (the call cannot resume).
    """

    def __init__(self, limit: int = 2048) -> None:
        self.seq = 0
        self._kept: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._limit = limit
        self._dropped_upto = 0

    def stamp(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        frame = {**frame, "seq": self.seq}
        self._kept.append((self.seq, frame))
        if len(self._kept) > self._limit:
            self._dropped_upto = self._kept.popleft()[0]
        return frame

    def ack(self, upto: int) -> None:
        while self._kept and self._kept[0][0] <= upto:
            self._kept.popleft()

    @property
    def unacked(self) -> int:
        return len(self._kept)

    def replay_after(self, seq: int) -> list[dict[str, Any]] | None:
        if seq < self._dropped_upto:
            return None
        self.ack(seq)
        return [f for s, f in self._kept if s > seq]


class Inbox:
    """The receive side: drops replayed duplicates and says when an `ack` is due."""

    def __init__(self, ack_every: int = 16) -> None:
        self.last_seq = 0
        self._since_ack = 0
        self._ack_every = ack_every

    def accept(self, frame: Mapping[str, Any]) -> bool:
        """True if the frame is new (deliver it); False for a duplicate from a replay."""
        seq = frame.get("seq")
        if seq is None:
            return True
        if seq <= self.last_seq:
            return False
        self.last_seq = seq
        self._since_ack += 1
        return True

    def sent_ack(self) -> None:
        self._since_ack = 0

    @property
    def ack_due(self) -> bool:
        return self._since_ack >= self._ack_every


def names(values: Iterable[Any]) -> list[str]:
    return [v for v in values if isinstance(v, str)][:64]
