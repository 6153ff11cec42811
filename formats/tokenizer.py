"""The tokenizer stored in a GGUF file, giving the ids llama.cpp gives.

``Tokenizer.from_gguf(path)`` (vocab-only files work) or ``Tokenizer.from_metadata(md)`` over the
``tokenizer.ggml.*`` keys. Two models: ``gpt2`` (byte-level BPE with llama.cpp's pre-tokenizers, `bpe.py`)
and ``llama`` (SentencePiece merges by score with ``<0xXX>`` byte fallback, `spm.py`). Control, unknown
and user-defined tokens written in the text become their ids (llama.cpp's tokenizer_st_partition: longest
token first); with ``parse_special=False`` only user-defined ones do, as in llama.cpp.

Decoding follows llama.cpp's token_to_piece/detokenize, with two deliberate differences so that
``decode(encode(text)) == text``: special tokens are rendered by default (``special=True``, also the
default of llama.cpp's common helpers), and the ``clean_up_tokenization_spaces`` pass (which turns
``" ,"`` into ``","``) is not applied. SentencePiece vocabularies add a space before the text when
encoding; decoding strips one leading space from the first token's piece, as llama.cpp does, so text that
starts with a space keeps it, and a sequence that starts with BOS keeps the space after it (llama.cpp:
``[BOS, "▁Hi"]`` -> ``" Hi"``). Caveat: SentencePiece spells spaces ``▁``, so a ``▁`` typed in the text
decodes as a space.

    python -m ternary.formats.tokenizer model.gguf "some text"     # prints ids and pieces
"""

from __future__ import annotations

import codecs
import numbers
import operator
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ternary.formats.bpe import (
    ADD_BOS_PRE,
    IGNORE_MERGES_PRE,
    ByteLevelBPE,
    byte_decode,
    bytes_to_unicode,
    pretokenize,
    pretokenize_spans,
    regex_list_name,
    unicode_to_bytes,
)
from ternary.formats.errors import GGUFError
from ternary.formats.reader import GGUFFile
from ternary.formats.spm import byte_token_ids, spm_tokenize

__all__ = ["Tokenizer", "StreamDecoder", "pretokenize", "bytes_to_unicode", "unicode_to_bytes"]

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space

# Texts llama.cpp treats as end of turn / end of generation when the file does not say (llama-vocab.cpp).
_EOT_TEXTS = (
    *"<|eot_id|> <|im_end|> <|end|> <end_of_turn> <|endoftext|> <|end_of_text|> <EOT> _<EOT> [EOT]".split(),
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_EOG_TEXTS = (
    *"<|eot_id|> <|im_end|> <|end|> <|return|> <|call|> <|flush|> <|calls|> <end_of_turn>".split(),
    *"<|endoftext|> </s> <|eom_id|> <EOT> _<EOT> [EOT] [EOS] <|end_of_text|> <end_of_utterance>".split(),
    *"<eos> <turn|>".split(),
    "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "[e~[",
)

_KEY = "tokenizer.ggml."
_MISSING = object()


class _Metadata:
    """Typed, checked access to the tokenizer keys; every problem is a GGUFError naming the key."""

    def __init__(self, md: Mapping[str, Any], source: str) -> None:
        self.md = md
        self.source = source

    def error(self, key: str, problem: str) -> GGUFError:
        return GGUFError(self.source, key, problem)

    def get(self, name: str, kind: type, default: Any = _MISSING) -> Any:
        key = _KEY + name
        if key not in self.md:
            if default is _MISSING:
                raise self.error(key, "missing (required for this tokenizer)")
            return default
        value = self.md[key]
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # NumPy integers too
        if not isinstance(value, kind):
            raise self.error(key, f"expected {kind.__name__}, found {type(value).__name__} {value!r:.60}")
        return value

    def array(self, name: str, item: type | tuple[type, ...], n_min: int, default: Any = _MISSING) -> Any:
        key = _KEY + name
        if key not in self.md:
            if default is _MISSING:
                raise self.error(key, "missing (required for this tokenizer)")
            return default
        value = self.md[key]
        if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:  # a NumPy array
            value = value.tolist()
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise self.error(key, f"expected an array, found {type(value).__name__}")
        if len(value) < n_min:
            raise self.error(key, f"has {len(value)} entries, fewer than the {n_min} tokens")
        allowed = item if isinstance(item, tuple) else (item,)
        if not set(map(type, value)) <= set(allowed):  # exact types: bool is not an int here
            bad = next(i for i, v in enumerate(value) if type(v) not in allowed)
            raise self.error(key, f"entry {bad} is {type(value[bad]).__name__} {value[bad]!r:.60}")
        return value

    def token_id(self, name: str, default: int | None, n_vocab: int) -> int | None:
        """A special-token id; like llama.cpp, an id outside the vocabulary is ignored with a warning."""
        if default is not None and default >= n_vocab:
            default = None
        tid = self.get(name, int, None)
        if tid is None:
            return default
        if not 0 <= tid < n_vocab:
            warnings.warn(
                f"{self.source}: {_KEY}{name}: id {tid} is outside the vocabulary of {n_vocab}; "
                f"using {default}",
                stacklevel=4,
            )
            return default
        return tid


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary (the module docstring lists the llama.cpp rules kept)."""

    model: str  # "gpt2" or "llama"
    pre: str  # the tokenizer.ggml.pre value ("default" when absent)
    tokens: list[str]  # token texts as stored (byte-level alphabet for gpt2, "▁" for spaces in llama)
    token_types: list[int]  # as stored, but end-of-turn texts promoted to CONTROL (as llama.cpp does)
    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    eog_ids: frozenset[int]  # every id that ends generation
    add_bos: bool  # tokenizer.ggml.add_bos_token (or llama.cpp's default for this model/pre)
    add_eos: bool
    add_space_prefix: bool

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of a GGUF file (a full model or a vocab-only file)."""
        with GGUFFile(path) as f:
            md = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
        return cls.from_metadata(md, source=os.fspath(path))

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], source: str = "<metadata>") -> Tokenizer:
        """The tokenizer described by GGUF metadata (plain Python values; arrays as lists or NumPy)."""
        return cls(md, source)

    def __init__(self, md: Mapping[str, Any], source: str = "<metadata>") -> None:
        meta = _Metadata(md, source)
        self.model = meta.get("model", str)
        if self.model not in ("gpt2", "llama"):
            raise meta.error(_KEY + "model", f"tokenizer model {self.model!r} is not supported (gpt2, llama)")
        spm = self.model == "llama"
        tokens = list(meta.array("tokens", str, 1))
        n = self.n_vocab = len(tokens)
        self.token_types = list(meta.array("token_type", int, n, [NORMAL] * n)[:n])
        self.scores = [float(s) for s in meta.array("scores", (int, float), n, [0.0] * n)[:n]]

        for i in [i for i, text in enumerate(tokens) if not text]:
            tokens[i] = f"[EMPTY_{i}]"  # llama.cpp renames empty tokens so that they can never match
        self.vocab: dict[str, int] = dict(zip(tokens, range(n), strict=True))
        if len(self.vocab) != n:
            seen: dict[str, int] = {}
            for i, text in enumerate(tokens):
                if text in seen:
                    raise meta.error(_KEY + "tokens", f"duplicate token {text!r} at ids {seen[text]} and {i}")
                seen[text] = i
        self.tokens = tokens

        self.pre = meta.get("pre", str, "default") or "default"
        if spm:
            self._bpe = None
            self._byte_ids = byte_token_ids(self.vocab)
        else:
            try:
                regex_list_name(self.pre)
            except ValueError as e:
                raise meta.error(_KEY + "pre", str(e)) from None
            merges = meta.array("merges", str, 0)
            self._bpe = ByteLevelBPE(self.vocab, merges, ignore_merges=self.pre in IGNORE_MERGES_PRE)

        self.bos_id = meta.token_id("bos_token_id", 1 if spm else 11, n)
        self.eos_id = meta.token_id("eos_token_id", 2 if spm else 11, n)
        self.eot_id = meta.token_id("eot_token_id", None, n)
        self.eom_id = meta.token_id("eom_token_id", None, n)
        self.unk_id = meta.token_id("unknown_token_id", 0 if spm else None, n)
        self.pad_id = meta.token_id("padding_token_id", None, n)
        self.add_bos = meta.get("add_bos_token", bool, spm or self.pre in ADD_BOS_PRE)
        self.add_eos = meta.get("add_eos_token", bool, False)
        self.add_space_prefix = meta.get("add_space_prefix", bool, spm)
        for flag, tid, name in ((self.add_bos, self.bos_id, "bos"), (self.add_eos, self.eos_id, "eos")):
            if flag and tid is None:
                raise meta.error(_KEY + f"add_{name}_token", f"is true, but {name}_token_id is not set")
        self._find_end_tokens(meta)

        # tokens written in the text: longest (in bytes) first, as llama.cpp's special-token cache
        special = [i for i, t in enumerate(self.token_types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        special.sort(key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")))
        self._special_all = special
        self._special_user = [i for i in special if self.token_types[i] == USER_DEFINED]
        self._pieces: list[bytes | None] = [None] * n

    def _find_end_tokens(self, meta: _Metadata) -> None:
        """EOT/EOM by text when the file does not say, and the EOG set, as llama.cpp builds them."""
        found = [self.vocab[t] for t in _EOG_TEXTS if t in self.vocab]
        if self.eot_id is None:
            self.eot_id = next((self.vocab[t] for t in _EOT_TEXTS if t in self.vocab), None)
        if self.eom_id is None:
            self.eom_id = next((self.vocab[t] for t in _EOM_TEXTS if t in self.vocab), None)
        fim = [meta.token_id(f"fim_{r}_token_id", None, self.n_vocab) for r in ("pad", "rep", "sep")]
        eog = {i for i in (*found, *fim, self.eos_id, self.eot_id, self.eom_id) if i is not None}
        for i in (*found, self.eot_id, self.eom_id):
            if i is not None and self.token_types[i] not in (CONTROL, UNKNOWN, USER_DEFINED):
                self.token_types[i] = CONTROL  # llama.cpp: "control-looking token ... will be overridden"
        self.eog_ids = frozenset(eog)

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_bos`` puts BOS first (``self.add_bos`` says what the file wants)."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this vocabulary has no BOS token")
            ids.append(self.bos_id)
        fragments = self._split_special(text, parse_special)
        if self._bpe is None:
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    ids.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                ids += spm_tokenize(frag.replace(" ", SPACE_MARK), self.vocab, self.scores, self._byte_ids)
                prev_special = False
        else:
            encode_piece = self._bpe.encode_piece
            for frag in fragments:
                if isinstance(frag, int):
                    ids.append(frag)
                    continue
                for a, b in pretokenize_spans(frag, self.pre):
                    ids += encode_piece(frag[a:b])
        return ids

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Text fragments and the ids of the special tokens written between them."""
        fragments: list[str | int] = [text] if text else []
        for tid in self._special_all if parse_special else self._special_user:
            needle = self.tokens[tid]
            if needle not in text:
                continue
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or needle not in frag:
                    split.append(frag)
                    continue
                for k, part in enumerate(frag.split(needle)):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    # ------------------------------------------------------------------ decoding

    def _check_id(self, token_id: int) -> int:
        tid = operator.index(token_id)
        if not 0 <= tid < self.n_vocab:
            raise ValueError(f"token id {tid} is outside the vocabulary (0..{self.n_vocab - 1})")
        return tid

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for (llama.cpp's token_to_piece without lstrip).

        Control and unknown tokens give their text when ``special`` is true, else nothing; unused ones
        nothing.
        """
        tid = self._check_id(token_id)
        piece = self._pieces[tid]
        if piece is None:
            piece = self._pieces[tid] = self._make_piece(tid)
        if not special and self.token_types[tid] in (CONTROL, UNKNOWN):
            return b""
        return piece

    def _make_piece(self, tid: int) -> bytes:
        text, ttype = self.tokens[tid], self.token_types[tid]
        if ttype in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if ttype == NORMAL:
            if self._bpe is None:
                return text.replace(SPACE_MARK, " ").encode("utf-8", "surrogateescape")
            return byte_decode(text)
        if ttype == BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode_bytes(
        self, ids: Iterable[int], special: bool = True, strip_leading_space: bool | None = None
    ) -> bytes:
        """The bytes ``ids`` spell; see `decode`."""
        strip = self.add_space_prefix if strip_leading_space is None else strip_leading_space
        pieces = [self.token_bytes(i, special) for i in ids]
        if strip and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        return b"".join(pieces)

    def decode(
        self, ids: Iterable[int], special: bool = True, strip_leading_space: bool | None = None
    ) -> str:
        """Text of ``ids``: pieces joined as bytes, UTF-8 decoded once at the end (invalid bytes -> U+FFFD).

        ``strip_leading_space`` (default: the vocabulary's add_space_prefix) removes one space from the first
        token's piece, undoing the space SentencePiece encoding adds; pass False when ``ids`` continue a text.
        """
        return self.decode_bytes(ids, special, strip_leading_space).decode("utf-8", errors="replace")

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose stored text is ``text``, or None."""
        return self.vocab.get(text)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, eog_ids={sorted(self.eog_ids)})"
        )


class StreamDecoder:
    """Feed ids one at a time, get back only complete UTF-8 text; ``flush()`` at the end returns the rest.

    The concatenated output equals ``tokenizer.decode(ids, special, strip_leading_space)``: a character
    whose bytes are split over several tokens comes out with the token that completes it.
    """

    def __init__(
        self, tokenizer: Tokenizer, special: bool = True, strip_leading_space: bool | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self._strip = tokenizer.add_space_prefix if strip_leading_space is None else strip_leading_space
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        piece = self.tokenizer.token_bytes(token_id, self.special)
        if self._strip:  # only the very first token, as llama.cpp's detokenize
            self._strip = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """What is still held back (an incomplete character becomes U+FFFD); the decoder is then reset."""
        return self._decoder.decode(b"", final=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m ternary.formats.tokenizer MODEL.gguf TEXT", file=sys.stderr)
        return 2
    tok = Tokenizer.from_gguf(args[0])
    ids = tok.encode(args[1], add_bos=tok.add_bos)
    print(tok)
    for i in ids:
        print(f"{i:>8} {tok.token_bytes(i)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
