"""Sentence splitting for streamed agent text, so TTS can speak a reply sentence by sentence as it arrives.

`SentenceSplitter.push(delta)` returns the sentences that the new text completed; `flush()` returns the
rest at the end of the reply. A sentence ends at `.`, `!`, `?`, `…` (or runs like `?!`, `...`, with closing
quotes/brackets) followed by whitespace, at a line break, or right after a full-width `。！？` (CJK text
has no spaces). A period does not end a sentence after a known abbreviation (`Dr.`, `e.g.`), after a
single capital (`J. R. R.`), after a list number at the start of a line (`1. `), or when the next word
starts in lower case (`approx. five`, `Well... maybe`). Decimals and dotted names (`3.5`, `example.com`)
never split because no whitespace follows the dot. When the text ends right after a terminator, the
splitter waits for the next delta (or flush) to decide; `waiting` says so, and `settle()` decides it as an
end when the agent has paused there (the speaker calls it after SETTLE_S without new text, so a streaming
agent that pauses between sentences is not left waiting in silence for its next piece).

Long clauses are cut early at a clause break (`,` `;` `:` or a spaced dash), and only the first segment of
a reply is cut eagerly. Why: espeak-ng speaks ~15 characters/s at 175 wpm while agents stream text at
~100-400 characters/s, so after the first segment the TTS is always behind the text and splitting gains
nothing but costs prosody (each piece gets a sentence-final fall and pause). The first segment is
different: the user waits in silence until it is complete, so once it reaches FIRST_CHARS (40 characters,
0.1-0.4 s of streaming, ~2.5 s of speech to cover the rest) it is cut at the last clause break. Later
segments are cut at a clause break only past CLAUSE_CHARS (120), and anything past MAX_CHARS (250) with no
clause break at all is cut at a space, so text without punctuation still gets spoken.
"""

from __future__ import annotations

import re

FIRST_CHARS = 40
CLAUSE_CHARS = 120
MAX_CHARS = 250
MIN_CLAUSE_CHARS = 15
# Text that stops right after a sentence end for this long has finished that sentence: token gaps of a
# streaming LLM are ~10-50 ms, so 0.2 s is a pause (a tool call, the next thought), not the middle of one.
SETTLE_S = 0.2

_TERMINATORS = ".!?…"
_FULLWIDTH_TERMINATORS = "。！？"
_CLOSERS = "\"')]}”’»」』）"
_OPENERS = "\"'([{“‘«"
# Tokens (lower case, without their final period) after which a period is not the end of a sentence.
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "rev", "hon", "gen", "col", "capt", "lt",
    "sgt", "gov", "sen", "rep", "vs", "e.g", "i.e", "cf", "approx", "fig", "dept", "ave", "blvd",
})
_CLAUSE_BREAK = re.compile(r"[,;:](?=\s)|\s[-–—]+(?=\s)")
_WAIT = -1


def _has_words(s: str) -> bool:
    return any(c.isalnum() for c in s)


class SentenceSplitter:
    """Streamed text in, complete sentences out. One per reply stream; flush() readies it for the next."""

    def __init__(self, first_chars: int = FIRST_CHARS, clause_chars: int = CLAUSE_CHARS,
                 max_chars: int = MAX_CHARS, min_clause_chars: int = MIN_CLAUSE_CHARS) -> None:
        if not 0 < min_clause_chars <= first_chars <= clause_chars <= max_chars:
            raise ValueError("need 0 < min_clause_chars <= first_chars <= clause_chars <= max_chars")
        self.first_chars = first_chars
        self.clause_chars = clause_chars
        self.max_chars = max_chars
        self.min_clause_chars = min_clause_chars
        self._buf = ""
        self._resume = 0  # scanning restarts here: everything before it is known not to be a boundary
        self._emitted = False
        self.waiting = False  # the text ends right after a terminator: the next delta decides


    def push(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            end = self._boundary()
            if end is None or end == _WAIT:
                break
            self._emit(end, out)
        self.waiting = end == _WAIT
        if end is None:
            self._early_cut(out)
        return out

    def settle(self) -> str | None:
        """No more text came after the buffer's final terminator: that was a sentence end, unless the period
        follows an abbreviation, an initial or a list number. Returns the sentence, or None."""
        if not self.waiting:
            return None
        buf = self._buf.rstrip()
        k = len(buf)
        while k > 0 and buf[k - 1] in _CLOSERS:
            k -= 1
        j = k
        while j > 0 and buf[j - 1] in _TERMINATORS + _FULLWIDTH_TERMINATORS:
            j -= 1
        if j == k or (buf[j:k] == "." and self._period_is_not_an_end(j)):
            return None
        out: list[str] = []
        self._emit(len(self._buf), out)
        self.waiting = False
        return out[0] if out else None

    def flush(self) -> str | None:
        """The unfinished rest of the reply (None if nothing speakable is left); then start afresh."""
        rest = self._buf.strip()
        self._buf, self._resume, self._emitted, self.waiting = "", 0, False, False
        return rest if _has_words(rest) else None

    # -- internals -------------------------------------------------------------------------------------

    def _emit(self, end: int, out: list[str]) -> None:
        piece, self._buf, self._resume = self._buf[:end].strip(), self._buf[end:], 0
        if _has_words(piece):
            out.append(piece)
            self._emitted = True

    def _boundary(self) -> int | None:
        """Index just past the first sentence in the buffer; _WAIT if the end of the buffer might be one;
        None if there is none."""
        buf, n = self._buf, len(self._buf)
        i = self._resume
        while i < n:
            c = buf[i]
            if c == "\n":
                if buf[:i].strip():
                    return i + 1
                i += 1
                continue
            if c in _FULLWIDTH_TERMINATORS:  # CJK text has no spaces to wait for
                k = i + 1
                while k < n and buf[k] in _CLOSERS:
                    k += 1
                if k == n:  # a closing bracket may still come
                    self._resume = i
                    return _WAIT
                return k
            if c not in _TERMINATORS:
                i += 1
                continue
            j = i
            while j < n and buf[j] in _TERMINATORS:
                j += 1
            k = j
            while k < n and buf[k] in _CLOSERS:
                k += 1
            if k == n:
                self._resume = i
                return _WAIT
            if not buf[k].isspace():
                i = k
                continue
            term = buf[i:j]
            if "!" in term or "?" in term:
                return k
            m = k
            while m < n and buf[m].isspace() and buf[m] != "\n":
                m += 1
            if m == n:
                self._resume = i
                return _WAIT
            if buf[m] == "\n":
                return k
            if buf[m].islower() or (term == "." and self._period_is_not_an_end(i)):
                i = k
                continue
            return k
        self._resume = n
        return None

    def _period_is_not_an_end(self, i: int) -> bool:
        """The period at buf[i] follows an abbreviation, an initial, or a list number."""
        buf = self._buf
        t = i
        while t > 0 and not buf[t - 1].isspace():
            t -= 1
        token = buf[t:i].lstrip(_OPENERS)
        if token.lower() in ABBREVIATIONS:
            return True
        if len(token) == 1 and token.isupper():
            return True
        return token.isdigit() and (t == 0 or buf[t - 1] == "\n" or not buf[:t].strip())

    def _early_cut(self, out: list[str]) -> None:
        text = self._buf
        size = len(text.strip())
        limit = self.clause_chars if self._emitted else self.first_chars
        if size < limit:
            return
        cut = None
        for match in _CLAUSE_BREAK.finditer(text):
            end = match.end()
            if len(text[:end].strip()) >= self.min_clause_chars:
                cut = end
        if cut is None and size >= self.max_chars:
            space = text.rstrip().rfind(" ")
            if space > 0 and len(text[:space].strip()) >= self.min_clause_chars:
                cut = space
        if cut is not None:
            self._emit(cut, out)
