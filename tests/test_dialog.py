"""DialogMachine: flows run offline and deterministically; LLM providers stream from real local HTTP servers
(an OpenAI-compatible one and one shaped like Anthropic's Messages API); the example agents end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from speechpipe.pipeline import events as ev
from speechpipe.pipeline.config import PipeConfig
from speechpipe.runner import DialogMachine, DialogReply, FlowError, LLMError
from speechpipe.runner.dialog import Flow, Slot, extract
from speechpipe.runner.llm import AnthropicChat, make_llm
from tests.fixtures_agents import ROOT

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOW = ROOT / "examples" / "flows" / "appointment.yaml"
GREETING = "Hello, this is Sunny Dental. Would you like to book an appointment?"


async def said(step: DialogReply | None) -> str:
    assert step is not None
    return "".join([chunk async for chunk in step.chunks])


async def talk(dm: DialogMachine, *lines: str) -> list[str]:
    out = [await said(await dm.start())]
    for line in lines:
        out.append(await said(await dm.respond(line)))
    return out


# ---- flows, offline --------------------------------------------------------------------------------------
async def test_appointment_flow_books_step_by_step() -> None:
    dm = DialogMachine(flow=FLOW)
    assert await talk(dm, "Yes please.", "Tuesday.", "Three thirty p.m.", "My name is Alex.") == [
        GREETING,
        "Great. Which day and time would you like?",
        "And at what time? For example, ten a.m. or three thirty p.m.",
        "Thanks. What name should I put the booking under?",
        "So that's Tuesday at 3:30 pm, for Alex. Shall I book it?",
    ]
    step = await dm.respond("Yes, book it.")
    assert await said(step) == "You're booked for Tuesday at 3:30 pm. We'll see you then, Alex. Goodbye!"
    assert step.end == "booked" and dm.ended
    assert dm.slots == {"day": "Tuesday", "time": "3:30 pm", "name": "Alex"}
    assert dm.trace == ["greet", "intent:affirm", "ask_slot", "slots:day", "slots:time", "ask_name",
                        "slots:name", "confirm", "intent:affirm", "booked"]


async def test_two_slots_in_one_answer_and_changing_them() -> None:
    dm = DialogMachine(flow=FLOW)
    lines = await talk(dm, "I'd like an appointment", "Friday at 10 a.m. would be great", "Sam")
    assert lines[-1] == "So that's Friday at 10 am, for Sam. Shall I book it?"
    assert await said(await dm.respond("No, change it.")) == \
        "No problem. Great. Which day and time would you like?"
    assert dm.slots == {"name": "Sam"}
    assert await said(await dm.respond("Monday at noon")) == \
        "So that's Monday at 12 pm, for Sam. Shall I book it?"  # the name is still known: no question


async def test_fallback_retries_then_on_fail() -> None:
    dm = DialogMachine(flow=FLOW)
    sorry = f"Sorry, I didn't catch that. {GREETING}"
    # no 'yes' in 'yesterday', no 'no' in 'knew'
    assert await talk(dm, "yesterday I knew a banana", "hmm") == [GREETING, sorry, sorry]
    step = await dm.respond("purple")
    assert await said(step) == "Okay. Thanks for calling Sunny Dental. Goodbye!"
    assert step.end == "caller_declined"


async def test_global_intents_dtmf_and_silence() -> None:
    dm = DialogMachine(flow=FLOW)
    await talk(dm, "yes")
    step = await dm.respond("Can I talk to a real person?")
    assert await said(step) == "Let me put you through to our receptionist."
    assert step.dispatch == "front-desk" and step.intent == "operator"
    dm = DialogMachine(flow=FLOW)
    await dm.start()
    assert await said(await dm.on_silence(5.0)) == \
        "Are you still there? Would you like to book an appointment?"
    assert await dm.on_dtmf("7") is None  # no intent for 7
    assert await said(await dm.on_dtmf("1")) == "Great. Which day and time would you like?"
    assert await dm.on_silence(5.0) is None  # ask_slot has no reprompt
    step = await dm.on_dtmf("0")
    assert step is not None and step.dispatch == "front-desk"


async def test_same_input_same_output() -> None:
    lines = ("sure", "wed at 9 am", "It's Robin", "no", "thursday 4 pm", "yes")
    a, b = DialogMachine(flow=FLOW), DialogMachine(flow=FLOW)
    assert await talk(a, *lines) == await talk(b, *lines)
    assert a.trace == b.trace and a.slots == b.slots == {"day": "Thursday", "time": "4 pm", "name": "Robin"}


@pytest.mark.parametrize(("flow", "message"), [
    ({"nodes": {}}, "non-empty"),
    ({"start": "nowhere", "nodes": {"a": {"say": "hi"}}}, "start: no node named 'nowhere'"),
    ({"nodes": {"a": {"say": "hi", "next": "b"}}}, "node a: next: no node named 'b'"),
    ({"nodes": {"a": {"intents": [{"name": "x", "patterns": ["(unclosed"]}]}}}, "bad pattern"),
    ({"nodes": {"a": {"sayy": "typo"}}}, "unknown keys ['sayy']"),
    ({"nodes": {"a": {"slots": ["day"]}}}, "fills slots but has no 'next'"),
    ({"nodes": {"a": {"intents": [{"keywords": ["x"]}]}}}, "with a 'name'"),
    ({"slots": {"d": {"type": "date"}}, "nodes": {"a": {}}}, "type must be"),
])
async def test_broken_flows_say_what_is_wrong(flow: dict[str, Any], message: str) -> None:
    with pytest.raises(FlowError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Flow.load(flow)


async def test_slot_extraction() -> None:
    time_slot = Slot("t", type="time")
    assert [extract(time_slot, t) for t in ("three thirty p.m.", "at 10 a.m.", "15:45", "seven o'clock",
                                            "forty five past", "at noon")] == \
        ["3:30 pm", "10 am", "15:45", "7 o'clock", None, "12 pm"]
    assert extract(Slot("n", type="number"), "table for twenty two please") == "22"
    assert extract(Slot("d", values={"Monday": ["monday", "mon"]}), "Is Mon OK?") == "Monday"
    assert extract(Slot("d", values={"Monday": ["monday", "mon"]}), "common") is None  # word boundaries


async def test_flows_load_from_yaml_and_json_text(tmp_path) -> None:
    flow = {"start": "a", "nodes": {"a": {"say": "Hi {who}.", "intents": [
        {"name": "bye", "patterns": [r"\bbye\b"], "end": True}]}}}
    path = tmp_path / "f.json"
    path.write_text(json.dumps(flow))
    for source in (path, str(path), json.dumps(flow), flow):
        dm = DialogMachine(flow=source)
        assert await said(await dm.start()) == "Hi {who}."  # unknown slots stay as written
        step = await dm.respond("ok bye now")
        assert step.end == "completed"


# ---- LLM providers against real local HTTP servers -------------------------------------------------------
class FakeLLMServer:
    """A real HTTP server speaking the OpenAI chat-completions stream (and Anthropic's, on /v1/messages)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply: Callable[[dict[str, Any]], list[str]] = lambda body: ["Sure", ", I can", " help."]
        self.status = 200
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body, "path": request.path})
        if self.status != 200:
            return web.json_response({"error": {"message": "model overloaded"}}, status=self.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, piece in enumerate(self.reply(body)):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": piece} if i else {"role": "assistant", "content": piece}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b": keep-alive comment\n\ndata: [DONE]\n\n")
        return resp

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body, "path": request.path})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [("message_start", {"type": "message_start", "message": {"id": "m1"}}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
                  ("ping", {"type": "ping"})]
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": piece}})
                   for piece in self.reply(body)]
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
                   ("message_stop", {"type": "message_stop"})]
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        return resp


@pytest.fixture
async def llm_server():
    server = FakeLLMServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/v1/messages", server.messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


async def test_openai_compatible_streaming_with_history(llm_server: FakeLLMServer) -> None:
    dm = DialogMachine(llm="openai/tiny-model", system="Be brief.",
                       llm_options={"base_url": f"{llm_server.url}/v1", "api_key": "sk-local"})
    step = await dm.respond("hi there")
    chunks = [c async for c in step.chunks]
    assert chunks == ["Sure", ", I can", " help."]  # deltas arrive as the server sends them
    req = llm_server.requests[0]
    assert req["headers"]["Authorization"] == "Bearer sk-local"
    assert req["body"]["model"] == "tiny-model" and req["body"]["stream"] is True
    assert req["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "hi there"}]
    await said(await dm.respond("and then?"))
    assert llm_server.requests[1]["body"]["messages"][1:] == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Sure, I can help."},
        {"role": "user", "content": "and then?"}]
    await dm.aclose()


async def test_llm_picks_an_intent_when_keywords_do_not(llm_server: FakeLLMServer) -> None:
    llm_server.reply = lambda body: ["operator"] if "Intents:" in body["messages"][0]["content"] else ["?"]
    dm = DialogMachine(flow=FLOW, llm="openai/m", llm_options={"base_url": f"{llm_server.url}/v1"})
    await dm.start()
    step = await dm.respond("I would rather speak with somebody at the front desk")
    assert step.intent == "operator" and step.dispatch == "front-desk"
    assert "Authorization" not in llm_server.requests[0]["headers"]  # no key configured: none sent
    await dm.aclose()


async def test_llm_errors_surface_and_flows_fall_back(llm_server: FakeLLMServer) -> None:
    llm_server.status = 503
    chat = DialogMachine(llm="openai/m", llm_options={"base_url": f"{llm_server.url}/v1"})
    with pytest.raises(LLMError, match="HTTP 503"):
        await said(await chat.respond("hello"))
    flow = DialogMachine(flow=FLOW, llm="openai/m", llm_options={"base_url": f"{llm_server.url}/v1"})
    await flow.start()
    assert (await said(await flow.respond("purple"))).startswith("Sorry, I didn't catch that.")
    await chat.aclose()
    await flow.aclose()


async def test_anthropic_messages_stream_shape(llm_server: FakeLLMServer) -> None:
    # Against a local server that speaks the documented Messages streaming format; not the live API.
    llm = make_llm("anthropic/claude-haiku-4-5", base_url=llm_server.url, api_key="ak-test")
    assert isinstance(llm, AnthropicChat)
    got = [d async for d in llm.stream("hi", system="Be kind.", history=[])]
    assert got == ["Sure", ", I can", " help."]
    req = llm_server.requests[0]
    assert req["path"] == "/v1/messages" and req["headers"]["x-api-key"] == "ak-test"
    assert req["headers"]["anthropic-version"] == "2023-06-01"
    assert req["body"]["system"] == "Be kind." and req["body"]["stream"] is True
    assert req["body"]["messages"] == [{"role": "user", "content": "hi"}]
    await llm.aclose()


async def test_any_object_with_stream_fills_the_llm_slot() -> None:
    class Shouty:
        async def stream(self, text: str):  # type: ignore[no-untyped-def]
            for word in text.upper().split():
                yield word + " "

    dm = DialogMachine(llm=Shouty())
    assert await said(await dm.respond("hello you")) == "HELLO YOU "
    with pytest.raises(ValueError, match="openai/<model>"):
        DialogMachine(llm="mistral/x")


# ---- the example agents, end to end ----------------------------------------------------------------------
async def test_appointment_agent_books_over_the_channel(agent_channel) -> None:
    ch = await agent_channel()
    await ch.runner("appointments", script=ROOT / "examples" / "appointment_agent.py")
    call = await ch.call("appointments", direction="inbound_phone")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == GREETING)
    assert await call.ask("Yes please") == "Great. Which day and time would you like?"
    assert await call.ask("Thursday at 2 pm") == "Thanks. What name should I put the booking under?"
    assert await call.ask("Kim") == "So that's Thursday at 2 pm, for Kim. Shall I book it?"
    assert await call.ask("Yes") == "You're booked for Thursday at 2 pm. We'll see you then, Kim. Goodbye!"
    assert await call.ended() == "booked"
    assert len(await ch.astore.list_turns(call.session_id)) == 9


async def test_llm_agent_streams_from_a_local_openai_server(agent_channel, llm_server: FakeLLMServer) -> None:
    ch = await agent_channel()
    await ch.runner("assistant", script=ROOT / "examples" / "llm_agent.py",
                    env={"OPENAI_BASE_URL": f"{llm_server.url}/v1", "AGENT_LLM": "openai/local-model"})
    call = await ch.call("assistant")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Hi there! What can I do for you?")
    assert await call.ask("What are your opening hours?") == "Sure, I can help."
    body = llm_server.requests[0]["body"]
    assert body["model"] == "local-model"
    assert body["messages"][-1]["content"] == "What are your opening hours?"
    assert "voice assistant" in body["messages"][0]["content"]
    assert await call.ask("Thanks, goodbye") == "Goodbye, and thanks for calling!"
    assert await call.ended() == "caller_said_goodbye"
    assert len(llm_server.requests) == 1  # goodbye never reached the model


async def test_llm_agent_whose_model_fails_apologises_instead_of_dead_air(agent_channel,
                                                                          llm_server: FakeLLMServer) -> None:
    ch = await agent_channel()
    await ch.runner("assistant", script=ROOT / "examples" / "llm_agent.py",
                    env={"OPENAI_BASE_URL": f"{llm_server.url}/v1", "AGENT_LLM": "openai/local-model"})
    call = await ch.call("assistant")
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == "Hi there! What can I do for you?")
    llm_server.status = 503
    call.session.push_text("What are your opening hours?")
    err = await call.wait(ev.AgentError)
    assert (err.code, err.agent_code) == ("agent_error", "dialog_failed")
    apology = PipeConfig(agent_id="assistant").agent_error_message
    await call.wait(ev.AgentSpeechDone, lambda e: e.text == apology)
    llm_server.status = 200  # the model is back: the call went on
    assert await call.ask("And on Sundays?") == "Sure, I can help."


async def test_llm_agent_without_a_key_refuses_to_start_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "examples" / "llm_agent.py"), *args], env=env,
                              capture_output=True, text=True, timeout=60)

    proc = await asyncio.to_thread(run)
    assert proc.returncode == 2 and "OPENAI_API_KEY is not set" in proc.stderr, proc.stderr
    proc = await asyncio.to_thread(run, "--llm", "anthropic/claude-x")
    assert proc.returncode == 2 and "ANTHROPIC_API_KEY is not set" in proc.stderr, proc.stderr
