"""The customer-side SDK: AgentRunner dials out and serves sessions as text.

    from speechpipe import AgentRunner, CallContext, DialogMachine
"""

from speechpipe.runner.context import (
    AgentTurn,
    CallContext,
    ChannelError,
    Interruption,
    Metric,
    Session,
    UserTurn,
)
from speechpipe.runner.dialog import DialogMachine, DialogReply, Flow, FlowError
from speechpipe.runner.llm import LLM, AnthropicChat, LLMError, OpenAIChat, make_llm
from speechpipe.runner.runner import AgentRunner, RunnerError

__all__ = [
    "LLM",
    "AgentRunner",
    "AgentTurn",
    "AnthropicChat",
    "CallContext",
    "ChannelError",
    "DialogMachine",
    "DialogReply",
    "Flow",
    "FlowError",
    "Interruption",
    "LLMError",
    "Metric",
    "OpenAIChat",
    "RunnerError",
    "Session",
    "UserTurn",
    "make_llm",
]
