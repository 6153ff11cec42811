"""Byte-level BPE learner: hand-worked merges, a from-scratch recounting learner as the reference for the
incremental pair counts, and round trips through the inference tokenizer."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ternary.training.bpe_trainer import (
    DEFAULT_SPECIALS,
    build_metadata,
    bytes_to_unicode,
    learn_bpe,
    learn_merges,
    load_tokenizer,
    pretokenize,
    save_tokenizer,
)

N_SPECIAL = len(DEFAULT_SPECIALS)
REPO = Path(__file__).resolve().parents[1]


def _tokenizer_cls():
    return pytest.importorskip("ternary.formats.tokenizer").Tokenizer


def _tok_id(md: dict, text: str) -> int:
    b2u = bytes_to_unicode()
    return md["tokenizer.ggml.tokens"].index("".join(b2u[b] for b in text.encode()))


# --- hand-worked examples ---


def test_hand_worked_merges_aaabdaaabac():
    # the textbook example: aa (4 overlapping occurrences) first; then ab and (aa,a) tie at 2 and the smaller
    # id pair (a=97, b=98) wins; then (aa, ab) at 2 -> aaab
    md = learn_bpe(["aaabdaaabac"], 256 + 3 + N_SPECIAL, min_frequency=1)
    assert md["tokenizer.ggml.merges"] == ["a a", "a b", "aa ab"]
    assert md["tokenizer.ggml.tokens"][256:259] == ["aa", "ab", "aaab"]
    assert md["tokenizer.ggml.tokens"][259:] == list(DEFAULT_SPECIALS.values())
    assert md["tokenizer.ggml.token_type"] == [1] * 259 + [3] * N_SPECIAL
    assert md["tokenizer.ggml.bos_token_id"] == 259
    assert md["tokenizer.ggml.eos_token_id"] == 260
    assert md["tokenizer.ggml.eot_token_id"] == 260
    assert md["tokenizer.ggml.padding_token_id"] == 261
    assert (
        md["tokenizer.ggml.fim_pre_token_id"],
        md["tokenizer.ggml.fim_suf_token_id"],
        md["tokenizer.ggml.fim_mid_token_id"],
    ) == (262, 263, 264)
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == "llama-bpe"
    assert md["tokenizer.ggml.add_bos_token"] is True


def test_hand_worked_pretokenized_words_and_min_frequency():
    # words: "ab", " ab" x2, " cd" -> (a,b) x3, then (space, ab) x2; every other pair occurs once
    md = learn_bpe(["ab ab ab cd"], 1000, min_frequency=2)
    assert md["tokenizer.ggml.merges"] == ["a b", "Ġ ab"]
    assert md["tokenizer.ggml.tokens"][256:258] == ["ab", "Ġab"]
    assert len(md["tokenizer.ggml.tokens"]) == 258 + N_SPECIAL  # smaller than asked: the pairs ran out


def test_byte_tokens_are_gpt2_byte_unicode():
    md = learn_bpe(["x"], 256 + N_SPECIAL)
    b2u = bytes_to_unicode()
    assert md["tokenizer.ggml.tokens"][:256] == [b2u[b] for b in range(256)]
    assert md["tokenizer.ggml.tokens"][32] == "Ġ" and md["tokenizer.ggml.tokens"][10] == "Ċ"
    assert len(set(md["tokenizer.ggml.tokens"])) == len(md["tokenizer.ggml.tokens"])


# --- incremental counts against a learner that recounts everything each step ---


def naive_merges(
    word_counts: dict[bytes, int], n_new_tokens: int, min_frequency: int
) -> list[tuple[bytes, bytes]]:
    syms = [bytes([b]) for b in range(256)]
    words = {tuple(w): f for w, f in word_counts.items()}
    merges = []
    while len(syms) - 256 < n_new_tokens:
        pairs: Counter = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:], strict=False):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_frequency:
            break
        spelled = syms[best[0]] + syms[best[1]]
        new = syms.index(spelled) if spelled in syms else len(syms)
        if new == len(syms):
            syms.append(spelled)
        merges.append((syms[best[0]], syms[best[1]]))
        merged: Counter = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    return merges


@pytest.mark.parametrize("seed", range(4))
def test_incremental_counts_match_recounting_reference(seed):
    rng = random.Random(seed)
    alphabet = b"aabbbcd" if seed % 2 else b"ab"  # small alphabets: many ties, overlaps (aaa) and repeats
    words = {
        bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 9))): rng.randint(1, 5) for _ in range(60)
    }
    expected = naive_merges(words, 40, min_frequency=1)
    assert learn_merges(words, 40, min_frequency=1) == expected
    assert len(expected) > 10


def test_result_does_not_depend_on_text_order():
    texts = [f"def f{i}(x):\n    return x * {i} + y_{i % 3}\n" for i in range(30)]
    a = learn_bpe(texts, 400)
    b = learn_bpe(reversed(texts), 400)
    assert a == b


# --- through the inference tokenizer ---


def rank_order_encode(md: dict, text: str) -> list[int]:
    """Reference encoder: pre-tokenize, then merge the lowest-rank pair until none applies (llama.cpp's
    `llm_tokenizer_bpe`; with `llama-bpe` a pre-token that is itself a token is taken whole)."""
    b2u = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(md["tokenizer.ggml.merges"])}
    ids = []
    for word in pretokenize(text, md["tokenizer.ggml.pre"]):
        syms = [b2u[b] for b in word.encode()]
        if md["tokenizer.ggml.pre"] == "llama-bpe" and "".join(syms) in vocab:
            syms = ["".join(syms)]
        while len(syms) > 1:
            r, i = min((ranks.get((syms[i], syms[i + 1]), 1 << 30), i) for i in range(len(syms) - 1))
            if r == 1 << 30:
                break
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        ids += [vocab[s] for s in syms]
    return ids


def test_merges_apply_in_rank_order_hand_worked():
    Tokenizer = _tokenizer_cls()
    md = learn_bpe(["aaabdaaabac"], 256 + 3 + N_SPECIAL, min_frequency=1)
    tok = Tokenizer.from_metadata(md)
    aa, ab, aaab = (_tok_id(md, s) for s in ("aa", "ab", "aaab"))
    a, b = ord("a"), ord("b")
    assert tok.encode("aab", add_bos=False) == [aa, b]  # (a,a) rank 0 beats (a,b) rank 1
    assert tok.encode("abaa", add_bos=False) == [ab, aa]  # aa first, then ab; no merge joins ab+aa
    assert tok.encode("aaab", add_bos=False) == [aaab]
    assert tok.encode("aaaab", add_bos=False) == [aa, aa, b]  # leftmost-first: aa aa b, then no (aa,b) merge
    assert tok.encode("ba", add_bos=False) == [b, a]


def _source_texts(budget: int = 120_000) -> list[str]:
    """This repository's own Python source, up to `budget` characters (keeps the tests fast as it grows)."""
    files = sorted((REPO / "training").glob("*.py")) + sorted((REPO / "tests").glob("*.py"))
    texts, total = [], 0
    for p in files:
        texts.append(p.read_text(encoding="utf-8"))
        total += len(texts[-1])
        if total >= budget:
            break
    return texts


UNSEEN = [
    "def main(argv: list[str]) -> int:\n\treturn 0  # done\r\n",
    "x = 1234567 + 0.5e-3; y = 'it''s' \"don't\"\n\n\n    ",
    "unicode: naïve café — 日本語 Ελληνικά 🙂🏽 e\u0301 \u00a0nbsp\u2028",
    "   leading and trailing spaces   ",
    "",
    "<|bos|> and <|eos|> spelled in text",
    "".join(chr(c) for c in range(1, 128)),
]


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_learned_tokenizer_round_trips_and_matches_rank_order_reference(pre):
    Tokenizer = _tokenizer_cls()
    md = learn_bpe(_source_texts(), 600, pre=pre)
    assert len(md["tokenizer.ggml.tokens"]) == 600
    tok = Tokenizer.from_metadata(md)
    assert tok.n_vocab == 600
    assert tok.bos_id == md["tokenizer.ggml.bos_token_id"]
    assert tok.eos_id == md["tokenizer.ggml.eos_token_id"]
    assert tok.eos_id in tok.eog_ids
    for text in UNSEEN + _source_texts()[-3:]:
        ids = tok.encode(text, add_bos=False, parse_special=False)
        assert tok.decode(ids) == text
        assert ids == rank_order_encode(md, text)
        assert all(
            0 <= i < md["tokenizer.ggml.bos_token_id"] for i in ids
        )  # plain text never makes a special
    source = "".join(_source_texts())
    assert len(tok.encode(source, add_bos=False)) < 0.6 * len(source.encode())  # bytes alone: 1.0


def test_special_tokens_parse_and_bos_is_added():
    Tokenizer = _tokenizer_cls()
    md = learn_bpe(["print(1)\n"] * 3, 300)
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", add_bos=True, parse_special=True)
    assert ids == [
        md["tokenizer.ggml.bos_token_id"],
        md["tokenizer.ggml.fim_pre_token_id"],
        ord("a"),
        md["tokenizer.ggml.fim_suf_token_id"],
        ord("b"),
        md["tokenizer.ggml.fim_mid_token_id"],
    ]
    assert tok.add_bos is True


# --- files and errors ---


def test_bytes_only_vocabulary_still_has_a_merges_array(tmp_path):
    Tokenizer = _tokenizer_cls()
    from ternary.formats.writer import write_model

    md = learn_bpe(["abc abc"], 1000, min_frequency=100)  # no pair is frequent enough: bytes only
    assert md["tokenizer.ggml.merges"] == ["a \u010a"] and len(md["tokenizer.ggml.tokens"]) == 256 + N_SPECIAL
    config = _tiny_config(len(md["tokenizer.ggml.tokens"]))
    write_model(tmp_path / "m.gguf", config, _zero_tensors(config), md)
    for tok in (Tokenizer.from_gguf(tmp_path / "m.gguf"), Tokenizer.from_metadata(md)):
        for text in UNSEEN:
            ids = tok.encode(text, add_bos=False, parse_special=False)
            assert ids == list(text.encode()) and tok.decode(ids) == text


def test_json_round_trip(tmp_path):
    md = learn_bpe(["hello world, hello code\n"] * 4, 280, extra_specials=["<|im_start|>"])
    save_tokenizer(md, tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert back == md
    assert back["tokenizer.ggml.tokens"][-1] == "<|im_start|>"
    assert back["tokenizer.ggml.token_type"][-1] == 3


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        learn_bpe(["abc"], 256)
    with pytest.raises(ValueError, match="pre"):
        learn_bpe(["abc"], 300, pre="no-such-pre")
    with pytest.raises(ValueError, match="unknown role"):
        build_metadata([], specials={"bos": "<s>", "eos": "</s>", "sep": "<sep>"})
    with pytest.raises(ValueError, match="'eos' token is required"):
        build_metadata([], specials={"bos": "<s>"})
    with pytest.raises(ValueError, match="collides"):
        build_metadata([], specials={"bos": "a", "eos": "</s>"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "spm.json").write_text('{"tokenizer.ggml.model": "llama"}')
    with pytest.raises(ValueError, match="gpt2"):
        load_tokenizer(tmp_path / "spm.json")


def _tiny_config(n_vocab: int):
    from ternary.formats.config import ModelConfig

    return ModelConfig(arch="bitnet", n_vocab=n_vocab, n_embd=256, n_layer=1, n_head=2, n_head_kv=2,
                       head_dim=128, n_ff=256, n_ctx_train=64)  # fmt: skip


def _zero_tensors(config) -> dict[str, np.ndarray]:
    from ternary.formats.model_file import expected_shapes

    return {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(config).items()}


def test_metadata_written_into_a_model_gguf_has_llama_cpp_types(tmp_path):
    """Through formats.writer: ids UINT32, token_type INT32, add_bos BOOL, tokens/merges string arrays (the
    types llama.cpp's loader reads), and the file's tokenizer encodes like the in-memory one."""
    Tokenizer = _tokenizer_cls()
    import gguf
    from ternary.formats.writer import write_model

    md = learn_bpe(_source_texts()[-3:], 320)
    config = _tiny_config(320)
    write_model(tmp_path / "m.gguf", config, _zero_tensors(config), md)
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    V = gguf.GGUFValueType
    assert fields["tokenizer.ggml.eos_token_id"].types == [V.UINT32]
    assert fields["tokenizer.ggml.fim_mid_token_id"].types == [V.UINT32]
    assert fields["tokenizer.ggml.add_bos_token"].types == [V.BOOL]
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert fields["tokenizer.ggml.merges"].types == [V.ARRAY, V.STRING]
    assert fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    from_file = Tokenizer.from_gguf(tmp_path / "m.gguf")
    text = UNSEEN[0] + UNSEEN[2]
    assert from_file.encode(text) == Tokenizer.from_metadata(md).encode(text)
    assert from_file.tokens == md["tokenizer.ggml.tokens"]


def test_cli_learns_from_a_directory(tmp_path, capsys):
    from ternary.training.bpe_trainer import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text(f"def function_{i}(value):\n    return value + {i}\n" * 3)
    (src / "skip.txt").write_text("other files are not read " * 50)
    with pytest.raises(SystemExit) as e:
        main([str(src), "--out", str(tmp_path / "tok.json"), "--vocab-size", "280", "--pre", "gpt-2"])
    assert e.value.code == 0
    md = load_tokenizer(tmp_path / "tok.json")
    assert len(md["tokenizer.ggml.tokens"]) == 280 and md["tokenizer.ggml.pre"] == "gpt-2"
    assert "Ġvalue" in md["tokenizer.ggml.tokens"] and "Ġfiles" not in md["tokenizer.ggml.tokens"]
    assert "vocabulary 280 tokens" in capsys.readouterr().err
