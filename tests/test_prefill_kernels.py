"""The prompt (prefill) kernels against their references, bit for bit.

* ``kernels_q8k.quantize_q8k_rows_into`` (vectorised Q8_K quantizer + lane sums + token pairs) against
  ``kernels.quantize_q8k_rows``, ``lane_sums`` and the pair layout's definition;
* ``fused.rms_norm_8`` (8 rows' sums of squares side by side) against ``kernels.rms_norm_rows``;
* ``kernels_q8k.q8k_matmul`` (512-bit tiles on token pairs, leftovers one token at a time) against
  ``kernels.ternary_q8k_matmul`` for every token count of a few tiles and every kernel path;
* ``kernels_attention`` 16-keys-at-a-time attention against the one-key-at-a-time twin, and both against
  ``attention.attention``;
* ``kernels_attention.rope_neox_rows`` against ``attention.apply_rope``;
* the fused forward's claimed work items: the same logits on one thread and two.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ORACLE, read_ids
from ternary.engine import attention, cpu_features, kernels, simd
from ternary.engine.fused import rms_norm_8
from ternary.engine.kernels_attention import (
    _attend_lanes,
    attend_head,
    attend_heads,
    attend_strided,
    compact_kv,
    rope_neox_rows,
)
from ternary.engine.kernels_q8k import (
    PAIR_BLOCK_BYTES,
    lane_sums,
    pair_buffers,
    pair_layout,
    q8k_matmul,
    quantize_q8k_rows_into,
)
from ternary.engine.model import load_transformer, rope_tables
from ternary.engine.planar import PlanarMatrix
from ternary.formats.model_file import open_model

PATHS = cpu_features.supported_paths()
F32 = np.float32

pytestmark = pytest.mark.usefixtures("one_numba_thread")


def awkward_rows(rng: np.random.Generator, n_tok: int, k: int) -> np.ndarray:
    """Rows whose 256-blocks hit every branch of the quantizer: zeros, -0, ties of |x| with both signs,
    the largest element first or last, magnitudes from subnormal to huge."""
    x = rng.standard_normal((n_tok, k)).astype(F32)
    x *= (10.0 ** rng.uniform(-30, 30, size=(n_tok, 1))).astype(F32)
    x[-1, :256] *= F32(1e-41) / np.abs(x[-1, :256]).max()  # subnormals
    blocks = x.reshape(n_tok, k // 256, 256)
    blocks[0, 0] = 0.0
    if n_tok > 1:
        blocks[1, 0] = -0.0
        blocks[1, -1] = rng.integers(-4, 5, size=256) * F32(0.5)  # many ties
        blocks[1, -1, 7] = -np.abs(blocks[1, -1]).max()
        blocks[1, -1, 9] = -blocks[1, -1, 7]
    if n_tok > 2:
        blocks[2, 0, -1] = 1e30
        blocks[2, -1, 0] = -1e30
        blocks[2, -1, 1] = 1e30
    return x


@pytest.mark.parametrize("k", [256, 2560, 48, 17])
def test_rms_norm_of_8_rows_side_by_side_is_bit_identical(k: int) -> None:
    rng = np.random.default_rng(k)
    x = rng.standard_normal((11, k)).astype(F32) * (10.0 ** rng.uniform(-20, 20, size=(11, 1))).astype(F32)
    w = rng.standard_normal(k).astype(F32)
    want = np.empty_like(x)
    kernels.rms_norm_rows(x, w, 1e-5, want)
    got = np.full_like(x, np.nan)
    for t0, t1 in ((0, 8), (8, 9), (9, 11)):  # full, single and short row groups
        rms_norm_8(x, t0, t1, w, 1e-5, got)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def reference_pairs(xq, sums, xs):
    """The pair layout from its definition: pair (A, B), block b, shift s → [A lo | B hi], [B lo | A hi]."""
    n_pairs, nb = xq.shape[0] // 2, xq.shape[1] // 256
    mixed = np.zeros((n_pairs, nb, 4, 2, 64), np.int8)
    for p in range(n_pairs):
        a, b = xq[2 * p].reshape(nb, 4, 64), xq[2 * p + 1].reshape(nb, 4, 64)
        mixed[p, :, :, 0] = np.concatenate([a[..., :32], b[..., 32:]], axis=-1)
        mixed[p, :, :, 1] = np.concatenate([b[..., :32], a[..., 32:]], axis=-1)
    neg = -np.concatenate([sums[0::2][:n_pairs], sums[1::2][:n_pairs]], axis=-1)
    spread = np.repeat(xs[:, :, None], 8, axis=-1)
    scales = np.concatenate([spread[0::2][:n_pairs], spread[1::2][:n_pairs]], axis=-1)
    return mixed.reshape(n_pairs, -1), neg, scales


@pytest.mark.parametrize(("n_tok", "k", "seed"), [(3, 256, 0), (8, 768, 1), (11, 1024, 2), (6, 2560, 3)])
def test_vectorised_q8k_quantizer_is_bit_identical(n_tok: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = awkward_rows(rng, n_tok, k)
    want_q, want_d = np.empty((n_tok, k), np.int8), np.empty((n_tok, k // 256), F32)
    kernels.quantize_q8k_rows(x, want_q, want_d)
    want_s = np.empty((n_tok, k // 256, 8), np.int32)
    lane_sums(want_q, want_s)
    assert (want_d == 0).any() and (want_d != 0).any()  # the zero-block branch ran, and others

    q = np.full((n_tok, k), 99, np.int8)
    d = np.full((n_tok, k // 256), np.nan, F32)
    s = np.full((n_tok, k // 256, 8), -7, np.int32)
    mixed, neg, scales = pair_buffers(simd.AVX512VNNI, n_tok, k)
    for t0 in range(0, n_tok, 4):  # in row chunks, as the fused forward calls it
        quantize_q8k_rows_into(x, t0, min(t0 + 4, n_tok), q, d, s, mixed, neg, scales, True)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(d.view(np.int32), want_d.view(np.int32))
    np.testing.assert_array_equal(s, want_s)
    want_mixed, want_neg, want_scales = reference_pairs(want_q, want_s, want_d)
    np.testing.assert_array_equal(mixed, want_mixed)
    np.testing.assert_array_equal(neg, want_neg)
    np.testing.assert_array_equal(scales, want_scales)
    assert mixed.shape[1] == k // 256 * PAIR_BLOCK_BYTES

    again = pair_buffers(simd.AVX512VNNI, n_tok, k)
    pair_layout(want_q, want_s, want_d, 0, n_tok, *again)  # the layout alone, from quantized rows
    for got, want in zip(again, (want_mixed, want_neg, want_scales), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("n_out", "k", "scales"), [(13, 512, "per_block"), (24, 768, "uniform"), (6, 256, "mixed")]
)
def test_prompt_tiles_equal_the_reference_q8k_kernel_for_every_token_count(
    path: str, n_out: int, k: int, scales: str
) -> None:
    rng = np.random.default_rng(n_out * k)
    codes = rng.integers(-1, 2, size=(n_out, k)).astype(np.int8)
    w_scales = rng.uniform(0.1, 2.0, size=(n_out, k // 256)).astype(F32)
    if scales != "per_block":
        w_scales[:] = w_scales[:, :1]
    if scales == "mixed":
        w_scales[::3] = rng.uniform(0.1, 2.0, size=w_scales[::3].shape)
    m = PlanarMatrix.from_codes(codes, w_scales, 256, kernels=path)
    for n_tok in range(1, 12):  # tiles of 4 tokens (2 pairs) and every number of leftovers
        xq = rng.integers(-128, 128, size=(n_tok, k)).astype(np.int8)
        xs = rng.uniform(1e-3, 1e-1, size=(n_tok, k // 256)).astype(F32)
        corr = np.empty((n_tok, k // 256, 8), np.int32)
        kernels.q8k_lane_corrections(xq, corr)
        want = np.empty((n_tok, n_out), F32)
        kernels.ternary_q8k_matmul(codes, w_scales, 256, xq, xs, corr, want)
        sums = np.empty((n_tok, k // 256, 8), np.int32)
        lane_sums(xq, sums)
        got = np.full((n_tok, n_out + 3), np.nan, F32)  # a wider output: columns past n_out stay untouched
        q8k_matmul(
            simd.ISAS[path], m.packed, m.group_scales, m.row_scales, m.group_uniform, n_out, xq, sums, xs, got
        )
        np.testing.assert_array_equal(got[:, :n_out], want, err_msg=f"{n_tok} tokens")
        assert np.isnan(got[:, n_out:]).all()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_16_keys_at_a_time_is_bit_identical(head_dim: int) -> None:
    """On the cache's rows and on ``compact_kv``'s copies: the one-key-at-a-time twin's bits, and those of
    ``attention.attention``."""
    rng = np.random.default_rng(head_dim)
    n_kv_head, n_ctx = 2, 70
    stride = n_kv_head * head_dim
    k = rng.standard_normal(n_ctx * stride).astype(F32) * 2
    v = rng.standard_normal(n_ctx * stride).astype(F32)
    v[::7] = -0.0
    q = rng.standard_normal(2 * head_dim).astype(F32)
    scratch = np.empty(16 * head_dim + 2 * (n_ctx + 16), F32)
    cache_k = k.reshape(1, n_ctx, n_kv_head, head_dim)
    cache_v = v.reshape(1, n_ctx, n_kv_head, head_dim)
    k_rows = np.empty((n_ctx, head_dim), F32)
    v_blocks = np.empty((head_dim // 16, n_ctx, 16), F32)
    for n_keys in [1, 2, 15, 16, 17, 33, 64, n_ctx]:
        for h in range(n_kv_head):
            kv_off = h * head_dim
            compact_kv(cache_k, cache_v, 0, h, 0, n_ctx, k_rows, v_blocks)
            outs = [np.full(3 * head_dim, np.nan, F32) for _ in range(3)]
            args = (k, v, kv_off, stride, n_keys, head_dim, F32(0.125))
            attend_head(q, head_dim, *args, outs[0], head_dim, scratch)
            _attend_lanes(q, head_dim, *args, outs[1], head_dim, scratch)
            rows, blocks = k_rows.ravel(), v_blocks.ravel()
            attend_strided(
                q, head_dim, rows, 0, head_dim, blocks, 0, 16, n_ctx * 16, n_keys, head_dim, F32(0.125),
                outs[2], head_dim, scratch,
            )  # fmt: skip
            for got in outs[1:]:
                np.testing.assert_array_equal(got.view(np.int32), outs[0].view(np.int32))
            assert not np.isnan(outs[0][head_dim : 2 * head_dim]).any()
            # both query heads on this KV head at once (GQA), against each alone
            both, alone = np.empty(2 * head_dim, F32), np.empty(2 * head_dim, F32)
            attend_heads(
                q, 0, 2, rows, 0, head_dim, blocks, 0, 16, n_ctx * 16, n_keys, head_dim, F32(0.125), both, 0,
                scratch,
            )  # fmt: skip
            for g in range(2):
                attend_head(q, g * head_dim, *args, alone, g * head_dim, scratch)
            np.testing.assert_array_equal(both.view(np.int32), alone.view(np.int32))
    # the reference: two heads, each on its own KV head, over a slot's cache
    want = np.empty((1, 2 * head_dim), F32)
    zero, pos = np.zeros(1, np.int32), np.array([40], np.int32)
    attention.attention(q.reshape(1, -1), cache_k, cache_v, zero, pos, 2, head_dim, 0.125, want)
    got = np.empty(2 * head_dim, F32)
    for h in range(2):
        o = h * head_dim
        attend_head(q, o, k, v, o, stride, 41, head_dim, F32(0.125), got, o, scratch)
    np.testing.assert_array_equal(got, want[0])


@pytest.mark.parametrize(("n_head", "head_dim", "n_rot"), [(20, 128, 128), (4, 64, 32), (2, 80, 80)])
def test_neox_rope_rows_are_bit_identical(n_head: int, head_dim: int, n_rot: int) -> None:
    rng = np.random.default_rng(head_dim + n_rot)
    x = (rng.standard_normal((13, n_head * head_dim)) * 10).astype(F32)
    cos, sin = rope_tables(rng.integers(0, 5000, 13).astype(np.int32), n_rot, 500000.0)
    want = x.copy()
    attention.apply_rope(want, cos, sin, n_head, head_dim, n_rot, True)
    got = x.copy()
    for t0 in range(0, 13, 8):
        rope_neox_rows(got, t0, min(t0 + 8, 13), cos, sin, n_head, head_dim, n_rot)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    assert not np.array_equal(got, x)


def test_claimed_work_items_give_the_same_logits_on_two_threads() -> None:
    """Threads claim the fused forward's matmul and attention items as they go: which thread computes an
    item must not change a bit (a prompt and the decode step after it, alternating thread counts)."""
    import numba

    with open_model(ORACLE / "tiny-tq2_0-blockscales-f16.gguf") as mf:
        m = load_transformer(mf, n_ctx=64, repack_cache=False)
    ids = read_ids(ORACLE / "tiny-tq2_0-blockscales-f16" / "prompt.batch.tokens.txt")[:40]
    runs = []
    try:
        for threads in (1, 2, 1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            m.reset_slot(0)
            prompt = m.forward(ids, np.arange(len(ids)), np.zeros(len(ids), np.int32))
            step = m.forward([ids[0]], [len(ids)], [0])
            runs.append((prompt, step))
    finally:
        numba.set_num_threads(1)
    for prompt, step in runs[1:]:
        np.testing.assert_array_equal(prompt, runs[0][0])
        np.testing.assert_array_equal(step, runs[0][1])
