"""The built-in demo agent `serve --demo` runs: an echo agent that connects over the real agent channel,
exactly as a customer's AgentRunner would (it just happens to live in the server's process)."""

from __future__ import annotations

from speechpipe.runner import AgentRunner, CallContext


async def handle_call(ctx: CallContext) -> None:
    where = "on the phone" if ctx.direction == "inbound_phone" else "on the web"
    await ctx.session.say(f"Hello! This is the Speech Pipe demo agent, {where}. Say something and I will "
                          "repeat it.")

    @ctx.session.on("user_turn")
    def echo(turn):  # type: ignore[no-untyped-def]
        return f"You said: {turn.text}"

    await ctx.session.run()


def demo_runner(url: str, api_key: str, agent_id: str) -> AgentRunner:
    return AgentRunner(handle_call, agent_id=agent_id, capacity=50, url=url, api_key=api_key,
                       worker_id="builtin-demo")
