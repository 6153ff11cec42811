"""Tokenizer against llama.cpp's own ids (shared/vocab cases, oracle prompts) and its decode rules."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ORACLE, ORACLE_MODELS, VOCAB
from ternary.formats.bpe import bytes_to_unicode
from ternary.formats.errors import GGUFError
from ternary.formats.reader import GGUFFile
from ternary.formats.tokenizer import CONTROL, NORMAL, USER_DEFINED, StreamDecoder, Tokenizer

VOCABS = ["llama-bpe", "gpt-2", "llama-spm"]
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_gguf(VOCAB / f"ggml-vocab-{name}.gguf") for name in VOCABS}


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    texts = (VOCAB / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = (VOCAB / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(lines)
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines, strict=True)]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vocab_cases(tokenizers, name):
    tok = tokenizers[name]
    cases = vocab_cases(name)
    assert len(cases) > 40
    for text, expected in cases:
        assert tok.encode(text, parse_special=False) == expected, repr(text)
        assert tok.encode(text) == expected, repr(text)  # no special-token text in these cases


@pytest.mark.parametrize("name", VOCABS)
def test_decode_inverts_encode(tokenizers, name):
    tok = tokenizers[name]
    for text, expected in vocab_cases(name):
        assert tok.decode(expected) == text, repr(text)


@pytest.mark.parametrize("model", ORACLE_MODELS)
def test_oracle_prompt_tokens(model):
    tok = Tokenizer.from_gguf(ORACLE / f"{model}.gguf")
    prompt = (ORACLE / "prompt.txt").read_text(encoding="utf-8")
    expected = [int(x) for x in (ORACLE / f"{model}.prompt_tokens.txt").read_text().replace(",", " ").split()]
    assert tok.add_bos
    ids = tok.encode(prompt, add_bos=tok.add_bos)
    assert ids == expected
    assert tok.decode(ids[1:]) == prompt
    assert tok.decode(ids, special=False) == prompt


def test_special_ids_and_flags(tokenizers):
    bpe, gpt2, spm = (tokenizers[n] for n in VOCABS)
    assert (bpe.bos_id, bpe.eos_id, bpe.eot_id) == (128000, 128001, 128009)
    assert bpe.eog_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
    assert bpe.add_bos  # no add_bos_token key: llama.cpp's default for llama-bpe
    assert (bpe.n_vocab, bpe.model, bpe.pre) == (128256, "gpt2", "llama-bpe")
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.add_bos, gpt2.eog_ids) == (50256, 50256, False, {50256})
    assert (spm.bos_id, spm.eos_id, spm.unk_id, spm.add_bos, spm.add_space_prefix) == (1, 2, 0, True, True)
    assert bpe.encode("Hi", add_bos=True) == [128000, *bpe.encode("Hi")]
    assert spm.encode("Hi", add_bos=True) == [1, *spm.encode("Hi")]
    oracle = Tokenizer.from_gguf(ORACLE / "tiny-tq2_0-f16.gguf")
    assert (oracle.bos_id, oracle.eos_id, oracle.eot_id, oracle.eog_ids) == (1792, 1793, 1801, {1793, 1801})


def test_llama3_special_tokens_in_text(tokenizers):
    tok = tokenizers["llama-bpe"]
    text = "<|begin_of_text|>Hello<|eot_id|>\n"
    ids = tok.encode(text)
    assert ids == [128000, *tok.encode("Hello"), 128009, *tok.encode("\n")]
    plain = tok.encode(text, parse_special=False)
    assert not {128000, 128009} & set(plain)
    assert plain[:3] == tok.encode("<|begin")
    assert tok.decode(ids) == tok.decode(plain) == text
    assert tok.decode(ids, special=False) == "Hello\n"


def test_spm_special_tokens_restart_the_space_prefix(tokenizers):
    tok = tokenizers["llama-spm"]
    ids = tok.encode("Hello</s>world")
    assert ids == [*tok.encode("Hello"), 2, *tok.encode("world")]
    assert tok.decode(ids, special=False) == "Hello world"  # each fragment's added space shows after </s>
    assert 2 not in tok.encode("Hello</s>world", parse_special=False)


def test_spm_decode_leading_space(tokenizers):
    tok = tokenizers["llama-spm"]
    hello = tok.encode("Hello")
    assert tok.tokens[hello[0]] == "\u2581Hello"
    assert tok.decode(hello) == "Hello"  # the space encode added is stripped
    assert tok.decode(tok.encode(" Hello")) == " Hello"  # only one space is
    assert tok.decode(hello, strip_leading_space=False) == " Hello"  # a continuation keeps it
    assert tok.decode([1, *hello], special=False) == " Hello"  # after BOS llama.cpp keeps it too
    assert tok.decode([1, *hello]) == "<s> Hello"
    assert tok.decode(tok.encode("a\u2581b")) == "a b"  # caveat: a typed "▁" comes back as a space


def test_spm_without_space_prefix():
    with GGUFFile(VOCAB / "ggml-vocab-llama-spm.gguf") as f:
        md = {**f.metadata, "tokenizer.ggml.add_space_prefix": False}
    tok = Tokenizer.from_metadata(md)
    assert not tok.add_space_prefix
    assert [tok.tokens[i] for i in tok.encode("Hello world")] == ["Hello", "\u2581world"]
    assert tok.decode(tok.encode(" Hello")) == " Hello"  # nothing added, nothing stripped


def test_token_bytes(tokenizers):
    bpe, spm = tokenizers["llama-bpe"], tokenizers["llama-spm"]
    space = bpe.token_to_id("\u0120")
    assert bpe.token_bytes(space) == b" "
    assert bpe.token_bytes(bpe.token_to_id("\u0120\u0120\u0120")) == b"   "
    assert bpe.token_bytes(128000) == b"<|begin_of_text|>"
    assert bpe.token_bytes(128000, special=False) == b""
    assert spm.token_bytes(spm.token_to_id("<0x0A>")) == b"\n"
    assert spm.token_bytes(spm.token_to_id("\u2581Hello")) == b" Hello"
    assert spm.token_bytes(0) == b"<unk>" and spm.token_bytes(0, special=False) == b""
    for bad in (-1, bpe.n_vocab):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            bpe.token_bytes(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([1, 2, 10**9])


def complete_utf8_steps(pieces: list[bytes]) -> list[str]:
    """What a stream should emit after each piece: the newly completed characters of the valid prefix."""
    out, done, buf = [], "", b""
    for piece in pieces:
        buf += piece
        for cut in range(len(buf), max(len(buf) - 4, -1), -1):
            try:
                text = buf[:cut].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        out.append(text[len(done) :])
        done = text
    return out


@pytest.mark.parametrize("name", VOCABS)
def test_stream_decoder_holds_split_characters(tokenizers, name):
    tok = tokenizers[name]
    text = "llama \U0001f999 and \u00f1, \u4e2d\u6587, \u1780\u17b6 \U0001f636\u200d\U0001f32b\ufe0f!"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert any(p and not _is_utf8(p) for p in pieces)  # some character really is split across tokens
    stream = StreamDecoder(tok)
    emitted = [stream.feed(i) for i in ids]
    if tok.add_space_prefix:
        pieces[0] = pieces[0][1:]
    assert emitted == complete_utf8_steps(pieces)
    assert stream.flush() == ""
    assert "".join(emitted) == text == tok.decode(ids)
    assert all("\ufffd" not in e for e in emitted)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_decoder_byte_fallback_and_flush(tokenizers):
    tok = tokenizers["llama-spm"]
    ids = tok.encode("\U0001f999")
    assert [tok.tokens[i] for i in ids] == ["\u2581", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    stream = StreamDecoder(tok)
    assert [stream.feed(i) for i in ids] == ["", "", "", "", "\U0001f999"]
    cut = StreamDecoder(tok, strip_leading_space=False)
    assert [cut.feed(i) for i in ids[:3]] == [" ", "", ""]
    assert cut.flush() == "\ufffd"  # an unfinished character is replaced once, at the end
    assert tok.decode(ids[:3]) == "\ufffd"


# ------------------------------------------------------------------------------ synthetic vocabularies


def bpe_metadata(merges=(), specials=(), pre="llama-bpe", **extra) -> dict:
    """A byte-level vocabulary: the 256 byte tokens, one token per merge, then (text, type) specials."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    for m in merges:
        if m.replace(" ", "") not in tokens:
            tokens.append(m.replace(" ", ""))
    types = [NORMAL] * len(tokens)
    for text, ttype in specials:
        tokens.append(text)
        types.append(ttype)
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    md.update({f"tokenizer.ggml.{k}": v for k, v in extra.items()})
    return md


def test_longest_special_token_wins():
    tok = Tokenizer.from_metadata(bpe_metadata(specials=[("<|a|>", CONTROL), ("<|a|><|b|>", CONTROL)]))
    a, ab = tok.token_to_id("<|a|>"), tok.token_to_id("<|a|><|b|>")
    x, y = tok.token_to_id("x"), tok.token_to_id("y")
    assert tok.encode("x<|a|><|b|>y<|a|>") == [x, ab, y, a]
    assert tok.decode(tok.encode("x<|a|><|b|>y<|a|>")) == "x<|a|><|b|>y<|a|>"


def test_user_defined_tokens_are_parsed_even_without_parse_special():
    tok = Tokenizer.from_metadata(bpe_metadata(specials=[("<ctl>", CONTROL), ("<usr>", USER_DEFINED)]))
    ctl, usr = tok.token_to_id("<ctl>"), tok.token_to_id("<usr>")
    assert tok.encode("<ctl><usr>") == [ctl, usr]
    plain = tok.encode("<ctl><usr>", parse_special=False)
    assert plain[-1] == usr and ctl not in plain
    assert tok.decode(plain) == "<ctl><usr>"
    assert tok.decode([ctl, usr], special=False) == "<usr>"  # user-defined text always shows


def test_numpy_arrays_and_ids_are_accepted():
    md = bpe_metadata(merges=["a b"])
    as_numpy = {k: np.asarray(v) if isinstance(v, list) and k.endswith("type") else v for k, v in md.items()}
    as_numpy["tokenizer.ggml.scores"] = np.zeros(len(md["tokenizer.ggml.tokens"]), np.float32)
    as_numpy["tokenizer.ggml.bos_token_id"] = np.uint32(7)
    tok = Tokenizer.from_metadata(as_numpy)
    assert tok.encode("ab") == Tokenizer.from_metadata(md).encode("ab") == [tok.token_to_id("ab")]
    assert tok.decode(np.array(tok.encode("ab"), np.int32)) == "ab"
    assert tok.bos_id == 7 and type(tok.bos_id) is int


def test_ignore_merges_for_llama3_pre():
    # "abc" is a token, but no merge builds it: Llama-3 (ignore_merges) emits it whole, GPT-2 spells it out
    md = bpe_metadata(merges=["x y"], specials=[("abc", NORMAL)])
    abc = md["tokenizer.ggml.tokens"].index("abc")
    assert Tokenizer.from_metadata(md).encode("abc") == [abc]
    byte_ids = [ord(c) for c in "abc"]  # bpe_metadata puts byte b's token at id b
    assert Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "gpt-2"}).encode("abc") == byte_ids


def test_merges_apply_by_rank():
    tok = Tokenizer.from_metadata(bpe_metadata(merges=["b c", "a b", "a bc"], pre="gpt-2"))
    ids = tok.encode("abc")
    assert [tok.tokens[i] for i in ids] == ["abc"]  # "b c" ranks first, then "a bc"
    tok = Tokenizer.from_metadata(bpe_metadata(merges=["a b", "b c", "a bc"], pre="gpt-2"))
    assert [tok.tokens[i] for i in tok.encode("abc")] == ["ab", "c"]


# ------------------------------------------------------------------------------ bad input


TWO_TOKENS = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": ["a", "b"],
    "tokenizer.ggml.merges": [],
}


def test_bad_metadata_names_the_key():
    good = bpe_metadata()
    cases = [
        ({}, "tokenizer.ggml.model: missing"),
        ({**good, "tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model: tokenizer model 'bert'"),
        ({**good, "tokenizer.ggml.pre": "nonesuch"}, "tokenizer.ggml.pre: pre-tokenizer 'nonesuch'"),
        ({k: v for k, v in good.items() if k != "tokenizer.ggml.merges"}, "tokenizer.ggml.merges: missing"),
        ({**good, "tokenizer.ggml.tokens": ["a", "b", "a"]}, "duplicate token 'a' at ids 0 and 2"),
        ({**good, "tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type: has 2 entries"),
        ({**good, "tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens: expected an array"),
        ({**good, "tokenizer.ggml.tokens": ["a", 7]}, "tokenizer.ggml.tokens: entry 1 is int"),
        ({**good, "tokenizer.ggml.bos_token_id": "1"}, "tokenizer.ggml.bos_token_id: expected int"),
    ]
    for md, message in cases:
        with pytest.raises(GGUFError, match=re.escape(message)):
            Tokenizer.from_metadata(md, source="x.gguf")
    with pytest.raises(GGUFError, match="add_bos_token: is true, but bos_token_id is not set"):
        Tokenizer.from_metadata({**TWO_TOKENS, "tokenizer.ggml.add_bos_token": True})
    with pytest.warns(UserWarning, match="eos_token_id: id 99999 is outside the vocabulary"):
        assert Tokenizer.from_metadata({**good, "tokenizer.ggml.eos_token_id": 99999}).eos_id == 11  # default


def test_bad_arguments(tokenizers, tmp_path: Path):
    tok = tokenizers["gpt-2"]
    with pytest.raises(TypeError, match="needs a str"):
        tok.encode(b"bytes")
    no_bos = Tokenizer.from_metadata(TWO_TOKENS)
    assert no_bos.bos_id is None and no_bos.eos_id is None  # llama.cpp's default ids (11) are out of range
    with pytest.raises(ValueError, match="no BOS"):
        no_bos.encode("x", add_bos=True)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"definitely not a gguf file")
    with pytest.raises(GGUFError, match="not.gguf"):
        Tokenizer.from_gguf(not_gguf)
