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
* ``quantize_q8k_rows_into(x, t0, t1, xq, x_scale, sums, mixed, neg_sums, pair_scales, pairs)``: rows [t0, t1)
  quantized as ``kernels.quantize_q8k_rows`` with their ``lane_sums`` (bit for bit, vectorised), and their
  token pairs (below) when ``pairs``;
* ``pair_buffers(isa, n_tok, k)`` / ``pair_layout(xq, sums, x_scale, t0, t1, mixed, neg_sums, pair_scales)``:
  the token-pair layout that 512-bit prompt tiles read (see "512-bit prompt tiles");
* ``q8k_matmul_groups(isa, g0, g1, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale,
  mixed, neg_sums, pair_scales, out)``: row groups [g0, g1) of a ``PlanarMatrix`` for every token, serial
  (for callers that own their ``prange``);
* ``q8k_matmul(isa, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale, out)``: all
  rows, parallel over chunks of row groups (builds the pair layout itself).

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
    _I8,
    BLOCK,
    ROW_BLOCK_BYTES,
    ROW_GROUP,
    IsaType,
    TileAccType,
    _data_ptr,
    _dot_u8s8,
    _load_bytes,
    _shift_right_2bit_fields,
    _splat,
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


def _scale_pointer(
    context, builder, scales_ty, scales, scales_offset, rows_ty, row_scales, rows_offset, uniform
):
    """Pointer to a row group's 4 weight scales: ``row_scales[rows_offset:]`` if ``uniform`` else
    ``scales[scales_offset:]``. Chosen on pointers: an array chosen in jitted code costs reference counting
    (two runtime calls) per tile."""
    return builder.select(
        builder.icmp_unsigned("!=", uniform, ir.Constant(uniform.type, 0)),
        _element_ptr(context, builder, rows_ty, row_scales, rows_offset),
        _element_ptr(context, builder, scales_ty, scales, scales_offset),
    )


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
def q8k_facc_fma(
    typingctx, facc, acc, scales, scales_offset, row_scales, rows_offset, uniform, xs, xs_offset, xs_stride
):
    """One block of llama.cpp's TQ × Q8_K float step for every (row r, token j) of the tile.

    ``lane = fold(acc[r, j])`` (int32; ``acc`` started from ``q8k_acc_start``), then
    ``facc[r, j] = fma(float(lane), xs[xs_offset + j·xs_stride] · w[r], facc[r, j])`` per lane, with the
    weight scales ``w`` at ``row_scales[rows_offset:]`` if ``uniform`` else ``scales[scales_offset:]``
    (``_scale_pointer``).
    """
    if not isinstance(facc, Q8KFAccType) or not isinstance(acc, TileAccType) or facc.isa != acc.isa:
        return None
    if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1 for a in (scales, xs)):
        return None
    isa = facc.isa
    intp = types.intp
    sig = facc(facc, acc, scales, intp, row_scales, intp, uniform, xs, intp, intp)

    def codegen(context, builder, sig, args):
        facc_v, acc_v, sc_a, sc_off, rs_a, rs_off, uni, xs_a, xs_off, xs_stride = args
        w_ptr = _scale_pointer(context, builder, sig.args[2], sc_a, sc_off, sig.args[4], rs_a, rs_off, uni)
        tokens, per = isa.tokens, _per_vector(isa)

        def at(aty, arr, index):
            return _element_ptr(context, builder, aty, arr, index)

        def const(v):
            return ir.Constant(sc_off.type, v)

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
            builder.load(at(sig.args[7], xs_a, builder.add(xs_off, builder.mul(xs_stride, const(j)))))
            for j in range(tokens)
        ]
        w_vals = [builder.load(builder.gep(w_ptr, [const(r)])) for r in range(ROW_GROUP)]
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


# ---------------------------------------------------------------- 512-bit prompt tiles: token pairs
# With 16 int32 lanes, lanes i and i+8 of a ``vpdpbusd`` over one row's 64 bytes both belong to llama.cpp's
# lane i, so the tile above folds every output with two shuffles and an add per block. Pairing tokens avoids
# most of it: ``pair_layout`` stores, per pair (A, B), block and shift s, the 64-byte activation vectors
# ``[A lo | B hi]`` and ``[B lo | A hi]`` (lo/hi: bytes 0–31 / 32–63 of the shift's 64). Against one row's
# weights they give ``[A_lo | B_hi]`` and ``[B_lo | A_hi]``; the first plus the second with its halves swapped
# is ``[A | B]``: both tokens' eight lanes, folded with one shuffle. The bsums correction is precomputed per
# pair as ``[−sums_A | −sums_B]`` (the first accumulator's start), the scales as ``[x_A ×8 | x_B ×8]``.

PAIR_BLOCK_BYTES = 2 * BLOCK  # one pair's activations of one block: 4 shifts × 2 vectors × 64 bytes
PAIR_LANES = 2 * LANES  # one pair's int32 sums / float scales of one block


@njit(cache=True)
def pair_layout(xq, sums, x_scale, t0, t1, mixed, neg_sums, pair_scales):
    """Fill pairs [t0/2, t1/2) (t0 even; an odd last token is left out) of the pair layout from ``xq``
    int8[T, K], ``sums`` (``lane_sums``) and ``x_scale`` float32[T, K/256]: ``mixed`` int8[T/2, 2K],
    ``neg_sums`` int32[T/2, K/256, 16], ``pair_scales`` float32[T/2, K/256, 16]."""
    k = xq.shape[1]
    nb = k // BLOCK
    qf = xq.reshape(xq.size)
    mf = mixed.reshape(mixed.size)
    for p in range(t0 // 2, t1 // 2):
        for b in range(nb):
            mix_pair_block(
                qf, 2 * p * k + b * BLOCK, (2 * p + 1) * k + b * BLOCK, mf, 2 * p * k + b * PAIR_BLOCK_BYTES
            )
            for j in range(LANES):
                neg_sums[p, b, j] = -sums[2 * p, b, j]
                neg_sums[p, b, LANES + j] = -sums[2 * p + 1, b, j]
                pair_scales[p, b, j] = x_scale[2 * p, b]
                pair_scales[p, b, LANES + j] = x_scale[2 * p + 1, b]


def _pairs(isa: IsaType) -> bool:
    """512-bit tiles of several tokens run on token pairs."""
    return isinstance(isa, IsaType) and isa.lanes == 2 * LANES and isa.tokens > 1


@intrinsic
def uses_pairs(typingctx, isa):
    """Whether prompt tiles of ``isa`` read the pair layout (a compile-time constant)."""
    if not isinstance(isa, IsaType):
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.boolean, _pairs(sig.args[0]))

    return types.boolean(isa), codegen


class PairFAccType(types.Type):
    """Float accumulators of a pair tile: one ``<16 x float>`` per (row, pair), index ``r·pairs + p``."""

    def __init__(self, isa: IsaType) -> None:
        self.isa = isa
        super().__init__(name=f"PairFAcc({isa.name}, tokens={isa.tokens})")


def _pair_count(isa: IsaType) -> int:
    return isa.tokens // 2


def _pair_facc_type(isa: IsaType) -> ir.Type:
    return ir.ArrayType(ir.VectorType(_F32, PAIR_LANES), ROW_GROUP * _pair_count(isa))


@register_model(PairFAccType)
class _PairFAccModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: PairFAccType) -> None:
        super().__init__(dmm, fe_type, _pair_facc_type(fe_type.isa))


def _vector_at(context, builder, aty, arr, index, vtype) -> ir.Value:
    return builder.load(
        builder.bitcast(_element_ptr(context, builder, aty, arr, index), vtype.as_pointer()), align=4
    )


def _splat_value(builder, value, count: int) -> ir.Value:
    vec = builder.insert_element(
        ir.Constant(ir.VectorType(value.type, count), None), value, ir.Constant(_I32, 0)
    )
    return builder.shuffle_vector(vec, vec, _indices([0] * count))


@intrinsic
def pair_facc_zero(typingctx, isa):
    """Zeroed float accumulators of a pair tile."""
    if not _pairs(isa):
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(_pair_facc_type(isa), None)

    return PairFAccType(isa)(isa), codegen


@intrinsic
def pair_block(
    typingctx, facc, packed, offset, mixed, x_offset, pair_stride, neg_sums, sums_offset, pair_scales,
    sums_stride, scales, scales_offset, row_scales, rows_offset, uniform,
):  # fmt: skip
    """One 256-weight block of a pair tile: the 4 rows at ``packed[offset:]`` against the tile's pairs
    (pair p's block at ``mixed[x_offset + p·pair_stride:]``, its corrections and scales at ``sums_offset +
    p·sums_stride``), then ``facc = fma(float(lanes), x_scale·w_scale, facc)`` per lane, as llama.cpp.

    The 4 weight scales are ``row_scales[rows_offset:]`` if ``uniform`` else ``scales[scales_offset:]``
    (``_scale_pointer``)."""
    if not isinstance(facc, PairFAccType):
        return None
    isa = facc.isa
    sig = facc(
        facc, packed, types.intp, mixed, types.intp, types.intp, neg_sums, types.intp, pair_scales,
        types.intp, scales, types.intp, row_scales, types.intp, uniform,
    )  # fmt: skip

    def codegen(context, builder, sig, args):
        facc_v, pk, off, xm, x_off, p_stride, ns, s_off, ps, s_stride, sc_a, sc_off, rs_a, rs_off, uni = args
        w_ptr = _scale_pointer(context, builder, sig.args[10], sc_a, sc_off, sig.args[12], rs_a, rs_off, uni)
        pairs = _pair_count(isa)
        acc_t = ir.VectorType(_I32, PAIR_LANES)
        f_t = ir.VectorType(_F32, PAIR_LANES)
        wbase = _data_ptr(context, builder, sig.args[1], pk)
        xbase = _data_ptr(context, builder, sig.args[3], xm)

        def const(v):
            return ir.Constant(off.type, v)

        def pair_index(base, stride, p):
            return builder.add(base, builder.mul(stride, const(p)))

        weights = [
            _load_bytes(builder, wbase, builder.add(off, const(r * ROW_BLOCK_BYTES)), 64)
            for r in range(ROW_GROUP)
        ]
        starts = [
            _vector_at(context, builder, sig.args[6], ns, pair_index(s_off, s_stride, p), acc_t)
            for p in range(pairs)
        ]
        first = {(r, p): starts[p] for r in range(ROW_GROUP) for p in range(pairs)}
        second = {(r, p): ir.Constant(acc_t, None) for r in range(ROW_GROUP) for p in range(pairs)}
        low2 = _splat(_I8, 64, 3)
        for s in range(4):
            codes = [
                builder.and_(_shift_right_2bit_fields(builder, weights[r], 2 * s), low2)
                for r in range(ROW_GROUP)
            ]
            for p in range(pairs):
                at = builder.add(pair_index(x_off, p_stride, p), const(s * 2 * ROW_BLOCK_BYTES))
                xa = _load_bytes(builder, xbase, at, 64)
                xb = _load_bytes(builder, xbase, builder.add(at, const(ROW_BLOCK_BYTES)), 64)
                for r in range(ROW_GROUP):
                    first[r, p] = _dot_u8s8(builder, isa, first[r, p], codes[r], xa)
                    second[r, p] = _dot_u8s8(builder, isa, second[r, p], codes[r], xb)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f_t, [f_t, f_t, f_t]), f"llvm.fma.v{PAIR_LANES}f32"
        )
        swap = _indices(list(range(LANES, PAIR_LANES)) + list(range(LANES)))
        w_lanes = [
            _splat_value(builder, builder.load(builder.gep(w_ptr, [const(r)])), PAIR_LANES)
            for r in range(ROW_GROUP)
        ]
        out = facc_v
        for p in range(pairs):
            x_lanes = _vector_at(context, builder, sig.args[8], ps, pair_index(s_off, s_stride, p), f_t)
            for r in range(ROW_GROUP):
                lanes = builder.add(first[r, p], builder.shuffle_vector(second[r, p], second[r, p], swap))
                d = builder.fmul(x_lanes, w_lanes[r])
                i = r * pairs + p
                out = builder.insert_value(
                    out, builder.call(fma, [builder.sitofp(lanes, f_t), d, builder.extract_value(out, i)]), i
                )
        return out

    return sig, codegen


@intrinsic
def pair_store(typingctx, facc, out, t0, n0, n_out):
    """Each output's ``hsum_float_8`` (a transpose-and-add tree over the tile: the same adds per output),
    stored at ``out[t0 + j, n0 + r]`` for the rows below ``n_out``."""
    if not isinstance(facc, PairFAccType) or facc.isa.tokens != 4:
        return None
    if not (
        isinstance(out, types.Array) and out.ndim == 2 and out.dtype == types.float32 and out.layout == "C"
    ):
        return None
    sig = types.none(facc, out, types.intp, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        facc_v, out_a, t0_v, n0_v, n_out_v = args
        pairs = _pair_count(facc.isa)
        vecs = [builder.extract_value(facc_v, i) for i in range(ROW_GROUP * pairs)]

        def merge(a, b, lo, hi):
            return builder.fadd(
                builder.shuffle_vector(a, b, _indices(lo)), builder.shuffle_vector(a, b, _indices(hi))
            )

        # outputs per vector: lanes 8h..8h+7 of vector r·2+p are (row r, token 2p+h)
        # level 1: s_k = a_k + a_{k+4}: one vector per row, tokens 0..3, four lanes each
        lo1 = [8 * h + k + 16 * v for v in range(2) for h in range(2) for k in range(4)]
        hi1 = [i + 4 for i in lo1]
        rows = [merge(vecs[2 * r], vecs[2 * r + 1], lo1, hi1) for r in range(ROW_GROUP)]
        # level 2: u0 = s0 + s2, u1 = s1 + s3: rows (0, 1) and (2, 3), eight outputs of two lanes
        lo2 = [4 * o + k + 16 * v for v in range(2) for o in range(4) for k in range(2)]
        hi2 = [i + 2 for i in lo2]
        halves = [merge(rows[0], rows[1], lo2, hi2), merge(rows[2], rows[3], lo2, hi2)]
        # level 3: u0 + u1, lanes ordered token-major (lane 4j + r) for the stores
        lo3 = [16 * (r // 2) + 2 * ((r % 2) * 4 + j) for j in range(4) for r in range(4)]
        hi3 = [i + 1 for i in lo3]
        total = merge(halves[0], halves[1], lo3, hi3)
        ary = context.make_array(sig.args[1])(context, builder, out_a)
        stride = builder.extract_value(ary.shape, 1)
        v4 = ir.VectorType(_F32, 4)
        valid = builder.icmp_signed(
            "<", ir.Constant(ir.VectorType(n0_v.type, 4), [0, 1, 2, 3]),
            _splat_value(builder, builder.sub(n_out_v, n0_v), 4),
        )  # fmt: skip
        store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [v4, v4.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 4)]),
            "llvm.masked.store.v4f32.p0",
        )
        for j in range(4):
            part = builder.shuffle_vector(total, total, _indices(list(range(4 * j, 4 * j + 4))))
            index = builder.add(builder.mul(builder.add(t0_v, ir.Constant(t0_v.type, j)), stride), n0_v)
            ptr = builder.bitcast(builder.gep(ary.data, [index]), v4.as_pointer())
            builder.call(store, [part, ptr, ir.Constant(_I32, 4), valid])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------- Q8_K activations, vectorised
# ``kernels.quantize_q8k_rows`` finds each block's first largest |x| with a branch per element and
# ``lane_sums`` adds bytes one by one: as scalar loops they cost as much as a small model's matmuls. The
# intrinsics below do the same per 256-block with 16-lane vectors (same values: the maximum and the first
# index of it do not depend on the order they are searched in; every q is the same rint of the same exact
# product), and ``quantize_q8k_rows_into`` writes the pair layout of the prompt tiles in the same pass.

_V16F = ir.VectorType(_F32, 16)
_V16I = ir.VectorType(_I32, 16)


def _f32_array(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == types.float32


def _fabs(builder, v) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type]), "llvm.fabs.v16f32")
    return builder.call(fn, [v])


def _max_keeping(builder, a, b) -> ir.Value:
    """Lane-wise ``a if a > b else b`` (a NaN in ``a`` is skipped, as the scalar ``if a > amax`` does)."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@intrinsic
def block_absmax_first(typingctx, x, offset):
    """The element of largest |x| in ``x[offset : offset + 256]``, the first one on ties (0 if all are 0)."""
    if not _f32_array(x):
        return None
    sig = types.float32(x, types.intp)

    def codegen(context, builder, sig, args):
        x_a, off = args
        base = _data_ptr(context, builder, sig.args[0], x_a)
        vecs = [
            builder.load(builder.bitcast(builder.gep(base, [builder.add(off, ir.Constant(off.type, 16 * k))]),
                                         _V16F.as_pointer()), align=4)
            for k in range(16)
        ]  # fmt: skip
        absv = [_fabs(builder, v) for v in vecs]
        m = absv[0]
        for v in absv[1:]:
            m = _max_keeping(builder, v, m)
        width = 16
        while width > 1:  # every lane ends up holding the maximum
            width //= 2
            rot = builder.shuffle_vector(m, m, _indices([(i + width) % 16 for i in range(16)]))
            m = _max_keeping(builder, rot, m)
        amax = builder.extract_element(m, ir.Constant(_I32, 0))
        i16 = ir.IntType(16)
        cttz = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i16, [i16, ir.IntType(1)]), "llvm.cttz.i16"
        )
        index = ir.Constant(_I32, 0)  # all zero: element 0, which is 0 (or -0: the caller tests amax)
        for k in reversed(range(16)):
            hits = builder.bitcast(builder.fcmp_ordered("==", absv[k], m), i16)
            first = builder.add(
                ir.Constant(_I32, 16 * k),
                builder.zext(builder.call(cttz, [hits, ir.Constant(ir.IntType(1), 1)]), _I32),
            )
            index = builder.select(builder.icmp_unsigned("!=", hits, ir.Constant(i16, 0)), first, index)
        value = builder.load(builder.gep(base, [builder.add(off, builder.sext(index, off.type))]))
        return builder.select(
            builder.fcmp_ordered(">", amax, ir.Constant(_F32, 0.0)), value, ir.Constant(_F32, 0.0)
        )

    return sig, codegen


@intrinsic
def quantize_block(typingctx, x, offset, iscale, q, q_offset, sums, sums_offset):
    """``q[q_offset + j] = min(127, rint(float64(iscale) · float64(x[offset + j])))`` for j < 256 (the exact
    product rounded once), and the 8 lane sums of the block at ``sums[sums_offset:]``."""
    if not (_f32_array(x) and iscale == types.float32):
        return None
    if not (isinstance(q, types.Array) and q.dtype == types.int8 and q.ndim == 1 and q.layout == "C"):
        return None
    if not (
        isinstance(sums, types.Array) and sums.dtype == types.int32 and sums.ndim == 1 and sums.layout == "C"
    ):
        return None
    sig = types.none(x, types.intp, types.float32, q, types.intp, sums, types.intp)

    def codegen(context, builder, sig, args):
        x_a, off, isc, q_a, q_off, s_a, s_off = args
        xbase = _data_ptr(context, builder, sig.args[0], x_a)
        qbase = _data_ptr(context, builder, sig.args[3], q_a)
        sbase = _data_ptr(context, builder, sig.args[5], s_a)
        v16d = ir.VectorType(ir.DoubleType(), 16)
        rint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16d, [v16d]), "llvm.rint.v16f64"
        )
        smin = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16I, [_V16I, _V16I]), "llvm.smin.v16i32"
        )
        scale = _splat_value(builder, builder.fpext(isc, ir.DoubleType()), 16)
        top = ir.Constant(_V16I, [ir.Constant(_I32, 127)] * 16)
        lanes = []
        for k in range(16):
            at = builder.add(off, ir.Constant(off.type, 16 * k))
            xv = builder.load(builder.bitcast(builder.gep(xbase, [at]), _V16F.as_pointer()), align=4)
            qv = builder.call(
                smin,
                [
                    builder.fptosi(builder.call(rint, [builder.fmul(scale, builder.fpext(xv, v16d))]), _V16I),
                    top,
                ],
            )
            qat = builder.add(q_off, ir.Constant(q_off.type, 16 * k))
            builder.store(
                builder.trunc(qv, ir.VectorType(_I8, 16)),
                builder.bitcast(builder.gep(qbase, [qat]), ir.VectorType(_I8, 16).as_pointer()),
                align=1,
            )
            lanes.append(qv)
        reduce = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_V16I]), "llvm.vector.reduce.add.v16i32"
        )
        for j in range(LANES):
            total = builder.call(reduce, [builder.add(lanes[2 * j], lanes[2 * j + 1])])
            builder.store(total, builder.gep(sbase, [builder.add(s_off, ir.Constant(s_off.type, j))]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mix_pair_block(typingctx, xq, a_offset, b_offset, mixed, m_offset):
    """One block of the pair layout from tokens A and B's bytes at ``xq[a_offset:]``/``xq[b_offset:]``."""
    ok = all(
        isinstance(a, types.Array) and a.dtype == types.int8 and a.ndim == 1 and a.layout == "C"
        for a in (xq, mixed)
    )
    if not ok:
        return None
    sig = types.none(xq, types.intp, types.intp, mixed, types.intp)

    def codegen(context, builder, sig, args):
        x_a, a_off, b_off, m_a, m_off = args
        xbase = _data_ptr(context, builder, sig.args[0], x_a)
        mbase = _data_ptr(context, builder, sig.args[3], m_a)
        v64 = ir.VectorType(_I8, 64)
        lo_hi = _indices(list(range(32)) + list(range(96, 128)))  # [first lo | second hi]
        for s in range(4):
            a = _load_bytes(builder, xbase, builder.add(a_off, ir.Constant(a_off.type, 64 * s)), 64)
            b = _load_bytes(builder, xbase, builder.add(b_off, ir.Constant(b_off.type, 64 * s)), 64)
            for i, (u, v) in enumerate(((a, b), (b, a))):
                at = builder.add(m_off, ir.Constant(m_off.type, 128 * s + 64 * i))
                builder.store(
                    builder.shuffle_vector(u, v, lo_hi),
                    builder.bitcast(builder.gep(mbase, [at]), v64.as_pointer()),
                    align=1,
                )
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def quantize_q8k_rows_into(x, t0, t1, xq, x_scale, sums, mixed, neg_sums, pair_scales, pairs):
    """Rows [t0, t1) of ``x`` float32[T, K] as ``kernels.quantize_q8k_rows`` + ``lane_sums`` (bit for bit),
    and (if ``pairs``; ``t0`` even) their pairs of the pair layout."""
    k = x.shape[1]
    nb = k // BLOCK
    xf = x.reshape(x.size)
    qf = xq.reshape(xq.size)
    sf = sums.reshape(sums.size)
    for t in range(t0, t1):
        for b in range(nb):
            off = t * k + b * BLOCK
            vmax = block_absmax_first(xf, off)
            if vmax == np.float32(0.0):
                x_scale[t, b] = np.float32(0.0)
                qf[off : off + BLOCK] = 0
                sums[t, b, :] = 0
                continue
            iscale = np.float32(-127.0) / vmax
            quantize_block(xf, off, iscale, qf, off, sf, (t * nb + b) * LANES)
            x_scale[t, b] = np.float32(1.0) / iscale
    if pairs:
        pair_layout(xq, sums, x_scale, t0, t1, mixed, neg_sums, pair_scales)


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
    group_offset = g * n_blocks * GROUP_BLOCK_BYTES
    uniform = group_uniform[g]
    facc = q8k_facc_zero(isa)
    for b in range(n_blocks):
        offset = group_offset + b * GROUP_BLOCK_BYTES
        if tokens == 1:  # streaming from DRAM; a GEMM tile re-reads its chunk from L2
            prefetch_bytes(packed, offset + PREFETCH_BYTES, GROUP_BLOCK_BYTES)
        start = q8k_acc_start(isa, sums, (t0 * n_blocks + b) * LANES, n_blocks * LANES)
        acc = tile_acc_dot(isa, start, packed, offset, x, t0 * k + b * BLOCK, k)
        w_off = (g * n_blocks + b) * ROW_GROUP
        facc = q8k_facc_fma(
            facc, acc, scales, w_off, row_scales, g * ROW_GROUP, uniform, xs, t0 * n_blocks + b, n_blocks
        )
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


@njit(cache=True)
def _pair_tiles(
    isa, g0, g1, t_full, packed, scales, row_scales, group_uniform, n_out, k, mixed, neg_sums, ps, out
):
    """Row groups [g0, g1) × tokens [0, t_full) in tiles of 4 tokens on the pair layout (flat arrays but
    ``out``). Whole loops in one function: per-tile calls into inlined helpers cost reference counting."""
    n_blocks = k // BLOCK
    pair_stride = n_blocks * PAIR_BLOCK_BYTES
    sums_stride = n_blocks * PAIR_LANES
    for t0 in range(0, t_full, tile_tokens(isa)):
        x_base = (t0 // 2) * pair_stride
        s_base = (t0 // 2) * sums_stride
        for g in range(g0, g1):
            group_offset = g * n_blocks * GROUP_BLOCK_BYTES
            uniform = group_uniform[g]
            facc = pair_facc_zero(isa)
            for b in range(n_blocks):
                facc = pair_block(
                    facc, packed, group_offset + b * GROUP_BLOCK_BYTES, mixed, x_base + b * PAIR_BLOCK_BYTES,
                    pair_stride, neg_sums, s_base + b * PAIR_LANES, ps, sums_stride, scales,
                    (g * n_blocks + b) * ROW_GROUP, row_scales, g * ROW_GROUP, uniform,
                )  # fmt: skip
            pair_store(facc, out, t0, g * ROW_GROUP, n_out)


@njit(cache=True)
def _lane_tiles(isa, g0, g1, t0, t1, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out):
    """Row groups [g0, g1) × tokens [t0, t1) in tiles of ``isa``'s tokens on the plain layout (flat arrays
    but ``out``)."""
    for t in range(t0, t1, tile_tokens(isa)):
        for g in range(g0, g1):
            tile_q8k(isa, g, t, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out)


@njit(cache=True)
def pair_buffers(isa, n_tok, k):
    """Uninitialised ``(mixed, neg_sums, pair_scales)`` for ``n_tok`` tokens (no pairs where ``isa`` does not
    use them)."""
    n_pairs = n_tok // 2 if uses_pairs(isa) else 0
    nb = k // BLOCK
    mixed = np.empty((n_pairs, 2 * k), dtype=np.int8)
    neg_sums = np.empty((n_pairs, nb, PAIR_LANES), dtype=np.int32)
    pair_scales = np.empty((n_pairs, nb, PAIR_LANES), dtype=np.float32)
    return mixed, neg_sums, pair_scales


@njit(cache=True, inline="always")
def q8k_matmul_groups(
    isa, g0, g1, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale, mixed, neg_sums,
    pair_scales, out,
):  # fmt: skip
    """Outputs of row groups [g0, g1) for every token (serial).

    ``packed``/``group_scales`` of a ``PlanarMatrix``; ``xq`` int8[T, K] C-contiguous; ``sums``
    int32[T, K/256, 8] from ``lane_sums``; ``x_scale`` float32[T, K/256]; ``mixed``, ``neg_sums``,
    ``pair_scales``: the pair layout (``pair_buffers`` + ``pair_layout``); ``out`` float32[T, ≥ n_out].
    """
    n_tok, k = xq.shape
    x = xq.reshape(n_tok * k)
    flat_sums = sums.reshape(sums.size)
    xs = x_scale.reshape(x_scale.size)
    scales = group_scales.reshape(group_scales.size)
    t_full = n_tok - n_tok % tile_tokens(isa)
    if t_full > 0:
        m, ns = mixed.reshape(mixed.size), neg_sums.reshape(neg_sums.size)
        ps = pair_scales.reshape(pair_scales.size)
        prompt_tiles(
            isa, g0, g1, t_full, packed, scales, row_scales, group_uniform, n_out, x, k, flat_sums, xs, m, ns,
            ps, out,
        )  # fmt: skip
    one = single_token(isa)
    for t0 in range(t_full, n_tok):
        for g in range(g0, g1):
            tile_q8k(one, g, t0, packed, scales, row_scales, group_uniform, n_out, x, k, flat_sums, xs, out)


def prompt_tiles(
    isa, g0, g1, t_full, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, m, ns, ps, out
):
    """Tokens [0, t_full) in full tiles of ``isa``: on the pair layout where ``isa`` uses it (flat arrays)."""
    raise NotImplementedError("only callable from jitted code")


@overload(prompt_tiles, inline="always")
def _prompt_tiles(
    isa, g0, g1, t_full, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, m, ns, ps, out
):
    # (one-call trampolines into top-level kernels, as in ``tile_q8k``)
    if _pairs(isa):

        def pairs(
            isa,
            g0,
            g1,
            t_full,
            packed,
            scales,
            row_scales,
            group_uniform,
            n_out,
            x,
            k,
            sums,
            xs,
            m,
            ns,
            ps,
            out,
        ):
            _pair_tiles(
                isa, g0, g1, t_full, packed, scales, row_scales, group_uniform, n_out, k, m, ns, ps, out
            )

        return pairs

    def lanes(
        isa, g0, g1, t_full, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, m, ns, ps, out
    ):
        _lane_tiles(
            isa, g0, g1, 0, t_full, packed, scales, row_scales, group_uniform, n_out, x, k, sums, xs, out
        )

    return lanes


@njit(cache=True, parallel=True)
def q8k_matmul(isa, packed, group_scales, row_scales, group_uniform, n_out, xq, sums, x_scale, out):
    """``q8k_matmul_groups`` over every row group, parallel over chunks of groups (builds the pair layout)."""
    n_groups = group_scales.shape[0]
    mixed, neg_sums, pair_scales = pair_buffers(isa, xq.shape[0], xq.shape[1])
    if uses_pairs(isa):
        pair_layout(xq, sums, x_scale, 0, xq.shape[0], mixed, neg_sums, pair_scales)
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
            mixed,
            neg_sums,
            pair_scales,
            out,
        )
