"""Corpus builder and DataLoader on small temp directories, with a byte-level stub tokenizer (token = byte
value) so the expected shard contents follow directly from the files' bytes."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ternary.training.corpus import (
    DataLoader,
    build_corpus,
    fim_transform,
    iter_texts,
    load_index,
    main,
    scan_sources,
)

BOS, EOS, FIM_PRE, FIM_SUF, FIM_MID = 256, 257, 258, 259, 260


class ByteTokenizer:
    """Token id = byte value; five control ids above 255."""

    n_vocab = 261
    bos_id, eos_id = BOS, EOS
    fim_pre_id, fim_suf_id, fim_mid_id = FIM_PRE, FIM_SUF, FIM_MID

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        assert not add_bos and not parse_special  # the builder adds BOS itself and never parses specials
        return list(text.encode("utf-8"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def src(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "pkg").mkdir(parents=True)
    b.mkdir()
    (a / "one.py").write_text("print('one')\n")
    (a / "pkg" / "two.py").write_text("def two():\n    return 'é 2'\n")
    (a / "notes.txt").write_text("not matched by the pattern\n")
    (a / "empty.py").write_bytes(b"")
    (b / "copy_of_one.py").write_text("print('one')\n")  # exact duplicate
    (b / "blob.py").write_bytes(b"\x00\x01binary")
    (b / "latin1.py").write_bytes("caf\u00e9 = 1\n".encode("latin-1"))  # not UTF-8
    (b / "three.py").write_text("x = 3  # <|eos|> in text stays text\n")
    return [a, b]


KEPT = {
    "print('one')\n",
    "def two():\n    return 'é 2'\n",
    "x = 3  # <|eos|> in text stays text\n",
}


def _stream(out: Path, split: str) -> np.ndarray:
    index = load_index(out)
    shards = [np.load(out / s["file"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, np.uint16)


def _docs(stream: np.ndarray, bos: bool) -> list[str]:
    ends = np.flatnonzero(stream == EOS)
    assert ends.size == 0 or ends[-1] == stream.size - 1  # every document ends with EOS
    docs, start = [], 0
    for e in ends:
        d = stream[start:e]
        if bos:
            assert d[0] == BOS and BOS not in d[1:]
            d = d[1:]
        docs.append(bytes(d.astype(np.uint8)).decode("utf-8"))
        start = e + 1
    return docs


def test_scan_dedups_and_counts_skips(src):
    scan = scan_sources(src)
    st = scan.stats
    assert (st.files_seen, st.kept, st.duplicates) == (7, 3, 1)
    assert (st.skipped_binary, st.skipped_undecodable, st.skipped_empty) == (1, 1, 1)
    assert [d.digest for d in scan.docs] == sorted(_sha(t.encode()) for t in KEPT)
    assert scan.docs[[d.digest for d in scan.docs].index(_sha(b"print('one')\n"))].path.parent == src[0]
    assert set(iter_texts(src)) == KEPT
    assert {t for t in iter_texts(src, "**/*.txt")} == {"not matched by the pattern\n"}


@pytest.mark.parametrize("add_bos", [False, True])
def test_shards_hold_documents_in_hash_order_with_eos(src, tmp_path, add_bos):
    out = tmp_path / "corpus"
    index = build_corpus(
        src, out, ByteTokenizer(add_bos), heldout_fraction=0.0, shard_tokens=16, progress=False
    )
    texts = sorted(KEPT, key=lambda t: _sha(t.encode()))
    expected = []
    for t in texts:
        expected += [BOS] * add_bos + list(t.encode()) + [EOS]
    train = index["splits"]["train"]
    assert train["n_docs"] == 3 and train["n_tokens"] == len(expected)
    assert len(train["shards"]) == -(-len(expected) // 16)  # documents run across 16-token shards
    assert all(s["n_tokens"] == 16 for s in train["shards"][:-1])
    stream = _stream(out, "train")
    assert stream.dtype == np.uint16
    assert stream.tolist() == expected
    assert _docs(stream, add_bos) == texts
    assert index["splits"]["heldout"] == {"n_docs": 0, "n_tokens": 0, "shards": []}
    assert index["stats"]["duplicates"] == 1 and index["stats"]["skipped_binary"] == 1
    assert index["fim_ids"] == {"pre": FIM_PRE, "suf": FIM_SUF, "mid": FIM_MID}
    assert index["bos_id"] == (BOS if add_bos else None)


def _many_files(root: Path, n: int) -> dict[str, str]:
    root.mkdir()
    texts = {}
    for i in range(n):
        t = f"# file {i}\nvalue_{i} = {i * i}\n" * (1 + i % 3)
        (root / f"m{i:02d}.py").write_text(t)
        texts[_sha(t.encode())] = t
    return texts


def test_split_is_by_file_and_deterministic(tmp_path):
    texts = _many_files(tmp_path / "src", 40)
    idx1 = build_corpus(
        [tmp_path / "src"], tmp_path / "c1", ByteTokenizer(), 0.3, shard_tokens=64, progress=False
    )
    idx2 = build_corpus(
        [tmp_path / "src"], tmp_path / "c2", ByteTokenizer(), 0.3, shard_tokens=64, progress=False
    )
    assert idx1["splits"] == idx2["splits"]
    build_corpus(
        [tmp_path / "src"], tmp_path / "c2", ByteTokenizer(), 0.3, shard_tokens=10**6, progress=False
    )
    assert sorted(p.name for p in (tmp_path / "c2").glob("*.npy")) == ["heldout_00000.npy", "train_00000.npy"]
    assert len(idx1["splits"]["train"]["shards"]) > 1
    assert np.array_equal(_stream(tmp_path / "c1", "train"), _stream(tmp_path / "c2", "train"))
    train = _docs(_stream(tmp_path / "c1", "train"), bos=False)
    heldout = _docs(_stream(tmp_path / "c1", "heldout"), bos=False)
    # every file lands whole in exactly one split, chosen by the first 64 bits of its SHA-256
    assert sorted(train + heldout) == sorted(texts.values())
    want_heldout = {t for h, t in texts.items() if int(h[:16], 16) / 2**64 < 0.3}
    assert set(heldout) == want_heldout and 5 <= len(heldout) <= 20
    assert train == [texts[h] for h in sorted(texts) if texts[h] not in want_heldout]


def test_worker_processes_give_identical_shards(tmp_path):
    _many_files(tmp_path / "src", 24)
    one = build_corpus([tmp_path / "src"], tmp_path / "c1", ByteTokenizer(), 0.2, progress=False)
    two = build_corpus([tmp_path / "src"], tmp_path / "c2", ByteTokenizer(), 0.2, workers=2, progress=False)
    assert one["splits"] == two["splits"]
    for split in ("train", "heldout"):
        assert np.array_equal(_stream(tmp_path / "c1", split), _stream(tmp_path / "c2", split))


@pytest.fixture
def corpus(tmp_path) -> Path:
    _many_files(tmp_path / "src", 30)
    build_corpus([tmp_path / "src"], tmp_path / "c", ByteTokenizer(), 0.0, shard_tokens=100, progress=False)
    return tmp_path / "c"


def test_loader_windows_are_stream_slices(corpus):
    stream = _stream(corpus, "train").astype(np.int32)
    B, T = 3, 10
    dl = DataLoader(corpus, B, T, shuffle=False, loop=False)
    batches = list(dl)
    assert len(batches) == len(dl) == ((stream.size - 1) // T) // B
    for i, batch in enumerate(batches):
        assert batch.shape == (B, T + 1) and batch.dtype == np.int32
        for r in range(B):
            k = i * B + r
            assert np.array_equal(batch[r], stream[k * T : k * T + T + 1])  # crosses 100-token shards too


def test_in_memory_stream_gives_the_same_batches(corpus):
    stream = _stream(corpus, "train")
    for shuffle in (False, True):
        a = DataLoader(corpus, 3, 16, seed=5, shuffle=shuffle)
        b = DataLoader.from_tokens(stream, 3, 16, seed=5, shuffle=shuffle)
        assert len(a) == len(b)
        for _ in range(len(a) + 2):  # into the second epoch
            assert np.array_equal(next(a), next(b))
    with pytest.raises(ValueError, match="1-D integer"):
        DataLoader.from_tokens(np.zeros((4, 4), np.int32), 1, 2)


def test_loader_shuffled_epochs_are_seeded_permutations(corpus):
    B, T = 4, 8
    a = DataLoader(corpus, B, T, seed=7)
    b = DataLoader(corpus, B, T, seed=7)
    c = DataLoader(corpus, B, T, seed=8)
    n = len(a)
    first = [next(a) for _ in range(n)]
    assert all(np.array_equal(x, next(b)) for x in first)
    assert not all(np.array_equal(x, next(c)) for x in first)
    stream = _stream(corpus, "train").astype(np.int32)
    windows = Counter(tuple(stream[k * T : k * T + T + 1].tolist()) for k in range((stream.size - 1) // T))
    rows = Counter(tuple(r.tolist()) for x in first for r in x)
    assert rows.total() == n * B and rows <= windows  # no window twice within an epoch (files repeat lines)
    second = [next(a) for _ in range(n)]
    assert a.epoch == 1
    assert not all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))  # a new order per epoch


@pytest.mark.parametrize("fim_rate", [0.0, 0.5])
def test_loader_resumes_exactly_from_state(corpus, fim_rate):
    B, T = 2, 12
    ref = DataLoader(corpus, B, T, seed=3, fim_rate=fim_rate)
    n = len(ref)
    for _ in range(n - 2):  # stop just before an epoch boundary so the resumed run crosses it
        next(ref)
    state = ref.state_dict()
    expected = [next(ref) for _ in range(5)]
    resumed = DataLoader(corpus, B, T, seed=3, fim_rate=fim_rate)
    resumed.load_state_dict(dict(state))
    assert all(np.array_equal(x, next(resumed)) for x in expected)
    assert resumed.state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="seed 3 != 4"):
        DataLoader(corpus, B, T, seed=4, fim_rate=fim_rate).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(corpus, B + 1, T, seed=3, fim_rate=fim_rate).load_state_dict(state)


def test_fim_transform_psm_by_hand():
    window = np.array([BOS, 1, 2, 3, 4, 5, EOS, BOS, 6, 7, 8, EOS, 9, 9], dtype=np.int32)
    out = fim_transform(window, np.random.default_rng(0), 1.0, EOS, FIM_PRE, FIM_SUF, FIM_MID, bos_id=BOS)
    rng = np.random.default_rng(0)  # replay the draws: one coin and two cut points per document
    expected = []
    for bos, doc, end in (([BOS], [1, 2, 3, 4, 5], [EOS]), ([BOS], [6, 7, 8], [EOS]), ([], [9, 9], [])):
        assert rng.random() < 1.0
        i, j = sorted(rng.integers(0, len(doc) + 1, size=2))
        expected += bos + [FIM_PRE, *doc[:i], FIM_SUF, *doc[j:], FIM_MID, *doc[i:j], *end]
    assert out.tolist() == expected[: window.size]  # 3 tokens longer per document, cut back to the window
    assert np.array_equal(fim_transform(window, rng, 0.0, EOS, FIM_PRE, FIM_SUF, FIM_MID, BOS), window)


def test_fim_transform_keeps_every_document_token():
    rng = np.random.default_rng(1)
    doc = list(range(1, 41))
    window = np.array(doc + [EOS] + [7] * 10, dtype=np.int32)  # room for the 3 FIM tokens of the first doc
    cuts = set()
    for _ in range(60):
        out = fim_transform(window, rng, 1.0, EOS, FIM_PRE, FIM_SUF, FIM_MID).tolist()
        assert len(out) == window.size and out[0] == FIM_PRE and out[43] == EOS
        s, m = out.index(FIM_SUF), out.index(FIM_MID)
        prefix, suffix, middle = out[1:s], out[s + 1 : m], out[m + 1 : 43]
        assert prefix + middle + suffix == doc
        cuts.add((len(prefix), len(middle)))
    assert len(cuts) > 30  # the cut points vary, empty middles and prefixes included over many draws


def test_loader_fim_rows_are_psm(corpus):
    dl = DataLoader(corpus, 4, 64, seed=0, fim_rate=1.0, shuffle=False)
    plain = DataLoader(corpus, 4, 64, seed=0, fim_rate=0.0, shuffle=False)
    x, y = next(dl), next(plain)
    assert x.shape == y.shape
    for row in x:
        starts = np.flatnonzero(row == FIM_PRE)
        assert starts.size >= 1  # rate 1: every document in the window was rewritten
        for s in starts:  # each rewritten document carries <pre> ... <suf> ... <mid> in that order
            rest = row[s:].tolist()
            if FIM_MID in rest:
                assert rest.index(FIM_SUF) < rest.index(FIM_MID)


def test_errors_are_clear(tmp_path, corpus):
    with pytest.raises(ValueError, match="not a directory"):
        build_corpus([tmp_path / "nope"], tmp_path / "o", ByteTokenizer(), progress=False)
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_corpus([tmp_path], tmp_path / "o", ByteTokenizer(), heldout_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="index"):
        DataLoader(tmp_path, 2, 8)
    with pytest.raises(ValueError, match="too few"):
        DataLoader(corpus, 2, 100_000)
    with pytest.raises(ValueError, match="split"):
        DataLoader(corpus, 2, 8, split="test")


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--tokenizer" in capsys.readouterr().out


def test_end_to_end_with_learned_tokenizer(src, tmp_path):
    Tokenizer = pytest.importorskip("ternary.formats.tokenizer").Tokenizer
    from ternary.training.bpe_trainer import learn_bpe, save_tokenizer

    md = learn_bpe(iter_texts(src), 300)
    save_tokenizer(md, tmp_path / "tok.json")
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit) as e:
        main([str(src[0]), str(src[1]), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(out),
              "--heldout-fraction", "0"])  # fmt: skip
    assert e.value.code == 0
    tok = Tokenizer.from_metadata(md)
    stream = _stream(out, "train")
    assert load_index(out)["bos_id"] == tok.bos_id  # the learned tokenizer adds BOS
    docs = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]
    assert {tok.decode(d[1:-1].tolist()) for d in docs} == KEPT
    assert all(d[0] == tok.bos_id for d in docs)
    assert (out / "tokenizer.json").exists()
    assert load_index(out)["fim_ids"]["pre"] == md["tokenizer.ggml.fim_pre_token_id"]
