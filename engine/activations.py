"""int8 activation quantizers: what a ternary (or int8) matmul multiplies the weights with.

Two modes for the ternary linears:
* ``q8k``: llama.cpp's Q8_K, one scale per 256-element block, rounding half to even (matches its logits);
* ``per_token``: BitNet's absmax, one scale per token row (how the models were trained).
Each returns ``(xq int8[T, K], x_scale float32[T, K // block])`` with ``x ≈ xq · x_scale`` per block; the
block length is implied by ``x_scale.shape[1]``. The head's activation formats (F16, Q8_0) live here too.
"""

from __future__ import annotations

import numpy as np
from ternary.engine import kernels

ACT_QUANT_MODES = ("q8k", "per_token")
Q8K_BLOCK = 256
Q8_0_BLOCK = 32


def normalize_mode(mode: str) -> str:
    """Accept ``per-token`` (the CLI spelling) for ``per_token``; reject anything unknown, clearly."""
    norm = mode.replace("-", "_").lower()
    if norm not in ACT_QUANT_MODES:
        raise ValueError(f"unknown activation quantization {mode!r}: expected one of q8k, per_token")
    return norm


def _check_rows(x: np.ndarray, block: int, what: str) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D activation array [tokens, features], got shape {x.shape}")
    if x.shape[1] % block:
        raise ValueError(f"{what}: row length {x.shape[1]} is not a multiple of the block length {block}")
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_q8k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_K: per 256 values ``d = max/-127`` (signed largest-|x| element), ``q = min(127, rint(x/d))``."""
    x = _check_rows(x, Q8K_BLOCK, "q8k")
    xq = np.empty(x.shape, dtype=np.int8)
    d = np.empty((x.shape[0], x.shape[1] // Q8K_BLOCK), dtype=np.float32)
    kernels.quantize_q8k_rows(x, xq, d)
    return xq, d


def quantize_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BitNet absmax: ``q = clamp(rint(x · 127/max|x|), -128, 127)`` per row, scale ``max|x|/127``."""
    x = _check_rows(x, 1, "per_token")
    xq = np.empty(x.shape, dtype=np.int8)
    d = np.empty((x.shape[0], 1), dtype=np.float32)
    kernels.quantize_per_token_rows(x, xq, d)
    return xq, d


def quantize(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Quantize activation rows with ``mode`` (``q8k`` or ``per_token``)."""
    if normalize_mode(mode) == "q8k":
        return quantize_q8k(x)
    return quantize_per_token(x)


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 as llama.cpp's x86 ``quantize_row_q8_0``: per 32 values ``q = rint(x · 127/amax)``.

    The scale is fp16(amax/127). (The SIMD path rounds half to even and multiplies by ``127/amax``.)
    """
    x = _check_rows(x, Q8_0_BLOCK, "q8_0")
    t, k = x.shape
    blocks = x.reshape(t, k // Q8_0_BLOCK, Q8_0_BLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    xq = np.rint(blocks * inv).astype(np.int8).reshape(t, k)
    d = (amax[:, :, 0] / np.float32(127.0)).astype(np.float16).astype(np.float32)
    return xq, d


def round_to_f16(x: np.ndarray) -> np.ndarray:
    """Round float32 activations to float16 and back (round to nearest even), as an F16 matmul does."""
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
