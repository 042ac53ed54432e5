"""The public agent SDK surface, re-exported for `from speechpipe import AgentRunner, CallContext, ...`."""

from speechpipe.runner import (
    AgentRunner,
    AgentTurn,
    CallContext,
    ChannelError,
    DialogMachine,
    Flow,
    Interruption,
    Metric,
    RunnerError,
    Session,
    UserTurn,
)

__all__ = [
    "AgentRunner",
    "AgentTurn",
    "CallContext",
    "ChannelError",
    "DialogMachine",
    "Flow",
    "Interruption",
    "Metric",
    "RunnerError",
    "Session",
    "UserTurn",
]
