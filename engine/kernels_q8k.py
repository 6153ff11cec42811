"""Ternary × Q8_K on the planar layout in llama.cpp's float order: bit-identical to the reference kernel.

llama.cpp's x86 ``vec_dot_tq{1,2}_0_q8_K`` keeps, per 256-block b, 8 int32 lanes
``lane_j = Σ_{e: (e%32)//4 = j} (w+1)·y − Σ_{32j ≤ e < 32j+32} y`` and folds each into its own float
accumulator, ``acc_j = fma(float(lane_j), d_b, acc_j)`` with ``d_b = x_scale·w_scale`` in float32; the output
is ``((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))``
(``kernels.ternary_q8k_matmul`` is the readable reference). The planar kernels (``kernels_fast``) round each
block's total instead, which is a different float result; this module reproduces llama.cpp's order on the
planar bytes with the integer tile of ``simd.tile_acc_dot``:

* a ``vpdpbusd`` over 64 activation bytes leaves int32 lane i = bytes 4i..4i+3 of the chunk, i.e. elements
  with ``(e % 64) // 4 = i``: folding lanes i and i+8 gives llama.cpp's lane i (``(e % 32) // 4``) exactly;
  with 32-byte vectors (AVX2, VNNI-256) lane i is already llama.cpp's lane i;
* the bsums term is weight-independent: ``lane_sums(xq)`` computes it once per (token, block) (``int32[T,
  K/256, 8]``) and matmuls sharing an input (Q/K/V, gate/up) share it.

Entry points (plain arrays and an ISA marker from ``simd.ISAS``; callable from jitted code):

* ``lane_sums(xq, out)``: ``out[t, b, j] = Σ xq[t, 256b + 32j : 256b + 32j + 32]``;
* ``q8k_matmul_groups(isa, g0, g1, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale,
  out)``: row groups
  [g0, g1) of a ``PlanarMatrix`` for every token, serial (for callers that own their ``prange``);
* ``q8k_matmul(isa, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale, out)``: all
  rows, parallel over chunks of
  row groups.

The generic (no SIMD) path computes the same lanes with scalar code, so every path gives the same bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model
from ternary.engine.kernels import fma_f32
from ternary.engine.kernels_fast import GROUP_BLOCK_BYTES, PREFETCH_BYTES, planar_chunk_groups
from ternary.engine.simd import (
    BLOCK,
    ROW_BLOCK_BYTES,
    ROW_GROUP,
    IsaType,
    TileAccType,
    prefetch_bytes,
    single_token,
    tile_acc_dot,
    tile_tokens,
)

LANES = 8  # llama.cpp's int32 lanes / float accumulators per output
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


@njit(cache=True)
def lane_sums(xq, out):
    """``out[t, b, j]`` = Σ of the 32 activations 256b + 32j .. +31 (llama.cpp's bsums, int32)."""
    n_tok, k = xq.shape
    for t in range(n_tok):
        row = xq[t]
        for c in range(k // 32):
            s = np.int32(0)
            chunk = row[c * 32 : c * 32 + 32]
            for i in range(32):
                s += np.int32(chunk[i])
            out[t, c // LANES, c % LANES] = s


# ---------------------------------------------------------------- the float accumulator of a tile


class Q8KFAccType(types.Type):
    """Float accumulators of a tile: 8 lanes per (row, token), packed into vectors of the ISA's width."""

    def __init__(self, isa: IsaType) -> None:
        self.isa = isa
        super().__init__(name=f"Q8KFAcc({isa.name}, tokens={isa.tokens})")


def _per_vector(isa: IsaType) -> int:
    """(row, token) outputs per float vector: two with 512-bit vectors, one with 256-bit ones."""
    return max(1, isa.lanes // LANES)


def _facc_vector(isa: IsaType) -> ir.VectorType:
    return ir.VectorType(_F32, LANES * _per_vector(isa))


def _facc_llvm_type(isa: IsaType) -> ir.Type:
    return ir.ArrayType(_facc_vector(isa), ROW_GROUP * isa.tokens // _per_vector(isa))


@register_model(Q8KFAccType)
class _Q8KFAccModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: Q8KFAccType) -> None:
        super().__init__(dmm, fe_type, _facc_llvm_type(fe_type.isa))


def _indices(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


def _element_ptr(context, builder, aty, arr, index) -> ir.Value:
    data = context.make_array(aty)(context, builder, arr).data
    return builder.gep(data, [index])


def _spread(builder, values: list) -> ir.Value:
    """A float vector holding ``values[q]`` in lanes 8q .. 8q+7."""
    vec = ir.Constant(ir.VectorType(_F32, len(values)), None)
    for q, v in enumerate(values):
        vec = builder.insert_element(vec, v, ir.Constant(_I32, q))
    return builder.shuffle_vector(vec, vec, _indices([q for q in range(len(values)) for _ in range(LANES)]))


def _row_lanes(builder, isa: IsaType, acc_v) -> list[ir.Value]:
    """The tile's integer lanes per (row, token), index ``r·tokens + j`` (vectors of ``isa.lanes`` int32).

    A one-token tile holds four accumulators per row, shift s holding Σ (code & 3<<2s)·x = 4^s·Σ code_s·x;
    they combine exactly as ((a3 >> 2 + a2) >> 2 + a1) >> 2 + a0 (every partial is a multiple of 4).
    """
    n_acc = ROW_GROUP * (4 if isa.tokens == 1 else isa.tokens)
    accs = [builder.extract_value(acc_v, i) for i in range(n_acc)]
    if isa.tokens > 1:
        return accs
    two = ir.Constant(ir.VectorType(_I32, isa.lanes), [ir.Constant(_I32, 2)] * isa.lanes)
    rows = []
    for r in range(ROW_GROUP):
        v = accs[4 * r + 3]
        for s in (2, 1, 0):
            v = builder.add(builder.ashr(v, two), accs[4 * r + s])
        rows.append(v)
    return rows


@intrinsic
def q8k_facc_zero(typingctx, isa):
    """Zeroed float accumulators for a tile of ``isa``."""
    if not isinstance(isa, IsaType) or isa.width == 0:
        return None
    facc = Q8KFAccType(isa)

    def codegen(context, builder, sig, args):
        return ir.Constant(_facc_llvm_type(isa), None)

    return facc(isa), codegen


@intrinsic
def q8k_acc_start(typingctx, isa, sums, sums_offset, sums_stride):
    """A tile accumulator holding llama.cpp's bsums correction: lane j of token j' starts at
    ``−sums[sums_offset + j'·sums_stride + j]`` (j < 8; with 16-lane vectors lanes 8..15 start at 0, the fold
    adds them to lanes 0..7). Accumulating the block's Σ code·x on top gives the corrected lanes without a
    subtraction per output."""
    if not isinstance(isa, IsaType) or isa.width == 0:
        return None
    if not (
        isinstance(sums, types.Array) and sums.dtype == types.int32 and sums.ndim == 1 and sums.layout == "C"
    ):
        return None
    acc_type = TileAccType(isa)
    sig = acc_type(isa, sums, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        _, s_a, s_off, s_stride = args
        vec8, lanes = ir.VectorType(_I32, LANES), isa.lanes
        acc_vec = ir.VectorType(_I32, lanes)
        starts = []
        for j in range(isa.tokens):
            index = builder.add(s_off, builder.mul(s_stride, ir.Constant(s_off.type, j)))
            ptr = _element_ptr(context, builder, sig.args[1], s_a, index)
            neg = builder.sub(
                ir.Constant(vec8, None), builder.load(builder.bitcast(ptr, vec8.as_pointer()), align=4)
            )
            if lanes > LANES:  # widen with zeros: lanes 8..15
                neg = builder.shuffle_vector(neg, ir.Constant(vec8, None), _indices(list(range(lanes))))
            starts.append(neg)
        n_acc = ROW_GROUP * (4 if isa.tokens == 1 else isa.tokens)
        out = ir.Constant(ir.ArrayType(acc_vec, n_acc), None)
        for r in range(ROW_GROUP):
            if isa.tokens == 1:  # the shift-0 accumulator of each row (added unshifted when they combine)
                out = builder.insert_value(out, starts[0], 4 * r)
            else:
                for j in range(isa.tokens):
                    out = builder.insert_value(out, starts[j], r * isa.tokens + j)
        return out

    return sig, codegen


@intrinsic
def q8k_facc_fma(typingctx, facc, acc, w, w_offset, xs, xs_offset, xs_stride):
    """One block of llama.cpp's TQ × Q8_K float step for every (row r, token j) of the tile.

    ``lane = fold(acc[r, j])`` (int32; ``acc`` started from ``q8k_acc_start``), then
    ``facc[r, j] = fma(float(lane), xs[xs_offset + j·xs_stride] · w[w_offset + r], facc[r, j])`` per lane.
    """
    if not isinstance(facc, Q8KFAccType) or not isinstance(acc, TileAccType) or facc.isa != acc.isa:
        return None
    ok = (
        isinstance(w, types.Array) and w.dtype == types.float32 and w.ndim == 1
        and isinstance(xs, types.Array) and xs.dtype == types.float32 and xs.ndim == 1
    )  # fmt: skip
    if not ok:
        return None
    isa = facc.isa
    sig = facc(facc, acc, w, types.intp, xs, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        facc_v, acc_v, w_a, w_off, xs_a, xs_off, xs_stride = args
        tokens, per = isa.tokens, _per_vector(isa)

        def at(aty, arr, index):
            return _element_ptr(context, builder, aty, arr, index)

        def const(v):
            return ir.Constant(w_off.type, v)

        rows = _row_lanes(builder, isa, acc_v)
        if isa.lanes == 2 * LANES:  # fold lanes i and i+8 of two outputs into one vector
            lo = _indices(list(range(LANES)) + list(range(2 * LANES, 3 * LANES)))
            hi = _indices(list(range(LANES, 2 * LANES)) + list(range(3 * LANES, 4 * LANES)))
            folded = [
                builder.add(builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi))
                for a, b in zip(rows[0::2], rows[1::2], strict=True)
            ]
        else:
            folded = rows
        xs_vals = [
            builder.load(at(sig.args[4], xs_a, builder.add(xs_off, builder.mul(xs_stride, const(j)))))
            for j in range(tokens)
        ]
        w_vals = [builder.load(at(sig.args[2], w_a, builder.add(w_off, const(r)))) for r in range(ROW_GROUP)]
        fvec = _facc_vector(isa)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(fvec, [fvec, fvec, fvec]), f"llvm.fma.v{fvec.count}f32"
        )
        out = facc_v
        for p, lanes in enumerate(folded):
            items = [p * per + q for q in range(per)]  # output index r·tokens + j of each half
            isum = lanes
            # d = x_scale · w_scale per output, spread over its 8 lanes: one vector multiply
            xs_lanes = _spread(builder, [xs_vals[item % tokens] for item in items])
            w_lanes = _spread(builder, [w_vals[item // tokens] for item in items])
            d = builder.fmul(xs_lanes, w_lanes)
            prev = builder.extract_value(out, p)
            out = builder.insert_value(out, builder.call(fma, [builder.sitofp(isum, fvec), d, prev]), p)
        return out

    return sig, codegen


@intrinsic
def q8k_facc_values(typingctx, facc):
    """Each output's ``hsum_float_8``, ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)): a tuple indexed r·tokens + j."""
    if not isinstance(facc, Q8KFAccType):
        return None
    isa = facc.isa
    n = ROW_GROUP * isa.tokens
    ret = types.UniTuple(types.float32, n)

    def codegen(context, builder, sig, args):
        per = _per_vector(isa)
        values = []
        for item in range(n):
            vec = builder.extract_value(args[0], item // per)
            base = (item % per) * LANES

            def lane(i, vec=vec, base=base):
                return builder.extract_element(vec, ir.Constant(_I32, base + i))

            a = [lane(i) for i in range(LANES)]
            left = builder.fadd(builder.fadd(a[0], a[4]), builder.fadd(a[2], a[6]))
            right = builder.fadd(builder.fadd(a[1], a[5]), builder.fadd(a[3], a[7]))
            values.append(builder.fadd(left, right))
        return context.make_tuple(builder, ret, values)

    return ret(facc), codegen


# ---------------------------------------------------------------- generic path: scalar, one token


@njit(cache=True)
def generic_group_q8k(packed, offset, x, x_offset, lanes):
    """``lanes[r, j]`` = Σ code·x over the elements of lane j (``(e % 32) // 4``) of row r's block (codes
    w+1)."""
    w = packed[offset : offset + GROUP_BLOCK_BYTES]
    xb = x[x_offset : x_offset + BLOCK]
    lanes[:] = 0
    for r in range(ROW_GROUP):
        for j in range(ROW_BLOCK_BYTES):
            b = np.int32(w[r * ROW_BLOCK_BYTES + j])
            lane = (j % 32) // 4
            lanes[r, lane] += (
                (b & 3) * np.int32(xb[j])
                + ((b >> 2) & 3) * np.int32(xb[64 + j])
                + ((b >> 4) & 3) * np.int32(xb[128 + j])
                + (b >> 6) * np.int32(xb[192 + j])
            )


def _generic(isa) -> bool:
    return isinstance(isa, IsaType) and isa.width == 0


@njit(cache=True)
def _generic_tile(g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out):
    n_blocks = k // BLOCK
    w, w_base, w_step = _weight_scales(g, n_blocks, scales, row_scales, group_uniform)
    lanes = np.empty((ROW_GROUP, LANES), dtype=np.int32)
    acc = np.zeros((ROW_GROUP, LANES), dtype=np.float32)
    for b in range(n_blocks):
        offset = (g * n_blocks + b) * GROUP_BLOCK_BYTES
        generic_group_q8k(packed, offset, x, t0 * k + b * BLOCK, lanes)
        xscale = xs[t0 * n_blocks + b]
        for r in range(ROW_GROUP):
            d = xscale * w[w_base + b * w_step + r]
            for j in range(LANES):
                lane = lanes[r, j] - sums[(t0 * n_blocks + b) * LANES + j]
                acc[r, j] = fma_f32(np.float32(lane), d, acc[r, j])
    for r in range(ROW_GROUP):
        n = g * ROW_GROUP + r
        if n < n_out:
            a = acc[r]
            out[t0, n] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


@njit(cache=True, inline="always")
def _weight_scales(g, n_blocks, scales, row_scales, group_uniform):
    """(array, base, step per block) of row group ``g``'s weight scales: its rows' single scales when the
    group is uniform (the per-block copies then stay untouched: less to stream, less resident), else its
    blocks'."""
    if group_uniform[g] != 0:
        return row_scales, g * ROW_GROUP, 0
    return scales, g * n_blocks * ROW_GROUP, ROW_GROUP


def tile_q8k(isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out):
    """All outputs of row group ``g`` × the tile's tokens from ``t0`` (``scales``/``x``/``sums``/``xs``
    flat)."""
    raise NotImplementedError("only callable from jitted code")


@njit(cache=True, inline="always")
def _simd_tile(isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out):
    tokens = tile_tokens(isa)
    n_blocks = k // BLOCK
    w, w_base, w_step = _weight_scales(g, n_blocks, scales, row_scales, group_uniform)
    group_offset = g * n_blocks * GROUP_BLOCK_BYTES
    facc = q8k_facc_zero(isa)
    for b in range(n_blocks):
        offset = group_offset + b * GROUP_BLOCK_BYTES
        if tokens == 1:  # streaming from DRAM; a GEMM tile re-reads its chunk from L2
            prefetch_bytes(packed, offset + PREFETCH_BYTES, GROUP_BLOCK_BYTES)
        start = q8k_acc_start(isa, sums, (t0 * n_blocks + b) * LANES, n_blocks * LANES)
        acc = tile_acc_dot(isa, start, packed, offset, x, t0 * k + b * BLOCK, k)
        facc = q8k_facc_fma(facc, acc, w, w_base + b * w_step, xs, t0 * n_blocks + b, n_blocks)
    values = q8k_facc_values(facc)
    for r in range(ROW_GROUP):
        n = g * ROW_GROUP + r
        if n < n_out:
            for j in range(tokens):
                out[t0 + j, n] = values[r * tokens + j]


@overload(tile_q8k, inline="always")
def _tile_q8k(isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out):
    if _generic(isa):
        return lambda isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out: (
            _generic_tile(g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out)
        )
    return lambda isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out: (
        _simd_tile(isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out)
    )


@njit(cache=True, inline="always")
def q8k_matmul_groups(
    isa, g0, g1, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale, out
):
    """Outputs of row groups [g0, g1) for every token (serial).

    ``packed``/``group_scales`` of a ``PlanarMatrix``; ``xq`` int8[T, K] C-contiguous; ``sums``
    int32[T, K/256, 8] from ``lane_sums``; ``x_scale`` float32[T, K/256]; ``out`` float32[T, ≥ n_out].
    """
    n_tok, k = xq.shape
    x = xq.reshape(n_tok * k)
    flat_sums = sums.reshape(sums.size)
    xs = x_scale.reshape(x_scale.size)
    scales = group_scales.reshape(group_scales.size)
    tokens = tile_tokens(isa)
    one = single_token(isa)
    t_full = n_tok - n_tok % tokens
    for t0 in range(0, t_full, tokens):
        for g in range(g0, g1):
            tile_q8k(isa, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, flat_sums, xs, out)
    for t0 in range(t_full, n_tok):
        for g in range(g0, g1):
            tile_q8k(one, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, flat_sums, xs, out)


@njit(cache=True, parallel=True)
def q8k_matmul(isa, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale, out):
    """``q8k_matmul_groups`` over every row group, parallel over chunks of groups."""
    n_groups = group_scales.shape[0]
    chunk = planar_chunk_groups(isa, xq.shape[0], xq.shape[1])
    for c in prange((n_groups + chunk - 1) // chunk):
        q8k_matmul_groups(
            isa,
            c * chunk,
            min(c * chunk + chunk, n_groups),
            packed,
            group_scales,
            row_scales,
            group_uniform,
            n_out,
            xq,
            sums,
            x_scale,
            out,
        )
