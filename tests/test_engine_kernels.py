"""Kernels and weight layouts against independent references: exact integer products, float64 NumPy, and
the codecs of ``ternary.formats`` (llama.cpp-identical)."""

from __future__ import annotations

import numpy as np
import pytest
from ternary.engine import activations, attention, kernels
from ternary.engine.model import rms_norm, rope_tables
from ternary.engine.weights import F16Matrix, Q6KMatrix, Q8_0Matrix, TernaryMatrix, dense_matrix
from ternary.formats import quants

RNG = np.random.default_rng(1234)


pytestmark = pytest.mark.usefixtures("one_numba_thread")


# ---------------------------------------------------------------- activation quantizers


def test_q8k_matches_llama_formula() -> None:
    x = RNG.normal(size=(3, 512)).astype(np.float32)
    x[1, 256:] = 0.0  # an all-zero block
    x[2, 10], x[2, 20] = -5.0, 5.0  # equal magnitudes: the first one (negative) sets iscale's sign
    xq, d = activations.quantize_q8k(x)
    for t in range(3):
        for b in range(2):
            blk = x[t, 256 * b : 256 * (b + 1)]
            if not blk.any():
                assert d[t, b] == 0 and not xq[t, 256 * b : 256 * (b + 1)].any()
                continue
            vmax = blk[np.argmax(np.abs(blk))]
            iscale = np.float32(-127.0) / vmax
            want = np.minimum(127, np.rint(np.float64(iscale) * blk.astype(np.float64)))
            np.testing.assert_array_equal(xq[t, 256 * b : 256 * (b + 1)], want)
            assert d[t, b] == np.float32(1.0) / iscale
    assert xq[2, 10] == -127 and xq[2, 20] == 127 and d[2, 0] == np.float32(5.0 / 127.0)


def test_q8k_rounds_the_exact_product() -> None:
    """A float32 product that rounds onto k + 1/2 while the exact product is below it rounds down."""
    vmax = np.float32(3.0)
    iscale = np.float32(-127.0) / -vmax
    found = None
    for k in range(11, 120, 2):  # odd k: rounding the float32 product (half to even) would give k + 1
        v0 = np.float32((k + 0.5) / float(iscale))
        for v in (v0, np.nextafter(v0, np.float32(9)), np.nextafter(v0, np.float32(0))):
            f32, exact = iscale * v, np.float64(iscale) * np.float64(v)
            if f32 == k + 0.5 and exact < k + 0.5 and v < vmax:
                found = (v, k)
    assert found is not None, "no float32 product rounding onto a tie among the candidates"
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, 0], x[0, 1] = -vmax, found[0]
    xq, _ = activations.quantize_q8k(x)
    assert xq[0, 1] == found[1]


def test_per_token_matches_bitnet_formula() -> None:
    x = RNG.normal(size=(4, 100)).astype(np.float32)
    x[3] = 0.0
    xq, d = activations.quantize_per_token(x)
    assert d.shape == (4, 1)
    for t in range(3):
        s = np.float32(127.0) / np.abs(x[t]).max()
        np.testing.assert_array_equal(xq[t], np.clip(np.rint(x[t] * s), -128, 127))
        assert d[t, 0] == np.float32(1.0) / s
    assert d[3, 0] == 0 and not xq[3].any()


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of the block length 256"):
        activations.quantize_q8k(np.ones((1, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown activation quantization"):
        activations.normalize_mode("int4")
    assert activations.normalize_mode("per-token") == "per_token"


# ---------------------------------------------------------------- integer matmuls


def random_ternary(n: int, k: int, block: int) -> TernaryMatrix:
    codes = RNG.integers(-1, 2, size=(n, k)).astype(np.int8)
    scales = RNG.uniform(0.5, 2.0, size=(n, k // block)).astype(np.float32)
    return TernaryMatrix.from_codes(codes, scales, block)


def blockwise_reference(w: TernaryMatrix, xq: np.ndarray, x_scale: np.ndarray) -> np.ndarray:
    """Σ over segments of (exact int64 dot) · w_scale · x_scale, in float64."""
    k = w.n_in
    x_block = k // x_scale.shape[1]
    seg = min(w.block, x_block)
    out = np.zeros((xq.shape[0], w.n_out))
    for k0 in range(0, k, seg):
        dots = xq[:, k0 : k0 + seg].astype(np.int64) @ w.codes[:, k0 : k0 + seg].astype(np.int64).T
        out += dots * x_scale[:, [k0 // x_block]] * w.block_scales[:, k0 // w.block][None, :]
    return out


@pytest.mark.parametrize("n_act_blocks", [1, 3])  # one scale per row, or Q8_K's per 256 (the lane kernel)
def test_ternary_matmul_integer_part_is_exact(n_act_blocks: int) -> None:
    w = random_ternary(33, 768, 256)
    w.block_scales[:] = 1.0
    xq = RNG.integers(-128, 128, size=(5, 768)).astype(np.int8)
    out = np.empty((5, 33), dtype=np.float32)
    w.matmul(xq, np.ones((5, n_act_blocks), dtype=np.float32), out)
    np.testing.assert_array_equal(out, xq.astype(np.int64) @ w.codes.astype(np.int64).T)


def ggml_tq_lane_reference(
    codes: np.ndarray, w_scale: np.ndarray, xq: np.ndarray, xd: np.ndarray
) -> np.ndarray:
    """ggml's x86 TQ × Q8_K float order, written from the intrinsics' data flow (spec §6) in NumPy.

    Lane j of a 256-block: Σ (code+1)·y over the bytes 4j..4j+3 of each 32-byte chunk, minus the bsums of
    elements 32j..32j+31; ``acc_j = fma(lane_j, d_x·d_w, acc_j)`` (exact product and sum in float64, one
    rounding to float32; no double rounding shows up at these magnitudes); then ``hsum_float_8``.
    """
    n, k = codes.shape
    t, nb = xq.shape[0], k // 256
    y = xq.astype(np.int64).reshape(t, 1, nb, 8, 8, 4)  # [token, -, block, chunk, lane, 4]
    q = (codes.astype(np.int64) + 1).reshape(1, n, nb, 8, 8, 4)
    bsums = xq.astype(np.int64).reshape(t, 1, nb, 8, 32).sum(axis=-1)  # 32-element runs, one per lane
    lanes = (q * y).sum(axis=(3, 5)) - bsums  # [T, N, nb, 8]
    acc = np.zeros((t, n, 8), dtype=np.float32)
    for b in range(nb):
        d = (xd[:, None, b] * w_scale[None, :, b]).astype(np.float32)  # float32 product, as ggml
        exact = lanes[:, :, b, :].astype(np.float64) * d[:, :, None].astype(np.float64) + acc
        acc = exact.astype(np.float32)
    a = acc.transpose(2, 0, 1)
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


@pytest.mark.parametrize("k", [256, 768])
def test_ternary_q8k_matmul_follows_ggml_lane_order(k: int) -> None:
    w = random_ternary(64, k, 256)
    x = RNG.normal(size=(6, k)).astype(np.float32)
    xq, xd = activations.quantize_q8k(x)
    out = np.empty((6, 64), dtype=np.float32)
    w.matmul(xq, xd, out)
    want = ggml_tq_lane_reference(w.codes, w.block_scales, xq, xd)
    np.testing.assert_array_equal(out, want)
    # the order is observable: one rounding of each block's total lands elsewhere for some outputs
    totals = np.einsum("tbj,nbj->tnb", xq.reshape(6, -1, 256).astype(np.int64), w.codes.reshape(64, -1, 256))
    d = (xd[:, None, :] * w.block_scales[None, :, :]).astype(np.float32)
    plain = (totals.astype(np.float32) * d).sum(axis=2, dtype=np.float32)
    assert np.any(plain != want)


@pytest.mark.parametrize(("w_block", "n_act_blocks"), [(256, 3), (256, 1), (768, 3), (768, 1)])
def test_ternary_matmul_block_scales(w_block: int, n_act_blocks: int) -> None:
    w = random_ternary(17, 768, w_block)
    xq = RNG.integers(-127, 128, size=(4, 768)).astype(np.int8)
    xs = RNG.uniform(0.01, 0.1, size=(4, n_act_blocks)).astype(np.float32)
    out = np.empty((4, 17), dtype=np.float32)
    w.matmul(xq, xs, out)
    np.testing.assert_allclose(out, blockwise_reference(w, xq, xs), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(w.dequantize(), w.codes * np.repeat(w.block_scales, w_block, axis=1))


def test_ternary_matrix_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        TernaryMatrix(np.full((2, 256), 2, dtype=np.int8), np.ones((2, 1), dtype=np.float32), 256)
    with pytest.raises(ValueError, match="does not divide"):
        TernaryMatrix(np.zeros((2, 300), dtype=np.int8), np.ones((2, 1), dtype=np.float32), 256)
    w = random_ternary(4, 256, 256)
    with pytest.raises(ValueError, match="activations must be int8"):
        w.matmul(np.zeros((1, 128), np.int8), np.ones((1, 1), np.float32), np.empty((1, 4), np.float32))


def test_q8_0_head_matches_formats_codec() -> None:
    w = RNG.normal(size=(40, 256)).astype(np.float32)
    raw = quants.quantize(quants.Q8_0, w)
    deq = quants.dequantize(quants.Q8_0, raw, w.shape)
    m = dense_matrix(quants.Q8_0, raw, w.shape, lambda: deq)
    assert isinstance(m, Q8_0Matrix)
    ids = np.array([3, 0, 39])
    np.testing.assert_array_equal(m.rows(ids), deq[ids])
    x = RNG.normal(size=(3, 256)).astype(np.float32)
    want = ref_q8_0(x) @ deq.T.astype(np.float64)
    np.testing.assert_allclose(m.matmul(x), want, rtol=1e-5, atol=1e-4)


def ref_q8_0(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    q = np.rint(blocks * (np.float32(127.0) / amax))
    return (q * (amax / np.float32(127.0)).astype(np.float16).astype(np.float64)).reshape(x.shape)


def test_q6_k_head_matches_formats_codec() -> None:
    w = RNG.normal(size=(24, 512)).astype(np.float32)
    raw = quants.quantize(quants.Q6_K, w)
    deq = quants.dequantize(quants.Q6_K, raw, w.shape)
    m = dense_matrix(quants.Q6_K, raw, w.shape, lambda: deq)
    assert isinstance(m, Q6KMatrix)
    assert m.codes.min() >= -32 and m.codes.max() <= 31
    ids = np.arange(24)
    np.testing.assert_array_equal(m.rows(ids), deq)
    x = RNG.normal(size=(2, 512)).astype(np.float32)
    xq, xd = activations.quantize_q8k(x)
    want = (xq * np.repeat(xd, 256, axis=1)).astype(np.float64) @ deq.T.astype(np.float64)
    np.testing.assert_allclose(m.matmul(x), want, rtol=1e-5, atol=1e-4)


def test_f16_head_converts_every_finite_half_exactly() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[((bits >> 10) & 0x1F) != 0x1F].reshape(-1, 1)  # every finite value (subnormals, -0 included)
    m = F16Matrix(bits)
    got = m.matmul(np.ones((1, 1), dtype=np.float32))[0]
    np.testing.assert_array_equal(got, bits[:, 0].view(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="inf or NaN"):
        F16Matrix(np.array([[0x7C00]], dtype=np.uint16))


def test_f16_head_rounds_activations_to_half() -> None:
    w = RNG.normal(size=(10, 64)).astype(np.float16)
    m = F16Matrix(w.view(np.uint16))
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    want = x.astype(np.float16).astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(m.matmul(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.rows(np.array([4])), w[[4]].astype(np.float32))


# ---------------------------------------------------------------- norms, RoPE, FFN gate, attention


def test_rms_norm() -> None:
    x = RNG.normal(size=(3, 96)).astype(np.float32)
    w = RNG.normal(size=96).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64**2, axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [True, False])
def test_rope(neox: bool) -> None:
    n_head, head_dim, n_rot, base = 2, 8, 6, 10000.0
    positions = np.array([0, 1, 5, 17], dtype=np.int32)
    cos, sin = rope_tables(positions, n_rot, base)
    theta = positions[:, None] * base ** (-2.0 * np.arange(n_rot // 2) / n_rot)
    np.testing.assert_allclose(cos, np.cos(theta), atol=1e-5)
    np.testing.assert_allclose(sin, np.sin(theta), atol=1e-5)
    x = RNG.normal(size=(4, n_head * head_dim)).astype(np.float32)
    got = x.copy()
    attention.apply_rope(got, cos, sin, n_head, head_dim, n_rot, neox)
    for t in range(4):
        for h in range(n_head):
            v = x[t, h * head_dim : (h + 1) * head_dim].astype(np.float64)
            want = v.copy()
            for i in range(n_rot // 2):
                a, b = (i, i + n_rot // 2) if neox else (2 * i, 2 * i + 1)
                c, s = np.cos(theta[t, i]), np.sin(theta[t, i])
                want[a], want[b] = v[a] * c - v[b] * s, v[a] * s + v[b] * c
            np.testing.assert_allclose(got[t, h * head_dim : (h + 1) * head_dim], want, atol=1e-5)


def test_ggml_expf_is_a_faithful_exp() -> None:
    """ggml's vector expf: an approximation (ARM's, "1.45 ulp + 0.5"; 2.2 seen near x = -47), inf/0 far out.

    Bit-exactness with ggml is checked where it matters, by tests/test_oracle.py (the SiLU·up outputs).
    """
    x = np.linspace(-87.0, 88.0, 20001).astype(np.float32)
    got = np.array([kernels.ggml_expf(v) for v in x])
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(got - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 2.5
    assert np.count_nonzero(got != np.exp(x)) > 0  # not libm's expf: the emulation is not a no-op
    assert kernels.ggml_expf(np.float32(300.0)) == np.inf
    assert kernels.ggml_expf(np.float32(-300.0)) == 0.0
    assert kernels.ggml_expf(np.float32(0.0)) == 1.0


def test_gated_ffn() -> None:
    g = RNG.normal(size=(2, 50)).astype(np.float32) * 4
    u = RNG.normal(size=(2, 50)).astype(np.float32)
    out = np.empty_like(g)
    kernels.gated_ffn(g, u, False, out)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(out, g64 / (1 + np.exp(-g64)) * u, rtol=1e-6, atol=1e-6)
    kernels.gated_ffn(g, u, True, out)
    np.testing.assert_allclose(out, np.maximum(g64, 0) ** 2 * u, rtol=1e-6, atol=1e-6)


def test_attention_over_slots_with_gqa() -> None:
    n_slots, n_ctx, n_head, n_kv, hd = 2, 6, 4, 2, 8
    k_cache = RNG.normal(size=(n_slots, n_ctx, n_kv, hd)).astype(np.float32)
    v_cache = RNG.normal(size=(n_slots, n_ctx, n_kv, hd)).astype(np.float32)
    slots = np.array([0, 1, 1], dtype=np.int32)
    positions = np.array([4, 0, 5], dtype=np.int32)
    q = RNG.normal(size=(3, n_head * hd)).astype(np.float32)
    out = np.empty_like(q)
    attention.attention(q, k_cache, v_cache, slots, positions, n_head, hd, 1 / np.sqrt(hd), out)
    for t in range(3):
        for h in range(n_head):
            keys = k_cache[slots[t], : positions[t] + 1, h // 2].astype(np.float64)
            vals = v_cache[slots[t], : positions[t] + 1, h // 2].astype(np.float64)
            s = keys @ q[t, h * hd : (h + 1) * hd] / np.sqrt(hd)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(
                out[t, h * hd : (h + 1) * hd], p @ vals / p.sum(), rtol=1e-5, atol=1e-6
            )
