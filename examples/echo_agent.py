"""The smallest agent: repeats what the caller said. The same `handle_call` serves phone and web sessions.

    SPEECHPIPE_URL=http://127.0.0.1:8780 SPEECHPIPE_API_KEY=spk_... python examples/echo_agent.py

(`--agent-id` defaults to SPEECHPIPE_AGENT_ID or `echo`; the pipe's config names the agent_id it wants.)
"""

from __future__ import annotations

import argparse
import logging
import os

from speechpipe import AgentRunner, CallContext


async def handle_call(ctx: CallContext) -> None:
    greeting = "Hello! You're on the phone with the echo agent." if ctx.direction == "inbound_phone" \
        else "Hello! This is the echo agent on the web."
    await ctx.session.say(greeting)

    @ctx.session.on("user_turn")
    def echo(turn):  # type: ignore[no-untyped-def]
        return f"You said: {turn.text}"

    await ctx.session.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-id", default=os.environ.get("SPEECHPIPE_AGENT_ID", "echo"))
    parser.add_argument("--capacity", type=int, default=int(os.environ.get("SPEECHPIPE_CAPACITY", "50")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    AgentRunner(handle_call, agent_id=args.agent_id, capacity=args.capacity).run_forever()


if __name__ == "__main__":
    main()
