"""The fast path (planar layout, fused all-layers forward) against the reference layout and llama.cpp.

In ``q8k`` mode the fast Engine must give the reference layout's logits BIT FOR BIT on every oracle model,
for a batched prompt and one token at a time, and meet test_oracle's thresholds against llama.cpp's logits.
Its parts are checked against their references on their own: the llama.cpp-order lane kernel on the planar
bytes (every kernel path) against ``kernels.ternary_q8k_matmul``, the vectorised attention and SiLU gate
against ``attention.attention`` and ``kernels.gated_ffn``, and the fused forward against the step-by-step one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ORACLE, ORACLE_MODELS, read_ids
from ternary.engine import attention, cpu_features, kernels, simd
from ternary.engine import model as model_module
from ternary.engine.engine import Engine
from ternary.engine.kernels_attention import attend_head
from ternary.engine.kernels_ffn import gate_rows
from ternary.engine.kernels_q8k import lane_sums, q8k_matmul
from ternary.engine.model import Transformer, load_transformer
from ternary.engine.planar import PlanarMatrix
from ternary.formats.model_file import open_model

PATHS = cpu_features.supported_paths()


pytestmark = pytest.mark.usefixtures("one_numba_thread")


_MODELS: dict[tuple[str, str, str], Transformer] = {}


def model(name: str, layout: str, act_quant: str = "q8k") -> Transformer:
    key = (name, layout, act_quant)
    if key not in _MODELS:
        with open_model(ORACLE / f"{name}.gguf") as mf:
            _MODELS[key] = load_transformer(
                mf, n_ctx=128, layout=layout, act_quant=act_quant, repack_cache=False
            )
    return _MODELS[key]


def batch_logits(m: Transformer, ids: list[int], trace: dict | None = None) -> np.ndarray:
    m.reset_slot(0)
    return m.forward(ids, np.arange(len(ids)), np.zeros(len(ids), dtype=np.int32), trace=trace)


def one_at_a_time(m: Transformer, ids: list[int]) -> np.ndarray:
    m.reset_slot(0)
    return np.concatenate([m.forward([t], [i], [0]) for i, t in enumerate(ids)])


# ---------------------------------------------------------------- the whole model


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_fast_layout_is_bit_identical_to_the_reference_and_meets_the_oracle(name: str) -> None:
    fast, ref = model(name, "planar"), model(name, "reference")
    assert fast.layout == "planar" and ref.layout == "reference"
    for case in ("prompt.batch", "rand64.batch"):
        ids = read_ids(ORACLE / name / f"{case}.tokens.txt")
        got = batch_logits(fast, ids)
        np.testing.assert_array_equal(got, batch_logits(ref, ids), err_msg=f"{name} {case}")
        want = np.load(ORACLE / name / f"{case}.logits.npy")
        top1 = np.mean(got.argmax(axis=1) == want.argmax(axis=1))
        rel = np.abs(got - want).mean() / want.std()
        print(f"\n{name} {case}: top-1 {top1:.4f}, mean|Δ|/std {rel:.2e}")
        assert top1 >= 0.98 and rel <= 0.01
    ids = read_ids(ORACLE / name / "prompt.incr.tokens.txt")
    incr = one_at_a_time(fast, ids)
    np.testing.assert_array_equal(incr, one_at_a_time(ref, ids))
    np.testing.assert_array_equal(incr, batch_logits(fast, ids))


@pytest.mark.parametrize("act_quant", ["q8k", "per_token"])
def test_fused_forward_equals_the_step_by_step_forward(act_quant: str) -> None:
    """A trace forces the layer-by-layer path over the same planar weights; both must agree bit for bit."""
    m = model("tiny-tq2_0-blockscales-f16", "planar", act_quant)
    ids = read_ids(ORACLE / "tiny-tq2_0-blockscales-f16" / "prompt.batch.tokens.txt")
    assert model_module._quantizers_as_imported()  # nothing swapped them: the fused path runs
    fused = batch_logits(m, ids)
    trace: dict[str, np.ndarray] = {}
    stepwise = batch_logits(m, ids, trace)
    assert "l_out-3" in trace  # the step-by-step path really ran
    np.testing.assert_array_equal(fused, stepwise)


def test_per_token_mode_stays_close_to_the_reference_layout() -> None:
    """per_token mode may use integer-only kernels (other float rounding): close, not identical."""
    name = "tiny-tq2_0-f16"
    ids = read_ids(ORACLE / name / "prompt.batch.tokens.txt")
    fast = batch_logits(model(name, "planar", "per_token"), ids)
    ref = batch_logits(model(name, "reference", "per_token"), ids)
    assert np.mean(fast.argmax(axis=1) == ref.argmax(axis=1)) >= 0.95
    assert np.abs(fast - ref).mean() / ref.std() < 0.02


def test_continuous_batch_of_slots_equals_each_slot_alone() -> None:
    with open_model(ORACLE / "tiny-tq1_0-q6k.gguf") as mf:
        m = load_transformer(mf, n_ctx=64, n_slots=3, repack_cache=False)
    a, b = [1, 5, 9, 200, 7], [3, 3, 100]
    alone_a = [m.forward([t], [i], [0])[0] for i, t in enumerate(a)]
    m.reset_slot(0)
    alone_b = m.forward(b, np.arange(3), np.zeros(3, np.int32))
    m.reset_slot(0)
    m.forward(a[:3], np.arange(3), np.full(3, 1))  # slot 1: a prompt of three
    mixed = m.forward([a[3], *b], [3, 0, 1, 2], [1, 2, 2, 2])  # a decode step of slot 1 + a prompt in slot 2
    np.testing.assert_array_equal(mixed[0], alone_a[3])
    np.testing.assert_array_equal(mixed[1:], alone_b)


def test_engine_options_and_repack_cache(tmp_path: Path) -> None:
    path = ORACLE / "tiny-tq2_0-scaletensors-q8.gguf"
    ids = [1, 2, 3, 4, 5]
    with Engine(path, threads=1, n_ctx=32, layout="reference") as ref:
        want = ref.logits(ids)
    with Engine(path, threads=1, n_ctx=32, decode_threads=1, repack_cache=tmp_path) as fast:
        assert fast.layout == "planar" and fast.decode_threads == 1
        np.testing.assert_array_equal(fast.logits(ids), want)
    assert len(list(tmp_path.iterdir())) == 1  # the repacked weights were cached
    with Engine(path, threads=1, n_ctx=32, repack_cache=tmp_path) as warm:  # from the cache
        np.testing.assert_array_equal(warm.logits(ids), want)
    with pytest.raises(ValueError, match="layout"):
        Engine(path, threads=1, layout="rowmajor")
    with pytest.raises(ValueError, match="decode_threads"):
        Engine(path, threads=1, decode_threads=-1)


# ---------------------------------------------------------------- the parts


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("n_out", "k", "n_tok", "scales"),
    [(37, 512, 1, "per_block"), (64, 768, 5, "per_block"), (16, 256, 9, "uniform"), (10, 1024, 4, "mixed")],
)
def test_lane_kernel_equals_the_reference_q8k_kernel(
    path: str, n_out: int, k: int, n_tok: int, scales: str
) -> None:
    rng = np.random.default_rng(n_out + k + n_tok)
    codes = rng.integers(-1, 2, size=(n_out, k)).astype(np.int8)
    w_scales = rng.uniform(0.1, 2.0, size=(n_out, k // 256)).astype(np.float32)
    if scales != "per_block":
        w_scales[:] = w_scales[:, :1]
    if scales == "mixed":
        w_scales[::3] = rng.uniform(0.1, 2.0, size=w_scales[::3].shape)
    xq = rng.integers(-128, 128, size=(n_tok, k)).astype(np.int8)
    xs = rng.uniform(1e-3, 1e-1, size=(n_tok, k // 256)).astype(np.float32)
    corr = np.empty((n_tok, k // 256, 8), np.int32)
    kernels.q8k_lane_corrections(xq, corr)
    want = np.empty((n_tok, n_out), np.float32)
    kernels.ternary_q8k_matmul(codes, w_scales, 256, xq, xs, corr, want)
    m = PlanarMatrix.from_codes(codes, w_scales, 256, kernels=path)
    sums = np.empty((n_tok, k // 256, 8), np.int32)
    lane_sums(xq, sums)
    got = np.full((n_tok, n_out), np.nan, np.float32)
    q8k_matmul(
        simd.ISAS[path], m.packed, m.group_scales, m.row_scales, m.group_uniform, n_out, xq, sums, xs, got
    )
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - want).max() == 0  # and not all NaN by accident
    exact = (xq.astype(np.int64) * np.repeat(xs, 256, axis=1)) @ (codes * np.repeat(w_scales, 256, axis=1)).T
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


@pytest.mark.parametrize(
    ("n_head", "n_head_kv", "head_dim", "positions"),
    [(4, 2, 64, [36]), (4, 1, 80, range(40, 47)), (2, 2, 16, [0])],
)
def test_vectorised_attention_equals_the_reference(
    n_head: int, n_head_kv: int, head_dim: int, positions
) -> None:
    rng = np.random.default_rng(head_dim)
    pos = np.asarray(positions, dtype=np.int32)
    n_tok, n_ctx = len(pos), 64
    q = rng.standard_normal((n_tok, n_head * head_dim)).astype(np.float32)
    k_cache = rng.standard_normal((2, n_ctx, n_head_kv, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((2, n_ctx, n_head_kv, head_dim)).astype(np.float32)
    slots = np.ones(n_tok, dtype=np.int32)
    want = np.empty_like(q)
    attention.attention(q, k_cache, v_cache, slots, pos, n_head, head_dim, 0.125, want)
    got = np.zeros_like(q)
    kc, vc = k_cache.reshape(-1), v_cache.reshape(-1)
    for t in range(n_tok):
        for h in range(n_head):
            n_keys = int(pos[t]) + 1
            scratch = np.empty(16 * head_dim + 2 * (n_keys + 16), np.float32)
            kv_off = (n_ctx * n_head_kv + h // (n_head // n_head_kv)) * head_dim  # slot 1
            off = t * n_head * head_dim + h * head_dim
            attend_head(
                q.reshape(-1),
                off,
                kc,
                vc,
                kv_off,
                n_head_kv * head_dim,
                n_keys,
                head_dim,
                np.float32(0.125),
                got.reshape(-1),
                off,
                scratch,
            )
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("relu2", [False, True])
def test_vectorised_gate_equals_the_reference_over_the_float_range(relu2: bool) -> None:
    bits = np.arange(0, 2**32, 8191, dtype=np.uint64).astype(np.uint32)
    gate = bits.view(np.float32)
    gate = gate[np.isfinite(gate)][: 2 * 260_000].reshape(2, -1)  # every exponent, both signs, subnormals
    up = np.random.default_rng(1).standard_normal(gate.shape).astype(np.float32)
    want = np.empty_like(gate)
    kernels.gated_ffn(gate, up, relu2, want)
    got = np.empty_like(gate)
    gate_rows(gate, up, relu2, got, 0, gate.shape[1])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_models_the_planar_layout_cannot_hold_fall_back_to_the_reference(tmp_path: Path) -> None:
    """An I2_S model with rows of 384 (not a multiple of 256): a warning, then the reference layout."""
    from ternary.bench.presets import RandomTensors, tokenizer_metadata
    from ternary.formats.config import ModelConfig
    from ternary.formats.writer import write_model

    cfg = ModelConfig(
        arch="bitnet", n_vocab=300, n_embd=384, n_layer=1, n_head=6, n_head_kv=2, head_dim=64, n_ff=640,
        n_ctx_train=64,
    )  # fmt: skip
    path = tmp_path / "i2s-384.gguf"
    write_model(path, cfg, RandomTensors(cfg), tokenizer_metadata(300), linear_type="I2_S")
    with pytest.warns(RuntimeWarning, match="not a multiple of 256; using the reference layout"):
        e = Engine(path, threads=1, n_ctx=16, act_quant="per_token")
    assert e.layout == "reference" and np.isfinite(e.logits([1, 2, 3])).all()


def test_an_unwritable_repack_cache_costs_only_the_cache(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    path = ORACLE / "tiny-tq2_0-f16.gguf"
    with pytest.warns(RuntimeWarning, match="repack cache not written"):
        e = Engine(path, threads=1, n_ctx=16, repack_cache=blocked / "cache")
    with Engine(path, threads=1, n_ctx=16, layout="reference") as ref:
        np.testing.assert_array_equal(e.logits([1, 2, 3]), ref.logits([1, 2, 3]))
