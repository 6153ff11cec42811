"""Reference Numba kernels: clear loops, exact integer dot products, parallel over output rows.

Every kernel is a top-level ``@njit(cache=True)`` function (one in a closure misses the on-disk cache).
Float arithmetic follows llama.cpp's CPU path where that matters for matching its numbers: float32 products
and sums, a float64 sum of squares in RMSNorm and of the exponentials in softmax, Q8_K rounding half to even.
Constants are spelled ``np.float32(...)`` on purpose: a bare float literal would promote the math to float64.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def fma_f32(typingctx, a, b, c):
    """``a·b + c`` in float32 with ONE rounding (``llvm.fma.f32``), like the FMAs ggml's kernels use."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


# ---------------------------------------------------------------- activation quantizers


@njit(cache=True)
def quantize_q8k_rows(x, q, d):
    """llama.cpp's ``quantize_row_q8_K_ref`` on every row of ``x`` float32[T, K] (K % 256 == 0).

    Per 256-block: ``max`` is the first element with the largest |x| (keeping its sign),
    ``iscale = -127/max``, ``q = min(127, round_half_even(iscale*x))``, ``d = 1/iscale``; an all-zero block
    gets d = 0, q = 0.
    """
    n_tok, k = x.shape
    for t in range(n_tok):
        for b in range(k // 256):
            k0 = b * 256
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(k0, k0 + 256):
                a = abs(x[t, j])
                if a > amax:
                    amax = a
                    vmax = x[t, j]
            if amax == np.float32(0.0):
                d[t, b] = np.float32(0.0)
                for j in range(k0, k0 + 256):
                    q[t, j] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            for j in range(k0, k0 + 256):
                # the exact product, rounded once: llama.cpp's build fuses iscale*x + 1.5*2^23 into one FMA
                v = np.rint(np.float64(iscale) * np.float64(x[t, j]))
                q[t, j] = min(127, int(v))
            d[t, b] = np.float32(1.0) / iscale


@njit(cache=True)
def quantize_per_token_rows(x, q, d):
    """BitNet's absmax quantizer, one scale per row: ``s = 127/max|x|``, ``q = clamp(round(x*s), -128, 127)``.

    ``d[t, 0] = 1/s`` so that ``x ≈ q*d`` as in every other quantizer here; an all-zero row gets d = 0, q = 0.
    """
    n_tok, k = x.shape
    for t in range(n_tok):
        amax = np.float32(0.0)
        for j in range(k):
            amax = max(amax, abs(x[t, j]))
        if amax == np.float32(0.0):
            d[t, 0] = np.float32(0.0)
            for j in range(k):
                q[t, j] = 0
            continue
        s = np.float32(127.0) / amax
        for j in range(k):
            v = int(np.rint(x[t, j] * s))
            q[t, j] = min(127, max(-128, v))
        d[t, 0] = np.float32(1.0) / s


# ---------------------------------------------------------------- integer matmuls


@njit(cache=True)
def int8_dot(a, b):
    """Exact ``Σ a·b`` of two int8 vectors in int32 (pass row slices: LLVM vectorizes this loop)."""
    total = np.int32(0)
    for j in range(a.shape[0]):
        total += np.int32(a[j]) * np.int32(b[j])
    return total


@njit(parallel=True, cache=True)
def block_scaled_matmul(codes, w_scale, w_block, xq, x_scale, x_block, out):
    """``out[t, n] = Σ_segments (Σ codes[n,k]·xq[t,k]) · (w_scale · x_scale)``, summed in float32.

    ``codes`` int8[N, K] (ternary or any int8 codes), ``w_scale`` float32[N, K // w_block], ``xq`` int8[T, K],
    ``x_scale`` float32[T, K // x_block]. A segment is ``min(w_block, x_block)`` long (one block divides the
    other); inside it the dot product is an exact int32 sum. Parallel over output rows.
    """
    n_out, k = codes.shape
    n_tok = xq.shape[0]
    seg = min(w_block, x_block)
    for n in prange(n_out):
        for t in range(n_tok):
            acc = np.float32(0.0)
            for k0 in range(0, k, seg):
                isum = int8_dot(codes[n, k0 : k0 + seg], xq[t, k0 : k0 + seg])
                scale = w_scale[n, k0 // w_block] * x_scale[t, k0 // x_block]
                acc += np.float32(isum) * scale
            out[t, n] = acc


Q8K_LANES = 8  # float accumulators of ggml's x86 TQ kernels: one per int32 lane of a 256-bit register


@njit(cache=True)
def q8k_lane_corrections(xq, corr):
    """The weight-independent part of each int32 lane of ggml's x86 TQ1_0/TQ2_0 × Q8_K dot product.

    The kernels multiply the UNSIGNED trits ``code + 1`` with the activations and subtract ``bsums`` to undo
    the +1; lane j collects the products of the elements e with ``(e % 32) // 4 == j`` but subtracts the bsums
    of the elements ``32j .. 32j+31``. So ``lane_j = Σ_{e ∈ S_j} code·y + corr_j`` with
    ``corr_j = Σ_{e ∈ S_j} y − Σ_{32j ≤ e < 32j+32} y`` (exact int32; the 8 corrections sum to 0).
    ``xq`` int8[T, K] (K % 256 == 0); ``corr`` int32[T, K // 256, 8].
    """
    n_tok, k = xq.shape
    for t in range(n_tok):
        for b in range(k // 256):
            for j in range(Q8K_LANES):
                corr[t, b, j] = 0
            for e in range(256):
                y = np.int32(xq[t, b * 256 + e])
                corr[t, b, (e % 32) // 4] += y
                corr[t, b, e // 32] -= y


@njit(parallel=True, cache=True)
def ternary_q8k_matmul(codes, w_scale, w_block, xq, x_scale, corr, out):
    """Ternary weights × Q8_K activations, with the float arithmetic in ggml's x86 TQ kernels' order.

    ``vec_dot_tq{1,2}_0_q8_K`` (AVX2, also what AVX-512 builds run) keeps 8 int32 lanes per 256-block (see
    ``q8k_lane_corrections``), converts each lane to float and folds it into its own float accumulator with an
    FMA, ``acc_j = fma(lane_j, d_x·d_w, acc_j)``, block after block; then ``hsum_float_8`` adds
    ``((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))``. Rounding the 8 lane products separately instead of the
    block total moves the result by an ulp now and then — enough to move a Q8_K rounding near a tie in the
    next layer to the other side, which is why the order is reproduced here. Integer parts stay exact.
    ``codes`` int8[N, K], ``w_scale`` float32[N, K // w_block] (w_block % 256 == 0), ``xq`` int8[T, K],
    ``x_scale`` float32[T, K // 256], ``corr`` from ``q8k_lane_corrections``. Parallel over output rows.
    """
    n_out, k = codes.shape
    n_tok = xq.shape[0]
    for n in prange(n_out):
        part = np.empty(32, dtype=np.int32)
        acc = np.empty(Q8K_LANES, dtype=np.float32)
        for t in range(n_tok):
            acc[:] = np.float32(0.0)
            for b in range(k // 256):
                k0 = b * 256
                part[:] = 0
                for c in range(8):
                    e0 = k0 + 32 * c
                    for i in range(32):
                        part[i] += np.int32(codes[n, e0 + i]) * np.int32(xq[t, e0 + i])
                d = x_scale[t, b] * w_scale[n, k0 // w_block]
                for j in range(Q8K_LANES):
                    lane = part[4 * j] + part[4 * j + 1] + part[4 * j + 2] + part[4 * j + 3] + corr[t, b, j]
                    acc[j] = fma_f32(np.float32(lane), d, acc[j])
            out[t, n] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))


@njit(parallel=True, cache=True)
def q6k_matmul(codes, sub_scales, d, xq, x_scale, out):
    """Q6_K weights × Q8_K activations as llama.cpp's ``vec_dot_q6_K_q8_K``.

    ``codes`` int8[N, K] in [-32, 31], ``sub_scales`` int8[N, K/16], ``d`` float32[N, K/256]; per 256-block
    the integer ``Σ_j sub_scale_j · Σ_16 code·xq`` is exact and is multiplied by ``d_w·d_x`` in float32.
    """
    n_out, k = codes.shape
    n_tok = xq.shape[0]
    for n in prange(n_out):
        for t in range(n_tok):
            acc = np.float32(0.0)
            for b in range(k // 256):
                isum = np.int32(0)
                for g in range(16):
                    k0 = b * 256 + g * 16
                    gsum = int8_dot(codes[n, k0 : k0 + 16], xq[t, k0 : k0 + 16])
                    isum += np.int32(sub_scales[n, b * 16 + g]) * gsum
                acc += (d[n, b] * x_scale[t, b]) * np.float32(isum)
            out[t, n] = acc


@njit(cache=True)
def _f16_bits_to_f32(h, pow2):
    """IEEE half bits → float32 for finite values (``pow2[e] = 2**(max(e, 1) - 25)``): exact, branch-light."""
    e = (h >> 10) & 0x1F
    m = np.int32(h & 0x3FF)
    if e != 0:
        m += 1024
    v = np.float32(m) * pow2[e]
    return -v if h & 0x8000 else v


@njit(parallel=True, cache=True)
def f16_matmul(x, w_bits, pow2, out):
    """``out[t, n] = Σ_k x[t,k]·w[n,k]`` with ``w`` given as float16 bit patterns (uint16[N, K]).

    ``x`` float32[T, K] (the caller rounds it to float16 first, as llama.cpp does); float32 accumulation.
    """
    n_out, k = w_bits.shape
    n_tok = x.shape[0]
    for n in prange(n_out):
        for t in range(n_tok):
            acc = np.float32(0.0)
            for j in range(k):
                acc += x[t, j] * _f16_bits_to_f32(w_bits[n, j], pow2)
            out[t, n] = acc


# ---------------------------------------------------------------- norms, RoPE, FFN gate


@njit(cache=True)
def rms_norm_rows(x, weight, eps, out):
    """ggml's ``rms_norm`` then ``mul``: ``y = x · (1/sqrt(mean(x²) + eps)) · weight`` (Σx² in float64)."""
    n_tok, k = x.shape
    for t in range(n_tok):
        ss = 0.0
        for j in range(k):
            sq = x[t, j] * x[t, j]
            ss += np.float64(sq)
        mean = np.float32(ss / k)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
        for j in range(k):
            out[t, j] = (x[t, j] * scale) * weight[j]


@njit(cache=True)
def rope_cache(positions, theta_scale, cos, sin):
    """cos/sin float32[T, n_rot/2] of ``theta_i = pos · theta_scale^i``, computed as ggml's rope cache.

    ``theta`` starts at the float32 position and is multiplied by ``theta_scale`` in float32 once per pair;
    float32 ``cos``/``sin`` compile to libm's ``cosf``/``sinf``, the functions llama.cpp calls.
    """
    for t in range(positions.shape[0]):
        theta = np.float32(positions[t])
        for i in range(cos.shape[1]):
            cos[t, i] = np.cos(theta)
            sin[t, i] = np.sin(theta)
            theta = theta * theta_scale


# ggml_v_expf's constants, spelled as in its source (hex floats, all exact in float32)
_EXP_SHIFT = np.float32(float.fromhex("0x1.8p23"))
_EXP_INV_LN2 = np.float32(float.fromhex("0x1.715476p+0"))
_EXP_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_EXP_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))
_EXP_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_EXP_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_EXP_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_EXP_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))


@njit(cache=True)
def ggml_expf(x):
    """float32 ``exp(x)`` exactly as ggml's vectorised ``ggml_v_expf`` (the AVX-512 build of the oracle).

    That is not libm's ``expf`` but ARM's optimized-routines approximation (~1.5 ulp off):
    ``n = round(x/ln2)`` via the 1.5·2^23 trick, a two-constant reduction ``b = x − n·ln2``, a degree-5
    polynomial in FMAs, scaled by ``2^n``; |n| > 192 gives 0 or inf. The FMA nesting below is the intrinsic
    code's, operation for operation.
    """
    n = fma_f32(x, _EXP_INV_LN2, _EXP_SHIFT) - _EXP_SHIFT
    b = fma_f32(-n, _EXP_LN2_LO, fma_f32(-n, _EXP_LN2_HI, x))
    if abs(n) > np.float32(192.0):
        return np.float32(np.inf) if n > np.float32(0.0) else np.float32(0.0)
    u = b * b
    hi = fma_f32(_EXP_C5, b, _EXP_C4)
    lo = fma_f32(_EXP_C3, b, _EXP_C2)
    j = fma_f32(fma_f32(hi, u, lo), u, fma_f32(_EXP_C1, b, np.float32(1.0)))
    return np.float32(np.float64(j) * 2.0 ** int(n))  # scalef: j·2^n, rounded once


@njit(cache=True)
def gated_ffn(gate, up, relu2, out):
    """``out = act(gate) · up``, act = SiLU (``g / (1 + ggml_expf(-g))``, ggml's vector SiLU) or ReLU²."""
    n_tok, k = gate.shape
    for t in range(n_tok):
        for j in range(k):
            g = gate[t, j]
            if relu2:
                r = max(g, np.float32(0.0))
                a = r * r
            else:
                a = g / (np.float32(1.0) + ggml_expf(np.float32(0.0) - g))
            out[t, j] = a * up[t, j]
