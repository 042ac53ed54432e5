"""A flow-based agent: books dental appointments by following examples/flows/appointment.yaml.

    SPEECHPIPE_URL=http://127.0.0.1:8780 SPEECHPIPE_API_KEY=spk_... python examples/appointment_agent.py

No model, no network beyond Speech Pipe: the DialogMachine runs the flow deterministically. Give it an
`--llm openai/<model>` (with OPENAI_BASE_URL for a local server) and it also maps unexpected answers to
the flow's intents through the model.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from speechpipe import AgentRunner, CallContext, DialogMachine

FLOW = Path(__file__).with_name("flows") / "appointment.yaml"
LLM: str | None = None


async def handle_call(ctx: CallContext) -> None:
    if ctx.direction == "inbound_phone":
        ctx.session.data["channel"] = "phone"   # e.g. offer an SMS confirmation to ctx.caller
    elif ctx.direction == "web":
        ctx.session.data["channel"] = "web"

    ctx.session.dialog_machine = DialogMachine(flow=FLOW, llm=LLM)
    await ctx.session.run()


def main() -> None:
    global LLM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-id", default=os.environ.get("SPEECHPIPE_AGENT_ID", "appointments"))
    parser.add_argument("--capacity", type=int, default=int(os.environ.get("SPEECHPIPE_CAPACITY", "20")))
    parser.add_argument("--llm", default=os.environ.get("APPOINTMENT_LLM"), help="e.g. openai/qwen2.5-0.5b")
    args = parser.parse_args()
    LLM = args.llm
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    AgentRunner(handle_call, agent_id=args.agent_id, capacity=args.capacity).run_forever()


if __name__ == "__main__":
    main()
