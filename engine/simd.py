"""SIMD building blocks for the planar ternary kernels, written as Numba ``@intrinsic`` LLVM IR.

LLVM never turns plain Numba loops into ``vpdpbusd``; these intrinsics emit the x86 dot-product instructions
directly (AVX-512 VNNI on zmm, VNNI on ymm, AVX2 ``maddubs``), with nothing beyond numba/llvmlite.

Vocabulary:

* An *ISA marker* (``Isa``) is a tiny value whose Numba type says which instructions to emit, the vector width
  and the token-tile height. Kernels take it as their first argument, so one kernel source compiles once per
  ISA.
* A *tile* is 4 weight rows (one row group of the planar layout) × ``tokens`` activation rows.
  ``tile_acc_dot`` adds one 256-weight block of the tile into a *tile accumulator* (an LLVM array of int32
  vectors that lives in registers) of Σ code·x (codes are w+1 ∈ {0,1,2}); ``tile_facc_add`` reduces it to 4 ×
  ``tokens`` integers, removes the +1 offset with Σx and adds ``float32(isum) · (w_scale · x_scale)`` into a
  float32 vector.
* Weight bytes (planar layout, see ``planar.py``): for row r of a group and block b, 64 bytes; byte j holds
  the codes of weights b·256 + s·64 + j at bits 2s..2s+1 (s = 0..3). Activation x[b·256 + s·64 + j] meets bits
  2s of byte j, so activations are read in place, never shuffled.

Two decodings of the 2-bit codes, both exact:

* one token (decode): ``byte & (3 << 2s)`` is code·4^s; each (row, s) gets its own accumulator, whose lanes
  are multiples of 4^s, and the four are combined at the end as ((a3 >> 2 + a2) >> 2 + a1) >> 2 + a0 (exact
  shifts). No shifts in the hot loop: 1 AND + 1 dot product per 64 weights.
* several tokens (prefill): ``(byte >> 2s) & 3`` is decoded once and reused by every token of the tile, one
  accumulator per (row, token).

Operand ranges make every path exact: unsigned code bytes ≤ 128 times int8 activations; ``vpdpbusd`` sums four
products into int32 without saturation, and AVX2 ``pmaddubsw`` pairs stay within int16 (2·128·128 = 32768 only
for -128, which is exactly int16's minimum).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

ROW_GROUP = 4  # weight rows per planar group (and per tile)
BLOCK = 256  # weights per block along K
ROW_BLOCK_BYTES = BLOCK // 4  # packed bytes of one row in one block

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)

# LLVM 22 declares the VNNI intrinsics on byte vectors, older LLVMs on int32 vectors (22 still upgrades them).
_VNNI_BYTE_OPERANDS = llvm.llvm_version_info >= (22,)


class IsaType(types.Type):
    """Numba type of an ISA marker: ``isa`` name, vector ``width`` in bytes (0 = scalar), tile ``tokens``."""

    def __init__(self, isa: str, width: int, tokens: int) -> None:
        self.isa = isa
        self.width = width
        self.tokens = tokens
        super().__init__(name=f"Isa({isa}, width={width}, tokens={tokens})")

    @property
    def lanes(self) -> int:
        """int32 lanes of one accumulator vector."""
        return self.width // 4


@register_model(IsaType)
class _IsaModel(models.OpaqueModel):
    pass


class Isa:
    """An ISA marker passed to kernels (``AVX512VNNI``, ``AVXVNNI``, ``AVX2``, ``GENERIC``)."""

    def __init__(self, isa: str, width: int, tokens: int) -> None:
        self.numba_type = IsaType(isa, width, tokens)

    @property
    def name(self) -> str:
        return self.numba_type.isa

    @property
    def tokens(self) -> int:
        return self.numba_type.tokens

    def __repr__(self) -> str:
        return f"Isa({self.name!r})"


@typeof_impl.register(Isa)
def _typeof_isa(val: Isa, c) -> IsaType:
    return val.numba_type


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    return NativeValue(c.context.get_constant_null(typ))


# 32 zmm/ymm registers with AVX-512: 4×4 tiles (16 accumulators); AVX2 machines have 16 ymm registers: 4×2.
AVX512VNNI = Isa("avx512vnni", 64, 4)
AVXVNNI = Isa("avxvnni", 32, 4)
AVX2 = Isa("avx2", 32, 2)
GENERIC = Isa("generic", 0, 1)
ISAS = {isa.name: isa for isa in (AVX512VNNI, AVXVNNI, AVX2, GENERIC)}


class TileAccType(types.Type):
    """Registers of one tile accumulator: an LLVM array of int32 vectors (see ``_acc_count``)."""

    def __init__(self, isa: IsaType) -> None:
        self.isa = isa
        super().__init__(name=f"TileAcc({isa.name}, tokens={isa.tokens})")


def _acc_count(isa: IsaType) -> int:
    """One vector per (row, shift) for a one-token tile, per (row, token) otherwise."""
    return ROW_GROUP * (4 if isa.tokens == 1 else isa.tokens)


def _acc_llvm_type(isa: IsaType) -> ir.Type:
    return ir.ArrayType(ir.VectorType(_I32, isa.lanes), _acc_count(isa))


@register_model(TileAccType)
class _TileAccModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: TileAccType) -> None:
        super().__init__(dmm, fe_type, _acc_llvm_type(fe_type.isa))


class TileFAccType(types.Type):
    """Registers of a tile's float32 outputs: ``<4·tokens x float>``, lane ``r·tokens + j``."""

    def __init__(self, isa: IsaType) -> None:
        self.isa = isa
        super().__init__(name=f"TileFAcc({isa.name}, tokens={isa.tokens})")


def _facc_llvm_type(isa: IsaType) -> ir.Type:
    return ir.VectorType(ir.FloatType(), ROW_GROUP * isa.tokens)


@register_model(TileFAccType)
class _TileFAccModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: TileFAccType) -> None:
        super().__init__(dmm, fe_type, _facc_llvm_type(fe_type.isa))


def _is_simd(isa) -> bool:
    return isinstance(isa, IsaType) and isa.width > 0


def _is_vector(arr, dtype) -> bool:
    """A 1-D C-contiguous array of ``dtype``: the intrinsics address elements as ``data + index``."""
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype


# ---------------------------------------------------------------- IR helpers (Python, run at compile time)


def _data_ptr(context, builder, aty, value) -> ir.Value:
    return context.make_array(aty)(context, builder, value).data


def _load_bytes(builder, base: ir.Value, index: ir.Value, width: int) -> ir.Value:
    ptr = builder.gep(base, [index])
    return builder.load(builder.bitcast(ptr, ir.PointerType(ir.VectorType(_I8, width))), align=1)


def _splat(elem: ir.IntType, count: int, value: int) -> ir.Constant:
    """A constant vector; ``value`` is taken modulo 2**bits and written as a signed integer."""
    bits = elem.width
    value %= 1 << bits
    if value >= 1 << (bits - 1):
        value -= 1 << bits
    return ir.Constant(ir.VectorType(elem, count), [ir.Constant(elem, value)] * count)


def _dot_u8s8(builder, isa: IsaType, acc: ir.Value, codes: ir.Value, x: ir.Value) -> ir.Value:
    """acc[i] += Σ_{k<4} codes[4i+k] (unsigned) · x[4i+k] (signed), exactly."""
    lanes, width = isa.lanes, isa.width
    acc_t = ir.VectorType(_I32, lanes)
    if isa.isa == "avx2":
        i16v = ir.VectorType(_I16, width // 2)
        maddubs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i16v, [codes.type, x.type]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        madd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(acc_t, [i16v, i16v]), "llvm.x86.avx2.pmadd.wd"
        )
        pairs = builder.call(maddubs, [codes, x])
        return builder.add(acc, builder.call(madd, [pairs, _splat(_I16, width // 2, 1)]))
    name = f"llvm.x86.avx512.vpdpbusd.{width * 8}"
    if _VNNI_BYTE_OPERANDS:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(acc_t, [acc_t, codes.type, x.type]), name
        )
        return builder.call(fn, [acc, codes, x])
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc_t, [acc_t, acc_t, acc_t]), name)
    return builder.call(fn, [acc, builder.bitcast(codes, acc_t), builder.bitcast(x, acc_t)])


def _shift_right_2bit_fields(builder, v: ir.Value, shift: int) -> ir.Value:
    """Bytes shifted right by ``shift`` bits (as 16-bit lanes; the caller masks off what crossed a byte)."""
    if shift == 0:
        return v
    count = v.type.count // 2
    wide = builder.bitcast(v, ir.VectorType(_I16, count))
    return builder.bitcast(builder.lshr(wide, _splat(_I16, count, shift)), v.type)


def _reduce_vectors(builder, vectors: list[ir.Value], lanes: int) -> ir.Value:
    """Horizontal sums of many int32 vectors as one vector ``<len(vectors) x i32>``, in order.

    Pairs are merged so that every add works on useful lanes (a transpose-and-add tree), then each vector's
    remaining segments are folded in place.
    """
    count = len(vectors)
    if count & (count - 1):
        raise ValueError(f"reduce needs a power-of-two number of vectors, got {count}")
    # (vector, rows it holds): each row occupies lanes // rows contiguous lanes
    groups = [(v, 1) for v in vectors]
    while len(groups) > 1 and lanes // groups[0][1] > 1:
        merged = []
        for (a, rows), (b, _) in zip(groups[0::2], groups[1::2], strict=True):
            seg = lanes // rows
            half = seg // 2
            lo = [i * seg + k for i in range(rows) for k in range(half)]
            lo += [lanes + i for i in lo]
            hi = [i + half for i in lo]
            pick_lo = builder.shuffle_vector(a, b, _index_vector(lo))
            pick_hi = builder.shuffle_vector(a, b, _index_vector(hi))
            merged.append((builder.add(pick_lo, pick_hi), 2 * rows))
        groups = merged
    parts = []
    for v, rows in groups:
        seg = lanes // rows
        width = seg
        while width > 1:
            half = width // 2
            v = builder.add(
                v, builder.shuffle_vector(v, v, _index_vector([(p + half) % lanes for p in range(lanes)]))
            )
            width = half
        if seg > 1:  # row i's sum sits at lane i·seg
            v = builder.shuffle_vector(v, v, _index_vector([i * seg for i in range(rows)]))
        parts.append(v)
    while len(parts) > 1:  # concatenate
        parts = [
            builder.shuffle_vector(a, b, _index_vector(list(range(2 * a.type.count))))
            for a, b in zip(parts[0::2], parts[1::2], strict=True)
        ]
    return parts[0]


def _index_vector(indices: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), indices)


def _tile_sums(builder, isa: IsaType, acc_v: ir.Value) -> ir.Value:
    """The tile's Σ code·x as ``<4·tokens x i32>``, lane ``r·tokens + j``."""
    accs = [builder.extract_value(acc_v, i) for i in range(_acc_count(isa))]
    if isa.tokens == 1:  # combine the four shift accumulators of each row: exact, see the module docstring
        two = _splat(_I32, isa.lanes, 2)
        rows = []
        for r in range(ROW_GROUP):
            v = accs[r * 4 + 3]
            for s in (2, 1, 0):
                v = builder.add(builder.ashr(v, two), accs[r * 4 + s])
            rows.append(v)
        accs = rows
    return _reduce_vectors(builder, accs, isa.lanes)


def _lanes_from(builder, values: list[ir.Value], pattern: list[int]) -> ir.Value:
    """A vector whose lane i is ``values[pattern[i]]``."""
    vec = ir.Constant(ir.VectorType(values[0].type, len(values)), None)
    for i, v in enumerate(values):
        vec = builder.insert_element(vec, v, ir.Constant(_I32, i))
    return builder.shuffle_vector(vec, vec, _index_vector(pattern))


# ---------------------------------------------------------------- intrinsics


@intrinsic
def tile_tokens(typingctx, isa):
    """Activation rows per tile for ``isa`` (a compile-time constant)."""
    if not isinstance(isa, IsaType):
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, sig.args[0].tokens)

    return types.intp(isa), codegen


@intrinsic
def single_token(typingctx, isa):
    """The one-token variant of ``isa`` (used for the tokens left over after the full tiles)."""
    if not isinstance(isa, IsaType):
        return None
    one = IsaType(isa.isa, isa.width, 1)

    def codegen(context, builder, sig, args):
        return context.get_constant_null(one)

    return one(isa), codegen


@intrinsic
def tile_acc_zero(typingctx, isa):
    """A zeroed tile accumulator."""
    if not _is_simd(isa):
        return None
    acc = TileAccType(isa)

    def codegen(context, builder, sig, args):
        return ir.Constant(_acc_llvm_type(isa), None)

    return acc(isa), codegen


@intrinsic
def tile_acc_dot(typingctx, isa, acc, packed, offset, x, x_offset, x_stride):
    """Add one 256-weight block of a row group into ``acc``.

    ``packed`` uint8[:] planar weights, the group's block at ``offset`` (4 rows × 64 bytes); ``x`` int8[:]
    flat activations, token j of the tile at ``x_offset + j·x_stride`` (256 bytes).
    """
    if not _is_simd(isa) or not isinstance(acc, TileAccType) or acc.isa != isa:
        return None
    if not (_is_vector(packed, types.uint8) and _is_vector(x, types.int8)):
        return None
    sig = acc(isa, acc, packed, types.intp, x, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        _, acc_v, packed_v, off, x_v, x_off, x_stride = args
        width, tokens = isa.width, isa.tokens
        halves = ROW_BLOCK_BYTES // width
        wbase = _data_ptr(context, builder, sig.args[2], packed_v)
        xbase = _data_ptr(context, builder, sig.args[4], x_v)
        accs = [builder.extract_value(acc_v, i) for i in range(_acc_count(isa))]

        def at(*terms):
            total = terms[0]
            for t in terms[1:]:
                total = builder.add(total, t)
            return total

        def const(v):
            return ir.Constant(off.type, v)

        weights = [
            [
                _load_bytes(builder, wbase, at(off, const(r * ROW_BLOCK_BYTES + h * width)), width)
                for h in range(halves)
            ]
            for r in range(ROW_GROUP)
        ]
        for s in range(4):
            for h in range(halves):
                col = const(s * ROW_BLOCK_BYTES + h * width)
                if tokens == 1:
                    xv = _load_bytes(builder, xbase, at(x_off, col), width)
                    mask = _splat(_I8, width, 3 << (2 * s))
                    for r in range(ROW_GROUP):
                        i = r * 4 + s
                        accs[i] = _dot_u8s8(builder, isa, accs[i], builder.and_(weights[r][h], mask), xv)
                else:
                    low2 = _splat(_I8, width, 3)
                    codes = [
                        builder.and_(_shift_right_2bit_fields(builder, weights[r][h], 2 * s), low2)
                        for r in range(ROW_GROUP)
                    ]
                    for j in range(tokens):
                        row_off = builder.mul(const(j), x_stride)
                        xv = _load_bytes(builder, xbase, at(x_off, row_off, col), width)
                        for r in range(ROW_GROUP):
                            i = r * tokens + j
                            accs[i] = _dot_u8s8(builder, isa, accs[i], codes[r], xv)
        out = ir.Constant(_acc_llvm_type(isa), None)
        for i, v in enumerate(accs):
            out = builder.insert_value(out, v, i)
        return out

    return sig, codegen


@intrinsic
def tile_facc_zero(typingctx, isa):
    """A zeroed float32 tile accumulator (4 × tokens outputs in one vector)."""
    if not _is_simd(isa):
        return None
    facc = TileFAccType(isa)

    def codegen(context, builder, sig, args):
        return ir.Constant(_facc_llvm_type(isa), None)

    return facc(isa), codegen


@intrinsic
def tile_facc_add(
    typingctx, facc, acc, w, w_offset, xs, xs_offset, xs_stride, xsum, xsum_offset, xsum_stride
):
    """``facc[r, j] += float32(Σ code·x − xsum[j]) · (w[r] · xs[j])``, lane by lane in IEEE float32.

    ``acc`` holds Σ code·x (codes w+1); ``xsum[j]`` = ``xsum[xsum_offset + j·xsum_stride]`` (int64, the Σx
    that turns codes into weights); ``w[r]`` = ``w[w_offset + r]``; ``xs[j]`` =
    ``xs[xs_offset + j·xs_stride]``.
    """
    if not isinstance(facc, TileFAccType) or not isinstance(acc, TileAccType) or facc.isa != acc.isa:
        return None
    if not (_is_vector(w, types.float32) and _is_vector(xs, types.float32) and _is_vector(xsum, types.int64)):
        return None
    isa = facc.isa
    sig = facc(facc, acc, w, types.intp, xs, types.intp, types.intp, xsum, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        facc_v, acc_v, w_a, w_off, xs_a, xs_off, xs_stride, xsum_a, xsum_off, xsum_stride = args
        tokens = isa.tokens
        rows_of = [i // tokens for i in range(ROW_GROUP * tokens)]
        toks_of = [i % tokens for i in range(ROW_GROUP * tokens)]

        def load(aty, arr, index):
            return builder.load(builder.gep(_data_ptr(context, builder, aty, arr), [index]))

        def strided(aty, arr, offset, stride, j):
            return load(aty, arr, builder.add(offset, builder.mul(stride, ir.Constant(offset.type, j))))

        sums = _tile_sums(builder, isa, acc_v)
        xsums = [
            builder.trunc(strided(sig.args[7], xsum_a, xsum_off, xsum_stride, j), _I32) for j in range(tokens)
        ]
        w_vals = [
            load(sig.args[2], w_a, builder.add(w_off, ir.Constant(w_off.type, r))) for r in range(ROW_GROUP)
        ]
        xs_vals = [strided(sig.args[4], xs_a, xs_off, xs_stride, j) for j in range(tokens)]
        scale = builder.fmul(_lanes_from(builder, w_vals, rows_of), _lanes_from(builder, xs_vals, toks_of))
        isum = builder.sub(sums, _lanes_from(builder, xsums, toks_of))
        return builder.fadd(facc_v, builder.fmul(builder.sitofp(isum, scale.type), scale))

    return sig, codegen


@intrinsic
def tile_facc_values(typingctx, facc):
    """The tile's float32 outputs as a tuple, index ``r·tokens + j``."""
    if not isinstance(facc, TileFAccType):
        return None
    n = ROW_GROUP * facc.isa.tokens
    ret = types.UniTuple(types.float32, n)

    def codegen(context, builder, sig, args):
        values = [builder.extract_element(args[0], ir.Constant(_I32, i)) for i in range(n)]
        return context.make_tuple(builder, ret, values)

    return ret(facc), codegen


@intrinsic
def prefetch_bytes(typingctx, arr, offset, nbytes):
    """Hint to bring ``arr[offset : offset + nbytes]`` into L1 (``nbytes`` a compile-time constant).

    The hardware prefetcher alone keeps a one-thread GEMV at ~65% of the streaming bandwidth: the kernel
    consumes each line too slowly for it to run far enough ahead. Prefetches never fault, so reaching past
    the end of ``arr`` is harmless.
    """
    if not isinstance(arr, types.Array) or not isinstance(nbytes, types.IntegerLiteral):
        return None
    count = nbytes.literal_value

    def codegen(context, builder, sig, args):
        base = _data_ptr(context, builder, sig.args[0], args[0])
        i8p = ir.PointerType(_I8)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0"
        )
        read, to_l1, data = ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)
        for line in range(0, count, 64):
            index = builder.add(args[1], ir.Constant(args[1].type, line))
            builder.call(fn, [builder.bitcast(builder.gep(base, [index]), i8p), read, to_l1, data])
        return context.get_dummy_value()

    return types.none(arr, types.intp, nbytes), codegen
