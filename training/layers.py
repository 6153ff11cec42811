"""Hand-written forward/backward pairs for each layer of the BitNet b1.58 transformer.

Every `*_forward` returns `(output, cache)` and the matching `*_backward` takes `(d_output, cache)` and
returns the input gradient(s) followed by parameter gradients. All array work goes through the backend `xp`
(see backend.py), so the same layer code runs on NumPy and on the CUDA backend.

BitLinear follows the BitNet b1.58 recipe (spec §8): absmean ternary weights and per-token absmax int8
activations in the forward, straight-through gradients in the backward: the rounding is treated as the
identity, so dX = dY·Q_w(W) and dW = dYᵀ·Q_a(X). With `ternary=False` both quantizers are skipped (float
reference runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # a backend array (numpy.ndarray on CPU)


# ------------------------------------------------------------------------------------------------ BitLinear


def bitlinear_forward(
    xp: ModuleType, x: Array, weights: Sequence[Array], ternary: bool, eps: float
) -> tuple[list[Array], tuple]:
    """y_i = Q_a(x) · Q_w(W_i)ᵀ for several weights [out_i, in] sharing one input x [N, in].

    The shared input is quantized once (q, k, v read the same normed activations; so do gate and up)."""
    xq = xp.quantize_activations(x) if ternary else x
    wqs = [xp.ternary_weight(w, eps) if ternary else w for w in weights]
    outs = [xp.matmul(xq, wq, trans_b=True) for wq in wqs]
    return outs, (xq, wqs)


def bitlinear_backward(xp: ModuleType, douts: Sequence[Array], cache: tuple) -> tuple[Array, list[Array]]:
    """(dx, [dW_i]) with straight-through estimators for both quantizers."""
    xq, wqs = cache
    dx = xp.matmul(douts[0], wqs[0])
    for dy, wq in zip(douts[1:], wqs[1:], strict=True):
        xp.add_(dx, xp.matmul(dy, wq))
    dws = [xp.matmul(dy, xq, trans_a=True) for dy in douts]
    return dx, dws


# -------------------------------------------------------------------------------------------------- RMSNorm


def rmsnorm_forward(xp: ModuleType, x: Array, w: Array, eps: float) -> tuple[Array, tuple]:
    """RMSNorm over the last axis (any leading shape; QK-norm uses it per head)."""
    y, rstd = xp.rmsnorm(x, w, eps)
    return y, (x, w, rstd)


def rmsnorm_backward(xp: ModuleType, dy: Array, cache: tuple) -> tuple[Array, Array]:
    x, w, rstd = cache
    return xp.rmsnorm_backward(dy, x, w, rstd)


# ----------------------------------------------------------------------------------------------------- RoPE


def rope_tables(n_pos: int, rope_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Host cos/sin tables [n_pos, rope_dim/2] for NEOX RoPE: θ_i(pos) = pos · base^(−2i/rope_dim)."""
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even, got {rope_dim}")
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def rope_forward(xp: ModuleType, x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [B, H, T, hd] at positions 0..T-1 (cos/sin already cut to T rows)."""
    return xp.rope(x, cos, sin)


def rope_backward(xp: ModuleType, dy: Array, cos: Array, sin: Array) -> Array:
    """The rotation is orthogonal, so its gradient is the inverse rotation."""
    return xp.rope(dy, cos, sin, inverse=True)


# ------------------------------------------------------------------------------------------------ attention


def attention_forward(xp: ModuleType, q: Array, k: Array, v: Array, softcap: float) -> tuple[Array, tuple]:
    """Causal GQA attention with 1/sqrt(head_dim) scaling and optional score soft-capping."""
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    out, aux = xp.attention(q, k, v, scale, softcap)
    return out, (q, k, v, aux, scale, softcap)


def attention_backward(xp: ModuleType, dout: Array, cache: tuple) -> tuple[Array, Array, Array]:
    q, k, v, aux, scale, softcap = cache
    return xp.attention_backward(dout, q, k, v, aux, scale, softcap)


# ------------------------------------------------------------------------------------------------------ FFN


def glu_forward(xp: ModuleType, g: Array, u: Array, act: str) -> tuple[Array, tuple]:
    """act(gate)·up, act = 'silu' (SwiGLU, upstream llama.cpp's bitnet) or 'relu2' (BitNet 2B4T)."""
    return xp.glu(g, u, act), (g, u, act)


def glu_backward(xp: ModuleType, dh: Array, cache: tuple) -> tuple[Array, Array]:
    g, u, act = cache
    return xp.glu_backward(dh, g, u, act)


# ---------------------------------------------------------------------------------------------- soft-capping


def softcap_forward(xp: ModuleType, x: Array, cap: float) -> tuple[Array, tuple]:
    """cap·tanh(x/cap) (Gemma-2 style logit capping); cap ≤ 0 means off (identity)."""
    if cap <= 0:
        return x, (None, cap)
    y = xp.softcap(x, cap)
    return y, (y, cap)


def softcap_backward(xp: ModuleType, dy: Array, cache: tuple) -> Array:
    y, cap = cache
    return dy if cap <= 0 else xp.softcap_backward(dy, y, cap)
