"""SentencePiece BPE (`tokenizer.ggml.model = llama`): merges chosen by token score, byte fallback.

This is llama.cpp's llm_tokenizer_spm: start from one symbol per character, repeatedly merge the adjacent
pair whose concatenation is the vocabulary token with the highest score (leftmost among equal scores), and
spell any final symbol that is not a token with its UTF-8 bytes as ``<0xXX>`` tokens. The caller has
already replaced spaces with ``▁`` and added the leading space.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


def byte_token_ids(vocab: Mapping[str, int]) -> list[int | None]:
    """The token of each byte: ``<0xXX>``, else the one-byte text itself (llama.cpp's byte_to_token)."""
    ids: list[int | None] = []
    for b in range(256):
        tid = vocab.get(f"<0x{b:02X}>")
        if tid is None:
            tid = vocab.get(bytes([b]).decode("utf-8", "surrogateescape"))
        ids.append(tid)
    return ids


def spm_merge(text: str, vocab: Mapping[str, int], scores: Sequence[float]) -> list[str]:
    """The symbols left after merging by score (each one a token, or a single character that is not)."""
    syms = list(text)
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        tid = vocab.get(syms[left] + syms[right])
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], left, right, len(syms[left]) + len(syms[right])))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        # a symbol only grows by absorbing its right neighbour, so equal lengths mean the pair is unchanged
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left] += syms[right]
        syms[right] = ""
        after = nxt[right]
        nxt[left] = after
        if after != -1:
            prv[after] = left
        if prv[left] != -1:
            push(prv[left], left)
        if after != -1:
            push(left, after)
    return [s for s in syms if s]


def spm_tokenize(
    text: str, vocab: Mapping[str, int], scores: Sequence[float], byte_ids: Sequence[int | None]
) -> list[int]:
    """Token ids of already escaped text (spaces as ``▁``)."""
    ids: list[int] = []
    for sym in spm_merge(text, vocab, scores):
        tid = vocab.get(sym)
        if tid is not None:
            ids.append(tid)
            continue
        for b in sym.encode("utf-8", "surrogateescape"):
            bid = byte_ids[b]
            if bid is None:
                raise ValueError(
                    f"cannot encode {sym!r}: the vocabulary has no byte-fallback token <0x{b:02X}> for it"
                )
            ids.append(bid)
    return ids
