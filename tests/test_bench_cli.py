"""``ternary-bench``: llama-bench's table and JSON shapes on a tiny model, the peer table, the bench presets.

No timing is asserted (speed belongs in bench/); the numbers only have to be there, positive and consistent.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import ORACLE, run_click
from ternary.bench.cli import BenchResult, ModelInfo, main, markdown_table
from ternary.bench.peers import peer_table
from ternary.bench.presets import PRESETS, RandomTensors, preset_model, tokenizer_metadata
from ternary.formats.model_file import expected_shapes
from ternary.formats.tokenizer import Tokenizer

MODEL = str(ORACLE / "tiny-tq2_0-f16.gguf")
LLAMA_BENCH_KEYS = {
    "model_filename", "model_type", "model_size", "model_n_params", "n_threads", "n_prompt", "n_gen",
    "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ts",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("restore_numba_threads")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_click(main, capsys, *args)


def test_markdown_table_has_llama_bench_columns(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, MODEL, "-t", "1", "-p", "8", "-n", "4", "-r", "2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert re.fullmatch(r"\| model +\| +size \| +params \| backend +\| threads \| +test \| +t/s \|", lines[0])
    assert set(lines[1]) <= set("|-: ")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[5] for r in rows] == ["pp8", "tg4"]
    for r in rows:
        assert r[0].startswith("bitnet ") and r[0].endswith("TQ2_0")
        assert r[1].endswith(" MiB") and r[2].endswith(" M") and r[4] == "1"
        mean, sd = (float(v) for v in r[6].split(" ± "))
        assert mean > 0 and sd >= 0


def test_json_and_jsonl_carry_llama_bench_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-m", MODEL, "-t", "1", "-p", "8", "-n", "3", "-r", "3", "-o", "json")
    assert code == 0, err
    records = json.loads(out)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(8, 0), (0, 3)]
    info = ModelInfo.of(MODEL)
    for r in records:
        assert LLAMA_BENCH_KEYS <= set(r)
        assert r["model_size"] == info.size and r["model_n_params"] == info.n_params and r["n_threads"] == 1
        assert len(r["samples_ts"]) == len(r["samples_ns"]) == 3
        n = r["n_prompt"] + r["n_gen"]
        np.testing.assert_allclose(r["samples_ts"], [n * 1e9 / ns for ns in r["samples_ns"]])
        assert r["avg_ts"] == pytest.approx(np.mean(r["samples_ts"]))
    code, out, err = run(capsys, MODEL, "-t", "1", "-p", "0", "-n", "2", "-r", "1", "-o", "jsonl")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["n_gen"] == 2


def test_model_size_and_params_count_every_tensor() -> None:
    info = ModelInfo.of(MODEL)
    from ternary.formats.reader import GGUFFile

    with GGUFFile(MODEL) as f:
        assert info.n_params == sum(int(np.prod(t.shape)) for t in f.tensors.values())
        assert info.size < f.file_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no model"),
        (("nope.gguf",), "no such file"),
        ((MODEL, "-m", str(ORACLE / "tiny-tq1_0-q6k.gguf")), "one model"),
        ((MODEL, "-t", "0"), "at least 1"),
        ((MODEL, "-p", "x"), "comma-separated integers"),
    ],
)
def test_bad_arguments_are_one_clear_error(capsys: pytest.CaptureFixture[str], args, message: str) -> None:
    code, out, err = run(capsys, *args)
    assert code != 0 and message in err and "Traceback" not in err


def _result(n_threads: int, n_prompt: int, n_gen: int, seconds: list[float]) -> BenchResult:
    info = ModelInfo("m.gguf", "bitnet 1M TQ2_0", 2**20, 10**6)
    return BenchResult(info, "CPU", n_threads, n_prompt, n_gen, [int(s * 1e9) for s in seconds])


def test_table_and_peer_ratios_from_known_samples() -> None:
    ours = [_result(2, 128, 0, [0.5, 0.5, 1.0]), _result(2, 0, 64, [1.0])]
    table = markdown_table(ours)
    assert "| pp128 |" in table and "213.33 ± 73.90" in table and "64.00 ± 0.00" in table
    peers = {
        "llama.cpp": [{"n_threads": 2, "n_prompt": 128, "n_gen": 0, "samples_ts": [100.0, 128.0, 300.0]}]
    }
    text = peer_table(ours, peers)
    row = next(line for line in text.splitlines() if "pp128" in line)
    assert "256.00" in row and "128.00" in row and "2.00×" in row  # medians: ours 256, theirs 128
    assert re.search(r"tg64 \| +64\.00 \| +- \| +- \|", text)  # no peer record: shown as missing


def test_presets_are_deterministic_and_shaped_like_their_models() -> None:
    a = PRESETS["A"].config
    assert (a.n_embd, a.n_layer, a.n_head, a.n_head_kv, a.head_dim, a.n_ff, a.n_vocab) == (
        2560, 30, 20, 5, 128, 6912, 128256,
    )  # fmt: skip
    b = PRESETS["B"].config
    assert (b.n_embd, b.n_layer, b.n_head, b.n_head_kv, b.n_ff, b.n_vocab) == (768, 12, 12, 4, 2048, 32000)
    tensors = RandomTensors(b)
    assert set(tensors) == set(expected_shapes(b))
    w = tensors["blk.3.ffn_up.weight"]
    np.testing.assert_array_equal(w, RandomTensors(b)["blk.3.ffn_up.weight"])  # same seed, same tensor
    scale = np.abs(w).max()
    assert set(np.unique(w / scale)) == {-1.0, 0.0, 1.0}  # ternary times one scale: uniform TQ2_0 blocks
    with pytest.raises(ValueError, match="unknown preset"):
        preset_model("C")


def test_preset_tokenizer_is_padded_to_the_vocabulary() -> None:
    md = tokenizer_metadata(1000)
    assert len(md["tokenizer.ggml.tokens"]) == len(md["tokenizer.ggml.token_type"]) == 1000
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("def f(x): return x")
    assert tok.decode(ids) == "def f(x): return x" and max(ids) < 1000
