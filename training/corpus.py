"""Corpus builder and data loader: source files -> deduplicated token shards -> packed, resumable batches.

Files are read as UTF-8 (binary and undecodable ones are skipped and counted), exact duplicates are dropped
by SHA-256 of their bytes, and each file goes to `train` or `heldout` by its hash, so the split is
deterministic and a file never straddles it. Documents are stored in hash order (a fixed pseudo-random
order) as one token stream per split, `[BOS] doc EOS [BOS] doc EOS ...` (BOS when the tokenizer adds one, so
training matches inference), cut into `.npy` shards described by `index.json`.

`DataLoader` yields `[B, T+1]` windows of that stream (inputs `[:, :-1]`, targets `[:, 1:]`) in a seeded
order, with `state_dict()`/`load_state_dict()` giving back exactly the same next batch after a restart, and an
optional fill-in-the-middle transform (PSM: `<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle`).

    python -m ternary.training.corpus SRC_DIR... --tokenizer tokenizer.json --out corpus/
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "heldout")
FORMAT = "ternary-corpus"
VERSION = 1


class TextTokenizer(Protocol):
    """What the builder needs from `ternary.formats.tokenizer.Tokenizer`."""

    n_vocab: int
    eos_id: int
    bos_id: int
    add_bos: bool

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]: ...


# ----------------------------------------------------------------------------------------------------
# reading source files


@dataclass
class ScanStats:
    """What happened to each matched file."""

    files_seen: int = 0
    kept: int = 0
    duplicates: int = 0
    skipped_binary: int = 0
    skipped_undecodable: int = 0
    skipped_unreadable: int = 0
    skipped_empty: int = 0
    bytes_kept: int = 0


@dataclass
class SourceDoc:
    digest: str  # SHA-256 hex of the file's bytes
    path: Path
    n_bytes: int


@dataclass
class Scan:
    docs: list[SourceDoc] = field(default_factory=list)
    stats: ScanStats = field(default_factory=ScanStats)


def _decode(raw: bytes) -> str | None:
    """The text of a source file, or None for binary (a NUL byte) / undecodable content."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _matching_files(src_dirs: Sequence[str | os.PathLike], pattern: str) -> Iterator[Path]:
    for d in src_dirs:
        d = Path(d)
        if not d.is_dir():
            raise ValueError(f"{d}: not a directory")
        yield from sorted(p for p in d.glob(pattern) if p.is_file())


def scan_sources(src_dirs: Sequence[str | os.PathLike], pattern: str = "**/*.py") -> Scan:
    """Every distinct, decodable, non-empty file under `src_dirs` matching `pattern` (first path wins on a
    duplicate), sorted by content hash."""
    scan = Scan()
    st = scan.stats
    seen: set[str] = set()
    for path in _matching_files(src_dirs, pattern):
        st.files_seen += 1
        try:
            raw = path.read_bytes()
        except OSError:
            st.skipped_unreadable += 1
            continue
        if not raw:
            st.skipped_empty += 1
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            st.duplicates += 1
            continue
        if b"\x00" in raw:
            st.skipped_binary += 1
            continue
        if _decode(raw) is None:
            st.skipped_undecodable += 1
            continue
        seen.add(digest)
        st.kept += 1
        st.bytes_kept += len(raw)
        scan.docs.append(SourceDoc(digest, path, len(raw)))
    scan.docs.sort(key=lambda d: d.digest)
    return scan


def iter_texts(src_dirs: Sequence[str | os.PathLike], pattern: str = "**/*.py") -> Iterator[str]:
    """The decoded text of each distinct source file (what the BPE learner reads)."""
    for doc in scan_sources(src_dirs, pattern).docs:
        text = _decode(doc.path.read_bytes())
        if text is not None:
            yield text


def split_of(digest: str, heldout_fraction: float) -> str:
    """'heldout' for a fixed `heldout_fraction` of hashes, else 'train' (a file's split never changes)."""
    return "heldout" if int(digest[:16], 16) < heldout_fraction * 2.0**64 else "train"


# ----------------------------------------------------------------------------------------------------
# building shards


def resolve_tokenizer(tokenizer: Any) -> tuple[TextTokenizer, dict[str, Any] | None]:
    """A Tokenizer from a Tokenizer, GGUF tokenizer metadata, a tokenizer JSON or a GGUF path; plus the
    metadata when it is at hand (written beside the shards so the trainer can embed it in its GGUF)."""
    if isinstance(tokenizer, Mapping | str | os.PathLike):
        from ternary.formats.tokenizer import Tokenizer
    if isinstance(tokenizer, Mapping):
        md = dict(tokenizer)
        return Tokenizer.from_metadata(md), md
    if isinstance(tokenizer, str | os.PathLike):
        path = Path(tokenizer)
        if path.suffix == ".gguf":
            return Tokenizer.from_gguf(path), None
        from ternary.training.bpe_trainer import load_tokenizer

        md = load_tokenizer(path)
        return Tokenizer.from_metadata(md), md
    for attr in ("encode", "eos_id", "n_vocab"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"tokenizer: {type(tokenizer).__name__} has no '{attr}'")
    return tokenizer, None


_WORKER_TOKENIZER: TextTokenizer | None = None  # set before the pool forks, inherited by the workers


def _encode_file(path: Path) -> np.ndarray:
    """Token ids of one file (an array: it crosses the process pipe as bytes, not as a list of ints)."""
    assert _WORKER_TOKENIZER is not None
    text = _decode(path.read_bytes())
    if text is None:  # the file changed since it was scanned
        return np.zeros(0, dtype=np.uint32)
    # parse_special=False: a source file that spells "<|eos|>" must not inject a control token
    return np.asarray(_WORKER_TOKENIZER.encode(text, add_bos=False, parse_special=False), dtype=np.uint32)


class ShardWriter:
    """Appends token runs to one split and writes `<split>_NNNNN.npy` files of `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.n_tokens = 0
        self.n_docs = 0

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        while arr.size:
            take = min(arr.size, self.shard_tokens - self.fill)
            self.buf[self.fill : self.fill + take] = arr[:take]
            self.fill += take
            self.n_tokens += take
            arr = arr[take:]
            if self.fill == self.shard_tokens:
                self._flush()

    def close(self) -> dict[str, Any]:
        if self.fill:
            self._flush()
        return {"n_docs": self.n_docs, "n_tokens": self.n_tokens, "shards": self.shards}

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.npy"
        np.save(self.out_dir / name, self.buf[: self.fill])
        self.shards.append({"file": name, "n_tokens": int(self.fill)})
        self.fill = 0


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_corpus(
    src_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: Any,
    heldout_fraction: float = 0.02,
    pattern: str = "**/*.py",
    shard_tokens: int = 1 << 24,
    add_bos: bool | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every distinct source file under `src_dirs` into train/heldout token shards in `out_dir`.

    `tokenizer`: a Tokenizer, its GGUF metadata dict, or a path to a tokenizer JSON / GGUF. `add_bos`
    (default: the tokenizer's own `add_bos`) puts BOS before each document; EOS always follows each one.
    `workers` > 1 tokenizes in forked processes. Returns the index (also written to `out_dir/index.json`,
    last, so a crashed build has none).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: {heldout_fraction} is not in [0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens: {shard_tokens} must be positive")
    tok, md = resolve_tokenizer(tokenizer)
    if add_bos is None:
        add_bos = bool(getattr(tok, "add_bos", False))
    bos_id = getattr(tok, "bos_id", None)
    if add_bos and (bos_id is None or bos_id < 0):
        raise ValueError("add_bos: the tokenizer has no BOS token")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)
    for split in SPLITS:  # shards of an earlier build into this directory
        for stale in out.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].npy"):
            stale.unlink()
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)

    t0 = time.perf_counter()
    scan = scan_sources(src_dirs, pattern)
    st = scan.stats
    say(
        f"corpus: {st.files_seen} files matched, {st.kept} kept ({st.bytes_kept / 1e6:.1f} MB), "
        f"{st.duplicates} duplicates, {st.skipped_binary} binary, {st.skipped_undecodable} not UTF-8, "
        f"{st.skipped_empty} empty, {st.skipped_unreadable} unreadable ({time.perf_counter() - t0:.1f} s)"
    )
    dtype = np.dtype(np.uint16 if tok.n_vocab <= 1 << 16 else np.uint32)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    prefix = [int(bos_id)] if add_bos else []
    suffix = [int(tok.eos_id)]

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok
    paths = [d.path for d in scan.docs]
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        encoded = pool.imap(_encode_file, paths, chunksize=8) if pool else map(_encode_file, paths)
        t1 = last = time.perf_counter()
        done_bytes = 0
        for i, (doc, ids) in enumerate(zip(scan.docs, encoded, strict=True)):
            w = writers[split_of(doc.digest, heldout_fraction)]
            w.add(prefix)
            w.add(ids)
            w.add(suffix)
            w.n_docs += 1
            done_bytes += doc.n_bytes
            now = time.perf_counter()
            if now - last > 5.0:
                last = now
                rate = done_bytes / (now - t1)
                say(
                    f"corpus: {i + 1}/{len(paths)} files, "
                    f"{done_bytes / 1e6:.1f}/{st.bytes_kept / 1e6:.1f} MB, "
                    f"{sum(x.n_tokens for x in writers.values()) / 1e6:.2f} M tokens, {rate / 1e6:.2f} MB/s, "
                    f"eta {(st.bytes_kept - done_bytes) / max(rate, 1.0):.0f} s"
                )
    finally:
        _WORKER_TOKENIZER = None
        if pool is not None:
            pool.terminate()

    index: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "n_vocab": int(tok.n_vocab),
        "eos_id": int(tok.eos_id),
        "bos_id": int(bos_id) if add_bos else None,
        "fim_ids": _fim_ids(md, tok),
        "pattern": pattern,
        "src_dirs": [str(Path(d).resolve()) for d in src_dirs],
        "heldout_fraction": heldout_fraction,
        "stats": vars(st),
        "splits": {s: w.close() for s, w in writers.items()},
    }
    if md is not None:
        from ternary.training.bpe_trainer import save_tokenizer

        save_tokenizer(md, out / TOKENIZER_NAME)
    _atomic_write_json(out / INDEX_NAME, index)
    tr, ho = index["splits"]["train"], index["splits"]["heldout"]
    n_all = max(tr["n_tokens"] + ho["n_tokens"], 1)
    say(
        f"corpus: train {tr['n_docs']} docs {tr['n_tokens']} tokens, heldout {ho['n_docs']} docs "
        f"{ho['n_tokens']} tokens, {st.bytes_kept / n_all:.2f} bytes/token, "
        f"{time.perf_counter() - t0:.1f} s -> {out}"
    )
    return index


def _fim_ids(md: Mapping[str, Any] | None, tok: Any) -> dict[str, int] | None:
    """The FIM token ids from the tokenizer metadata, or from `fim_pre_id`/... attributes of the tokenizer."""
    roles = ("pre", "suf", "mid")
    if md is not None:
        keys = [f"tokenizer.ggml.fim_{r}_token_id" for r in roles]
        if all(k in md for k in keys):
            return {r: int(md[k]) for r, k in zip(roles, keys, strict=True)}
    ids = [getattr(tok, f"fim_{r}_id", None) for r in roles]
    if all(isinstance(i, int) and i >= 0 for i in ids):
        return dict(zip(roles, ids, strict=True))
    return None


def load_index(corpus_dir: str | os.PathLike) -> dict[str, Any]:
    """The `index.json` of a built corpus, checked."""
    path = Path(corpus_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: cannot read corpus index (was build_corpus run and did it finish?): {e}"
        ) from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path}: format: not a {FORMAT} v{VERSION} index")
    return index


# ----------------------------------------------------------------------------------------------------
# fill-in-the-middle


def fim_transform(
    window: np.ndarray,
    rng: np.random.Generator,
    rate: float,
    eos_id: int,
    fim_pre: int,
    fim_suf: int,
    fim_mid: int,
    bos_id: int | None = None,
) -> np.ndarray:
    """Rewrite each EOS-separated document of `window` with probability `rate` as PSM,
    `[BOS] <pre> prefix <suf> suffix <mid> middle EOS`, cutting at two uniform token positions; the result is
    cut back to the window's length (each rewritten document is 3 tokens longer)."""
    n = window.size
    ends = np.flatnonzero(window == eos_id)
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [n]))
    parts: list[np.ndarray] = []
    for k, (s, e) in enumerate(zip(starts, stops, strict=True)):
        doc = window[s:e]
        if doc.size and bos_id is not None and doc[0] == bos_id:
            parts.append(doc[:1])
            doc = doc[1:]
        if doc.size and rng.random() < rate:
            i, j = np.sort(rng.integers(0, doc.size + 1, size=2))
            parts += [[fim_pre], doc[:i], [fim_suf], doc[j:], [fim_mid], doc[i:j]]
        else:
            parts.append(doc)
        if k < ends.size:
            parts.append(window[e : e + 1])
    return np.concatenate([np.asarray(p, dtype=window.dtype) for p in parts])[:n]


# ----------------------------------------------------------------------------------------------------
# loading batches


class DataLoader:
    """Packed `[batch_size, seq_len + 1]` int32 windows of one split, in a seeded order a state dict resumes.

    Window k is tokens `[k*T, k*T + T + 1)` of the split's stream (consecutive windows share one token, so
    every token is a target once per epoch). Each epoch visits `n_windows // batch_size` batches in the order
    `permutation(seed, epoch)` (or in stream order with `shuffle=False`); `loop=False` stops after one epoch.
    `DataLoader.from_tokens` does the same over a token array in memory.
    """

    def __init__(
        self,
        corpus_dir: str | os.PathLike,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        seed: int = 0,
        shuffle: bool = True,
        fim_rate: float = 0.0,
        loop: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split: {split!r} is not one of {SPLITS}")
        self.dir = Path(corpus_dir)
        index = load_index(self.dir)
        if fim_rate > 0 and not index.get("fim_ids"):
            raise ValueError(f"{self.dir / INDEX_NAME}: fim_ids: the corpus tokenizer has no FIM tokens")
        info = index["splits"][split]
        shards = [np.load(self.dir / s["file"], mmap_mode="r") for s in info["shards"]]
        for s, arr in zip(info["shards"], shards, strict=True):
            if arr.ndim != 1 or arr.size != s["n_tokens"]:
                raise ValueError(
                    f"{self.dir / s['file']}: holds {arr.shape}, index says {s['n_tokens']} tokens"
                )
        self._start(shards, index, split, batch_size, seq_len, seed, shuffle, fim_rate, loop)

    @classmethod
    def from_tokens(
        cls,
        tokens: np.ndarray | Sequence[int],
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
    ) -> DataLoader:
        """The same windows, order and state over an in-memory token stream (no corpus folder, no FIM)."""
        self = cls.__new__(cls)
        self.dir = Path("<memory>")
        stream = np.asarray(tokens)
        if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
            raise ValueError(f"tokens: expected a 1-D integer sequence, got {stream.dtype} {stream.shape}")
        index = {"eos_id": None, "bos_id": None, "fim_ids": None}
        self._start([stream], index, "memory", batch_size, seq_len, seed, shuffle, 0.0, loop)
        return self

    def _start(
        self,
        shards: list[np.ndarray],
        index: dict[str, Any],
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int,
        shuffle: bool,
        fim_rate: float,
        loop: bool,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size {batch_size} and seq_len {seq_len} must be positive")
        if not 0.0 <= fim_rate <= 1.0:
            raise ValueError(f"fim_rate: {fim_rate} is not in [0, 1]")
        self.index, self.shards = index, shards
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.shuffle, self.fim_rate, self.loop = seed, shuffle, fim_rate, loop
        self.offsets = np.cumsum([0] + [a.size for a in self.shards])
        self.n_tokens = int(self.offsets[-1])
        self.n_windows = max(self.n_tokens - 1, 0) // seq_len
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.dir}: split '{split}' has {self.n_tokens} tokens, too few for one batch of "
                f"{batch_size} x {seq_len + 1}"
            )
        self.epoch = 0
        self.batch = 0  # the next batch within the epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> np.ndarray:
        if self.batch >= self.batches_per_epoch:
            if not self.loop:
                raise StopIteration
            self.epoch += 1
            self.batch = 0
        order = self._epoch_order()
        ks = order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        out = np.stack([self._window(int(k)) for k in ks])
        self.batch += 1
        return out

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to produce the same next batch: the position plus what defines the order."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "split": self.split,
            "n_tokens": self.n_tokens,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "fim_rate": self.fim_rate,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        wrong = [
            f"{k} {state.get(k)!r} != {mine[k]!r}"
            for k in mine
            if k not in ("epoch", "batch") and state.get(k) != mine[k]
        ]
        if wrong:
            raise ValueError(f"data loader state does not match this loader: {', '.join(wrong)}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"data loader state: position epoch {epoch} batch {batch} is out of range")
        self.epoch, self.batch = epoch, batch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def _window(self, k: int) -> np.ndarray:
        start, n = k * self.seq_len, self.seq_len + 1
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while n > 0:
            lo = start - int(self.offsets[i])
            piece = self.shards[i][lo : lo + n]
            pieces.append(piece)
            n -= piece.size
            start += piece.size
            i += 1
        w = np.concatenate(pieces).astype(np.int32)
        if self.fim_rate > 0:
            f = self.index["fim_ids"]
            rng = np.random.default_rng([self.seed, self.epoch, k, 0xF1])
            w = fim_transform(
                w,
                rng,
                self.fim_rate,
                self.index["eos_id"],
                f["pre"],
                f["suf"],
                f["mid"],
                self.index["bos_id"],
            )
        return w


# ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    import click

    @click.command(help="Tokenize source files into train/heldout token shards (index.json + .npy).")
    @click.argument("src_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
    @click.option(
        "--tokenizer",
        "tokenizer",
        required=True,
        type=click.Path(exists=True, dir_okay=False),
        help="tokenizer JSON (from ternary.training.bpe_trainer) or a GGUF file",
    )
    @click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="output directory")
    @click.option("--pattern", default="**/*.py", show_default=True, help="glob of files under each SRC_DIR")
    @click.option("--heldout-fraction", default=0.02, show_default=True)
    @click.option("--shard-tokens", default=1 << 24, show_default=True)
    @click.option("--workers", default=1, show_default=True, help="tokenizer processes")
    def cli(src_dirs, tokenizer, out, pattern, heldout_fraction, shard_tokens, workers) -> None:
        build_corpus(src_dirs, out, tokenizer, heldout_fraction, pattern, shard_tokens, workers=workers)

    cli.main(args=list(argv) if argv is not None else None, standalone_mode=True)


if __name__ == "__main__":
    main()
