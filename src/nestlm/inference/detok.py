"""Incremental detokenization: token ids in, text deltas out, for every streamed output (`nestlm generate` /
`nestlm think` printing to a terminal, `nestlm serve`'s SSE chunks). One rule: a delta never ends inside a
multi-byte character nor inside what may still become one of the held strings (stop strings, the
end-of-thinking tag)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Detok", "HeldText", "held_suffix", "settled"]


def held_suffix(text, holds) -> int:
    """Length of the longest suffix of `text` that starts one of `holds` (or is one): text to hold back.
    Works on any sequences: strings, or token id lists (the end-of-thinking tag a budget cut mid-way)."""
    best = 0
    for h in holds:
        for k in range(min(len(h), len(text)), best, -1):
            if h[:k] == text[-k:]:
                best = k
                break
    return best


def settled(text: str) -> str:
    """A finished text as it is handed out: a trailing incomplete character (the U+FFFD of an unfinished
    UTF-8 sequence, which Detok.push holds back while streaming) is dropped, never shown."""
    return text.rstrip("\ufffd")


class HeldText:
    """The text-level twin of Detok, for text that arrives already decoded (a server's stream): `push` a delta,
    get the part that is safe to show, which never ends inside what may become one of `holds` (the
    end-of-thinking tag) and leaves out U+FFFD (a character a server cut in two, whose bytes never come)."""

    def __init__(self, holds: list[str] = ()):
        self.holds, self.text, self.sent = [h for h in holds if h], "", 0

    def push(self, delta: str) -> str:
        self.text += delta.replace("\ufffd", "")
        upto = len(self.text) - held_suffix(self.text, self.holds)
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def rest(self, final: str) -> str:
        """What is left to show of `final`, the text as it ends (a prefix of what was pushed, held parts cut)."""
        out = final[self.sent:]
        self.sent = max(self.sent, len(final))
        return out


class Detok:
    """Incremental detokenization of one phase: push token ids, get text deltas that never end inside a
    multi-byte character nor inside what may become one of `holds` (stop strings, the end-of-thinking tag)."""

    def __init__(self, decode: Callable[[list[int]], str], holds: list[str] = ()):
        self.decode, self.holds, self.ids, self.sent = decode, [h for h in holds if h], [], 0

    def text(self) -> str:
        return self.decode(self.ids)

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.text()
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        return self.take(text, len(text) - held_suffix(text, self.holds))

    def take(self, text: str, upto: int) -> str:
        delta = text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta

    def first_hold(self) -> tuple[int, str] | None:
        """(position, string) of the earliest hold the text contains, None if none."""
        text = self.text()
        hits = [(i, h) for h in self.holds if (i := text.find(h)) >= 0]
        return min(hits) if hits else None
