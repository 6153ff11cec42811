"""Output-head kernels (engine/head_kernels.py) against independent references.

* exact integer parts of Q6_K blocks vs a NumPy int64 unpacking of the block bytes (itself checked against the
  formats codec), on random bytes with extreme scales and activations;
* every SIMD path this machine supports vs the generic Numba path, bit for bit (tiles and leftover tokens);
* the documented float order replayed in NumPy, bit for bit; the engine's reference head classes and a
  float64 product to float32 round-off;
* llama.cpp's logits of the oracle models, bit for bit: the F16 head from llama.cpp's own ``result_norm``,
  the Q6_K and Q8_0 heads from the engine's (bit-exact) final norm;
* clear errors for bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ORACLE
from ternary.engine import activations, cpu_features, simd, weights
from ternary.engine import head_kernels as hk
from ternary.formats import quants
from ternary.formats.reader import GGUFFile

PATHS = cpu_features.supported_paths()
F32 = np.float32


pytestmark = pytest.mark.usefixtures("one_numba_thread")


# ---------------------------------------------------------------- independent NumPy references


def q6k_fields(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes q−32 int64[n, k], scales int64[n, k/16], d float32[n, k/256]) unpacked from the bytes."""
    blocks = raw.reshape(n, k // 256, 210)
    ql = blocks[..., :128].astype(np.int64).reshape(n, -1, 2, 2, 32)  # [h, v % 2, i]
    qh = blocks[..., 128:192].astype(np.int64).reshape(n, -1, 2, 1, 32)  # [h, -, i]
    nibbles = np.concatenate([ql & 15, ql >> 4], axis=3)  # [h, v, i] for v = 0..3
    bits = (qh >> (2 * np.arange(4).reshape(1, 1, 1, 4, 1))) & 3
    codes = (nibbles | (bits << 4)).reshape(n, k) - 32
    scales = blocks[..., 192:208].view(np.int8).astype(np.int64).reshape(n, k // 16)
    d = blocks[..., 208:210].copy().view(np.float16).astype(F32).reshape(n, k // 256)
    return codes, scales, d


def q6k_isums(raw: np.ndarray, n: int, k: int, xq: np.ndarray) -> np.ndarray:
    """Exact int64 ``Σ_s scale_s·Σ (q−32)·x`` per (token, row, 256-block)."""
    codes, scales, _ = q6k_fields(raw, n, k)
    sub = np.einsum("tsj,nsj->tns", xq.astype(np.int64).reshape(len(xq), -1, 16), codes.reshape(n, -1, 16))
    return (sub * scales[None]).reshape(len(xq), n, k // 256, 16).sum(axis=3)


def fma32(a, b, c):
    """float32 fma through float64 (the product of two float32 is exact in float64)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(F32)


def q6k_reference(raw, n, k, xq, xd) -> np.ndarray:
    """The module's documented Q6_K order: ``acc = fma(f32(isum)·d_w, d_x, acc)`` block by block."""
    isum = q6k_isums(raw, n, k, xq).astype(F32)
    _, _, d = q6k_fields(raw, n, k)
    acc = np.zeros((len(xq), n), F32)
    for b in range(k // 256):
        acc = fma32(isum[:, :, b] * d[None, :, b], xd[:, b, None], acc)
    return acc


def hsum8(v: np.ndarray) -> np.ndarray:
    return ((v[..., 0] + v[..., 4]) + (v[..., 2] + v[..., 6])) + (
        (v[..., 1] + v[..., 5]) + (v[..., 3] + v[..., 7])
    )


def q8_0_reference(raw, n, k, xq, xd) -> np.ndarray:
    """llama.cpp's Q8_0 order: 8 lanes of 4 values per 32-block, FMA per block, ``hsum_float_8``."""
    blocks = raw.reshape(n, k // 32, 34)
    wd = blocks[..., :2].copy().view(np.float16).astype(F32)[..., 0]
    wq = blocks[..., 2:].view(np.int8).astype(np.int64)
    x = xq.astype(np.int64).reshape(len(xq), k // 32, 32)
    acc = np.zeros((len(xq), n, 8), F32)
    for b in range(k // 32):
        lanes = (x[:, None, b, :] * wq[None, :, b, :]).reshape(len(xq), n, 8, 4).sum(axis=3)
        acc = fma32(lanes.astype(F32), (wd[None, :, b] * xd[:, b, None])[..., None], acc)
    return hsum8(acc)


def f16_reference(bits: np.ndarray, x16: np.ndarray) -> np.ndarray:
    """tinyBLAS's F16 order: lane k % 16, then ``_mm512_reduce_add_ps``; a tail in order."""
    w = bits.view(np.float16).astype(F32)
    n, k = w.shape
    main = k - k % 16
    lanes = np.zeros((len(x16), n, 16), F32)
    for s in range(0, main, 16):
        lanes = lanes + x16[:, None, s : s + 16] * w[None, :, s : s + 16]
    h = lanes[..., :8] + lanes[..., 8:]
    q = h[..., :4] + h[..., 4:]
    total = (q[..., 0] + q[..., 2]) + (q[..., 1] + q[..., 3])
    for j in range(main, k):
        total = total + x16[:, None, j] * w[None, :, j]
    return total


# ---------------------------------------------------------------- random inputs


def random_q6k(rng, n: int, k: int) -> np.ndarray:
    """Random block bytes (every code and scale, -128 included), finite fp16 d of either sign."""
    raw = rng.integers(0, 256, size=n * k // 256 * 210, dtype=np.uint8)
    blocks = raw.reshape(-1, 210)
    blocks[:, 192] = 0x80  # scale -128
    blocks[:, 193] = 0x7F
    d = rng.uniform(-2e-3, 2e-3, size=len(blocks)).astype(np.float16)
    blocks[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return raw


def random_q8k(rng, t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    xq = rng.integers(-128, 128, size=(t, k)).astype(np.int8)
    xq[:, :3] = [-128, 127, -128]
    return xq, rng.uniform(1e-3, 2e-2, size=(t, k // 256)).astype(F32)


def rows(kernel, isa, *args, n_out: int, n_tok: int) -> np.ndarray:
    out = np.full((n_tok, n_out), np.nan, F32)
    kernel(isa, *args[:2], 0, n_out, *args[2:], out)
    return out


# ---------------------------------------------------------------- Q6_K


def test_numpy_q6k_unpacking_matches_the_formats_codec() -> None:
    rng = np.random.default_rng(1)
    raw = random_q6k(rng, 3, 512)
    codes, scales, d = q6k_fields(raw, 3, 512)
    values = np.repeat(np.repeat(d, 16, axis=1) * scales.astype(F32), 16, axis=1) * codes.astype(F32)
    np.testing.assert_array_equal(values, quants.dequantize(quants.Q6_K, raw, (3, 512)))


@pytest.mark.parametrize("path", PATHS)
def test_q6k_block_sums_are_exact(path: str) -> None:
    rng = np.random.default_rng(2)
    n, k, t = 5, 768, 3
    raw = random_q6k(rng, n, k)
    xq, _ = random_q8k(rng, t, k)
    got = np.zeros((t, n, k // 256), np.int32)
    hk.q6k_block_sums(simd.ISAS[path], raw, k, xq, hk.q8k_bsums(xq), got)
    np.testing.assert_array_equal(got, q6k_isums(raw, n, k, xq))


def test_q8k_bsums() -> None:
    xq = np.random.default_rng(3).integers(-128, 128, size=(2, 512)).astype(np.int8)
    want = xq.astype(np.int64).reshape(2, 32, 16).sum(axis=2)
    np.testing.assert_array_equal(hk.q8k_bsums(xq), want)


@pytest.mark.parametrize("n_tok", [1, 6])
def test_q6k_every_path_matches_the_documented_order(n_tok: int) -> None:
    """6 tokens: one 4-token tile plus two single tokens on the AVX paths."""
    rng = np.random.default_rng(4)
    n, k = 7, 512
    raw = random_q6k(rng, n, k)
    xq, xd = random_q8k(rng, n_tok, k)
    bsums = hk.q8k_bsums(xq)
    want = q6k_reference(raw, n, k, xq, xd)
    for path in PATHS:
        got = rows(hk.q6k_rows, simd.ISAS[path], raw, k, xq, xd, bsums, n_out=n, n_tok=n_tok)
        np.testing.assert_array_equal(got, want, err_msg=path)


def test_q6k_head_vs_reference_head_and_float64() -> None:
    rng = np.random.default_rng(5)
    n, k = 33, 512
    w = rng.standard_normal((n, k)).astype(F32)
    raw = quants.quantize(quants.Q6_K, w)
    x = rng.standard_normal((3, k)).astype(F32)
    head = hk.Q6KHead(raw, (n, k))
    got = head.matmul(x)
    ref = weights.dense_matrix(quants.Q6_K, raw, (n, k), lambda: quants.dequantize(quants.Q6_K, raw, (n, k)))
    xq, xd = activations.quantize_q8k(x)
    x_deq = xq.astype(np.float64) * np.repeat(xd, 256, axis=1)
    exact = x_deq @ quants.dequantize(quants.Q6_K, raw, (n, k)).astype(np.float64).T
    bound = 1e-5 * (np.abs(x_deq) @ np.abs(head.rows(np.arange(n))).T.astype(np.float64))
    assert np.all(np.abs(got - exact) <= bound)
    assert np.all(np.abs(got - ref.matmul(x)) <= 2 * bound)


# ---------------------------------------------------------------- Q8_0 and F16


@pytest.mark.parametrize("n_tok", [1, 3])
def test_q8_0_every_path_matches_llamas_order(n_tok: int) -> None:
    rng = np.random.default_rng(6)
    n, k = 9, 320
    raw = quants.quantize(quants.Q8_0, rng.standard_normal((n, k)).astype(F32))
    raw.reshape(-1, 34)[:, 2] = 0x80  # a weight of -128 (the file format allows it)
    xq, xd = activations.quantize_q8_0(rng.standard_normal((n_tok, k)).astype(F32))
    want = q8_0_reference(raw, n, k, xq, xd)
    for path in PATHS:
        got = rows(hk.q8_0_rows, simd.ISAS[path], raw, k, xq, xd, n_out=n, n_tok=n_tok)
        np.testing.assert_array_equal(got, want, err_msg=path)


@pytest.mark.parametrize("k", [256, 264])
def test_f16_every_path_matches_tinyblas_order(k: int) -> None:
    rng = np.random.default_rng(7)
    n, t = 11, 2
    bits = rng.standard_normal((n, k)).astype(np.float16).view(np.uint16)
    x16 = activations.round_to_f16(rng.standard_normal((t, k)).astype(F32))
    want = f16_reference(bits, x16)
    for path in PATHS:
        got = rows(hk.f16_rows, simd.ISAS[path], bits.reshape(-1), k, x16, n_out=n, n_tok=t)
        np.testing.assert_array_equal(got, want, err_msg=path)


@pytest.mark.parametrize("ggml_type", [quants.Q8_0, quants.F16])
def test_heads_vs_reference_heads(ggml_type: int) -> None:
    rng = np.random.default_rng(8)
    n, k = 21, 256
    w = rng.standard_normal((n, k)).astype(F32)
    raw = quants.quantize(ggml_type, w)
    x = rng.standard_normal((4, k)).astype(F32)
    got = hk.head_matrix(ggml_type, raw, (n, k)).matmul(x)
    deq = quants.dequantize(ggml_type, raw, (n, k))
    ref = weights.dense_matrix(ggml_type, raw, (n, k), lambda: deq).matmul(x)
    bound = 1e-5 * (np.abs(x) @ np.abs(deq).T)
    assert np.all(np.abs(got - ref) <= bound)


# ---------------------------------------------------------------- llama.cpp's numbers


def test_f16_head_reproduces_llamas_logits_from_its_final_norm() -> None:
    with GGUFFile(ORACLE / "tiny-tq2_0-f16.gguf") as g:
        t = g.tensors["token_embd.weight"]
        head = hk.head_matrix(t.ggml_type, t.raw, t.shape)
        x = np.load(ORACLE / "tiny-tq2_0-f16" / "prompt.batch.tensors" / "result_norm.npy")
        np.testing.assert_array_equal(
            head.matmul(x), np.load(ORACLE / "tiny-tq2_0-f16" / "prompt.batch.logits.npy")
        )


@pytest.mark.parametrize("name", ["tiny-tq1_0-q6k", "tiny-tq2_0-scaletensors-q8"])
def test_quantized_heads_reproduce_llamas_logits(name: str) -> None:
    """From the engine's final norm (bit-exact to llama.cpp's): every logit has llama.cpp's bits."""
    from ternary.engine.model import load_transformer
    from ternary.formats.model_file import open_model

    ids = [int(i) for i in (ORACLE / name / "prompt.batch.tokens.txt").read_text().split(",")]
    with open_model(ORACLE / f"{name}.gguf") as mf:
        model = load_transformer(mf, act_quant="q8k", n_ctx=len(ids))
    trace: dict[str, np.ndarray] = {}
    model.forward(ids, np.arange(len(ids)), np.zeros(len(ids), np.int32), trace=trace)
    with GGUFFile(ORACLE / f"{name}.gguf") as g:
        t = g.tensors["token_embd.weight"]
        head = hk.head_matrix(t.ggml_type, t.raw, t.shape)
        np.testing.assert_array_equal(
            head.matmul(trace["result_norm"]), np.load(ORACLE / name / "prompt.batch.logits.npy")
        )


# ---------------------------------------------------------------- wrappers and errors


@pytest.mark.parametrize("ggml_type", [quants.Q6_K, quants.Q8_0, quants.F16])
def test_rows_are_the_dequantized_rows(ggml_type: int) -> None:
    w = np.random.default_rng(9).standard_normal((6, 256)).astype(F32)
    raw = quants.quantize(ggml_type, w)
    head = hk.head_matrix(ggml_type, raw, (6, 256))
    np.testing.assert_array_equal(
        head.rows(np.array([4, 0, 4])), quants.dequantize(ggml_type, raw, (6, 256))[[4, 0, 4]]
    )
    with pytest.raises(ValueError, match="row ids"):
        head.rows(np.array([6]))


def test_bad_input_is_named() -> None:
    raw = quants.quantize(quants.Q6_K, np.ones((4, 256), F32))
    with pytest.raises(ValueError, match="no fast head kernel for TQ2_0"):
        hk.head_matrix(quants.TQ2_0, raw, (4, 256))
    with pytest.raises(ValueError, match="multiple of the block length 256"):
        hk.Q6KHead(raw, (8, 128))
    with pytest.raises(ValueError, match="expected 840 uint8 bytes"):
        hk.Q6KHead(raw[:-1], (4, 256))
    head = hk.Q6KHead(raw, (4, 256))
    with pytest.raises(ValueError, match=r"activations must be \[tokens, 256\]"):
        head.matmul(np.ones((2, 128), F32))
    with pytest.raises(ValueError, match="xq must be"):
        head.matmul_quantized(np.ones((1, 256), np.int16), np.ones((1, 1), F32))
    with pytest.raises(ValueError, match="out must be"):
        head.matmul_quantized(np.ones((1, 256), np.int8), np.ones((1, 1), F32), np.empty((1, 3), F32))
    q8 = hk.Q8_0Head(quants.quantize(quants.Q8_0, np.ones((4, 64), F32)), (4, 64))
    with pytest.raises(ValueError, match="-128"):
        q8.matmul_quantized(np.full((1, 64), -128, np.int8), np.ones((1, 2), F32))
    inf = np.full((2, 16), np.inf, np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="inf or NaN"):
        hk.F16Head(inf, (2, 16))
    with pytest.raises(ValueError, match="unknown kernel path"):
        hk.Q6KHead(raw, (4, 256), kernels="sse9")
