"""Generated token ids to the text a client may see now: complete UTF-8 only, never part of a stop string.

A byte-level BPE token can end in the middle of a multi-byte character, and a stop string can span several
tokens: both mean holding text back until the next token decides. `TextStream` holds back the smallest tail
that could still become either, and cuts the text where the first stop string starts (OpenAI never returns the
stop string)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TokenDecoder(Protocol):
    """Incremental detokenizer (`ternary.formats.tokenizer.StreamDecoder`): `feed` returns newly completed
    text, `flush` whatever is left at the end."""

    def feed(self, token: int) -> str: ...

    def flush(self) -> str: ...


class TextStream:
    """Feeds generated tokens through a decoder and releases text that no later token can change."""

    def __init__(self, decoder: TokenDecoder, stop: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self.stopped = False  # a stop string was found; nothing more will be released

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.feed(token), final=False)

    def flush(self) -> str:
        """End of generation: release everything still held (a trailing partial character becomes U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0 if final else self._partial_stop_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
