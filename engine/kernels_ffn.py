"""The FFN gate ``act(gate) · up`` as a loop LLVM vectorises, bit-identical to ``kernels.gated_ffn``.

``kernels.ggml_expf`` reproduces ggml's vector ``expf`` with a branch and ``2.0 ** n``, which keeps the loop
scalar (~13 ns per element: 40 ms of a 125M model's 128-token prompt). Here the same FMAs run branch-free and
the final ``scalef(j, n)`` (``j · 2^n`` rounded once) multiplies the float64 ``j`` by an exact power of two
built from its exponent bits (``|n| > 192`` selects 0 or inf, as ggml's blend does); the float32 conversion
is the one rounding. The result equals ``kernels.gated_ffn`` bit for bit (tests compare them over the
whole float range).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from ternary.engine.kernels import (
    _EXP_C1,
    _EXP_C2,
    _EXP_C3,
    _EXP_C4,
    _EXP_C5,
    _EXP_INV_LN2,
    _EXP_LN2_HI,
    _EXP_LN2_LO,
    _EXP_SHIFT,
    fma_f32,
)

EXP_LIMIT = 192  # ggml: |n| > 192 gives 0 (n < 0) or inf (n > 0)


@intrinsic
def pow2_f64(typingctx, k):
    """``2.0 ** k`` as float64 for an int32 ``k`` in [-1022, 1023], built from its exponent bits."""
    if k != types.int32:
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        biased = builder.add(builder.sext(args[0], i64), ir.Constant(i64, 1023))
        return builder.bitcast(builder.shl(biased, ir.Constant(i64, 52)), ir.DoubleType())

    return types.float64(types.int32), codegen


@njit(cache=True, inline="always")
def expf(x):
    """``kernels.ggml_expf``'s value, branch-free (vectorisable)."""
    n = fma_f32(x, _EXP_INV_LN2, _EXP_SHIFT) - _EXP_SHIFT
    b = fma_f32(-n, _EXP_LN2_LO, fma_f32(-n, _EXP_LN2_HI, x))
    u = b * b
    hi = fma_f32(_EXP_C5, b, _EXP_C4)
    lo = fma_f32(_EXP_C3, b, _EXP_C2)
    j = fma_f32(fma_f32(hi, u, lo), u, fma_f32(_EXP_C1, b, np.float32(1.0)))
    limit = np.float32(EXP_LIMIT + 1)
    k = np.int32(min(max(n, -limit), limit))  # clamped first: a float beyond int32 has no defined conversion
    r = np.float32(np.float64(j) * pow2_f64(k))
    # beyond the limit j may be NaN (b = x − n·ln2 of huge x): ggml's blend ignores it, so must we
    r = np.float32(np.inf) if k > EXP_LIMIT else r
    return np.float32(0.0) if k < -EXP_LIMIT else r


@njit(cache=True, error_model="numpy")  # a division that may not raise: the loop vectorises
def gate_rows(gate, up, relu2, out, n0, n1):
    """``out = act(gate) · up`` on columns [n0, n1) of C-contiguous float32[T, n] arrays: SiLU
    ``g / (1 + expf(-g))`` with ggml's ``expf``, or ReLU²."""
    for t in range(gate.shape[0]):
        g_row = gate[t, n0:n1]
        u_row = up[t, n0:n1]
        o_row = out[t, n0:n1]
        if relu2:
            for j in range(n1 - n0):
                r = max(g_row[j], np.float32(0.0))
                o_row[j] = (r * r) * u_row[j]
        else:
            for j in range(n1 - n0):
                g = g_row[j]
                o_row[j] = (g / (np.float32(1.0) + expf(np.float32(0.0) - g))) * u_row[j]
