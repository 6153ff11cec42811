"""Output-head kernels: Q6_K × Q8_K, Q8_0 × Q8_0 and F16 × F16 over the bytes as the GGUF stores them.

The head of a BitNet model is a dense [n_vocab, n_embd] matrix (often the tied embedding) and ~27% of a decode
step: 270 MB of Q6_K per token for the 2B4T shape. These kernels stream it once, in file order (no repack),
with SIMD intrinsics where the machine has them, and reproduce llama.cpp's float order where the oracle pins
it. Callable from other ``@njit`` code (plain arrays plus an ISA marker from ``simd.ISAS``):

* ``q8k_bsums(xq int8[T, K]) -> int16[T, K/16]``: Σ of every 16 activations (Q8_K's ``bsums``).
* ``q6k_rows(isa, w, n_in, r0, r1, xq, xd, bsums, out)``: rows [r0, r1) of ``out[t, n] = Σ_k W[n, k]·x[t, k]``
  (serial). ``w`` uint8[N·(K/256)·210] (the Q6_K blocks, row-major), ``xq`` int8[T, K], ``xd``
  float32[T, K/256] (Q8_K scales), ``bsums`` from ``q8k_bsums``, ``out`` float32[T, N].
* ``q8_0_rows(isa, w, n_in, r0, r1, xq, xd, out)``: ``w`` uint8[N·(K/32)·34] (Q8_0 blocks), ``xq`` int8[T, K]
  in [-127, 127] (Q8_0 activations never hold -128), ``xd`` float32[T, K/32].
* ``f16_rows(isa, w, n_in, r0, r1, x, out)``: ``w`` uint16[N·K] (F16 bit patterns), ``x`` float32[T, K]
  already rounded to F16 values (``activations.round_to_f16``).
* ``q6k_matmul``, ``q8_0_matmul``, ``f16_matmul``: the same arguments without ``r0, r1``, parallel over chunks
  of rows (each thread reads one sequential stream). Call these from Python or from jitted code that is not
  cached (numba #8578, see ``kernels_fast``); jitted callers with their own ``prange`` use the ``*_rows``.
* ``q6k_block_sums(isa, w, n_in, xq, bsums, out int32[T, N, K/256])``: the exact integer part alone (tests).

Python wrappers (``Q6KHead``, ``Q8_0Head``, ``F16Head``, ``head_matrix``) quantize activations as llama.cpp
does and follow ``weights.DenseMatrix`` (``rows``, ``matmul``).

Float order (integer parts are exact on every path, so every path gives the same bits):

* Q6_K: per 256-block ``isum = Σ_16-blocks scale·Σ (q−32)·x`` (int32), then ``acc = fma(f32(isum)·d_w, d_x,
  acc)`` block after block. llama.cpp's logits of the Q6_K oracle model (K = 256, one block per row) are
  ``(f32(isum)·d_w)·d_x`` bit for bit (the engine's reference ``(d_w·d_x)·isum`` matches 66% of them);
  the FMA that chains blocks is this module's choice (what C's ``sum += isum * d_w * d_x`` becomes under
  GCC's default FP contraction): no oracle has more than one Q6_K block per row.
* Q8_0: llama.cpp's (vec_dot and tinyBLAS agree): 8 float lanes, lane j takes elements 4j..4j+3 of every
  32-block as ``fma(f32(lane_isum), d_w·d_x, acc_j)`` (the product of two fp16 scales is exact), then
  ``hsum_float_8``: ``((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))``.
* F16: tinyBLAS's: 16 float lanes, element k into lane k % 16 (F16×F16 products are exact in float32, so FMA
  and multiply-add agree), then ``_mm512_reduce_add_ps`` (``attention.reduce_add_16``); a tail of K % 16
  elements (no llama.cpp head has one) is added after, in order.

Q6_K block (210 bytes, 256 values): ql[128], qh[64], int8 scales[16], fp16 d; value e = 128h + 32v + i
(h < 2, v < 4, i < 32) takes a nibble of ql[64h + 32(v % 2) + i] (the low one for v < 2, else the high one)
and bits 2v, 2v+1 of qh[32h + i] on top: q = nibble | (bits << 4), weight = d·scales[e / 16]·(q − 32). The
SIMD kernels feed the unsigned q to ``pmaddubsw`` (pairs of q·x, exact in int16) and ``pmaddwd`` with the
sub-block scales, and take the −32 off once per block through ``bsums``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from ternary.engine import activations, cpu_features, simd, topology
from ternary.engine.attention import reduce_add_16
from ternary.engine.kernels import fma_f32
from ternary.engine.kernels_fast import PREFETCH_BYTES
from ternary.engine.simd import (
    AVX2,
    IsaType,
    _data_ptr,
    _dot_u8s8,
    _is_vector,
    _splat,
    prefetch_bytes,
    single_token,
    tile_tokens,
)
from ternary.formats import quants

topology.configure_threading()  # omp: ~1 µs per parallel region, before any region runs

QK_K = 256
Q6K_BLOCK_BYTES = 210
Q6K_SUBBLOCK = 16
Q8_0_BLOCK = 32
Q8_0_BLOCK_BYTES = 34
F16_LANES = 16
Q8_0_LANES = 8
ROW_CHUNK = 32  # rows per parallel work item (omp's static schedule still gives each thread one stream)

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_HALF = ir.HalfType()


# ---------------------------------------------------------------- IR helpers (run at compile time)


def _load(builder, base: ir.Value, index: ir.Value, vec_type: ir.Type) -> ir.Value:
    """An unaligned load of ``vec_type`` at ``base + index`` (index in elements of ``base``)."""
    ptr = builder.bitcast(builder.gep(base, [index]), ir.PointerType(vec_type))
    return builder.load(ptr, align=1)


def _plus(builder, index: ir.Value, value: int) -> ir.Value:
    return builder.add(index, ir.Constant(index.type, value))


def _call(builder, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _shuffle(builder, v: ir.Value, indices: list[int]) -> ir.Value:
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, len(indices)), indices))


def _shift_words(builder, v: ir.Value, amounts: list[int]) -> ir.Value:
    """Bytes ``v`` shifted as 16-bit words, word i by ``amounts[i]`` (> 0 left, < 0 right; one direction)."""
    if not any(amounts):
        return v
    words = ir.VectorType(_I16, v.type.count // 2)
    w = builder.bitcast(v, words)
    counts = ir.Constant(words, [abs(a) for a in amounts])
    w = builder.shl(w, counts) if max(amounts) > 0 else builder.lshr(w, counts)
    return builder.bitcast(w, v.type)


def _prefetch(builder, base_i8: ir.Value, index: ir.Value) -> None:
    i8p = ir.PointerType(_I8)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0"
    )
    ptr = builder.bitcast(builder.gep(base_i8, [index]), i8p)
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _maddubs(builder, width: int, u8: ir.Value, s8: ir.Value) -> ir.Value:
    """Pairs of unsigned × signed bytes summed into int16 (``pmaddubsw``; exact while |pair| < 2^15)."""
    name = "llvm.x86.avx512.pmaddubs.w.512" if width == 64 else "llvm.x86.avx2.pmadd.ub.sw"
    return _call(builder, name, ir.VectorType(_I16, width // 2), [u8, s8])


def _madd_words(builder, a: ir.Value, b: ir.Value) -> ir.Value:
    """Pairs of int16 products summed into int32 (``pmaddwd``, exact)."""
    n = a.type.count
    name = "llvm.x86.avx512.pmaddw.d.512" if n == 32 else "llvm.x86.avx2.pmadd.wd"
    return _call(builder, name, ir.VectorType(_I32, n // 2), [a, b])


def _spread_scales(builder, scales: ir.Value, first: int, width: int) -> ir.Value:
    """Sub-block scales for one code vector: word i ↦ ``scales[first + i // 8]`` (``width // 2`` words).

    On zmm this is one ``vpermw`` per vector. The index goes through an empty inline-asm statement so that
    LLVM cannot see it is constant: with a constant index it rewrites the permute as byte shuffles plus sign
    extensions, two instructions per vector instead of one.
    """
    pattern = [first + i // 8 for i in range(width // 2)]
    if width != 64:
        return _shuffle(builder, scales, pattern)
    words = ir.VectorType(_I16, 32)
    wide = builder.shuffle_vector(scales, scales, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
    index = ir.Constant(words, pattern)
    opaque = builder.asm(ir.FunctionType(words, [words]), "", "=v,0", [index], False)
    return _call(builder, "llvm.x86.avx512.permvar.hi.512", words, [wide, opaque])


def _q6k_codes(builder, width: int, wbase: ir.Value, off: ir.Value) -> list[ir.Value]:
    """The 256 unsigned 6-bit codes of the block at ``off``, as 256/width byte vectors in element order."""
    vec = ir.VectorType(_I8, width)
    low4, top2 = _splat(_I8, width, 0x0F), _splat(_I8, width, 0x30)
    codes = []
    for h in range(2):  # 128-value halves
        qh = _load(builder, wbase, _plus(builder, off, 128 + 32 * h), ir.VectorType(_I8, 32))
        if width == 64:  # one vector = 64 values: v = 0, 1 (then 2, 3) side by side
            qh2 = _shuffle(builder, qh, list(range(32)) * 2)
            ql = _load(builder, wbase, _plus(builder, off, 64 * h), vec)
            lo = builder.and_(ql, low4)
            hi = builder.and_(_shift_words(builder, ql, [-4] * 32), low4)
            codes.append(builder.or_(lo, builder.and_(_shift_words(builder, qh2, [4] * 16 + [2] * 16), top2)))
            codes.append(
                builder.or_(hi, builder.and_(_shift_words(builder, qh2, [0] * 16 + [-2] * 16), top2))
            )
        else:  # one vector = 32 values
            for v in range(4):
                ql = _load(builder, wbase, _plus(builder, off, 64 * h + 32 * (v % 2)), vec)
                nib = builder.and_(ql if v < 2 else _shift_words(builder, ql, [-4] * 16), low4)
                bits = builder.and_(_shift_words(builder, qh, [4 - 2 * v] * 16), top2)
                codes.append(builder.or_(nib, bits))
    return codes


# ---------------------------------------------------------------- intrinsics


def _is_simd(isa) -> bool:
    return isinstance(isa, IsaType) and isa.width in (32, 64)


def _half_from_quad(builder, base_i8: ir.Value, byte_index: ir.Value, lane: int) -> ir.Value:
    """The float16 at ``base_i8[byte_index]`` as float32, through a 4-half load starting ``lane`` halves
    before it. A lone 2-byte load becomes ``vpinsrw`` into whatever register LLVM picks, and when that is a
    loop's float accumulator every block waits for the previous one (3x slower Q8_0 rows); ``vcvtph2ps``
    from memory depends on nothing."""
    quad = _load(builder, base_i8, _plus(builder, byte_index, -2 * lane), ir.VectorType(_HALF, 4))
    return builder.extract_element(builder.fpext(quad, ir.VectorType(_F32, 4)), ir.Constant(_I32, lane))


@intrinsic
def half_at(typingctx, arr, index):
    """The float16 stored at ``arr[index]`` (uint16 array: element index; uint8 array: byte offset), exactly
    as float32."""
    if not isinstance(arr, types.Array) or arr.dtype not in (types.uint8, types.uint16):
        return None

    def codegen(context, builder, sig, args):
        base = _data_ptr(context, builder, sig.args[0], args[0])
        h = builder.load(builder.bitcast(builder.gep(base, [args[1]]), ir.PointerType(_HALF)), align=1)
        return builder.fpext(h, _F32)

    return types.float32(arr, types.intp), codegen


@intrinsic
def half_ending_at(typingctx, arr, index):
    """The float16 at byte ``index`` of the uint8 array ``arr`` (``index`` ≥ 6: it reads the 8 bytes ending
    with it; see ``_half_from_quad``)."""
    if not _is_vector(arr, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        return _half_from_quad(builder, _data_ptr(context, builder, sig.args[0], args[0]), args[1], 3)

    return types.float32(arr, types.intp), codegen


@intrinsic
def q6k_simd_isums(typingctx, isa, w, w_off, x, x_off, x_stride, bs, bs_off, bs_stride):
    """Exact ``Σ_s scale_s·Σ (q−32)·x`` of the Q6_K block at ``w[w_off:]`` for each token of the tile.

    Token j's 256 activations start at ``x[x_off + j·x_stride]``, its 16 ``bsums`` at ``bs[bs_off +
    j·bs_stride]``. Returns ``tile_tokens(isa)`` int32.
    """
    if not _is_simd(isa):
        return None
    if not (_is_vector(w, types.uint8) and _is_vector(x, types.int8) and _is_vector(bs, types.int16)):
        return None
    tokens, width = isa.tokens, isa.width
    ret = types.UniTuple(types.int32, tokens)
    sig = ret(isa, w, types.intp, x, types.intp, types.intp, bs, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        _, w_a, off, x_a, x_off, x_stride, bs_a, bs_off, bs_stride = args
        wbase = _data_ptr(context, builder, sig.args[1], w_a)
        xbase = _data_ptr(context, builder, sig.args[3], x_a)
        bsbase = _data_ptr(context, builder, sig.args[6], bs_a)
        codes = _q6k_codes(builder, width, wbase, off)
        scales8 = _load(builder, wbase, _plus(builder, off, 192), ir.VectorType(_I8, 16))
        scales = builder.sext(scales8, ir.VectorType(_I16, 16))
        per_vec = width // Q6K_SUBBLOCK  # sub-blocks per code vector; pmaddubsw lane i covers values 2i, 2i+1
        vec_scales = [_spread_scales(builder, scales, k * per_vec, width) for k in range(len(codes))]
        sums = []
        for j in range(tokens):
            xo = builder.add(x_off, builder.mul(x_stride, ir.Constant(x_off.type, j)))
            acc = None
            for k, code in enumerate(codes):
                xv = _load(builder, xbase, _plus(builder, xo, k * width), ir.VectorType(_I8, width))
                part = _madd_words(builder, _maddubs(builder, width, code, xv), vec_scales[k])
                acc = part if acc is None else builder.add(acc, part)
            if width == 64:
                acc = builder.add(
                    _shuffle(builder, acc, list(range(8))), _shuffle(builder, acc, list(range(8, 16)))
                )
            bo = builder.add(bs_off, builder.mul(bs_stride, ir.Constant(bs_off.type, j)))
            bsums = _load(builder, bsbase, bo, ir.VectorType(_I16, 16))
            offset = builder.shl(_madd_words(builder, scales, bsums), _splat(_I32, 8, 5))  # 32·Σ scale·bsum
            total = builder.sub(acc, offset)
            sums.append(_call(builder, "llvm.vector.reduce.add.v8i32", _I32, [total]))
        return context.make_tuple(builder, ret, sums)

    return sig, codegen


@intrinsic
def f16_simd_dot(typingctx, isa, w, w_off, x, x_off, steps):
    """tinyBLAS's F16 dot of ``steps``·16 values: ``w[w_off:]`` (F16 bits) · ``x[x_off:]`` (float32), 16
    lanes, then the ``_mm512_reduce_add_ps`` tree."""
    if not _is_simd(isa) or not (_is_vector(w, types.uint16) and _is_vector(x, types.float32)):
        return None
    sig = types.float32(isa, w, types.intp, x, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        _, w_a, w_off, x_a, x_off, steps = args
        wbase = _data_ptr(context, builder, sig.args[1], w_a)
        xbase = _data_ptr(context, builder, sig.args[3], x_a)
        wbytes = builder.bitcast(wbase, ir.PointerType(_I8))
        lanes = ir.VectorType(_F32, F16_LANES)
        acc_ptr = cgutils.alloca_once_value(builder, ir.Constant(lanes, None))
        with cgutils.for_range(builder, steps) as loop:
            k = builder.mul(loop.index, ir.Constant(loop.index.type, F16_LANES))
            wi = builder.add(w_off, k)
            _prefetch(builder, wbytes, builder.add(builder.shl(wi, ir.Constant(wi.type, 1)),
                                                   ir.Constant(wi.type, PREFETCH_BYTES)))  # fmt: skip
            wv = builder.fpext(_load(builder, wbase, wi, ir.VectorType(_HALF, F16_LANES)), lanes)
            xv = _load(builder, xbase, builder.add(x_off, k), lanes)
            builder.store(builder.fadd(builder.load(acc_ptr), builder.fmul(xv, wv)), acc_ptr)
        v = builder.load(acc_ptr)
        v = builder.fadd(_shuffle(builder, v, list(range(8))), _shuffle(builder, v, list(range(8, 16))))
        v = builder.fadd(_shuffle(builder, v, list(range(4))), _shuffle(builder, v, list(range(4, 8))))
        v = builder.fadd(_shuffle(builder, v, [0, 1]), _shuffle(builder, v, [2, 3]))
        return builder.fadd(builder.extract_element(v, ir.Constant(_I32, 0)),
                            builder.extract_element(v, ir.Constant(_I32, 1)))  # fmt: skip

    return sig, codegen


def _q8_0_dot_isa(isa: IsaType) -> IsaType:
    """The 256-bit dot-product flavour for 32-value blocks: AVX-VNNI's own, else AVX2's (on every x86 CPU with
    AVX-512 VNNI too, without relying on AVX512-VL)."""
    return isa if isa.width == 32 else IsaType(AVX2.name, 32, 1)


@intrinsic
def q8_0_simd_dot(typingctx, isa, w, w_off, x, x_off, xd, xd_off, n_blocks):
    """llama.cpp's Q8_0 × Q8_0 dot of one row: ``n_blocks`` blocks at ``w[w_off:]``, activations at
    ``x[x_off:]`` (in [-127, 127]) with scales ``xd[xd_off:]``."""
    if not _is_simd(isa) or not (_is_vector(w, types.uint8) and _is_vector(x, types.int8)):
        return None
    if not _is_vector(xd, types.float32):
        return None
    dot_isa = _q8_0_dot_isa(isa)
    sig = types.float32(isa, w, types.intp, x, types.intp, xd, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        _, w_a, w_off, x_a, x_off, xd_a, xd_off, n_blocks = args
        wbase = _data_ptr(context, builder, sig.args[1], w_a)
        xbase = _data_ptr(context, builder, sig.args[3], x_a)
        xdbase = _data_ptr(context, builder, sig.args[5], xd_a)
        bytes32 = ir.VectorType(_I8, Q8_0_BLOCK)
        lanes_i = ir.VectorType(_I32, Q8_0_LANES)
        lanes_f = ir.VectorType(_F32, Q8_0_LANES)
        acc_ptr = cgutils.alloca_once_value(builder, ir.Constant(lanes_f, None))
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            wo = builder.add(w_off, builder.mul(b, ir.Constant(b.type, Q8_0_BLOCK_BYTES)))
            _prefetch(builder, wbase, _plus(builder, wo, PREFETCH_BYTES))
            d_w = _half_from_quad(builder, wbase, wo, 0)  # d and the first 6 codes
            d = builder.fmul(d_w, builder.load(builder.gep(xdbase, [builder.add(xd_off, b)])))
            wq = _load(builder, wbase, _plus(builder, wo, 2), bytes32)
            xq = _load(
                builder, xbase, builder.add(x_off, builder.mul(b, ir.Constant(b.type, Q8_0_BLOCK))), bytes32
            )
            # |w|·(x·sign w): exact while x > -128 (pairs ≤ 2·128·127 fit pmaddubsw's int16)
            absw = _call(builder, "llvm.abs.v32i8", bytes32, [wq, ir.Constant(ir.IntType(1), 0)])
            signed_x = _call(builder, "llvm.x86.avx2.psign.b", bytes32, [xq, wq])
            isum = _dot_u8s8(builder, dot_isa, ir.Constant(lanes_i, None), absw, signed_x)
            dv = builder.insert_element(ir.Constant(lanes_f, None), d, ir.Constant(_I32, 0))
            dv = _shuffle(builder, dv, [0] * Q8_0_LANES)
            fma = _call(
                builder, "llvm.fma.v8f32", lanes_f, [builder.sitofp(isum, lanes_f), dv, builder.load(acc_ptr)]
            )
            builder.store(fma, acc_ptr)
        v = builder.load(acc_ptr)  # hsum_float_8: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
        v = builder.fadd(_shuffle(builder, v, list(range(4))), _shuffle(builder, v, list(range(4, 8))))
        v = builder.fadd(_shuffle(builder, v, [0, 1]), _shuffle(builder, v, [2, 3]))
        return builder.fadd(builder.extract_element(v, ir.Constant(_I32, 0)),
                            builder.extract_element(v, ir.Constant(_I32, 1)))  # fmt: skip

    return sig, codegen


# ---------------------------------------------------------------- generic twins (plain Numba, one token)


@njit(cache=True)
def q6k_generic_isum(w, w_off, x, x_off):
    """The exact integer part of one Q6_K block (bit layout in the module docstring)."""
    total = np.int32(0)
    for h in range(2):
        for v in range(4):
            for half in range(2):
                part = np.int32(0)
                for i in range(16 * half, 16 * half + 16):
                    ql = np.int32(w[w_off + 64 * h + 32 * (v % 2) + i])
                    nib = ql & 0x0F if v < 2 else ql >> 4
                    bits = (np.int32(w[w_off + 128 + 32 * h + i]) >> (2 * v)) & 3
                    part += ((nib | (bits << 4)) - 32) * np.int32(x[x_off + 128 * h + 32 * v + i])
                s = 8 * h + 2 * v + half
                total += np.int32(np.int8(w[w_off + 192 + s])) * part
    return total


@njit(cache=True)
def f16_generic_dot(w, w_off, x, x_off, steps, lanes):
    """``f16_simd_dot`` in plain Numba (``lanes`` float32[16] scratch)."""
    lanes[:] = np.float32(0.0)
    for s in range(steps):
        k = s * F16_LANES
        for i in range(F16_LANES):
            lanes[i] += x[x_off + k + i] * half_at(w, w_off + k + i)
    return reduce_add_16(lanes)


@njit(cache=True)
def q8_0_generic_dot(w, w_off, x, x_off, xd, xd_off, n_blocks, lanes):
    """``q8_0_simd_dot`` in plain Numba (``lanes`` float32[8] scratch)."""
    lanes[:] = np.float32(0.0)
    for b in range(n_blocks):
        wo = w_off + b * Q8_0_BLOCK_BYTES
        xo = x_off + b * Q8_0_BLOCK
        d = half_at(w, wo) * xd[xd_off + b]
        for j in range(Q8_0_LANES):
            isum = np.int32(0)
            for i in range(4 * j, 4 * j + 4):
                isum += np.int32(np.int8(w[wo + 2 + i])) * np.int32(x[xo + i])
            lanes[j] = fma_f32(np.float32(isum), d, lanes[j])
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))


# ---------------------------------------------------------------- per-ISA primitives, resolved when compiled
# Stubs callable only from jitted code; each overload is a one-line trampoline into a top-level kernel or
# intrinsic (so the on-disk cache keeps working, as in kernels_fast).


def q6k_isums(isa, w, w_off, x, x_off, x_stride, bs, bs_off, bs_stride):
    """Exact integer parts of one Q6_K block for each token of the tile (a tuple of ``tile_tokens(isa)``)."""
    raise NotImplementedError("only callable from jitted code")


def f16_dot(isa, w, w_off, x, x_off, steps, lanes):
    """The 16-lane F16 dot of ``steps``·16 values (``lanes`` scratch for the generic path)."""
    raise NotImplementedError("only callable from jitted code")


def q8_0_dot(isa, w, w_off, x, x_off, xd, xd_off, n_blocks, lanes):
    """The Q8_0 dot of one row (``lanes`` scratch for the generic path)."""
    raise NotImplementedError("only callable from jitted code")


def _generic(isa) -> bool:
    return isinstance(isa, IsaType) and isa.width == 0


@overload(q6k_isums, inline="always")
def _q6k_isums(isa, w, w_off, x, x_off, x_stride, bs, bs_off, bs_stride):
    if _generic(isa):
        return lambda isa, w, w_off, x, x_off, x_stride, bs, bs_off, bs_stride: (
            q6k_generic_isum(w, w_off, x, x_off),
        )
    return lambda isa, w, w_off, x, x_off, x_stride, bs, bs_off, bs_stride: q6k_simd_isums(
        isa, w, w_off, x, x_off, x_stride, bs, bs_off, bs_stride
    )


@overload(f16_dot, inline="always")
def _f16_dot(isa, w, w_off, x, x_off, steps, lanes):
    if _generic(isa):
        return lambda isa, w, w_off, x, x_off, steps, lanes: f16_generic_dot(w, w_off, x, x_off, steps, lanes)
    return lambda isa, w, w_off, x, x_off, steps, lanes: f16_simd_dot(isa, w, w_off, x, x_off, steps)


@overload(q8_0_dot, inline="always")
def _q8_0_dot(isa, w, w_off, x, x_off, xd, xd_off, n_blocks, lanes):
    if _generic(isa):
        return lambda isa, w, w_off, x, x_off, xd, xd_off, n_blocks, lanes: q8_0_generic_dot(
            w, w_off, x, x_off, xd, xd_off, n_blocks, lanes
        )
    return lambda isa, w, w_off, x, x_off, xd, xd_off, n_blocks, lanes: q8_0_simd_dot(
        isa, w, w_off, x, x_off, xd, xd_off, n_blocks
    )


# ---------------------------------------------------------------- serial row drivers


@njit(cache=True)
def q8k_bsums(xq):
    """Σ of every 16 activations, int16[T, K/16] (Q8_K's ``bsums``: |Σ| ≤ 16·128 fits)."""
    n_tok, k = xq.shape
    out = np.empty((n_tok, k // Q6K_SUBBLOCK), dtype=np.int16)
    for t in range(n_tok):
        for s in range(k // Q6K_SUBBLOCK):
            total = np.int32(0)
            for i in range(s * Q6K_SUBBLOCK, (s + 1) * Q6K_SUBBLOCK):
                total += np.int32(xq[t, i])
            out[t, s] = total
    return out


@njit(cache=True, inline="always")
def _q6k_tile(isa, w, base, n_blocks, x, n_in, bs, xd, t0, acc):
    """``acc[j]`` = the output of the row whose blocks start at ``w[base]`` for token t0 + j of the tile."""
    tokens = tile_tokens(isa)
    n_sub = n_in // Q6K_SUBBLOCK
    for j in range(tokens):
        acc[j] = np.float32(0.0)
    for b in range(n_blocks):
        off = base + b * Q6K_BLOCK_BYTES
        prefetch_bytes(w, off + PREFETCH_BYTES, 256)
        sums = q6k_isums(isa, w, off, x, t0 * n_in + b * QK_K, n_in, bs, t0 * n_sub + b * 16, n_sub)
        d_w = half_ending_at(w, off + 208)
        for j in range(tokens):
            acc[j] = fma_f32(np.float32(sums[j]) * d_w, xd[t0 + j, b], acc[j])


@njit(cache=True)
def q6k_rows(isa, w, n_in, r0, r1, xq, xd, bsums, out):
    """Rows [r0, r1) of the Q6_K × Q8_K product for every token (see the module docstring)."""
    n_tok = xq.shape[0]
    n_blocks = n_in // QK_K
    row_bytes = n_blocks * Q6K_BLOCK_BYTES
    x = xq.reshape(xq.size)
    bs = bsums.reshape(bsums.size)
    tokens = tile_tokens(isa)
    one = single_token(isa)
    t_full = n_tok - n_tok % tokens
    acc = np.empty(tokens, dtype=np.float32)
    for r in range(r0, r1):
        base = r * row_bytes
        for t0 in range(0, t_full, tokens):
            _q6k_tile(isa, w, base, n_blocks, x, n_in, bs, xd, t0, acc)
            for j in range(tokens):
                out[t0 + j, r] = acc[j]
        for t0 in range(t_full, n_tok):
            _q6k_tile(one, w, base, n_blocks, x, n_in, bs, xd, t0, acc)
            out[t0, r] = acc[0]


@njit(cache=True)
def q6k_block_sums(isa, w, n_in, xq, bsums, out):
    """``out[t, n, b]`` = the exact integer part of block b of row n for token t (for tests)."""
    n_tok, n_out, n_blocks = out.shape
    x = xq.reshape(xq.size)
    bs = bsums.reshape(bsums.size)
    one = single_token(isa)
    for n in range(n_out):
        for b in range(n_blocks):
            off = (n * n_blocks + b) * Q6K_BLOCK_BYTES
            for t in range(n_tok):
                out[t, n, b] = q6k_isums(
                    one, w, off, x, t * n_in + b * QK_K, n_in, bs, t * (n_in // 16) + b * 16, 0
                )[0]


@njit(cache=True)
def f16_rows(isa, w, n_in, r0, r1, x, out):
    """Rows [r0, r1) of the F16 × F16 product (``x`` float32[T, K] holding F16 values)."""
    n_tok = x.shape[0]
    steps = n_in // F16_LANES
    xf = x.reshape(x.size)
    lanes = np.empty(F16_LANES, dtype=np.float32)
    for r in range(r0, r1):
        base = r * n_in
        for t in range(n_tok):
            total = f16_dot(isa, w, base, xf, t * n_in, steps, lanes)
            for k in range(steps * F16_LANES, n_in):
                total += xf[t * n_in + k] * half_at(w, base + k)
            out[t, r] = total


@njit(cache=True)
def q8_0_rows(isa, w, n_in, r0, r1, xq, xd, out):
    """Rows [r0, r1) of the Q8_0 × Q8_0 product (``xq`` in [-127, 127])."""
    n_tok = xq.shape[0]
    n_blocks = n_in // Q8_0_BLOCK
    row_bytes = n_blocks * Q8_0_BLOCK_BYTES
    x = xq.reshape(xq.size)
    xds = xd.reshape(xd.size)
    lanes = np.empty(Q8_0_LANES, dtype=np.float32)
    for r in range(r0, r1):
        for t in range(n_tok):
            out[t, r] = q8_0_dot(isa, w, r * row_bytes, x, t * n_in, xds, t * n_blocks, n_blocks, lanes)


# ---------------------------------------------------------------- parallel drivers (call from Python)


@njit(cache=True, parallel=True)
def q6k_matmul(isa, w, n_in, xq, xd, bsums, out):
    """``q6k_rows`` over all rows, parallel over chunks of ``ROW_CHUNK`` rows."""
    n_out = out.shape[1]
    for c in prange((n_out + ROW_CHUNK - 1) // ROW_CHUNK):
        q6k_rows(isa, w, n_in, c * ROW_CHUNK, min(n_out, c * ROW_CHUNK + ROW_CHUNK), xq, xd, bsums, out)


@njit(cache=True, parallel=True)
def f16_matmul(isa, w, n_in, x, out):
    """``f16_rows`` over all rows, parallel over chunks of ``ROW_CHUNK`` rows."""
    n_out = out.shape[1]
    for c in prange((n_out + ROW_CHUNK - 1) // ROW_CHUNK):
        f16_rows(isa, w, n_in, c * ROW_CHUNK, min(n_out, c * ROW_CHUNK + ROW_CHUNK), x, out)


@njit(cache=True, parallel=True)
def q8_0_matmul(isa, w, n_in, xq, xd, out):
    """``q8_0_rows`` over all rows, parallel over chunks of ``ROW_CHUNK`` rows."""
    n_out = out.shape[1]
    for c in prange((n_out + ROW_CHUNK - 1) // ROW_CHUNK):
        q8_0_rows(isa, w, n_in, c * ROW_CHUNK, min(n_out, c * ROW_CHUNK + ROW_CHUNK), xq, xd, out)


# ---------------------------------------------------------------- Python wrappers


def _isa(kernels: str | None) -> IsaType:
    return simd.ISAS[cpu_features.select_path(kernels)]


def _flat_bytes(raw: np.ndarray, nbytes: int, what: str) -> np.ndarray:
    flat = np.asarray(raw).reshape(-1)
    if flat.dtype != np.uint8 or flat.size != nbytes:
        raise ValueError(f"{what}: expected {nbytes} uint8 bytes, got {flat.dtype}[{flat.size}]")
    return np.ascontiguousarray(flat)


def _check_shape(shape: tuple[int, int], block: int, what: str) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"{what}: a head matrix must be 2-D [n_out, n_in], got shape {shape}")
    if shape[1] % block:
        raise ValueError(f"{what}: row length {shape[1]} is not a multiple of the block length {block}")
    return int(shape[0]), int(shape[1])


def _activations(x: np.ndarray, n_in: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"{what}: activations must be [tokens, {n_in}], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class _Head:
    """What the three head types share: shape, kernel path, dequantized rows for the embedding lookup."""

    ggml_type: int
    block: int

    def __init__(self, raw: np.ndarray, shape: tuple[int, int], kernels: str | None) -> None:
        name = quants.type_name(self.ggml_type)
        self.n_out, self.n_in = _check_shape(shape, self.block, name)
        self.raw = _flat_bytes(raw, quants.tensor_nbytes(self.ggml_type, shape), name)
        self.isa = _isa(kernels)
        self.row_bytes = self.raw.size // self.n_out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows (float32[len(ids), n_in]) through the formats codec."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_out):
            raise ValueError(f"row ids must be in [0, {self.n_out}), got {ids.min()}..{ids.max()}")
        picked = self.raw.reshape(self.n_out, self.row_bytes)[ids]
        return quants.dequantize(self.ggml_type, picked.reshape(-1), (ids.size, self.n_in))

    def _out(self, n_tok: int, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty((n_tok, self.n_out), dtype=np.float32)
        if out.shape != (n_tok, self.n_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be C-contiguous float32[{n_tok}, {self.n_out}], got {out.dtype}{out.shape}"
            )
        return out


class Q6KHead(_Head):
    """A Q6_K head over its file bytes; activations quantized to Q8_K as llama.cpp does."""

    ggml_type = quants.Q6_K
    block = QK_K

    def __init__(self, raw: np.ndarray, shape: tuple[int, int], kernels: str | None = None) -> None:
        super().__init__(raw, shape, kernels)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x`` float32[T, n_in] → logits float32[T, n_out]."""
        xq, xd = activations.quantize_q8k(_activations(x, self.n_in, "Q6_K head"))
        return self.matmul_quantized(xq, xd)

    def matmul_quantized(self, xq: np.ndarray, xd: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Given Q8_K activations (``xq`` int8[T, n_in], ``xd`` float32[T, n_in/256])."""
        n_tok = xq.shape[0]
        if xq.shape != (n_tok, self.n_in) or xq.dtype != np.int8 or not xq.flags.c_contiguous:
            raise ValueError(f"xq must be C-contiguous int8[T, {self.n_in}], got {xq.dtype}{xq.shape}")
        if xd.shape != (n_tok, self.n_in // QK_K) or xd.dtype != np.float32:
            raise ValueError(f"xd must be float32[{n_tok}, {self.n_in // QK_K}], got {xd.dtype}{xd.shape}")
        out = self._out(n_tok, out)
        q6k_matmul(self.isa, self.raw, self.n_in, xq, np.ascontiguousarray(xd), q8k_bsums(xq), out)
        return out


class Q8_0Head(_Head):
    """A Q8_0 head over its file bytes; activations quantized to Q8_0 as llama.cpp does."""

    ggml_type = quants.Q8_0
    block = Q8_0_BLOCK

    def __init__(self, raw: np.ndarray, shape: tuple[int, int], kernels: str | None = None) -> None:
        super().__init__(raw, shape, kernels)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        xq, xd = activations.quantize_q8_0(_activations(x, self.n_in, "Q8_0 head"))
        return self.matmul_quantized(xq, xd)

    def matmul_quantized(self, xq: np.ndarray, xd: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Given Q8_0 activations (``xq`` int8[T, n_in] in [-127, 127], ``xd`` float32[T, n_in/32])."""
        n_tok = xq.shape[0]
        if xq.shape != (n_tok, self.n_in) or xq.dtype != np.int8 or not xq.flags.c_contiguous:
            raise ValueError(f"xq must be C-contiguous int8[T, {self.n_in}], got {xq.dtype}{xq.shape}")
        if xq.size and xq.min() == -128:
            raise ValueError("Q8_0 activations must be in [-127, 127] (the kernels' sign trick), got -128")
        if xd.shape != (n_tok, self.n_in // Q8_0_BLOCK) or xd.dtype != np.float32:
            raise ValueError(
                f"xd must be float32[{n_tok}, {self.n_in // Q8_0_BLOCK}], got {xd.dtype}{xd.shape}"
            )
        out = self._out(n_tok, out)
        q8_0_matmul(self.isa, self.raw, self.n_in, xq, np.ascontiguousarray(xd), out)
        return out


class F16Head(_Head):
    """An F16 head over its file bytes; activations rounded to F16, products summed in float32."""

    ggml_type = quants.F16
    block = 1

    def __init__(self, raw: np.ndarray, shape: tuple[int, int], kernels: str | None = None) -> None:
        super().__init__(raw, shape, kernels)
        self.bits = self.raw.view(np.uint16)
        if self.bits.size and np.any((self.bits >> 10) & 0x1F == 0x1F):
            raise ValueError("F16 head holds inf or NaN values")

    def matmul(self, x: np.ndarray) -> np.ndarray:
        x16 = activations.round_to_f16(_activations(x, self.n_in, "F16 head"))
        out = self._out(x16.shape[0], None)
        f16_matmul(self.isa, self.bits, self.n_in, x16, out)
        return out


def head_matrix(ggml_type: int, raw: np.ndarray, shape: tuple[int, int], kernels: str | None = None) -> _Head:
    """The fast head for a Q6_K, Q8_0 or F16 tensor (``ValueError`` for any other type)."""
    heads = {quants.Q6_K: Q6KHead, quants.Q8_0: Q8_0Head, quants.F16: F16Head}
    if ggml_type not in heads:
        raise ValueError(f"no fast head kernel for {quants.type_name(ggml_type)}: expected Q6_K, Q8_0 or F16")
    return heads[ggml_type](raw, tuple(shape), kernels)
