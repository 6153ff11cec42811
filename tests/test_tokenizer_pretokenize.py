"""Pre-tokenizer and merge loops against naive twins written from llama.cpp's hand-written code.

`pretokenize` runs llama.cpp's regexes over a category-collapsed copy of the text; llama.cpp itself uses
hand-written character loops for the GPT-2 and Llama-3 patterns (unicode_regex_split_custom_gpt2/_llama3).
The twins below are such loops, one character at a time, so a disagreement on any text is a bug in one of
them.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ternary.formats.bpe import (
    KNOWN_PRE,
    PRE_TOKENIZER_REGEXES,
    bpe_merge,
    byte_decode,
    byte_encode,
    bytes_to_unicode,
    merge_ranks,
    pretokenize,
    regex_list_name,
    unicode_to_bytes,
)
from ternary.formats.spm import spm_merge

WHITESPACE = {*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F}
WHITESPACE |= {0x205F, 0x3000}

# letters (ASCII, Latin-1, CJK), numbers (Nd, No), marks, controls, format, unassigned, private use, ASCII
# and Unicode whitespace, apostrophes and the letters of the contractions
ALPHABET = list("aZéß中ŉ1٣½'sStTrReEvVlLmMdD ,!+~#") + [
    "\t", "\n", "\r", "\x0b", "\x1c", "\xa0", "\u2003", "\u3000", "\x85", "\u0301", "\u200d", "\u0378",
    "\ue000", "\U0001f601", "\u212a",
]  # fmt: skip
texts = st.text(alphabet=st.sampled_from(ALPHABET), max_size=40)


def _cat(text: str, i: int) -> str:
    return unicodedata.category(text[i]) if 0 <= i < len(text) else ""


def _is_letter(text: str, i: int) -> bool:
    return _cat(text, i).startswith("L")


def _is_number(text: str, i: int) -> bool:
    return _cat(text, i).startswith("N")


def _is_space(text: str, i: int) -> bool:
    return 0 <= i < len(text) and ord(text[i]) in WHITESPACE


def _is_other(text: str, i: int) -> bool:
    """[^\\s\\p{L}\\p{N}] inside the text (unassigned code points included)."""
    return 0 <= i < len(text) and not (_is_space(text, i) or _is_letter(text, i) or _is_number(text, i))


def _contraction(text: str, pos: int, fold: bool) -> int:
    """Length of 's 't 're 've 'm 'll 'd at pos (case-folded for Llama-3), else 0."""
    if text[pos] != "'" or pos + 1 >= len(text):
        return 0
    nxt = text[pos + 1 : pos + 3]
    if fold:
        nxt = "".join(c.lower() if c.isascii() else c for c in nxt)
    if nxt[:1] in ("s", "t", "m", "d"):
        return 2
    if len(nxt) == 2 and nxt in ("re", "ve", "ll"):
        return 3
    return 0


def _whitespace_run(text: str, pos: int) -> int:
    """\\s+(?!\\S) then \\s+: a whole run that ends the text, else all but its last character (or 1)."""
    end = pos
    while _is_space(text, end):
        end += 1
    if end - pos > 1 and end < len(text):
        return end - 1
    return end


def gpt2_reference(text: str) -> list[str]:
    pieces, pos = [], 0
    while pos < len(text):
        n = _contraction(text, pos, fold=False)
        if n:
            pieces.append(text[pos : pos + n])
            pos += n
            continue
        start = pos
        body = pos + 1 if text[pos] == " " else pos
        for test in (_is_letter, _is_number, _is_other):
            if test(text, body):
                end = body
                while test(text, end):
                    end += 1
                break
        else:
            end = _whitespace_run(text, pos) if _is_space(text, pos) else pos + 1
        pieces.append(text[start:end])
        pos = end
    return pieces


def llama3_reference(text: str) -> list[str]:
    pieces, pos = [], 0
    while pos < len(text):
        n = _contraction(text, pos, fold=True)
        if n:
            pieces.append(text[pos : pos + n])
            pos += n
            continue
        c = text[pos]
        if (
            c not in "\r\n"
            and not _is_number(text, pos)
            and (_is_letter(text, pos) or _is_letter(text, pos + 1))
        ):
            end = pos + 1
            while _is_letter(text, end):
                end += 1
        elif _is_number(text, pos):
            end = pos
            while _is_number(text, end) and end - pos < 3:
                end += 1
        elif _is_other(text, pos + 1 if c == " " else pos):
            end = pos + 1 if c == " " else pos
            while _is_other(text, end):
                end += 1
            while end < len(text) and text[end] in "\r\n":
                end += 1
        else:
            end = pos
            last_newline = None
            while _is_space(text, end):
                if text[end] in "\r\n":
                    last_newline = end + 1
                end += 1
            end = last_newline if last_newline is not None else _whitespace_run(text, pos)
        pieces.append(text[pos:end])
        pos = end
    return pieces


@settings(max_examples=300, deadline=None)
@given(texts)
def test_llama3_matches_llama_cpp_character_loop(text):
    assert pretokenize(text, "llama-bpe") == llama3_reference(text)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_gpt2_matches_llama_cpp_character_loop(text):
    assert pretokenize(text, "gpt-2") == gpt2_reference(text)


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("Hello, y'all!", ["Hello", ",", " y", "'all", "!"]),
        ("I'VE 1234567", ["I", "'VE", " ", "123", "456", "7"]),
        ("  \n\n   x\t\ty", ["  \n\n", "  ", " x", "\t", "\ty"]),
        ("a \u00a0 b", ["a", " \u00a0", " b"]),  # NBSP is whitespace
        ("\u4e2d\u6587abc", ["\u4e2d\u6587abc"]),
        ("x\u0301y", ["x", "\u0301y"]),  # a combining mark is not a letter
    ],
)
def test_llama3_examples(text, pieces):
    assert pretokenize(text, "llama-bpe") == pieces


@pytest.mark.parametrize(
    "pre, text, pieces",
    [
        # \p{N} first: every digit alone, and the space before it stays apart
        ("starcoder", "x = 42;", ["x", " =", " ", "4", "2", ";"]),
        ("refact", "x = 42;", ["x", " =", " ", "4", "2", ";"]),
        ("gpt-2", "x = 42;", ["x", " =", " 42", ";"]),
        ("qwen2", "x = 42;", ["x", " =", " ", "4", "2", ";"]),
        ("deepseek-coder", "if x:\n  y1", ["if", " x", ":", "\n", " ", " y", "1"]),
        # punctuation runs, then GPT-2, then digit runs, then groups of three digits
        ("default", "a+=12345 (x)", ["a", "+=", "123", "45", " ", "(", "x", ")"]),
        ("tekken", "HelloWorld ABCdef", ["Hello", "World", " ABCdef"]),
    ],
)
def test_multi_regex_examples(pre, text, pieces):
    assert pretokenize(text, pre) == pieces


@settings(max_examples=60, deadline=None)
@given(texts)
def test_every_pre_tokenizer_keeps_all_text(text):
    one_name_per_list = {regex_list_name(name): name for name in KNOWN_PRE}
    assert set(one_name_per_list) == set(PRE_TOKENIZER_REGEXES)
    for name in one_name_per_list.values():
        pieces = pretokenize(text, name)
        assert "".join(pieces) == text
        assert all(pieces)


def test_unknown_pre_tokenizer_is_named():
    with pytest.raises(ValueError, match="'no-such-pre'"):
        pretokenize("x", "no-such-pre")


def test_byte_map_is_gpt2s():
    b2u = bytes_to_unicode()
    assert len(set(b2u.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in b2u.values())
    assert b2u[ord("!")] == "!" and b2u[ord(" ")] == "\u0120" and b2u[0] == "\u0100" and b2u[0xAD] == "\u0143"
    assert unicode_to_bytes() == {c: b for b, c in b2u.items()}
    everything = bytes(range(256))
    assert byte_decode("".join(b2u[b] for b in everything)) == everything
    text = "héllo 🦙\n\x00"
    assert byte_decode(byte_encode(text)) == text.encode("utf-8")


# ------------------------------------------------------------------------------------------ merge loops


def naive_bpe(symbols: list[str], ranks: dict[str, int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair (leftmost first) until none is ranked."""
    syms = list(symbols)
    while True:
        found = [
            (ranks[a + " " + b], i)
            for i, (a, b) in enumerate(zip(syms, syms[1:], strict=False))
            if a + " " + b in ranks
        ]
        if not found:
            return syms
        _, i = min(found)
        syms[i : i + 2] = [syms[i] + syms[i + 1]]


def naive_spm(text: str, vocab: dict[str, int], scores: list[float]) -> list[str]:
    """Merge the adjacent pair forming the highest-scored token (leftmost first) until none forms one."""
    syms = list(text)
    while True:
        found = [
            (-scores[vocab[a + b]], i)
            for i, (a, b) in enumerate(zip(syms, syms[1:], strict=False))
            if a + b in vocab
        ]
        if not found:
            return syms
        _, i = min(found)
        syms[i : i + 2] = [syms[i] + syms[i + 1]]


pieces = st.text(alphabet="abc", min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(pieces, pieces), max_size=25), st.text(alphabet="abc", max_size=16))
def test_bpe_merge_matches_rank_loop(pairs, word):
    merges = [f"{a} {b}" for a, b in pairs]
    ranks = merge_ranks(merges)
    assert bpe_merge(list(word), ranks) == naive_bpe(list(word), ranks)


def test_merge_ranks_keep_the_first_duplicate():
    assert merge_ranks(["a b", "c d", "a b", "nospace"]) == {"a b": 0, "c d": 1}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.text(alphabet="ab▁", min_size=2, max_size=4), st.sampled_from([-1.0, -2.0, -3.0]))),
    st.text(alphabet="ab▁", max_size=16),
)
def test_spm_merge_matches_score_loop(entries, text):
    vocab: dict[str, int] = {}
    scores: list[float] = []
    for piece, score in entries:
        if piece not in vocab:
            vocab[piece] = len(scores)
            scores.append(score)
    assert spm_merge(text, vocab, scores) == naive_spm(text, vocab, scores)
