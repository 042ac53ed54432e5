"""A runner process for the agent-channel tests: every hook writes a JSON line, user text drives controls.

Run as `python tests/agent_probe.py` with SPEECHPIPE_URL / SPEECHPIPE_API_KEY / SPEECHPIPE_AGENT_ID set and
PROBE_LOG naming the JSON-lines file. What the user says (typed turns) picks the behaviour:
  "say X"  "end X"  "transfer X"  "dispatch X"  "pause"  "resume"  "boom" (the user_turn hook raises)
  "long" (a slow, long streamed reply)  "sleep N" (answer after N s)  "stats"  anything else: echo.
DTMF "#" calls session.interrupt(); DTMF "0" answers with a `say`; DTMF "9" makes the dtmf hook raise.
Metadata `raise_in_entry` makes the entrypoint raise after registering its hooks; jobs for pipe
PROBE_REFUSE_PIPE are refused by `on_job`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from speechpipe.runner import AgentRunner, CallContext, UserTurn

LOG = os.environ.get("PROBE_LOG", "probe.jsonl")
LONG = ["This is the first sentence of a long answer.", "Here is the second sentence, it goes on a while.",
        "The third sentence keeps talking about nothing much.", "A fourth one follows right behind it.",
        "And a fifth sentence, so that there is plenty left to cut."]
runner: AgentRunner | None = None


def log(event: str, **fields: Any) -> None:
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields}, default=str)
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(line + "\n")


async def slow_long() -> AsyncIterator[str]:
    for sentence in LONG:
        for word in sentence.split(" "):
            yield word + " "
            await asyncio.sleep(0.02)


async def handle_call(ctx: CallContext) -> None:
    s = ctx.session
    log("entry", session_id=ctx.session_id, direction=ctx.direction, agent_id=ctx.agent_id,
        pipe_id=ctx.pipe_id, caller=ctx.caller, metadata=ctx.metadata, job_id=ctx.job_id)
    s.data["user_turns"] = 0

    def on_dtmf(digit: str) -> Any:
        log("dtmf", digit=digit)
        if digit == "9":
            raise RuntimeError("dtmf hook blew up")
        if digit == "#":
            return s.interrupt()
        if digit == "0":
            return s.say("You pressed zero: connecting you to the operator.")  # a menu's answer
        return None

    async def answer(turn: UserTurn) -> Any:
        s.data["user_turns"] += 1
        text = turn.text.strip().rstrip(".!?")
        word, _, rest = text.partition(" ")
        word = word.lower()
        if word == "boom":
            raise RuntimeError("user_turn hook blew up")
        if word == "say":
            await s.say(rest)
            return None
        if word == "end":
            await s.say("Goodbye.")
            await s.end(rest or "agent_ended")
            return None
        if word == "transfer":
            await s.transfer(rest)
            return None
        if word == "dispatch":
            await s.dispatch(rest, {"note": "from probe", "turns": s.data["user_turns"]})
            return None
        if word == "pause":
            await s.recording.pause()
            return "Recording paused."
        if word == "resume":
            await s.recording.resume()
            return "Recording resumed."
        if word == "long":
            return slow_long()
        if word == "sleep":
            await asyncio.sleep(float(rest))
            return f"I slept {rest} seconds."
        if word == "stats" and runner is not None:
            log("stats", stats=runner.stats())
            return "Stats written."
        return f"You said: {turn.text}"

    s.on("call_start", lambda c: log("call_start", session_id=c.session_id))
    s.on("user_partial", lambda text: log("user_partial", text=text))
    s.on("user_turn", lambda t: log("user_turn", turn_id=t.turn_id, text=t.text))
    s.on("user_turn", answer)
    s.on("agent_turn", lambda t: log("agent_turn", turn_id=t.turn_id, text=t.text))
    s.on("interruption", lambda i: log("interruption", turn_id=i.turn_id, heard=i.heard_text,
                                       user=i.user_text, text=i.text))
    s.on("dtmf", on_dtmf)
    s.on("silence", lambda sec: log("silence", seconds=sec))
    s.on("metric", lambda m: log("metric", turn_id=m.turn_id, values=m.values))
    s.on("call_end", lambda reason: log("call_end", reason=reason, data=s.data))
    s.on("error", lambda e: log("error", code=e.code, message=e.message, details=e.details))
    greeting = os.environ.get("PROBE_GREETING")
    if greeting:
        await s.say(greeting)
    if ctx.metadata.get("raise_in_entry"):
        raise RuntimeError("the entrypoint blew up after setting up its hooks")
    await s.run()


async def main() -> None:
    global runner
    refuse = os.environ.get("PROBE_REFUSE_PIPE")
    runner = AgentRunner(handle_call, on_job=lambda job: job["metadata"].get("pipe_id") != refuse,
                         drain_timeout_s=float(os.environ.get("PROBE_DRAIN_S", "30")),
                         end_timeout_s=float(os.environ.get("PROBE_END_S", "10")),
                         bridge_grace_s=float(os.environ.get("PROBE_BRIDGE_GRACE_S", "10")),
                         reconnect_min_s=0.1, reconnect_max_s=1.0)
    log("runner_start", worker_id=runner.worker_id)
    try:
        await runner.run()
    finally:
        log("exit", stats=runner.stats())


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
