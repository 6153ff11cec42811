"""Block codecs against independent references: gguf-py's codecs, naive loops, the oracle's bytes."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
from conftest import ORACLE
from gguf import GGMLQuantizationType as T
from ternary.formats import quants
from ternary.formats.reader import GGUFFile

RNG = np.random.default_rng(1234)


def _ternary_rows(n: int, k: int, rng=RNG) -> np.ndarray:
    """W_t * gamma with one gamma per 256-block (the values BitNet stores)."""
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.float32)
    scales = rng.uniform(0.01, 2.0, size=(n, k // 256, 1)).astype(np.float32)
    return (codes.reshape(n, k // 256, 256) * scales).reshape(n, k)


def _hard_values(n: int, k: int) -> np.ndarray:
    """Random floats plus blocks that stress rounding: all zero, halves, a negative absmax, tiny values."""
    x = RNG.standard_normal((n, k)).astype(np.float32)
    x[0, :256] = 0
    x[1, :256] = np.tile(np.array([0.5, -0.5, 1.0, -1.0, 0.25, 1.5], np.float32), 43)[:256]
    x[2, :256] *= 1e-30
    x[3, 7] = -50.0
    return x


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0, T.Q8_0])
@pytest.mark.parametrize("make", [_ternary_rows, _hard_values])
def test_encoders_byte_identical_to_gguf_py(qtype, make):
    x = make(8, 512)
    ours = quants.quantize(int(qtype), x)
    ref = gguf.quants.quantize(x, qtype).reshape(-1)
    assert np.array_equal(ours, ref)


def test_float_encoders():
    x = _hard_values(4, 256)
    assert np.array_equal(quants.quantize(quants.F16, x), x.astype(np.float16).view(np.uint8).reshape(-1))
    assert np.array_equal(quants.quantize(quants.F32, x), x.view(np.uint8).reshape(-1))
    ref_bf16 = gguf.quants.quantize(x, T.BF16).reshape(-1).view(np.uint8)
    assert np.array_equal(quants.quantize(quants.BF16, x), ref_bf16)


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0, T.Q8_0, T.Q6_K, T.BF16, T.F16])
def test_decoders_match_gguf_py_on_arbitrary_bytes(qtype):
    """Random bytes reach bit patterns no quantizer writes; NaN/inf must propagate the same way."""
    block, size = quants.block_geometry(int(qtype))
    n_rows, k = 3, 512
    raw = RNG.integers(0, 256, size=n_rows * k // block * size, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # random fp16 scales include inf and NaN
        got = quants.dequantize(int(qtype), raw, (n_rows, k))
        ref = gguf.quants.dequantize(raw.reshape(n_rows, -1), qtype).reshape(n_rows, k)
    assert got.dtype == np.float32 and got.shape == (n_rows, k)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("qtype", [quants.TQ1_0, quants.TQ2_0])
def test_ternary_codes_are_exact(qtype):
    w = _ternary_rows(6, 768)
    raw = quants.quantize(qtype, w)
    codes, scales, block = quants.ternary_codes(qtype, raw, w.shape)
    assert block == 256 and codes.dtype == np.int8 and scales.shape == (6, 3)
    expected_scales = np.abs(w).reshape(6, 3, 256).max(axis=2).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(scales, expected_scales)
    np.testing.assert_array_equal(codes, np.sign(w).astype(np.int8))
    rebuilt = codes * np.repeat(scales, 256, axis=1)
    np.testing.assert_array_equal(rebuilt, quants.dequantize(qtype, raw, w.shape))


def test_tq2_code_three_is_not_ternary():
    raw = quants.quantize(quants.TQ2_0, _ternary_rows(1, 256))
    raw[0] |= 3  # weight 0 -> code 3 (+2)
    assert quants.dequantize(quants.TQ2_0, raw, (1, 256))[0, 0] > 0
    with pytest.raises(ValueError, match="code 3"):
        quants.ternary_codes(quants.TQ2_0, raw, (1, 256))


def _naive_i2s(codes: np.ndarray, scale: float) -> np.ndarray:
    """The layout spelled out weight by weight: block b, weight j -> byte 32b + j%32, shift 6 - 2*(j//32)."""
    flat = codes.reshape(-1) + 1
    out = np.zeros(flat.size // 4 + 32, dtype=np.uint8)
    for i, q in enumerate(flat):
        b, j = divmod(i, 128)
        out[32 * b + j % 32] |= int(q) << (6 - 2 * (j // 32))
    out[flat.size // 4 : flat.size // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
    return out


def test_i2s_layout_round_trip():
    codes = RNG.integers(-1, 2, size=(4, 256)).astype(np.int8)
    codes[0, 0] = 1  # the scale is max|w|: make sure it occurs
    gamma = np.float32(0.8125)
    raw = quants.quantize(quants.I2_S, codes.astype(np.float32) * gamma)
    assert raw.size == quants.tensor_nbytes(quants.I2_S, (4, 256)) == 4 * 256 // 4 + 32
    np.testing.assert_array_equal(raw, _naive_i2s(codes, gamma))
    got_codes, scales, block = quants.ternary_codes(quants.I2_S, raw, (4, 256))
    np.testing.assert_array_equal(got_codes, codes)
    assert block == 256 and scales.shape == (4, 1) and (scales == gamma).all()
    np.testing.assert_array_equal(quants.dequantize(quants.I2_S, raw, (4, 256)), codes * gamma)


def test_i2s_code_three_rejected():
    raw = _naive_i2s(np.zeros((1, 128), np.int8), 1.0)
    raw[5] = 0xFF
    with pytest.raises(ValueError, match="code 3"):
        quants.ternary_codes(quants.I2_S, raw, (1, 128))


def test_q6k_requantizes_the_oracle_tensor_to_a_fixed_point():
    """quantize(dequantize(llama-quantize's Q6_K)) reproduces every value exactly, and is then a fixed point.

    Raw bytes may differ from llama-quantize's in some blocks: its input was the F16 master, and for a
    dequantized block whose largest |value| is a +31 code the same values are re-expressed with the
    opposite sign of d/scales (make_qx_quants takes its sign from the signed max). Most blocks come back
    byte-identical.
    """
    with GGUFFile(ORACLE / "tiny-tq1_0-q6k.gguf") as f:
        t = f.tensors["token_embd.weight"]
        x = f.dequantize(t.name)
        oracle = t.raw.copy()
    once = quants.quantize(quants.Q6_K, x)
    np.testing.assert_array_equal(quants.dequantize(quants.Q6_K, once, x.shape), x)
    again = quants.quantize(quants.Q6_K, quants.dequantize(quants.Q6_K, once, x.shape))
    np.testing.assert_array_equal(again, once)
    same_blocks = (once.reshape(-1, 210) == oracle.reshape(-1, 210)).all(axis=1)
    assert same_blocks.mean() > 0.75


def test_q6k_quantizer_error_and_zero_block():
    x = _hard_values(4, 512)
    x[1:3] = RNG.standard_normal((2, 512))  # rows without outliers or underflow, for the error bound
    raw = quants.quantize(quants.Q6_K, x)
    y = quants.dequantize(quants.Q6_K, raw, x.shape)
    np.testing.assert_array_equal(y, gguf.quants.dequantize(raw.reshape(4, -1), T.Q6_K).reshape(4, 512))
    np.testing.assert_array_equal(y[0, :256], 0)
    assert np.array_equal(raw[:210], np.zeros(210, np.uint8))  # all-zero block: all-zero bytes
    groups = x[1:3].reshape(-1, 16)
    err = np.abs(y[1:3].reshape(-1, 16) - groups).max(axis=1)
    assert (err <= np.abs(groups).max(axis=1) / 31).all()  # within about one 6-bit step of each group
    assert np.abs(y[3] - x[3]).max() < 50 / 31  # a -50 outlier sets d; the rest stays within its step


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="multiple of 256"):
        quants.quantize(quants.TQ2_0, np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        quants.quantize(quants.TQ1_0, np.full((1, 256), np.nan, np.float32))
    with pytest.raises(ValueError, match="needs 66 bytes"):
        quants.dequantize(quants.TQ2_0, np.zeros(65, np.uint8), (1, 256))
    with pytest.raises(ValueError, match="not a ternary type"):
        quants.ternary_codes(quants.Q8_0, np.zeros(34 * 8, np.uint8), (1, 256))
    with pytest.raises(ValueError, match="unknown ggml type"):
        quants.tensor_nbytes(99, (4,))
    with pytest.raises(ValueError, match="no encoder"):
        quants.quantize(int(T.Q4_K), np.zeros((1, 256), np.float32))


def test_tensor_nbytes_uses_exact_integers():
    assert quants.tensor_nbytes(quants.TQ2_0, (6912, 2560)) == 6912 * 10 * 66
    assert quants.tensor_nbytes(quants.I2_S, (6912, 2560)) == 6912 * 2560 // 4 + 32
    huge = (2**40, 2**20)
    assert quants.tensor_nbytes(quants.F32, huge) == 2**62  # Python ints: no silent int64 wrap-around
