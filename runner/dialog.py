"""`DialogMachine`: a conversation as a graph of nodes, loaded from YAML or JSON, run deterministically.

A flow (see examples/flows/appointment.yaml):

    start: greet
    fallback: "Sorry, I didn't catch that."
    slots:    {day: {values: {monday: [monday, mon]}}, time: {type: time, prompt: "At what time?"}}
    intents:  [{name: bye, keywords: [goodbye], next: goodbye}]        # global: checked in every node
    nodes:
      greet:   {say: "Book an appointment?", intents: [{name: yes, keywords: [yes, sure], next: ask}]}
      ask:     {say: "Which day and time?", slots: [day, time], next: confirm}
      confirm: {say: "{day} at {time}, right?", intents: [...]}
      goodbye: {say: "Bye!", end: completed}

On each user turn the current node's intents are tried (keywords at word boundaries, regex `patterns`,
`dtmf` digits), then the global intents, then the node's slots are filled from the text; a node whose
slots are all filled moves to `next`. With nothing matched, an `llm` (optional) first picks an intent by
name; a node with `llm: true` answers free-form through it (streamed); otherwise the fallback is said
and the question repeated (after `max_retries`, `on_fail` is entered). Entering a node says its `say`
(with `{slot}` filled in) and applies its action: `end`, `transfer`, `dispatch`. Without an llm
everything is offline and the same input always gives the same output.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .llm import LLM, make_llm, stream_from

log = logging.getLogger(__name__)

MAX_HOPS = 20
HISTORY_TURNS = 20


class FlowError(ValueError):
    """A flow file that cannot run: says where and why."""


# ---- flow model -------------------------------------------------------------------------------------------
@dataclass
class Slot:
    name: str
    values: dict[str, list[str]] | None = None  # canonical value -> phrases that mean it
    pattern: re.Pattern[str] | None = None
    type: str = "text"  # text | number | time | any
    prompt: str | None = None


@dataclass
class Intent:
    name: str
    keywords: list[str] = field(default_factory=list)
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    dtmf: list[str] = field(default_factory=list)
    description: str | None = None
    say: str | None = None
    next: str | None = None
    set: dict[str, str] = field(default_factory=dict)
    clear: list[str] = field(default_factory=list)
    end: str | None = None
    transfer: str | None = None
    dispatch: str | None = None


@dataclass
class Node:
    name: str
    say: str | None = None
    intents: list[Intent] = field(default_factory=list)
    slots: list[str] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    next: str | None = None
    end: str | None = None
    transfer: str | None = None
    dispatch: str | None = None
    llm: bool = False
    prompt: str | None = None  # instructions for the llm in this node
    fallback: str | None = None
    reprompt: str | None = None  # said after the platform reports silence
    max_retries: int | None = None
    on_fail: str | None = None


@dataclass
class Flow:
    start: str
    nodes: dict[str, Node]
    slots: dict[str, Slot] = field(default_factory=dict)
    intents: list[Intent] = field(default_factory=list)
    fallback: str = "Sorry, I didn't catch that."
    max_retries: int = 2
    system: str | None = None
    name: str = "flow"

    @classmethod
    def load(cls, source: Flow | Mapping[str, Any] | str | Path) -> Flow:
        """A Flow from a Flow, a dict, a .yaml/.yml/.json path, or YAML/JSON text."""
        if isinstance(source, Flow):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        text = str(source)
        path = Path(text)
        if "\n" not in text and path.suffix.lower() in (".yaml", ".yml", ".json"):
            if not path.is_file():
                raise FlowError(f"flow file {text!r} not found")
            raw = path.read_text(encoding="utf-8")
            data = json.loads(raw) if path.suffix.lower() == ".json" else yaml.safe_load(raw)
        else:
            data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            raise FlowError("a flow must be a mapping with 'start' and 'nodes'")
        return cls.from_dict(data)

    @classmethod
    def chat(cls, system: str | None = None) -> Flow:
        """The flow behind `DialogMachine(llm=...)` with no flow: one free-form node."""
        return cls(start="chat", nodes={"chat": Node(name="chat", llm=True)}, system=system, name="chat")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Flow:
        nodes_raw = d.get("nodes")
        if not isinstance(nodes_raw, Mapping) or not nodes_raw:
            raise FlowError("flow: 'nodes' must be a non-empty mapping")
        slots = {name: _slot(name, spec or {}) for name, spec in (d.get("slots") or {}).items()}
        flow = cls(start=str(d.get("start") or next(iter(nodes_raw))), slots=slots,
                   nodes={str(n): _node(str(n), spec or {}) for n, spec in nodes_raw.items()},
                   intents=[_intent(f"intents[{i}]", spec) for i, spec in enumerate(d.get("intents") or [])],
                   fallback=str(d.get("fallback") or cls.fallback), max_retries=int(d.get("max_retries", 2)),
                   system=d.get("system"), name=str(d.get("name") or "flow"))
        flow._check()
        return flow

    def _check(self) -> None:
        def target(where: str, name: str | None) -> None:
            if name is not None and name not in self.nodes:
                raise FlowError(f"{where}: no node named {name!r}")

        target("start", self.start)
        for intent in self.intents:
            target(f"intent {intent.name}", intent.next)
        for node in self.nodes.values():
            target(f"node {node.name}: next", node.next)
            target(f"node {node.name}: on_fail", node.on_fail)
            for intent in node.intents:
                target(f"node {node.name}: intent {intent.name}", intent.next)
            for slot in [*node.slots, *node.prompts]:
                if slot not in self.slots:
                    self.slots[slot] = Slot(slot)  # a slot named only in a node: free text
            if node.slots and node.next is None and not node.intents:
                raise FlowError(f"node {node.name}: fills slots but has no 'next'")


def _strs(where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [str(value)]
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    raise FlowError(f"{where}: expected a string or a list of strings")


def _regex(where: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise FlowError(f"{where}: bad pattern {pattern!r}: {exc}") from None


def _action(value: Any, default: str) -> str | None:
    if value is None or value is False:
        return None
    return default if value is True else str(value)


def _slot(name: str, spec: Mapping[str, Any]) -> Slot:
    where = f"slot {name}"
    values = spec.get("values")
    if isinstance(values, list):
        values = {str(v): [str(v)] for v in values}
    elif isinstance(values, Mapping):
        values = {str(k): _strs(f"{where}.values.{k}", v) or [str(k)] for k, v in values.items()}
    elif values is not None:
        raise FlowError(f"{where}: 'values' must be a list or a mapping")
    kind = str(spec.get("type") or ("text" if values or spec.get("pattern") else "any"))
    if kind not in ("text", "number", "time", "any"):
        raise FlowError(f"{where}: type must be text, number, time or any")
    return Slot(name=name, values=values, type=kind, prompt=spec.get("prompt"),
                pattern=_regex(where, spec["pattern"]) if spec.get("pattern") else None)


def _intent(where: str, spec: Any) -> Intent:
    if not isinstance(spec, Mapping) or not spec.get("name"):
        raise FlowError(f"{where}: an intent is a mapping with a 'name'")
    where = f"intent {spec['name']}"
    return Intent(name=str(spec["name"]), keywords=[_norm(k) for k in _strs(f"{where}.keywords",
                                                                              spec.get("keywords"))],
                  patterns=[_regex(where, x) for x in _strs(f"{where}.patterns", spec.get("patterns"))],
                  dtmf=_strs(f"{where}.dtmf", spec.get("dtmf")), description=spec.get("description"),
                  say=spec.get("say"), next=spec.get("next"),
                  set={str(k): str(v) for k, v in (spec.get("set") or {}).items()},
                  clear=_strs(f"{where}.clear", spec.get("clear")), end=_action(spec.get("end"), "completed"),
                  transfer=_action(spec.get("transfer"), ""), dispatch=_action(spec.get("dispatch"), ""))


def _node(name: str, spec: Mapping[str, Any]) -> Node:
    where = f"node {name}"
    if not isinstance(spec, Mapping):
        raise FlowError(f"{where}: a node is a mapping")
    known = {"say", "intents", "slots", "prompts", "next", "end", "transfer", "dispatch", "llm", "prompt",
             "fallback", "reprompt", "max_retries", "on_fail"}
    unknown = set(spec) - known
    if unknown:
        raise FlowError(f"{where}: unknown keys {sorted(unknown)}")
    return Node(name=name, say=spec.get("say"), intents=[_intent(f"{where}.intents[{i}]", s)
                                                         for i, s in enumerate(spec.get("intents") or [])],
                slots=_strs(f"{where}.slots", spec.get("slots")),
                prompts={str(k): str(v) for k, v in (spec.get("prompts") or {}).items()},
                next=spec.get("next"), end=_action(spec.get("end"), "completed"),
                transfer=_action(spec.get("transfer"), ""), dispatch=_action(spec.get("dispatch"), ""),
                llm=bool(spec.get("llm", False)), prompt=spec.get("prompt"), fallback=spec.get("fallback"),
                reprompt=spec.get("reprompt"), max_retries=spec.get("max_retries"),
                on_fail=spec.get("on_fail"))


# ---- text understanding -----------------------------------------------------------------------------------
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}
_TIME = re.compile(r"\b(\d{1,2})(?:[: ](\d{2}))?\s*(am|pm)\b|\b(\d{1,2}):(\d{2})\b|\b(\d{1,2}) o'?clock\b")


def _norm(text: str) -> str:
    """Lower case, `p.m.` → `pm`, punctuation (but apostrophes and clock colons) → spaces."""
    text = text.lower().replace("a.m.", "am").replace("p.m.", "pm")
    text = re.sub(r"(?<=\d):(?=\d)", "\x00", text)
    text = re.sub(r"[^\w'\x00]+", " ", text).replace("\x00", ":")
    return " ".join(text.split())


def _digits(norm: str) -> str:
    """Number words to digits ('forty five' → '45'), for number and time slots."""
    out: list[str] = []
    words = norm.split()
    i = 0
    while i < len(words):
        w = words[i]
        if w in _TENS:
            value = _TENS[w]
            if i + 1 < len(words) and words[i + 1] in _UNITS[1:10]:
                value += _UNITS.index(words[i + 1])
                i += 1
            out.append(str(value))
        elif w in _UNITS:
            out.append(str(_UNITS.index(w)))
        elif w == "noon":
            out.append("12 pm")
        elif w == "midnight":
            out.append("12 am")
        else:
            out.append(w)
        i += 1
    return " ".join(out)


def _has_phrase(norm: str, phrase: str) -> int:
    """Position of `phrase` in `norm` at word boundaries, or -1."""
    m = re.search(rf"(?<![\w']){re.escape(phrase)}(?![\w'])", norm)
    return m.start() if m else -1


def _matches(intent: Intent, norm: str, raw: str) -> bool:
    return any(_has_phrase(norm, k) >= 0 for k in intent.keywords if k) or \
        any(p.search(raw) or p.search(norm) for p in intent.patterns)


def extract(slot: Slot, text: str) -> str | None:
    """The slot's value in `text`, or None."""
    norm = _norm(text)
    if slot.values:
        best: tuple[int, str] | None = None
        for canonical, phrases in slot.values.items():
            for phrase in phrases:
                pos = _has_phrase(norm, _norm(phrase))
                if pos >= 0 and (best is None or pos < best[0]):
                    best = (pos, canonical)
        if best is not None:
            return best[1]
    if slot.pattern is not None:
        m = slot.pattern.search(text) or slot.pattern.search(norm)
        if m:
            return (m.group(1) if m.groups() and m.group(1) else m.group(0)).strip().strip(".!?,;:")
    if slot.type == "number":
        m = re.search(r"\b\d+\b", _digits(norm))
        return m.group(0) if m else None
    if slot.type == "time":
        m = _TIME.search(_digits(norm))
        if not m:
            return None
        if m.group(1):
            hour, minute, half = m.group(1), m.group(2), m.group(3)
            return f"{int(hour)}:{minute} {half}" if minute else f"{int(hour)} {half}"
        if m.group(4):
            return f"{int(m.group(4))}:{m.group(5)}"
        return f"{int(m.group(6))} o'clock"
    if slot.type == "any":
        return text.strip().strip(".!?,;:") or None
    return None


def fill(template: str, slots: Mapping[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: slots.get(m.group(1), m.group(0)), template)


# ---- the machine ------------------------------------------------------------------------------------------
@dataclass
class DialogReply:
    """One step's output: text chunks to speak (LLM deltas stream through), and what to do after."""

    chunks: AsyncIterator[str]
    node: str
    intent: str | None = None
    end: str | None = None
    transfer: tuple[str, str] | None = None
    dispatch: str | None = None


class DialogMachine:
    def __init__(self, flow: Flow | Mapping[str, Any] | str | Path | None = None,
                 llm: str | LLM | None = None, *, system: str | None = None,
                 llm_options: Mapping[str, Any] | None = None) -> None:
        if flow is None and llm is None:
            raise ValueError("DialogMachine needs a flow, an llm, or both")
        self.flow = Flow.load(flow) if flow is not None else Flow.chat(system)
        self.system = system or self.flow.system
        self.llm: LLM | None = make_llm(llm, **(llm_options or {})) if llm is not None else None
        self._owns_llm = isinstance(llm, str)
        self.node = self.flow.start
        self.slots: dict[str, str] = {}
        self.retries = 0
        self.ended = False
        self.history: list[dict[str, str]] = []
        self.trace: list[str] = []  # nodes entered and intents taken, for tests and logs

    # ---- entry points (Session calls these) ---------------------------------------------------------------
    async def start(self) -> DialogReply:
        step = _Step()
        self._enter(self.flow.start, step)
        return self._reply(step)

    async def respond(self, text: str) -> DialogReply:
        self._remember("user", text)
        step = _Step()
        if self.ended:
            return self._reply(step)
        node = self.flow.nodes[self.node]
        norm = _norm(text)
        intent = next((i for i in [*node.intents, *self.flow.intents] if _matches(i, norm, text)), None)
        if intent is not None:
            self._apply(intent, step)
            return self._reply(step)
        if node.slots and self._fill_slots(node, text, step):
            return self._reply(step)
        if self.llm is not None and not node.llm:
            intent = await self._classify(text, [*node.intents, *self.flow.intents])
            if intent is not None:
                self._apply(intent, step)
                return self._reply(step)
        if node.llm and self.llm is not None:
            step.stream = self._llm_answer(text, node)
            return self._reply(step)
        self._fallback(node, step)
        return self._reply(step)

    async def on_dtmf(self, digit: str) -> DialogReply | None:
        if self.ended:
            return None
        node = self.flow.nodes[self.node]
        intent = next((i for i in [*node.intents, *self.flow.intents] if digit in i.dtmf), None)
        if intent is None:
            return None
        step = _Step()
        self._apply(intent, step)
        return self._reply(step)

    async def on_silence(self, seconds: float) -> DialogReply | None:
        node = self.flow.nodes[self.node]
        if self.ended or not node.reprompt:
            return None
        step = _Step()
        step.say(fill(node.reprompt, self.slots))
        return self._reply(step)

    async def aclose(self) -> None:
        if self._owns_llm and hasattr(self.llm, "aclose"):
            await self.llm.aclose()  # type: ignore[union-attr]

    # ---- transitions --------------------------------------------------------------------------------------
    def _enter(self, name: str, step: _Step, hops: int = 0) -> None:
        if hops > MAX_HOPS:
            raise FlowError(f"more than {MAX_HOPS} automatic transitions from {self.node!r}: a loop?")
        node = self.flow.nodes[name]
        self.node = name
        self.retries = 0
        self.trace.append(name)
        step.node = name
        missing = [s for s in node.slots if s not in self.slots]
        if node.say and not (node.slots and not missing):
            step.say(fill(node.say, self.slots))
        elif node.slots and missing and not node.say:
            step.say(self._prompt(node, missing[0]))
        if node.end is not None or node.transfer is not None or node.dispatch is not None:
            self._act(node.end, node.transfer, node.dispatch, step)
        elif node.slots and not missing and node.next:
            self._enter(node.next, step, hops + 1)
        elif not node.slots and not node.intents and not node.llm and node.next:
            self._enter(node.next, step, hops + 1)

    def _apply(self, intent: Intent, step: _Step) -> None:
        self.trace.append(f"intent:{intent.name}")
        step.intent = intent.name
        for name in intent.clear:
            self.slots.pop(name, None)
        self.slots.update({k: fill(v, self.slots) for k, v in intent.set.items()})
        if intent.say:
            step.say(fill(intent.say, self.slots))
        if intent.end is not None or intent.transfer is not None or intent.dispatch is not None:
            self._act(intent.end, intent.transfer, intent.dispatch, step)
        elif intent.next:
            self._enter(intent.next, step)

    def _act(self, end: str | None, transfer: str | None, dispatch: str | None, step: _Step) -> None:
        self.ended = True
        if transfer:
            step.transfer = (fill(transfer, self.slots), "blind")
        elif dispatch:
            step.dispatch = fill(dispatch, self.slots)
        else:
            step.end = end or "completed"

    def _fill_slots(self, node: Node, text: str, step: _Step) -> bool:
        found = {}
        for name in node.slots:
            if name not in self.slots:
                value = extract(self.flow.slots[name], text)
                if value is not None:
                    found[name] = value
                    if self.flow.slots[name].type == "any":
                        break  # free text fills one slot, not all of them
        if not found:
            return False
        self.slots.update(found)
        self.trace.append("slots:" + ",".join(sorted(found)))
        missing = [s for s in node.slots if s not in self.slots]
        if missing:
            step.say(self._prompt(node, missing[0]))
        elif node.next:
            self._enter(node.next, step)
        return True

    def _prompt(self, node: Node, slot: str) -> str:
        text = node.prompts.get(slot) or self.flow.slots[slot].prompt or f"What is the {slot}?"
        return fill(text, self.slots)

    def _fallback(self, node: Node, step: _Step) -> None:
        self.retries += 1
        limit = node.max_retries if node.max_retries is not None else self.flow.max_retries
        if node.on_fail and self.retries > limit:
            self.trace.append("on_fail")
            self._enter(node.on_fail, step)
            return
        step.say(fill(node.fallback or self.flow.fallback, self.slots))
        missing = [s for s in node.slots if s not in self.slots]
        again = self._prompt(node, missing[0]) if missing else node.say
        if again:
            step.say(fill(again, self.slots))

    # ---- llm ----------------------------------------------------------------------------------------------
    async def _classify(self, text: str, intents: list[Intent]) -> Intent | None:
        if not intents or self.llm is None:
            return None
        menu = "\n".join(f"- {i.name}" + (f": {i.description}" if i.description else "") for i in intents)
        system = ("You map what a caller said to one intent. Intents:\n" + menu +
                  "\nAnswer with the intent name only, or none.")
        try:
            answer = "".join([d async for d in stream_from(self.llm, text, system=system, history=[])])
        except Exception:
            log.exception("llm intent classification failed; using the fallback")
            return None
        word = _norm(answer).split(" ")[0] if answer.strip() else ""
        by_name = {_norm(i.name): i for i in intents}
        return by_name.get(_norm(answer)) or by_name.get(word)

    async def _llm_answer(self, text: str, node: Node) -> AsyncIterator[str]:
        assert self.llm is not None
        system = fill(node.prompt or self.system or "You are a helpful voice agent. Answer briefly, in "
                      "plain spoken sentences.", self.slots)
        async for delta in stream_from(self.llm, text, system=system,
                                       history=self.history[-HISTORY_TURNS - 1:-1]):
            yield delta

    def _remember(self, role: str, text: str) -> None:
        if text:
            self.history.append({"role": role, "content": text})
            del self.history[:-2 * HISTORY_TURNS]

    def _reply(self, step: _Step) -> DialogReply:
        return DialogReply(chunks=self._chunks(step), node=step.node or self.node, intent=step.intent,
                           end=step.end, transfer=step.transfer, dispatch=step.dispatch)

    async def _chunks(self, step: _Step) -> AsyncIterator[str]:
        said: list[str] = []
        text = " ".join(step.texts)
        if text:
            said.append(text)
            yield text
        if step.stream is not None:
            async for delta in step.stream:
                said.append(delta)
                yield delta
        self._remember("assistant", "".join(said))


class _Step:
    """What one step says and does, gathered while walking the graph."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.stream: AsyncIterator[str] | None = None
        self.node: str | None = None
        self.intent: str | None = None
        self.end: str | None = None
        self.transfer: tuple[str, str] | None = None
        self.dispatch: str | None = None

    def say(self, text: str) -> None:
        if text and text.strip():
            self.texts.append(text.strip())
