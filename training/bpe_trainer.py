"""Byte-level BPE learner: text in, llama.cpp-loadable GGUF tokenizer metadata out.

Text is split with the same pre-tokenizer the inference tokenizer uses
(`ternary.formats.tokenizer.pretokenize`), each distinct pre-token ("word") is counted once with its
frequency, and the most frequent adjacent pair of symbols is merged repeatedly. Pair counts are updated
incrementally (only the words holding the merged pair are touched) and the best pair comes from a lazy
max-heap, so a merge costs time proportional to the words it changes, not to the corpus. All 256 bytes are
base tokens (ids 0..255, token id == byte value) so any text encodes; the special tokens come last.

    python -m ternary.training.bpe_trainer SRC_DIR... --vocab-size 8192 --out tokenizer.json
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ternary.formats.tokenizer import bytes_to_unicode, pretokenize

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3

# role -> the metadata key llama.cpp reads the id from
SPECIAL_ROLE_KEYS: dict[str, str] = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "fim_pre": "tokenizer.ggml.fim_pre_token_id",
    "fim_suf": "tokenizer.ggml.fim_suf_token_id",
    "fim_mid": "tokenizer.ggml.fim_mid_token_id",
}

DEFAULT_SPECIALS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "fim_pre": "<|fim_prefix|>",
    "fim_suf": "<|fim_suffix|>",
    "fim_mid": "<|fim_middle|>",
}

# Pre-tokenizers llama.cpp knows by name and ternary.formats.tokenizer implements for `gpt2` vocabularies.
KNOWN_PRE = ("llama-bpe", "gpt-2", "default", "starcoder", "deepseek-coder", "qwen2", "refact", "smollm")

# A merge no supported pre-tokenizer can apply (none puts a letter and a newline in one piece): the only merge
# of a bytes-only vocabulary.
NO_OP_MERGE = "a \u010a"

ProgressFn = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def count_words(texts: Iterable[str], pre: str = "llama-bpe", progress: ProgressFn | None = None) -> Counter:
    """Frequency of every pre-token (the unit BPE never merges across) over all texts."""
    counts: Counter = Counter()
    n_chars = 0
    t0 = last = time.perf_counter()
    for i, text in enumerate(texts):
        counts.update(pretokenize(text, pre))
        n_chars += len(text)
        if progress is not None and time.perf_counter() - last > 5.0:
            last = time.perf_counter()
            progress(
                f"bpe: counted {i + 1} texts, {n_chars / 1e6:.1f} M chars, {len(counts)} distinct words "
                f"({n_chars / 1e6 / (last - t0):.2f} M chars/s)"
            )
    return counts


def learn_merges(
    word_counts: Mapping[bytes, int],
    n_new_tokens: int,
    min_frequency: int = 2,
    progress: ProgressFn | None = None,
) -> list[tuple[bytes, bytes]]:
    """Merges (left, right byte strings) of byte-level BPE over `word_counts`, in rank order, until they have
    made `n_new_tokens` distinct tokens beyond the 256 bytes.

    Ties in pair frequency go to the pair with the smaller (left id, right id), ids being creation order, so
    the result is deterministic. Two merges that spell the same bytes share one token (as in HF tokenizers
    and in llama.cpp, which looks merged symbols up by text). Stops early when the best pair occurs fewer
    than `min_frequency` times.
    """
    sym_bytes: list[bytes] = [bytes([b]) for b in range(256)]
    sym_id: dict[bytes, int] = {s: i for i, s in enumerate(sym_bytes)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for w, f in word_counts.items():
        if len(w) >= 2 and f > 0:
            words.append(list(w))
            freqs.append(f)

    pair_count: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], set[int]] = {}
    for wi, (w, f) in enumerate(zip(words, freqs, strict=True)):
        for p in zip(w, w[1:], strict=False):
            pair_count[p] = pair_count.get(p, 0) + f
            s = pair_words.get(p)
            if s is None:
                pair_words[p] = {wi}
            else:
                s.add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    t0 = last = time.perf_counter()
    while len(sym_bytes) - 256 < n_new_tokens and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if count != -neg:  # stale heap entry: the current count was pushed when it changed
            continue
        if count < min_frequency:
            break
        a, b = pair
        spelled = sym_bytes[a] + sym_bytes[b]
        new = sym_id.get(spelled, len(sym_bytes))
        if new == len(sym_bytes):
            sym_bytes.append(spelled)
            sym_id[spelled] = new
        merges.append((sym_bytes[a], sym_bytes[b]))
        changed: set[tuple[int, int]] = set()
        for wi in pair_words.pop(pair, ()):
            _merge_word(words, freqs[wi], wi, a, b, new, pair_count, pair_words, changed)
        del pair_count[pair]
        changed.discard(pair)
        for p in changed:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
        if progress is not None and time.perf_counter() - last > 5.0:
            last = time.perf_counter()
            progress(
                f"bpe: {len(sym_bytes) - 256}/{n_new_tokens} tokens, last {sym_bytes[new]!r} x{count} "
                f"({len(merges) / (last - t0):.0f} merges/s)"
            )
    return merges


def _merge_word(
    words: list[list[int]],
    f: int,
    wi: int,
    a: int,
    b: int,
    new: int,
    pair_count: dict[tuple[int, int], int],
    pair_words: dict[tuple[int, int], set[int]],
    changed: set[tuple[int, int]],
) -> None:
    """Replace each (a, b) in word `wi` (left to right, no overlaps) by `new`, keeping pair counts exact."""
    w = words[wi]
    n = len(w)
    out: list[int] = []
    i = 0
    hit = False
    while i < n:
        if i + 1 < n and w[i] == a and w[i + 1] == b:
            out.append(new)
            i += 2
            hit = True
        else:
            out.append(w[i])
            i += 1
    if not hit:  # the word lost this pair to an earlier merge; pair_words is pruned lazily
        return
    for p in zip(w, w[1:], strict=False):
        pair_count[p] -= f
        changed.add(p)
    for p in zip(out, out[1:], strict=False):
        pair_count[p] = pair_count.get(p, 0) + f
        changed.add(p)
        if new in p:
            s = pair_words.get(p)
            if s is None:
                pair_words[p] = {wi}
            else:
                s.add(wi)
    words[wi] = out


def build_metadata(
    merges: Sequence[tuple[bytes, bytes]],
    pre: str = "llama-bpe",
    specials: Mapping[str, str] = DEFAULT_SPECIALS,
    extra_specials: Sequence[str] = (),
    add_bos: bool = True,
) -> dict[str, Any]:
    """GGUF `tokenizer.ggml.*` metadata (plain Python values) for a byte-level BPE vocabulary.

    Tokens: the 256 bytes, then each merge result not seen before, then the special tokens (CONTROL).
    The `eot` role defaults to the `eos` token so llama.cpp stops on it either way.
    """
    unknown = set(specials) - set(SPECIAL_ROLE_KEYS)
    if unknown:
        raise ValueError(f"specials: unknown role(s) {sorted(unknown)}; known: {sorted(SPECIAL_ROLE_KEYS)}")
    for need in ("bos", "eos"):
        if need not in specials:
            raise ValueError(f"specials: a '{need}' token is required")
    if pre not in KNOWN_PRE:
        raise ValueError(f"pre: {pre!r} is not a pre-tokenizer llama.cpp knows; use one of {KNOWN_PRE}")
    b2u = bytes_to_unicode()

    def to_str(bs: bytes) -> str:
        return "".join(b2u[x] for x in bs)

    tokens = [to_str(bytes([b])) for b in range(256)]
    seen = set(tokens)
    merge_strs = []
    for left, right in merges:
        merge_strs.append(f"{to_str(left)} {to_str(right)}")
        s = to_str(left + right)
        if (
            s not in seen
        ):  # two merge paths can spell the same bytes; they share one token, as in HF tokenizers
            seen.add(s)
            tokens.append(s)
    if not merge_strs:
        # llama.cpp refuses a gpt2 vocabulary without a merges array, and GGUF writers drop empty arrays
        merge_strs = [NO_OP_MERGE]
    n_normal = len(tokens)
    special_texts = list(dict.fromkeys([*specials.values(), *extra_specials]))
    for s in special_texts:
        if s in seen:
            raise ValueError(f"special token {s!r} collides with a byte-level token")
        tokens.append(s)
    ids = {s: n_normal + i for i, s in enumerate(special_texts)}

    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [TOKEN_TYPE_NORMAL] * n_normal
        + [TOKEN_TYPE_CONTROL] * len(special_texts),
        "tokenizer.ggml.merges": merge_strs,
        "tokenizer.ggml.add_bos_token": bool(add_bos),
        "tokenizer.ggml.add_eos_token": False,
    }
    roles = dict(specials)
    roles.setdefault("eot", roles["eos"])
    for role, text in roles.items():
        md[SPECIAL_ROLE_KEYS[role]] = ids[text]
    return md


def learn_bpe(
    texts_iter: Iterable[str],
    vocab_size: int,
    pre: str = "llama-bpe",
    specials: Mapping[str, str] = DEFAULT_SPECIALS,
    extra_specials: Sequence[str] = (),
    min_frequency: int = 2,
    add_bos: bool = True,
    progress: bool | ProgressFn = False,
) -> dict[str, Any]:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens (256 bytes + merges + specials) from texts.

    Returns GGUF tokenizer metadata (see `build_metadata`); the vocabulary is smaller than asked when the
    texts run out of pairs occurring `min_frequency` times.
    """
    n_special = len(dict.fromkeys([*specials.values(), *extra_specials]))
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size: {vocab_size} is below 256 byte tokens + {n_special} special tokens")
    if pre not in KNOWN_PRE:
        raise ValueError(f"pre: {pre!r} is not a pre-tokenizer llama.cpp knows; use one of {KNOWN_PRE}")
    say = _stderr if progress is True else (progress or None)
    t0 = time.perf_counter()
    words = count_words(texts_iter, pre, say)
    t1 = time.perf_counter()
    byte_counts: Counter = Counter()
    for w, c in words.items():
        byte_counts[w.encode("utf-8")] += c
    merges = learn_merges(byte_counts, vocab_size - 256 - n_special, min_frequency, say)
    md = build_metadata(merges, pre, specials, extra_specials, add_bos)
    if say is not None:
        say(
            f"bpe: {len(words)} distinct words counted in {t1 - t0:.1f} s, {len(merges)} merges learned in "
            f"{time.perf_counter() - t1:.1f} s, vocabulary {len(md['tokenizer.ggml.tokens'])} tokens"
        )
    return md


def save_tokenizer(metadata: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write tokenizer metadata as JSON (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(metadata), f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike) -> dict[str, Any]:
    """Read tokenizer metadata written by `save_tokenizer`; `Tokenizer.from_metadata` accepts the result."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            md = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer JSON: {e}") from e
    if not isinstance(md, dict) or md.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model: not a gpt2 (byte-level BPE) tokenizer file")
    return md


def main(argv: Sequence[str] | None = None) -> None:
    import click
    from ternary.training.corpus import iter_texts

    @click.command(
        help="Learn a byte-level BPE tokenizer from source files; writes GGUF tokenizer metadata as JSON."
    )
    @click.argument("src_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
    @click.option(
        "--out", "-o", required=True, type=click.Path(dir_okay=False), help="tokenizer JSON to write"
    )
    @click.option(
        "--vocab-size", default=8192, show_default=True, help="total tokens incl. bytes and specials"
    )
    @click.option("--pattern", default="**/*.py", show_default=True, help="glob of files under each SRC_DIR")
    @click.option("--pre", default="llama-bpe", show_default=True, type=click.Choice(KNOWN_PRE))
    @click.option("--min-frequency", default=2, show_default=True)
    def cli(src_dirs, out, vocab_size, pattern, pre, min_frequency) -> None:
        md = learn_bpe(
            iter_texts(src_dirs, pattern),
            vocab_size,
            pre=pre,
            min_frequency=min_frequency,
            progress=True,
        )
        save_tokenizer(md, out)
        _stderr(f"bpe: wrote {out}")

    cli.main(args=list(argv) if argv is not None else None, standalone_mode=True)


if __name__ == "__main__":
    main()
