"""Byte-level BPE (`tokenizer.ggml.model = gpt2`): llama.cpp's pre-tokenizers, GPT-2's byte map, merges.

The pre-tokenizer regexes are llama.cpp's (src/llama-vocab.cpp, one list per `tokenizer.ggml.pre`), run
the way llama.cpp runs them (src/unicode.cpp) so that the pieces, hence the ids, are the same:

- each regex of a list splits every piece left by the previous one; text a regex does not match stays a
  piece;
- a regex using ``\\p{L}``-style classes runs on a *collapsed* copy of the text, one character per code
  point: ASCII stays itself, other code points become one byte per Unicode category (letter, number,
  punctuation, mark, symbol, other) and non-ASCII whitespace becomes ``\\v``; in the regex ``\\p{L}``
  becomes ``[<letter byte>A-Za-z]`` and so on. So ``\\p{Lu}`` means any letter, as in llama.cpp, and
  ``\\s`` is ASCII whitespace plus those ``\\v``;
- a regex without such classes runs on the text with non-ASCII whitespace replaced by ``\\v``.

For the GPT-2 and Llama-3 regexes llama.cpp uses hand-written splitters instead, whose results are those
of the regex run this way (unassigned code points count as "other"). The stdlib ``re`` with ``re.ASCII``
(so ``\\s``, ``\\d``, ``\\b`` are ECMAScript's) is enough: no third-party regex engine is needed.

Unicode categories come from ``unicodedata`` (Python 3.11: Unicode 14), llama.cpp's table from a later
Unicode: only code points assigned after Unicode 14 can split differently.
"""

from __future__ import annotations

import functools
import heapq
import re
import unicodedata
from collections.abc import Mapping, Sequence

# ------------------------------------------------------------------------------------------ GPT-2 byte map


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return dict(sorted(table.items()))


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


@functools.cache
def _byte_translation() -> dict[int, str]:
    return {b: c for b, c in bytes_to_unicode().items()}


def byte_encode(text: str) -> str:
    """UTF-8 bytes of ``text`` spelled in GPT-2's byte characters (the byte-level vocabularies' alphabet)."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1").translate(_byte_translation())


def byte_decode(token_text: str) -> bytes:
    """Bytes a byte-level token spells. A character outside GPT-2's byte alphabet stands for its own UTF-8."""
    u2b = unicode_to_bytes()
    try:
        return bytes([u2b[c] for c in token_text])
    except KeyError:
        return b"".join(
            u2b[c].to_bytes() if c in u2b else c.encode("utf-8", "surrogateescape") for c in token_text
        )


# ------------------------------------------------------------------------------------------ pre-tokenizers

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER_THEN_LOWER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_LOWER_AFTER_UPPER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TAIL_SLASH = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_NO_PUNCT_RUN = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# One entry per regex list of llama.cpp's llm_tokenizer_bpe; _PRE_NAMES says which names select each.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "bloom": (_NO_PUNCT_RUN,),
    "viking": (_NO_PUNCT_RUN, r"\p{N}"),
    "tekken": (_UPPER_THEN_LOWER + "|" + _LOWER_AFTER_UPPER + r"|\p{N}|" + _TAIL_SLASH,),
    "gpt-4o": (
        _UPPER_THEN_LOWER
        + _CONTRACTIONS
        + "?|"
        + _LOWER_AFTER_UPPER
        + _CONTRACTIONS
        + r"?|\p{N}{1,3}|"
        + _TAIL_SLASH,
    ),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}

_LLAMA3_NAMES = "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano".split()
_GPT2_NAMES = """gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert
    jina-v1-en jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4""".split()

# `tokenizer.ggml.pre` value -> regex list, as llama.cpp's llama_vocab::impl::load maps them.
_PRE_NAMES: dict[str, str] = {
    "default": "default",
    **dict.fromkeys(_LLAMA3_NAMES, "llama3"),
    **dict.fromkeys("dbrx smaug-bpe glm4 chatglm-bpe".split(), "llama3"),
    **dict.fromkeys(_GPT2_NAMES, "gpt2"),
    **dict.fromkeys(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2".split(), "starcoder"
    ),
    **dict.fromkeys(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2".split(), "qwen2"
    ),
    "qwen35": "qwen35",
    "deepseek-coder": "deepseek-coder",
    **dict.fromkeys("deepseek-v3 hunyuan-dense joyai-llm hy_v4".split(), "deepseek-v3"),
    "falcon": "falcon",
    **dict.fromkeys("bloom poro-chat gpt3-finnish".split(), "bloom"),
    "viking": "viking",
    "tekken": "tekken",
    **dict.fromkeys("gpt-4o llama4 kanana2 talkie minimax-m2".split(), "gpt-4o"),
    "seed-coder": "seed-coder",
    **dict.fromkeys("bailingmoe bailingmoe2 llada-moe".split(), "bailingmoe"),
    "minicpm5": "minicpm5",
}

# llama.cpp emits a piece as one token when the vocabulary has it (ignore_merges) for these names ...
IGNORE_MERGES_PRE = frozenset([*_LLAMA3_NAMES, "tekken", "minicpm5"])
# ... and adds BOS by default (a file's tokenizer.ggml.add_bos_token overrides) for these.
ADD_BOS_PRE = frozenset([*_LLAMA3_NAMES, "tekken"])

KNOWN_PRE = tuple(_PRE_NAMES)


def regex_list_name(pre: str) -> str:
    """The regex list (a key of `PRE_TOKENIZER_REGEXES`) that ``tokenizer.ggml.pre = pre`` selects."""
    try:
        return _PRE_NAMES[pre]
    except KeyError:
        raise ValueError(
            f"pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_PRE_NAMES))})"
        ) from None


# llama.cpp's whitespace set (Unicode White_Space) and its one-byte stand-ins for the categories.
_WHITESPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]) | {
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
}
_VT = 0x0B
_CATEGORY_CODE = {"N": 0xD1, "L": 0xD2, "P": 0xD3, "M": 0xD4, "S": 0xD5}
_OTHER_CODE = 0xD0
# \p{X} in a collapsed regex: the category's stand-in plus its ASCII members (llama.cpp's k_ucat_map).
_CLASS_BODY = {
    "N": "\xd10-9",
    "L": "\xd2A-Za-z",
    "P": "\xd3!-#%-*,-/:-;?-@\\[-\\]_\\{\\}",
    "M": "\xd4",
    "S": "\xd5\\$\\+<->\\^`\\|",
}
_CLASS_BODY.update({sub: _CLASS_BODY["L"] for sub in ("Lu", "Ll", "Lt", "Lm", "Lo")})
_PROPERTY = re.compile(r"\\p\{(\w+)\}")


class _CollapseTable(dict):
    """str.translate table: code point -> its collapsed stand-in, filled on first use of each code point."""

    def __missing__(self, cp: int) -> int:
        if cp < 0x80:
            code = cp
        elif cp in _WHITESPACE:
            code = _VT
        else:
            code = _CATEGORY_CODE.get(unicodedata.category(chr(cp))[0], _OTHER_CODE)
        self[cp] = code
        return code


_COLLAPSE = _CollapseTable((cp, cp) for cp in range(0x80))
_WIDE = {cp: _VT for cp in _WHITESPACE if cp >= 0x80}


def _uses_categories(expr: str) -> bool:
    return any(m.group(1) in _CLASS_BODY for m in _PROPERTY.finditer(expr))


def _python_regex(expr: str) -> str:
    """Rewrite ``\\p{X}`` classes for the collapsed text; ``$`` becomes ``\\Z`` (ECMAScript: end of input)."""
    out: list[str] = []
    inside = False
    i = 0
    while i < len(expr):
        c = expr[i]
        if c == "\\":
            m = _PROPERTY.match(expr, i)
            if m and m.group(1) in _CLASS_BODY:
                body = _CLASS_BODY[m.group(1)]
                out.append(body if inside else f"[{body}]")
                i = m.end()
                continue
            out.append(expr[i : i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out)


@functools.cache
def _compiled(list_name: str) -> tuple[tuple[re.Pattern[str], bool], ...]:
    rules = []
    for expr in PRE_TOKENIZER_REGEXES[list_name]:
        collapsed = _uses_categories(expr)
        rules.append((re.compile(_python_regex(expr), re.ASCII), collapsed))
    return tuple(rules)


def pretokenize_spans(text: str, pre: str) -> list[tuple[int, int]]:
    """(start, end) of each piece `pretokenize` returns."""
    rules = _compiled(regex_list_name(pre))
    spans = [(0, len(text))] if text else []
    views: dict[bool, str] = {}
    for pattern, collapsed in rules:
        if collapsed not in views:
            views[collapsed] = text.translate(_COLLAPSE if collapsed else _WIDE)
        view = views[collapsed]
        out: list[tuple[int, int]] = []
        for start, end in spans:
            piece = view if (start, end) == (0, len(view)) else view[start:end]
            pos = 0
            for m in pattern.finditer(piece):
                a, b = m.span()
                if a > pos:
                    out.append((start + pos, start + a))
                if b > a:
                    out.append((start + a, start + b))
                pos = max(pos, b)
            if pos < end - start:
                out.append((start + pos, end))
        spans = out
    return spans


def pretokenize(text: str, pre: str) -> list[str]:
    """Split ``text`` into the pieces BPE never merges across, exactly as llama.cpp does for ``pre``.

    ``pre`` is a ``tokenizer.ggml.pre`` value (``llama-bpe``, ``gpt-2``, ``default``, ``starcoder``,
    ``qwen2``, ...). The pieces concatenate back to ``text``.
    """
    return [text[a:b] for a, b in pretokenize_spans(text, pre)]


# ------------------------------------------------------------------------------------------ merges


def merge_ranks(merges: Sequence[str]) -> dict[str, int]:
    """``"left right"`` -> rank; the first of duplicate merges wins (llama.cpp's emplace)."""
    ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1), strict=True))
    for merge in [m for m in ranks if m.find(" ", 1) <= 0]:  # llama.cpp splits at the first space after 0
        del ranks[merge]
    return ranks


def bpe_merge(symbols: list[str], ranks: Mapping[str, int]) -> list[str]:
    """Merge adjacent symbols, lowest rank first (leftmost among equals), until no pair has a rank.

    The heap of candidate pairs with a linked list over the symbols is llama.cpp's llm_tokenizer_bpe_session;
    stale heap entries are recognised by their text no longer matching.
    """
    n = len(symbols)
    if n < 2:
        return list(symbols)
    syms = list(symbols)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[int, int, int, str]] = []
    for i in range(n - 1):
        pair = syms[i] + " " + syms[i + 1]
        rank = ranks.get(pair)
        if rank is not None:
            heap.append((rank, i, i + 1, syms[i] + syms[i + 1]))
    heapq.heapify(heap)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
            continue
        syms[left] = merged
        syms[right] = ""
        after = nxt[right]
        nxt[left] = after
        if after != -1:
            prv[after] = left
        for a, b in ((prv[left], left), (left, after)):
            if a != -1 and b != -1:
                rank = ranks.get(syms[a] + " " + syms[b])
                if rank is not None:
                    heapq.heappush(heap, (rank, a, b, syms[a] + syms[b]))
    return [s for s in syms if s]


class ByteLevelBPE:
    """Pieces of text -> token ids for a byte-level vocabulary (merges by rank, a cache per piece)."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[str],
        ignore_merges: bool = False,
        cache_size: int = 1 << 17,
    ) -> None:
        self.vocab = vocab
        self.ranks = merge_ranks(merges)
        self.ignore_merges = ignore_merges
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size

    def encode_piece(self, piece: str) -> list[int]:
        """Token ids of one pre-tokenized piece (raw text, not yet byte-encoded)."""
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._encode_uncached(byte_encode(piece))
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _encode_uncached(self, word: str) -> list[int]:
        vocab = self.vocab
        if self.ignore_merges and word in vocab:
            return [vocab[word]]
        ids = []
        for sym in bpe_merge(list(word), self.ranks):
            tid = vocab.get(sym)
            if tid is not None:
                ids.append(tid)
                continue
            # llama.cpp looks each UTF-8 byte of the unknown symbol up as a one-byte token and drops misses
            for b in sym.encode("utf-8", "surrogateescape"):
                tid = vocab.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if tid is not None:
                    ids.append(tid)
        return ids
