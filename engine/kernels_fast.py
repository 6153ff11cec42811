"""Ternary GEMV/GEMM kernels on the planar layout (``planar.py``), one driver for every ISA.

Entry points, callable from Python or from other ``@njit`` code (plain arrays plus an ISA marker from
``simd.ISAS``):

* ``activation_sums(xq) -> (block_sums int64[T, K/256], token_sums int64[T])``: Σ xq per block and per token.
  The layout stores codes as w+1 ∈ {0,1,2}; subtracting these sums turns Σ code·x into Σ w·x. Matmuls that
  share an input (Q/K/V, gate/up) can compute them once.
* ``planar_matmul_summed(isa, packed, group_scales, row_scales, group_uniform, n_out, xq, block_sums,
  token_sums, x_scale, out)``: parallel over chunks of row groups (each thread reads one sequential stream of
  weights).
* ``planar_matmul(...)``: the same, computing the sums itself.
* ``planar_matmul_groups(isa, g0, g1, ...)``: row groups [g0, g1) only, serial: for jitted callers that run
  their own ``prange``. Call the two parallel drivers from Python or from jitted code that is not cached:
  Numba segfaults loading a cached function that calls a parallel function loaded from the cache (numba
  #8578).

The float result is defined independently of the ISA, so every path gives bit-identical output: ``out[t, n] =
0 + Σ_seg float32(Σ_seg w·x) · (w_scale · x_scale)`` summed in float32 in segment order, where a segment is
the whole row when the row's group has one scale (``group_uniform``) and the activations have one scale per
token (``x_scale`` with one column): an integer-only loop and one float multiply per output. Otherwise
segments are the 256-weight blocks, with the block's own weight scale and its activation block's scale.

Inputs are not validated here (``PlanarMatrix.matmul`` does it): ``xq`` int8[T, K] C-contiguous, K % 256 == 0,
``x_scale`` float32[T, C] C-contiguous with (K/256) % C == 0, ``out`` float32[T, n_out].

The per-tile primitives (``acc_zero``, ``acc_dot``, ``facc_zero``, ``facc_add``, ``facc_values``) resolve at
compile time: SIMD markers map to the intrinsics of ``simd.py``, the generic marker to plain Numba functions
on tuples (one token, scalar code that LLVM may auto-vectorize).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload
from ternary.engine.simd import (
    BLOCK,
    ROW_BLOCK_BYTES,
    ROW_GROUP,
    IsaType,
    prefetch_bytes,
    single_token,
    tile_acc_dot,
    tile_acc_zero,
    tile_facc_add,
    tile_facc_values,
    tile_facc_zero,
    tile_tokens,
)

GROUP_BLOCK_BYTES = ROW_GROUP * ROW_BLOCK_BYTES  # one block of one row group: 4 rows × 64 bytes
# Software prefetch this far ahead of the weight stream (measured on Zen: 1 thread GEMV from DRAM goes from
# ~65% of the streaming bandwidth without prefetch to ~95% at 8 KiB; 4–32 KiB are all within a few %).
PREFETCH_BYTES = 8192
# Prefill: a thread keeps this many bytes of weights hot in L2 while every token tile passes over them.
GEMM_CHUNK_BYTES = 96 * 1024
# Decode: weights per parallel work item; enough to amortise its set-up, small enough to balance threads.
DECODE_CHUNK_BYTES = 64 * 1024


@njit(cache=True)
def activation_sums(xq):
    """Σ xq over every 256-block and over every token (int64)."""
    n_tok, k = xq.shape
    nb = k // BLOCK
    block_sums = np.empty((n_tok, nb), dtype=np.int64)
    token_sums = np.empty(n_tok, dtype=np.int64)
    for t in range(n_tok):
        total = 0
        for b in range(nb):
            block = xq[t, b * BLOCK : (b + 1) * BLOCK]
            s = np.int32(0)
            for j in range(BLOCK):
                s += np.int32(block[j])
            block_sums[t, b] = s
            total += s
        token_sums[t] = total
    return block_sums, token_sums


# ---------------------------------------------------------------- generic path: plain Numba, one token


@njit(cache=True, inline="always")
def _byte_dot(byte, x0, x1, x2, x3):
    """Σ code·x over the four 2-bit codes of one packed byte (code s at bits 2s meets x_s), in int32."""
    b = np.int32(byte)
    return (b & 3) * x0 + ((b >> 2) & 3) * x1 + ((b >> 4) & 3) * x2 + (b >> 6) * x3


@njit(cache=True)
def generic_acc_dot(acc, packed, offset, x, x_offset):
    """``acc`` + Σ code·x for the 4 rows of the group-block at ``packed[offset:]`` (activations at
    ``x[x_offset:]``).

    Slices first, then loop indices from ``range``: LLVM sees non-negative indices (no wraparound fix-ups)
    and vectorizes the loop; indexing with ``offset + j`` directly runs 5× slower.
    """
    w = packed[offset : offset + GROUP_BLOCK_BYTES]
    xb = x[x_offset : x_offset + BLOCK]
    s0 = s1 = s2 = s3 = np.int32(0)
    for j in range(ROW_BLOCK_BYTES):
        x0 = np.int32(xb[j])
        x1 = np.int32(xb[64 + j])
        x2 = np.int32(xb[128 + j])
        x3 = np.int32(xb[192 + j])
        s0 += _byte_dot(w[j], x0, x1, x2, x3)
        s1 += _byte_dot(w[64 + j], x0, x1, x2, x3)
        s2 += _byte_dot(w[128 + j], x0, x1, x2, x3)
        s3 += _byte_dot(w[192 + j], x0, x1, x2, x3)
    return acc[0] + s0, acc[1] + s1, acc[2] + s2, acc[3] + s3


@njit(cache=True)
def generic_facc_add(facc, acc, w, w_offset, xs, xs_offset, xsum, xsum_offset):
    """``facc[r] + float32(acc[r] − xsum) · (w[r] · xs)`` per row (scalar twin of ``tile_facc_add``)."""
    x_scale = xs[xs_offset]
    x_sum = xsum[xsum_offset]
    f0, f1, f2, f3 = facc
    f0 += np.float32(acc[0] - x_sum) * (w[w_offset] * x_scale)
    f1 += np.float32(acc[1] - x_sum) * (w[w_offset + 1] * x_scale)
    f2 += np.float32(acc[2] - x_sum) * (w[w_offset + 2] * x_scale)
    f3 += np.float32(acc[3] - x_sum) * (w[w_offset + 3] * x_scale)
    return f0, f1, f2, f3


# ---------------------------------------------------------------- per-tile primitives, resolved by ISA
# Each stub is only callable from jitted code; its overload returns a one-line trampoline into a top-level
# kernel or intrinsic (no kernel body lives in a closure, so the on-disk cache keeps working).


def acc_zero(isa):
    """A zeroed integer tile accumulator."""
    raise NotImplementedError("only callable from jitted code")


def acc_dot(isa, acc, packed, offset, x, x_offset, x_stride):
    """``acc`` + Σ code·x of one group-block; token j's activations at ``x[x_offset + j·x_stride:]``."""
    raise NotImplementedError("only callable from jitted code")


def facc_zero(isa):
    """Zeroed float32 tile outputs."""
    raise NotImplementedError("only callable from jitted code")


def facc_add(isa, facc, acc, w, w_offset, xs, xs_offset, xs_stride, xsum, xsum_offset, xsum_stride):
    """``facc[r, j] += float32(acc[r, j] − xsum[j]) · (w[r] · xs[j])`` (see ``simd.tile_facc_add``)."""
    raise NotImplementedError("only callable from jitted code")


def facc_values(isa, facc):
    """The tile outputs as a float32 tuple, index ``r·tokens + j``."""
    raise NotImplementedError("only callable from jitted code")


def _generic(isa) -> bool:
    return isinstance(isa, IsaType) and isa.width == 0


@overload(acc_zero, inline="always")
def _acc_zero(isa):
    if _generic(isa):
        return lambda isa: (np.int64(0), np.int64(0), np.int64(0), np.int64(0))
    return lambda isa: tile_acc_zero(isa)


@overload(acc_dot, inline="always")
def _acc_dot(isa, acc, packed, offset, x, x_offset, x_stride):
    if _generic(isa):
        return lambda isa, acc, packed, offset, x, x_offset, x_stride: generic_acc_dot(
            acc, packed, offset, x, x_offset
        )
    return lambda isa, acc, packed, offset, x, x_offset, x_stride: tile_acc_dot(
        isa, acc, packed, offset, x, x_offset, x_stride
    )


@overload(facc_zero, inline="always")
def _facc_zero(isa):
    if _generic(isa):
        return lambda isa: (np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0))
    return lambda isa: tile_facc_zero(isa)


@overload(facc_add, inline="always")
def _facc_add(isa, facc, acc, w, w_offset, xs, xs_offset, xs_stride, xsum, xsum_offset, xsum_stride):
    if _generic(isa):
        return lambda isa, facc, acc, w, w_offset, xs, xs_offset, xs_stride, xsum, xsum_offset, xsum_stride: (
            generic_facc_add(facc, acc, w, w_offset, xs, xs_offset, xsum, xsum_offset)
        )
    return lambda isa, facc, acc, w, w_offset, xs, xs_offset, xs_stride, xsum, xsum_offset, xsum_stride: (
        tile_facc_add(facc, acc, w, w_offset, xs, xs_offset, xs_stride, xsum, xsum_offset, xsum_stride)
    )


@overload(facc_values, inline="always")
def _facc_values(isa, facc):
    if _generic(isa):
        return lambda isa, facc: facc
    return lambda isa, facc: tile_facc_values(facc)


# ---------------------------------------------------------------- drivers


@njit(cache=True, inline="always")
def _tile_outputs(
    isa, g, t0, packed, group_scales, row_scales, group_uniform, n_out, x, k, block_sums, token_sums, x_scale,
    n_cols, out,
):  # fmt: skip
    """All outputs of row group ``g`` × the tile's tokens starting at ``t0`` (flat arrays, see the driver)."""
    tokens = tile_tokens(isa)
    n_blocks = k // BLOCK
    group_offset = g * n_blocks * GROUP_BLOCK_BYTES
    n0 = g * ROW_GROUP
    facc = facc_zero(isa)
    if group_uniform[g] != 0 and n_cols == 1:
        acc = acc_zero(isa)
        for b in range(n_blocks):
            offset = group_offset + b * GROUP_BLOCK_BYTES
            prefetch_bytes(packed, offset + PREFETCH_BYTES, GROUP_BLOCK_BYTES)
            acc = acc_dot(isa, acc, packed, offset, x, t0 * k + b * BLOCK, k)
        facc = facc_add(isa, facc, acc, row_scales, n0, x_scale, t0, 1, token_sums, t0, 1)
    else:
        blocks_per_col = n_blocks // n_cols
        for b in range(n_blocks):
            offset = group_offset + b * GROUP_BLOCK_BYTES
            prefetch_bytes(packed, offset + PREFETCH_BYTES, GROUP_BLOCK_BYTES)
            acc = acc_dot(isa, acc_zero(isa), packed, offset, x, t0 * k + b * BLOCK, k)
            xs_offset = t0 * n_cols + b // blocks_per_col
            xsum_offset = t0 * n_blocks + b
            # (two calls, not one with the array chosen in a variable: reassigning an array variable in the
            # loop costs a reference-count call per block and spills the accumulators around it)
            if group_uniform[g] != 0:
                facc = facc_add(
                    isa, facc, acc, row_scales, n0, x_scale, xs_offset, n_cols,
                    block_sums, xsum_offset, n_blocks,
                )  # fmt: skip
            else:
                facc = facc_add(
                    isa, facc, acc, group_scales, (g * n_blocks + b) * ROW_GROUP, x_scale, xs_offset, n_cols,
                    block_sums, xsum_offset, n_blocks,
                )  # fmt: skip
    values = facc_values(isa, facc)
    for r in range(ROW_GROUP):
        n = n0 + r
        if n < n_out:
            for j in range(tokens):
                out[t0 + j, n] = values[r * tokens + j]


@njit(cache=True)
def planar_chunk_groups(isa, n_tok, k):
    """Row groups per parallel work item: ``DECODE_CHUNK_BYTES`` of weights for decode (each thread still
    reads one sequential stream), ``GEMM_CHUNK_BYTES`` when token tiles reuse the weights (they stay in L2
    while every tile passes)."""
    group_bytes = (k // BLOCK) * GROUP_BLOCK_BYTES
    if n_tok >= tile_tokens(isa):
        return max(1, GEMM_CHUNK_BYTES // group_bytes)
    return max(1, DECODE_CHUNK_BYTES // group_bytes)


@njit(cache=True, inline="always")
def _groups_flat(
    isa, g0, g1, packed, scales, row_scales, group_uniform, n_out, x, n_tok, k, sums, token_sums, xs, n_cols,
    out,
):  # fmt: skip
    """``planar_matmul_groups`` on flat views (made once per call by the drivers, not once per work item)."""
    tokens = tile_tokens(isa)
    one = single_token(isa)
    t_full = n_tok - n_tok % tokens
    for t0 in range(0, t_full, tokens):
        for g in range(g0, g1):
            _tile_outputs(
                isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, token_sums, xs,
                n_cols, out,
            )  # fmt: skip
    for t0 in range(t_full, n_tok):
        for g in range(g0, g1):
            _tile_outputs(
                one, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, token_sums, xs,
                n_cols, out,
            )  # fmt: skip


@njit(cache=True, inline="always")
def planar_matmul_groups(
    isa,
    g0,
    g1,
    packed,
    group_scales,
    row_scales,
    group_uniform,
    n_out,
    xq,
    block_sums,
    token_sums,
    x_scale,
    out,
):
    """Outputs of row groups [g0, g1) for every token: serial, for callers that run their own parallel region
    (e.g. Q, K and V in one ``prange``). A call costs a few hundred cycles of set-up: give it many groups."""
    n_tok, k = xq.shape
    x, xs, sums, scales = _flat_views(xq, x_scale, block_sums, group_scales)
    _groups_flat(
        isa, g0, g1, packed, scales, row_scales, group_uniform, n_out, x, n_tok, k, sums, token_sums, xs,
        x_scale.shape[1], out,
    )  # fmt: skip


# The two parallel drivers each own their prange: a cached jitted function must not call a parallel one whose
# code was itself loaded from the cache (numba issue #8578: the caller's cache entry then segfaults on load).
# (And the prange must sit in the driver itself: one inside an inlined helper runs serially.)


@njit(cache=True, inline="always")
def _flat_views(xq, x_scale, block_sums, group_scales):
    n_tok, k = xq.shape
    return (
        xq.reshape(n_tok * k),
        x_scale.reshape(x_scale.size),
        block_sums.reshape(block_sums.size),
        group_scales.reshape(group_scales.size),
    )


@njit(cache=True, parallel=True)
def planar_matmul_summed(
    isa, packed, group_scales, row_scales, group_uniform, n_out, xq, block_sums, token_sums, x_scale, out
):
    """``out = xq · Wᵀ`` with the scales (see the module docstring), given ``activation_sums(xq)``.

    ``group_scales`` float32[n_groups, K/256, 4] (per-block scales, group-major), ``row_scales``
    float32[4·n_groups] (the one scale of each row of a uniform group), ``group_uniform`` uint8[n_groups].
    """
    n_tok, k = xq.shape
    x, xs, sums, scales = _flat_views(xq, x_scale, block_sums, group_scales)
    n_groups = group_uniform.shape[0]
    chunk = planar_chunk_groups(isa, n_tok, k)
    for c in prange((n_groups + chunk - 1) // chunk):
        g0 = c * chunk
        _groups_flat(
            isa, g0, min(g0 + chunk, n_groups), packed, scales, row_scales, group_uniform, n_out,
            x, n_tok, k, sums, token_sums, xs, x_scale.shape[1], out,
        )  # fmt: skip


@njit(cache=True, parallel=True)
def planar_matmul(isa, packed, group_scales, row_scales, group_uniform, n_out, xq, x_scale, out):
    """``planar_matmul_summed`` computing the activation sums itself."""
    block_sums, token_sums = activation_sums(xq)
    n_tok, k = xq.shape
    x, xs, sums, scales = _flat_views(xq, x_scale, block_sums, group_scales)
    n_groups = group_uniform.shape[0]
    chunk = planar_chunk_groups(isa, n_tok, k)
    for c in prange((n_groups + chunk - 1) // chunk):
        g0 = c * chunk
        _groups_flat(
            isa, g0, min(g0 + chunk, n_groups), packed, scales, row_scales, group_uniform, n_out,
            x, n_tok, k, sums, token_sums, xs, x_scale.shape[1], out,
        )  # fmt: skip
