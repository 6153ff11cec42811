"""bench/peers.py without real peers: bitnet.cpp's llama-bench JSON (a canned run), the I2_S copy our writer
makes for it (checked against gguf-py's TQ2_0 decoder and the I2_S layout written out by hand), the cache
of converted copies, and the whole ``compare_with_peers`` flow through a stand-in ``llama-bench`` script.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ORACLE
from ternary.bench.cli import BenchResult, ModelInfo
from ternary.bench.peers import (
    Peer,
    compare_with_peers,
    default_peers,
    parse_bench_json,
    peer_model,
    peer_table,
    weight_differences,
    write_i2s_copy,
)
from ternary.bench.presets import RandomTensors, tokenizer_metadata
from ternary.formats.config import ModelConfig
from ternary.formats.reader import GGUFFile
from ternary.formats.writer import write_model

CANNED = (
    Path(__file__).parent / "fixtures" / "bitnet_cpp_llama_bench.json"
)  # bitnet.cpp, model B, -t 2 -p 32 -n 8 -r 2
TINY = ORACLE / "tiny-tq2_0-f16.gguf"
I2S = 36


def _result(n_threads: int, n_prompt: int, n_gen: int, seconds: list[float]) -> BenchResult:
    info = ModelInfo("m.gguf", "bitnet 1M TQ2_0", 2**20, 10**6)
    return BenchResult(info, "CPU", n_threads, n_prompt, n_gen, [int(s * 1e9) for s in seconds])


def test_bitnet_cpp_llama_bench_json_parses_into_the_peer_table() -> None:
    records = parse_bench_json(CANNED.read_text(), "bitnet.cpp I2_S")
    assert [(r["n_threads"], r["n_prompt"], r["n_gen"]) for r in records] == [(2, 32, 0), (2, 0, 8)]
    assert records[0]["model_type"] == "bitnet ?B I2_S - 2 bpw ternary"
    ours = [_result(2, 32, 0, [0.01, 0.02, 0.04]), _result(2, 0, 8, [0.1])]  # medians 1600 and 80 t/s
    text = peer_table(ours, {"bitnet.cpp I2_S": records})
    header, _, pp, tg = text.splitlines()[:4]
    assert "bitnet.cpp I2_S" in header and "÷ bitnet.cpp I2_S" in header
    # their medians: pp (2294.48 + 2532.75) / 2 = 2413.615, printed 2413.61 (binary); tg 623.487
    assert re.search(r"\| +pp32 \| +1600\.00 \| +2413\.61 \| +0\.66× \|", pp)
    assert re.search(r"\| +tg8 \| +80\.00 \| +623\.49 \| +0\.13× \|", tg)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("main: error: failed to load model", "not JSON"),
        ('{"n_threads": 2}', "not a list of records"),
        ('[{"n_threads": 2, "n_prompt": 0, "samples_ts": [1.0]}]', "lacks n_gen"),
        ('[{"n_threads": 2, "n_prompt": 0, "n_gen": 8, "samples_ts": []}]', "no samples"),
    ],
)
def test_bad_llama_bench_output_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"bitnet.cpp I2_S: .*{message}"):
        parse_bench_json(text, "bitnet.cpp I2_S")


def _expected_i2s_bytes(values: np.ndarray) -> bytes:
    """The fork's x86 I2_S layout, spelled out: weight j of each 128-weight block in byte j % 32 at bit shift
    6 - 2 * (j // 32), code = value sign + 1; then the float32 scale and 28 zero bytes."""
    scale = np.abs(values).max()
    codes = (np.rint(values.reshape(-1) / scale).astype(np.int64) + 1).tolist()
    packed = bytearray(len(codes) // 4)
    for i, code in enumerate(codes):
        block, j = divmod(i, 128)
        packed[block * 32 + j % 32] |= code << (6 - 2 * (j // 32))
    return bytes(packed) + np.float32(scale).tobytes() + bytes(28)


def test_i2s_copy_is_the_same_model_in_the_forks_layout(tmp_path: Path) -> None:
    out = tmp_path / "tiny.i2_s.gguf"
    write_i2s_copy(TINY, out)
    assert weight_differences(TINY, out) == []
    with GGUFFile(TINY) as src, GGUFFile(out) as dst:
        assert dst.architecture == "bitnet" and dst.metadata["general.file_type"] == 40  # MOSTLY_I2_S
        name = "blk.1.ffn_down.weight"
        t = src.tensors[name]
        values = gguf.quants.dequantize(np.asarray(t.raw), gguf.GGMLQuantizationType.TQ2_0).reshape(t.shape)
        assert dst.tensors[name].ggml_type == I2S
        assert np.asarray(dst.tensors[name].raw).tobytes() == _expected_i2s_bytes(values)
        for kept in ("token_embd.weight", "output_norm.weight", "blk.3.ffn_sub_norm.weight"):
            assert dst.tensors[kept].ggml_type == src.tensors[kept].ggml_type
            assert np.array_equal(dst.tensors[kept].raw, src.tensors[kept].raw)
        tokens = "tokenizer.ggml.tokens"
        assert dst.metadata[tokens] == src.metadata[tokens]
        assert dst.metadata["tokenizer.ggml.bos_token_id"] == src.metadata["tokenizer.ggml.bos_token_id"]


@pytest.mark.parametrize(
    ("stem", "head", "other"),
    [
        ("tiny-tq1_0-q6k", "Q6_K", "blk.0.attn_q.weight"),  # a Q6_K re-encode would change 415 of 2048 blocks
        ("tiny-tq2_0-scaletensors-q8", "Q8_0", "blk.2.attn_v.scale"),
    ],
)
def test_other_sources_heads_and_scale_tensors_are_copied(
    tmp_path: Path, stem: str, head: str, other: str
) -> None:
    model = ORACLE / f"{stem}.gguf"
    out = tmp_path / f"{stem}.i2_s.gguf"
    write_i2s_copy(model, out)
    assert weight_differences(model, out) == []
    with GGUFFile(model) as src, GGUFFile(out) as dst:
        assert dst.tensors["token_embd.weight"].type_name == head
        assert dst.tensors[other].ggml_type == (
            I2S if other.endswith(".weight") else src.tensors[other].ggml_type
        )


def test_weight_differences_sees_another_head() -> None:
    # the same ternary linears (made from one F16 master) under an F16 and a Q6_K head
    diffs = weight_differences(TINY, ORACLE / "tiny-tq1_0-q6k.gguf")
    assert diffs == ["token_embd.weight: F16 and Q6_K values differ"]


def test_per_block_scales_cannot_become_i2_s(tmp_path: Path) -> None:
    out = tmp_path / "blocks.i2_s.gguf"
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: .*different block scales"):
        write_i2s_copy(ORACLE / "tiny-tq2_0-blockscales-f16.gguf", out)
    assert not out.exists()


def test_a_relu2_bitnet_file_is_refused(tmp_path: Path) -> None:
    config = ModelConfig(
        arch="bitnet", n_vocab=300, n_embd=256, n_layer=1, n_head=2, n_head_kv=1, head_dim=128, n_ff=256,
        n_ctx_train=64, ffn_act="relu2",
    )  # fmt: skip
    model = tmp_path / "relu2.gguf"
    write_model(model, config, RandomTensors(config), tokenizer_metadata(300))
    with pytest.raises(ValueError, match="relu2 but bitnet.cpp computes the `bitnet` architecture with SiLU"):
        write_i2s_copy(model, tmp_path / "relu2.i2_s.gguf")


def test_copies_are_cached_until_the_model_changes(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    shutil.copy(TINY, model)
    peer = Peer("bitnet.cpp I2_S", tmp_path / "no-bin", "i2_s")
    path = peer_model(peer, model, peer)
    assert path == tmp_path / "tiny.i2_s.gguf" and weight_differences(model, path) == []
    first = path.stat().st_mtime_ns
    os.utime(path, ns=(first - 10**9, first - 10**9))  # older than a moment ago, newer than the model
    os.utime(model, ns=(first - 2 * 10**9, first - 2 * 10**9))
    assert peer_model(peer, model, peer) == path and path.stat().st_mtime_ns == first - 10**9  # not rewritten
    os.utime(model, ns=(first, first))  # the model is newer now
    peer_model(peer, model, peer)
    assert path.stat().st_mtime_ns > first - 10**9


def test_bitnet_cpp_is_a_default_peer_with_its_own_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TERNARY_BITNET_CPP_BIN", str(tmp_path))
    bitnet = next(p for p in default_peers() if p.name == "bitnet.cpp I2_S")
    assert bitnet.bin_dir == tmp_path and bitnet.quant == "i2_s" and bitnet.bench == tmp_path / "llama-bench"


def test_compare_with_peers_runs_a_stand_in_bitnet_cpp(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bench = bin_dir / "llama-bench"
    bench.write_text(f'#!/bin/sh\necho "$@" > "{bin_dir}/args.txt"\ncat "{CANNED}"\n')
    bench.chmod(bench.stat().st_mode | stat.S_IXUSR)
    model = tmp_path / "tiny.gguf"
    shutil.copy(TINY, model)
    said: list[str] = []
    shown: list[str] = []
    peers = [Peer("llama.cpp TQ2_0", tmp_path / "missing"), Peer("bitnet.cpp I2_S", bin_dir, "i2_s")]
    ours = [_result(2, 32, 0, [0.02]), _result(2, 0, 8, [0.1])]
    records = compare_with_peers(model, ours, [2], [32], [8], 2, said.append, shown.append, peers)
    assert list(records) == ["bitnet.cpp I2_S"] and len(records["bitnet.cpp I2_S"]) == 2
    assert any("llama.cpp TQ2_0: no llama-bench" in s for s in said)
    args = (bin_dir / "args.txt").read_text().split()
    assert args == [
        "-m",
        str(tmp_path / "tiny.i2_s.gguf"),
        "-r",
        "2",
        "-o",
        "json",
        "-t",
        "2",
        "-p",
        "32",
        "-n",
        "8",
    ]
    assert weight_differences(model, tmp_path / "tiny.i2_s.gguf") == []
    assert re.search(r"pp32 \| +1600\.00 \| +2413\.61 \| +0\.66×", shown[0])
