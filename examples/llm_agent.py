"""An LLM agent: free-form answers streamed from any OpenAI-compatible server (or Anthropic), spoken as
they arrive, sentence by sentence.

    # a local llama.cpp / vLLM / Ollama server:
    OPENAI_BASE_URL=http://127.0.0.1:8080/v1 SPEECHPIPE_API_KEY=spk_... \\
        python examples/llm_agent.py --llm openai/qwen2.5-1.5b-instruct
    # Anthropic:
    ANTHROPIC_API_KEY=... python examples/llm_agent.py --llm anthropic/claude-haiku-4-5

The flow is tiny: one free-form node, plus a global "goodbye" intent that ends the call without asking
the model, so hanging up never depends on the model's mood.

It refuses to start without the model's key (OPENAI_API_KEY, unless OPENAI_BASE_URL names a server that
needs none; ANTHROPIC_API_KEY), naming the variable to set: a runner without one would greet every caller,
then fail every turn. A model that fails mid-call (down, refusing) is reported to the platform, which
apologises to the caller once per turn (the pipe's `agent_error_message`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from speechpipe import AgentRunner, CallContext, DialogMachine
from speechpipe.runner import RunnerError, make_llm

FLOW = {
    "start": "chat",
    "system": ("You are a friendly voice assistant on a phone line. Answer in one or two short spoken "
               "sentences. No lists, no markdown."),
    "intents": [{"name": "goodbye", "keywords": ["goodbye", "bye", "hang up"], "next": "bye"}],
    "nodes": {
        "chat": {"llm": True},
        "bye": {"say": "Goodbye, and thanks for calling!", "end": "caller_said_goodbye"},
    },
}
LLM = "openai/gpt-4o-mini"


async def handle_call(ctx: CallContext) -> None:
    greeting = "Hi, thanks for calling." if ctx.direction == "inbound_phone" else "Hi there!"
    await ctx.session.say(f"{greeting} What can I do for you?")
    ctx.session.dialog_machine = DialogMachine(flow=FLOW, llm=LLM)
    await ctx.session.run()


def missing_key(llm: str) -> str | None:
    """Why `llm` cannot work from this environment (the variable to set), or None."""
    provider = llm.partition("/")[0]
    env = os.environ
    if provider == "openai" and not env.get("OPENAI_API_KEY") and not env.get("OPENAI_BASE_URL"):
        return ("OPENAI_API_KEY is not set: set it to your OpenAI API key (or set OPENAI_BASE_URL to a local "
                "OpenAI-compatible server that needs no key)")
    if provider == "anthropic" and not env.get("ANTHROPIC_API_KEY"):
        return "ANTHROPIC_API_KEY is not set: set it to your Anthropic API key"
    return None


def main() -> None:
    global LLM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-id", default=os.environ.get("SPEECHPIPE_AGENT_ID", "assistant"))
    parser.add_argument("--capacity", type=int, default=int(os.environ.get("SPEECHPIPE_CAPACITY", "20")))
    parser.add_argument("--llm", default=os.environ.get("AGENT_LLM", LLM),
                        help="openai/<model> (OPENAI_BASE_URL, OPENAI_API_KEY) or anthropic/<model>")
    args = parser.parse_args()
    try:
        make_llm(args.llm)
    except ValueError as exc:
        sys.exit(f"llm_agent: {exc}")
    problem = missing_key(args.llm)
    if problem is not None:
        print(f"llm_agent: --llm {args.llm}: {problem}", file=sys.stderr)
        sys.exit(2)
    LLM = args.llm
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        AgentRunner(handle_call, agent_id=args.agent_id, capacity=args.capacity).run_forever()
    except RunnerError as exc:
        sys.exit(f"llm_agent: {exc}")


if __name__ == "__main__":
    main()
