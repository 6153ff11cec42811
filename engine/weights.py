"""Weight layouts the forward pass multiplies with.

* ``TernaryMatrix``: the reference layout of a ternary linear: one int8 code in {-1, 0, +1} per weight
  (row-major, rows = outputs) and a float32 scale per block of ``block`` weights along the input. Simple and
  exact; the fast planar layout (``planar.py``) implements the same interface.
* ``PlanarQ8KMatrix``: the planar layout whose Q8_K matmul keeps llama.cpp's float order (``kernels_q8k``), so
  it gives the reference layout's bits; the engine's default.
* The token embedding / output head in the formats llama.cpp uses for it (F16, Q8_0, Q6_K, anything else as a
  float32 fallback), each multiplying with the activation format llama.cpp pairs it with, and able to hand out
  dequantized rows for the embedding lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from ternary.engine import activations, kernels, simd
from ternary.engine.kernels_q8k import lane_sums, q8k_matmul
from ternary.engine.planar import PlanarMatrix
from ternary.formats import quants


def _owned(a: np.ndarray, dtype: type) -> np.ndarray:
    """A writable, C-contiguous copy-if-needed (Numba compiles read-only arrays as a separate type)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


class TernaryMatrix:
    """Ternary weights ``W[n, k] = codes[n, k] · block_scales[n, k // block]``, one int8 code per weight."""

    def __init__(self, codes: np.ndarray, block_scales: np.ndarray, block: int) -> None:
        if codes.ndim != 2:
            raise ValueError(f"ternary codes must be 2-D [n_out, n_in], got shape {codes.shape}")
        n_out, n_in = codes.shape
        if block <= 0 or n_in % block:
            raise ValueError(f"block length {block} does not divide the input length {n_in}")
        if block_scales.shape != (n_out, n_in // block):
            raise ValueError(
                f"block_scales shape {block_scales.shape} does not match codes {codes.shape}, block {block}"
            )
        codes = _owned(codes, np.int8)
        if codes.size and int(np.abs(codes).max()) > 1:
            raise ValueError("ternary codes must be -1, 0 or +1")
        self.codes = codes
        self.block_scales = _owned(block_scales, np.float32)
        self.block = int(block)

    @classmethod
    def from_codes(cls, codes: np.ndarray, block_scales: np.ndarray, block: int) -> TernaryMatrix:
        return cls(codes, block_scales, block)

    @property
    def n_out(self) -> int:
        return self.codes.shape[0]

    @property
    def n_in(self) -> int:
        return self.codes.shape[1]

    def matmul(self, xq: np.ndarray, x_scale: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[t, n] = Σ_blocks (Σ codes·xq) · w_scale · x_scale`` (exact integer dots, float32 sum)."""
        n_tok = xq.shape[0]
        if xq.shape != (n_tok, self.n_in) or xq.dtype != np.int8:
            raise ValueError(f"activations must be int8[T, {self.n_in}], got {xq.dtype}{list(xq.shape)}")
        if out.shape != (n_tok, self.n_out) or out.dtype != np.float32:
            raise ValueError(f"out must be float32[{n_tok}, {self.n_out}], got {out.dtype}{list(out.shape)}")
        n_act_blocks = x_scale.shape[1] if x_scale.ndim == 2 else 0
        if x_scale.shape[0] != n_tok or n_act_blocks == 0 or self.n_in % n_act_blocks:
            raise ValueError(f"x_scale shape {x_scale.shape} does not fit activations {xq.shape}")
        x_block = self.n_in // n_act_blocks
        if x_block % self.block and self.block % x_block:
            raise ValueError(f"activation block {x_block} and weight block {self.block}: neither divides")
        if x_block == activations.Q8K_BLOCK and self.block % x_block == 0:
            # llama.cpp's TQ × Q8_K path: its float accumulation order decides near-tie roundings downstream
            corr = np.empty((n_tok, n_act_blocks, kernels.Q8K_LANES), dtype=np.int32)
            kernels.q8k_lane_corrections(xq, corr)
            kernels.ternary_q8k_matmul(self.codes, self.block_scales, self.block, xq, x_scale, corr, out)
        else:
            kernels.block_scaled_matmul(self.codes, self.block_scales, self.block, xq, x_scale, x_block, out)
        return out

    def dequantize(self) -> np.ndarray:
        """The float32 weights (for tests and debugging)."""
        scales = np.repeat(self.block_scales, self.block, axis=1)
        return self.codes.astype(np.float32) * scales


class PlanarQ8KMatrix(PlanarMatrix):
    """``PlanarMatrix`` whose product with 256-block activation scales follows llama.cpp's TQ × Q8_K order.

    The rule for choosing the order is ``TernaryMatrix``'s (activation blocks of 256 meet weight blocks of a
    multiple of 256), so both layouts give the same bits wherever the reference does; other activation
    scales (per token) take the integer-only planar kernels.
    """

    def matmul(self, xq: np.ndarray, x_scale: np.ndarray, out: np.ndarray) -> np.ndarray:
        n_blocks = self.n_in // activations.Q8K_BLOCK
        if not (isinstance(x_scale, np.ndarray) and x_scale.ndim == 2 and x_scale.shape[1] == n_blocks):
            return super().matmul(xq, x_scale, out)
        n_tok = x_scale.shape[0]
        if not isinstance(xq, np.ndarray) or xq.dtype != np.int8 or xq.shape != (n_tok, self.n_in):
            raise ValueError(f"activations must be int8[{n_tok}, {self.n_in}], got {_describe(xq)}")
        if x_scale.dtype != np.float32:
            raise ValueError(f"x_scale must be float32, got {x_scale.dtype}")
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n_tok, self.n_out):
            raise ValueError(f"output must be float32[{n_tok}, {self.n_out}], got {_describe(out)}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("output array must be C-contiguous and writable")
        xq, x_scale = np.ascontiguousarray(xq), np.ascontiguousarray(x_scale)
        sums = np.empty((n_tok, n_blocks, kernels.Q8K_LANES), dtype=np.int32)
        lane_sums(xq, sums)
        q8k_matmul(
            simd.ISAS[self.kernels],
            self.packed,
            self.group_scales,
            self.row_scales,
            self.group_uniform,
            self.n_out,
            xq,
            sums,
            x_scale,
            out,
        )
        return out


def _describe(a: object) -> str:
    return f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__


class DenseMatrix(Protocol):
    """An embedding / output-head matrix [n_out, n_in]: dequantized rows out, float activations in."""

    n_out: int
    n_in: int

    def rows(self, ids: np.ndarray) -> np.ndarray: ...

    def matmul(self, x: np.ndarray) -> np.ndarray: ...


class F32Matrix:
    """Float32 weights; the fallback for any type llama.cpp has no special head path for here."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = _owned(weights, np.float32)
        self.n_out, self.n_in = self.weights.shape

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.weights[ids]

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32) @ self.weights.T


Q6K_DECODE_VALUES = 1 << 22  # values dequantized at a time while recovering Q6_K codes

_F16_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=np.float32)


class F16Matrix:
    """Float16 weights kept as their bit patterns; activations rounded to F16, products summed in float32."""

    def __init__(self, bits: np.ndarray) -> None:
        bits = _owned(bits, np.uint16)
        if bits.size and np.any((bits >> 10) & 0x1F == 0x1F):
            raise ValueError("F16 matrix holds inf or NaN values")
        self.bits = bits
        self.n_out, self.n_in = bits.shape

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.bits[ids].view(np.float16).astype(np.float32)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        x16 = activations.round_to_f16(x)
        out = np.empty((x16.shape[0], self.n_out), dtype=np.float32)
        kernels.f16_matmul(x16, self.bits, _F16_POW2, out)
        return out


class Q8_0Matrix:
    """Q8_0 weights (int8 codes, a float16 scale per 32); activations quantized to Q8_0 as llama.cpp does."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray) -> None:
        self.codes = _owned(codes, np.int8)
        self.scales = _owned(scales, np.float32)
        self.n_out, self.n_in = self.codes.shape

    @classmethod
    def from_bytes(cls, raw: np.ndarray, shape: tuple[int, int]) -> Q8_0Matrix:
        n, k = shape
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n * k // 32, 34)
        scales = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(n, k // 32)
        codes = blocks[:, 2:].copy().view(np.int8).reshape(n, k)
        return cls(codes, scales)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        c = self.codes[ids].astype(np.float32)
        return c * np.repeat(self.scales[ids], 32, axis=1)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        xq, xd = activations.quantize_q8_0(x)
        out = np.empty((xq.shape[0], self.n_out), dtype=np.float32)
        kernels.block_scaled_matmul(self.codes, self.scales, 32, xq, xd, 32, out)
        return out


class Q6KMatrix:
    """Q6_K weights (6-bit codes, int8 scale per 16, float16 scale per 256); activations quantized to Q8_K."""

    def __init__(self, codes: np.ndarray, sub_scales: np.ndarray, d: np.ndarray) -> None:
        self.codes = _owned(codes, np.int8)
        self.sub_scales = _owned(sub_scales, np.int8)
        self.d = _owned(d, np.float32)
        self.n_out, self.n_in = self.codes.shape

    @classmethod
    def from_bytes(cls, raw: np.ndarray, shape: tuple[int, int]) -> Q6KMatrix:
        """Take the scales from the 210-byte blocks and recover the codes from the dequantized values.

        A Q6_K value is ``(d · scale) · code`` with |code| ≤ 32, so dividing by ``d · scale`` and rounding
        gives the code back exactly; this reuses the formats codec instead of repeating its bit unpacking.
        Rows are decoded a chunk at a time: a float32 copy of a 128256-row head would be 1.3 GB.
        """
        n, k = shape
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // 256, 210)
        sub_scales = blocks[:, :, 192:208].copy().view(np.int8).reshape(n, k // 16)
        d = blocks[:, :, 208:210].copy().view(np.float16).astype(np.float32).reshape(n, k // 256)
        codes = np.empty((n, k), dtype=np.int8)
        chunk = max(1, Q6K_DECODE_VALUES // k)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            vals = quants.dequantize(quants.Q6_K, blocks[r0:r1].reshape(-1), (r1 - r0, k))
            step = np.repeat(d[r0:r1], 16, axis=1) * sub_scales[r0:r1].astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(
                    step[:, :, None] != 0, np.rint(vals.reshape(r1 - r0, k // 16, 16) / step[:, :, None]), 0
                )
            if q.size and (q.min() < -32 or q.max() > 31):
                raise ValueError(
                    "Q6_K codes out of range [-32, 31]: block bytes and dequantized values disagree"
                )
            codes[r0:r1] = q.reshape(r1 - r0, k)
        return cls(codes, sub_scales, d)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        step = np.repeat(self.d[ids], 16, axis=1) * self.sub_scales[ids].astype(np.float32)
        return np.repeat(step, 16, axis=1) * self.codes[ids].astype(np.float32)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        xq, xd = activations.quantize_q8k(x)
        out = np.empty((xq.shape[0], self.n_out), dtype=np.float32)
        kernels.q6k_matmul(self.codes, self.sub_scales, self.d, xq, xd, out)
        return out


def dense_matrix(
    ggml_type: int, raw: np.ndarray, shape: tuple[int, int], dequantize: Callable[[], np.ndarray]
) -> DenseMatrix:
    """The embedding/head layout for a tensor of ``ggml_type`` (``dequantize`` is called only if needed)."""
    if len(shape) != 2:
        raise ValueError(f"an embedding/head matrix must be 2-D, got shape {shape}")
    if ggml_type == quants.F16:
        return F16Matrix(np.asarray(raw, dtype=np.uint8).view(np.uint16).reshape(shape))
    if ggml_type == quants.Q8_0:
        return Q8_0Matrix.from_bytes(raw, shape)
    if ggml_type == quants.Q6_K:
        return Q6KMatrix.from_bytes(raw, shape)
    return F32Matrix(dequantize())
