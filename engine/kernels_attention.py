"""Attention of one query head in llama.cpp's float order, with explicit 16-lane vectors (for fused callers).

``attention.attention`` defines the order (ggml's ``vec_dot_f32`` for K·Q, ``soft_max_ext``, tinyBLAS's
16-lane V·p) with scalar loops that LLVM leaves scalar; at a context of ~140 they cost as much as all the
matmuls of a small model's decode step. The intrinsics here emit the same float operations as
``<16 x float>`` vector code (every lane sees the same FMAs and adds in the same order: the bits are equal):

* ``vec_dot_main(x, x_off, y, y_off, n_steps)``: ``vec_dot_f32``'s 4 accumulators of 16 lanes over
  ``n_steps`` steps of 64 elements, reduced ``(r0 + r2) + (r1 + r3)`` then ``_mm512_reduce_add_ps``;
* ``fma_row16(acc, acc_off, v, v_off, p, n16)``: ``acc[acc_off + i] = fma(v[v_off + i], p,
  acc[acc_off + i])`` for i < 16·n16 (tinyBLAS's per-lane accumulation of V·p: a row of accumulators per
  key lane);
* ``reduce_rows16(acc, stride, out, out_off, n16)``: ``out[out_off + e] = reduce_add_16(acc[r·stride + e]
  for r < 16)`` for e < 16·n16.

* ``qk_scores16`` / ``pv_columns16``: the same K·Q and V·p 16 keys at a time (section "16 keys at a time").

``softmax16`` is ``attention.softmax_weights`` with a vectorisable ``expf`` (``kernels_ffn``), and
``attend_head`` combines them into one (token, head) of causal attention over a slot's cache rows (16 keys
at a time where ``head_dim`` is 64 or 128, else one key at a time).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from ternary.engine.attention import LANES, VEC_DOT_STEP, reduce_add_16
from ternary.engine.kernels import fma_f32
from ternary.engine.kernels_ffn import expf

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_V16 = ir.VectorType(_F32, LANES)


def _f32_vector(arr) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == types.float32


def _ptr(context, builder, aty, arr, index) -> ir.Value:
    data = context.make_array(aty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [index]), _V16.as_pointer())


def _fma(builder, a, b, c) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _halves(builder, v, width: int) -> tuple[ir.Value, ir.Value]:
    idx = ir.Constant(ir.VectorType(_I32, width // 2), list(range(width // 2)))
    hi = ir.Constant(ir.VectorType(_I32, width // 2), list(range(width // 2, width)))
    return builder.shuffle_vector(v, v, idx), builder.shuffle_vector(v, v, hi)


def _reduce_add_16(builder, v) -> ir.Value:
    """``_mm512_reduce_add_ps``: halves 8+8, 4+4, pairs, then lanes 0+1 (``attention.reduce_add_16``)."""
    width = LANES
    while width > 2:
        lo, hi = _halves(builder, v, width)
        v = builder.fadd(lo, hi)
        width //= 2
    zero, one = ir.Constant(_I32, 0), ir.Constant(_I32, 1)
    return builder.fadd(builder.extract_element(v, zero), builder.extract_element(v, one))


@intrinsic
def vec_dot_main(typingctx, x, x_off, y, y_off, n_steps):
    """Σ x·y over ``64·n_steps`` elements in ``ggml_vec_dot_f32``'s order (the tail is the caller's)."""
    if not (_f32_vector(x) and _f32_vector(y)):
        return None
    sig = types.float32(x, types.intp, y, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        xa, xo, ya, yo, steps = args
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16, None)) for _ in range(4)]
        with cgutils.for_range(builder, steps) as loop:
            base = builder.mul(loop.index, ir.Constant(steps.type, VEC_DOT_STEP))
            for m in range(4):
                off = builder.add(base, ir.Constant(steps.type, m * LANES))
                xv = builder.load(
                    _ptr(context, builder, signature.args[0], xa, builder.add(xo, off)), align=4
                )
                yv = builder.load(
                    _ptr(context, builder, signature.args[2], ya, builder.add(yo, off)), align=4
                )
                builder.store(_fma(builder, xv, yv, builder.load(accs[m])), accs[m])
        r = [builder.load(a) for a in accs]
        folded = builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))
        return _reduce_add_16(builder, folded)

    return sig, codegen


@intrinsic
def fma_row16(typingctx, acc, acc_off, v, v_off, p, n16):
    """``acc[acc_off + i] = fma(v[v_off + i], p, acc[acc_off + i])`` for i < 16·n16."""
    if not (_f32_vector(acc) and _f32_vector(v) and p == types.float32):
        return None
    sig = types.none(acc, types.intp, v, types.intp, types.float32, types.intp)

    def codegen(context, builder, signature, args):
        aa, ao, va, vo, pv, count = args
        splat = builder.insert_element(ir.Constant(_V16, None), pv, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
        with cgutils.for_range(builder, count) as loop:
            off = builder.mul(loop.index, ir.Constant(count.type, LANES))
            aptr = _ptr(context, builder, signature.args[0], aa, builder.add(ao, off))
            vv = builder.load(_ptr(context, builder, signature.args[2], va, builder.add(vo, off)), align=4)
            builder.store(_fma(builder, vv, splat, builder.load(aptr, align=4)), aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def reduce_rows16(typingctx, acc, stride, out, out_off, n16):
    """``out[out_off + e]`` = ``reduce_add_16`` over the 16 rows ``acc[r·stride + e]``, for e < 16·n16."""
    if not (_f32_vector(acc) and _f32_vector(out)):
        return None
    sig = types.none(acc, types.intp, out, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aa, st, oa, oo, count = args
        with cgutils.for_range(builder, count) as loop:
            off = builder.mul(loop.index, ir.Constant(count.type, LANES))
            rows = [
                builder.load(
                    _ptr(
                        context,
                        builder,
                        signature.args[0],
                        aa,
                        builder.add(off, builder.mul(st, ir.Constant(st.type, r))),
                    ),
                    align=4,
                )
                for r in range(LANES)
            ]
            # the reduce_add_16 tree, lane-wise across rows: a_i = (v_i + v_{i+8}) + (v_{i+4} + v_{i+12})
            a = [
                builder.fadd(builder.fadd(rows[i], rows[i + 8]), builder.fadd(rows[i + 4], rows[i + 12]))
                for i in range(4)
            ]
            total = builder.fadd(builder.fadd(a[0], a[2]), builder.fadd(a[1], a[3]))
            builder.store(total, _ptr(context, builder, signature.args[2], oa, builder.add(oo, off)), align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------- 16 keys at a time
# ``vec_dot_main`` reduces every key's 16 lanes on its own (a chain of shuffles and adds per key) and
# ``fma_row16`` keeps tinyBLAS's 16 rows of accumulators in memory. The two intrinsics below do the same
# float operations 16 keys at a time: the per-key lane vectors of ``vec_dot_main`` are reduced together by a
# transpose-and-add tree (every add of ``_mm512_reduce_add_ps`` happens once per key, on useful lanes only),
# and the 16 rows of V·p accumulators of one 16-column block live in registers. Rows past ``n_keys`` are
# never read (the last group's loads are clamped to the last key and its results dropped).


def _load16(context, builder, aty, arr, index) -> ir.Value:
    return builder.load(_ptr(context, builder, aty, arr, index), align=4)


def _splat16(builder, value) -> ir.Value:
    vec = builder.insert_element(ir.Constant(_V16, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _transpose_reduce(builder, vectors: list) -> ir.Value:
    """``reduce_add_16`` of each of 16 vectors, as one vector (lane r: vector r), with the same adds: merging
    two vectors adds lanes i and i + 8 of both at once, and so on down the tree."""
    groups = [(v, 1) for v in vectors]
    while len(groups) > 1:
        merged = []
        for (a, rows), (b, _) in zip(groups[0::2], groups[1::2], strict=True):
            seg = LANES // rows
            half = seg // 2
            lo = [i * seg + k for i in range(rows) for k in range(half)]
            lo += [LANES + i for i in lo]
            hi = [i + half for i in lo]
            index = ir.VectorType(_I32, LANES)
            merged.append(
                (
                    builder.fadd(
                        builder.shuffle_vector(a, b, ir.Constant(index, lo)),
                        builder.shuffle_vector(a, b, ir.Constant(index, hi)),
                    ),
                    2 * rows,
                )
            )
        groups = merged
    return groups[0][0]


def _clamped_rows(builder, base, stride, n_valid):
    """Offsets of the 16 rows ``base + r·stride``, row r clamped to ``n_valid − 1``."""
    last = builder.sub(n_valid, ir.Constant(n_valid.type, 1))
    rows = []
    for r in range(LANES):
        rr = ir.Constant(n_valid.type, r)
        use = builder.select(builder.icmp_signed("<", rr, n_valid), rr, last)
        rows.append(builder.add(base, builder.mul(use, stride)))
    return rows


@intrinsic
def qk_scores16(typingctx, k, k_off, k_stride, n_valid, q, q_off, n_steps, scale, scores, s_off):
    """Scores of up to 16 keys: key r (r < ``n_valid``) at ``k[k_off + r·k_stride:]`` gets ``vec_dot_main``
    against ``q[q_off:]`` over ``64·n_steps`` elements, times ``scale`` (float32), stored at
    ``scores[s_off + r]`` (all 16 lanes are written); returns the largest of the ``n_valid`` stored."""
    if not (_f32_vector(k) and _f32_vector(q) and _f32_vector(scores) and scale == types.float32):
        return None
    intp = types.intp
    sig = types.float32(k, intp, intp, intp, q, intp, intp, types.float32, scores, intp)

    def codegen(context, builder, signature, args):
        ka, ko, kst, nv, qa, qo, steps, sc, sa, so = args
        rows = _clamped_rows(builder, ko, kst, nv)
        zero = ir.Constant(_V16, None)
        folded = []
        for r in range(LANES):  # one key at a time: four accumulators live, not 64
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
            with cgutils.for_range(builder, steps) as loop:
                base = builder.mul(loop.index, ir.Constant(steps.type, VEC_DOT_STEP))
                for m in range(4):
                    off = builder.add(base, ir.Constant(base.type, m * LANES))
                    qv = _load16(context, builder, signature.args[4], qa, builder.add(qo, off))
                    kv = _load16(context, builder, signature.args[0], ka, builder.add(rows[r], off))
                    builder.store(_fma(builder, kv, qv, builder.load(accs[m])), accs[m])
            a = [builder.load(x) for x in accs]
            folded.append(builder.fadd(builder.fadd(a[0], a[2]), builder.fadd(a[1], a[3])))
        total = builder.fmul(_transpose_reduce(builder, folded), _splat16(builder, sc))
        builder.store(total, _ptr(context, builder, signature.args[8], sa, so), align=4)
        lane = ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES)))
        valid = builder.icmp_signed("<", lane, _splat_i32(builder, builder.trunc(nv, _I32)))
        m = builder.select(valid, total, _splat16(builder, ir.Constant(_F32, float("-inf"))))
        width = LANES
        while width > 1:
            width //= 2
            rot = builder.shuffle_vector(
                m, m, ir.Constant(ir.VectorType(_I32, LANES), [(i + width) % LANES for i in range(LANES)])
            )
            m = builder.select(builder.fcmp_ordered(">", rot, m), rot, m)
        return builder.extract_element(m, ir.Constant(_I32, 0))

    return sig, codegen


def _splat_i32(builder, value) -> ir.Value:
    vec = builder.insert_element(ir.Constant(ir.VectorType(_I32, LANES), None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def pv_columns16(typingctx, v, v_off, v_stride, n_keys, p, p_off, out, out_off):
    """``out[out_off + e]`` for e < 16: tinyBLAS's V·p over keys 0..n_keys-1 (key j's row at ``v[v_off +
    j·v_stride:]``, weight ``p[p_off + j]``; accumulator row j % 16 by FMA), then ``reduce_add_16`` over the
    rows."""
    if not (_f32_vector(v) and _f32_vector(p) and _f32_vector(out)):
        return None
    sig = types.none(v, types.intp, types.intp, types.intp, p, types.intp, out, types.intp)

    def codegen(context, builder, signature, args):
        va, vo, vst, nk, pa, po, oa, oo = args
        i64 = vo.type
        pdata = builder.gep(context.make_array(signature.args[4])(context, builder, pa).data, [po])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16, None)) for _ in range(LANES)]
        full = builder.sdiv(nk, ir.Constant(i64, LANES))
        with cgutils.for_range(builder, full) as loop:
            j0 = builder.mul(loop.index, ir.Constant(i64, LANES))
            for r in range(LANES):
                j = builder.add(j0, ir.Constant(i64, r))
                vv = _load16(context, builder, signature.args[0], va, builder.add(vo, builder.mul(j, vst)))
                pj = _splat16(builder, builder.load(builder.gep(pdata, [j])))
                builder.store(_fma(builder, vv, pj, builder.load(accs[r])), accs[r])
        j0 = builder.mul(full, ir.Constant(i64, LANES))
        rest = builder.sub(nk, j0)
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(i64, 0))):
            rows = _clamped_rows(builder, builder.add(vo, builder.mul(j0, vst)), vst, rest)
            last = builder.sub(nk, ir.Constant(i64, 1))
            for r in range(LANES):
                valid = builder.icmp_signed("<", ir.Constant(i64, r), rest)
                j = builder.select(valid, builder.add(j0, ir.Constant(i64, r)), last)
                vv = _load16(context, builder, signature.args[0], va, rows[r])
                pj = _splat16(builder, builder.load(builder.gep(pdata, [j])))
                acc = builder.load(accs[r])
                builder.store(builder.select(valid, _fma(builder, vv, pj, acc), acc), accs[r])
        rows_v = [builder.load(a) for a in accs]
        a = [
            builder.fadd(builder.fadd(rows_v[i], rows_v[i + 8]), builder.fadd(rows_v[i + 4], rows_v[i + 12]))
            for i in range(4)
        ]
        total = builder.fadd(builder.fadd(a[0], a[2]), builder.fadd(a[1], a[3]))
        builder.store(total, _ptr(context, builder, signature.args[6], oa, oo), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, error_model="numpy")
def softmax16(scores, n_keys, scale, out):
    """``attention.softmax_weights``, bit for bit: ``out`` holds n_keys rounded up to 16 (tail set to 0)."""
    vmax = np.float32(-np.inf)
    for j in range(n_keys):
        scores[j] = scores[j] * scale
        vmax = max(vmax, scores[j])
    softmax_scaled(scores, n_keys, vmax, out)


@njit(cache=True, error_model="numpy")
def softmax_scaled(scores, n_keys, vmax, out):
    """``softmax16`` after its first loop: ``scores`` already scaled, ``vmax`` their maximum."""
    for j in range(n_keys):
        out[j] = expf(scores[j] - vmax)
    out[n_keys:] = np.float32(0.0)
    total = 0.0  # ggml_float: each group of 16 is summed in float32, the groups in float64
    for g0 in range(0, out.shape[0], LANES):
        a0 = (out[g0] + out[g0 + 8]) + (out[g0 + 4] + out[g0 + 12])
        a1 = (out[g0 + 1] + out[g0 + 9]) + (out[g0 + 5] + out[g0 + 13])
        a2 = (out[g0 + 2] + out[g0 + 10]) + (out[g0 + 6] + out[g0 + 14])
        a3 = (out[g0 + 3] + out[g0 + 11]) + (out[g0 + 7] + out[g0 + 15])
        total += np.float64((a0 + a2) + (a1 + a3))
    inv = np.float32(1.0 / total)
    for j in range(n_keys):
        out[j] = out[j] * inv


@njit(cache=True)
def attend_head(q, q_off, k, v, kv_off, kv_stride, n_keys, head_dim, scale, out, out_off, scratch):
    """One query head ``q[q_off : q_off + head_dim]`` over cache rows 0..n_keys-1 into ``out[out_off:]``, bit
    for bit ``attention.attention``.

    ``q``, ``k``, ``v``, ``out``: flat float32 arrays; key j of this head is ``k[kv_off + j·kv_stride :
    + head_dim]`` (same for ``v``); ``scratch`` float32[≥ 16·head_dim + 2·(n_keys + 16)].
    """
    if blocked_head_dim(head_dim):
        attend_strided(
            q, q_off, k, kv_off, kv_stride, v, kv_off, kv_stride, LANES, n_keys, head_dim, scale, out,
            out_off, scratch,
        )  # fmt: skip
    else:
        _attend_lanes(q, q_off, k, v, kv_off, kv_stride, n_keys, head_dim, scale, out, out_off, scratch)


@njit(cache=True)
def blocked_head_dim(head_dim):
    """Head sizes the 16-keys-at-a-time kernels serve: 64 and 128 (one or two ``vec_dot_main`` steps, each
    unrolled); others take the one-key-at-a-time path."""
    return head_dim == VEC_DOT_STEP or head_dim == 2 * VEC_DOT_STEP


@njit(cache=True)
def attend_strided(
    q, q_off, k, k_off, k_stride, v, v_off, v_stride, v_block_stride, n_keys, head_dim, scale, out, out_off,
    scratch,
):  # fmt: skip
    """``attend_head`` 16 keys at a time (``head_dim`` 64 or 128: ``blocked_head_dim``) over any layout:
    key j at ``k[k_off + j·k_stride:]``; element e of value j at ``v[v_off + (e // 16)·v_block_stride +
    j·v_stride + e % 16]`` (the cache's rows: ``v_stride`` = the row stride, blocks 16 apart;
    ``compact_kv``'s: 16, blocks ``16·n_rows`` apart)."""
    attend_heads(
        q, q_off, 1, k, k_off, k_stride, v, v_off, v_stride, v_block_stride, n_keys, head_dim, scale, out,
        out_off, scratch,
    )  # fmt: skip


@njit(cache=True)
def attend_heads(
    q, q_off, n_heads, k, k_off, k_stride, v, v_off, v_stride, v_block_stride, n_keys, head_dim, scale, out,
    out_off, scratch,
):  # fmt: skip
    """``attend_strided`` for ``n_heads`` query heads that share one KV head (GQA): head g at ``q[q_off +
    g·head_dim:]``, its output at ``out[out_off + g·head_dim:]``. Each block of 16 keys, and each 16-column
    block of V, is used by every head in turn while it is in L1 (the heads' own float operations unchanged).
    ``scratch`` float32[≥ n_heads·(2·(n_keys + 16) + 1)]."""
    n_pad = (n_keys + LANES - 1) // LANES * LANES
    maxima = scratch[2 * n_heads * n_pad : 2 * n_heads * n_pad + n_heads]
    maxima[:] = np.float32(-np.inf)
    # a constant step count: LLVM unrolls each key's loop (2.5x faster than a loop over steps)
    if head_dim == VEC_DOT_STEP:
        _group_scores(
            q, q_off, n_heads, k, k_off, k_stride, n_keys, head_dim, 1, scale, scratch, n_pad, maxima
        )
    else:
        _group_scores(
            q, q_off, n_heads, k, k_off, k_stride, n_keys, head_dim, 2, scale, scratch, n_pad, maxima
        )
    for g in range(n_heads):
        p = scratch[(n_heads + g) * n_pad : (n_heads + g + 1) * n_pad]
        softmax_scaled(scratch[g * n_pad : (g + 1) * n_pad], n_keys, maxima[g], p)
    for c in range(head_dim // LANES):
        for g in range(n_heads):
            o = out_off + g * head_dim + c * LANES
            pv_columns16(
                v, v_off + c * v_block_stride, v_stride, n_keys, scratch, (n_heads + g) * n_pad, out, o
            )


@njit(cache=True, inline="always")
def _group_scores(
    q, q_off, n_heads, k, k_off, k_stride, n_keys, head_dim, steps, scale, scores, n_pad, maxima
):
    """``qk_scores16`` of every head over keys 0..n_keys-1 (head g's scores at ``scores[g·n_pad:]``), each
    block of keys for all heads in turn; ``maxima[g]`` becomes head g's largest score."""
    for j0 in range(0, n_keys, LANES):
        n_valid = min(LANES, n_keys - j0)
        for g in range(n_heads):
            m = qk_scores16(
                k, k_off + j0 * k_stride, k_stride, n_valid, q, q_off + g * head_dim, steps, scale, scores,
                g * n_pad + j0,
            )  # fmt: skip
            maxima[g] = max(maxima[g], m)


@njit(cache=True)
def rope_neox_rows(x, t0, t1, cos, sin, n_head, head_dim, n_rot):
    """``attention.apply_rope`` (NEOX pairs i, i + n_rot/2) on rows [t0, t1) of ``x`` float32[T,
    n_head·head_dim], bit for bit, in loops LLVM vectorises (the pair style fixed, each half a slice)."""
    half = n_rot // 2
    for t in range(t0, t1):
        c = cos[t]
        s = sin[t]
        row = x[t]
        for h in range(n_head):
            lo = row[h * head_dim : h * head_dim + half]
            hi = row[h * head_dim + half : h * head_dim + n_rot]
            for i in range(half):
                x0 = lo[i]
                x1 = hi[i]
                lo[i] = fma_f32(x0, c[i], -(x1 * s[i]))
                hi[i] = fma_f32(x0, s[i], x1 * c[i])


@njit(cache=True)
def compact_kv(k_cache, v_cache, slot, kv_head, r0, r1, k_rows, v_blocks):
    """Rows [r0, r1) of one slot's and KV head's cache (float32[n_slots, n_ctx, n_head_kv, head_dim]) into
    contiguous buffers: ``k_rows[j, e]`` (float32[n_rows, head_dim]) and ``v_blocks[e // 16, j, e % 16]``
    (float32[head_dim/16, n_rows, 16]). Prompt attention then streams both instead of striding over heads."""
    head_dim = k_rows.shape[1]
    for j in range(r0, r1):
        for e in range(head_dim):
            k_rows[j, e] = k_cache[slot, j, kv_head, e]
        for c in range(head_dim // LANES):
            for e in range(LANES):
                v_blocks[c, j, e] = v_cache[slot, j, kv_head, c * LANES + e]


@njit(cache=True)
def _attend_lanes(q, q_off, k, v, kv_off, kv_stride, n_keys, head_dim, scale, out, out_off, scratch):
    """``attend_head`` one key at a time (any ``head_dim``)."""
    n_pad = (n_keys + LANES - 1) // LANES * LANES
    lanes = scratch[: LANES * head_dim]
    scores = scratch[LANES * head_dim : LANES * head_dim + n_pad]
    p = scratch[LANES * head_dim + n_pad : LANES * head_dim + 2 * n_pad]
    steps = head_dim // VEC_DOT_STEP
    for j in range(n_keys):
        row = kv_off + j * kv_stride
        total = vec_dot_main(k, row, q, q_off, steps)
        for i in range(steps * VEC_DOT_STEP, head_dim):
            total = fma_f32(k[row + i], q[q_off + i], total)
        scores[j] = total
    softmax16(scores, n_keys, scale, p)
    n16 = head_dim // LANES
    lanes[:] = np.float32(0.0)
    for j in range(n_keys):
        r = j % LANES
        row = kv_off + j * kv_stride
        fma_row16(lanes, r * head_dim, v, row, p[j], n16)
        for e in range(n16 * LANES, head_dim):
            lanes[r * head_dim + e] = fma_f32(v[row + e], p[j], lanes[r * head_dim + e])
    reduce_rows16(lanes, head_dim, out, out_off, n16)
    column = np.empty(LANES, dtype=np.float32)
    for e in range(n16 * LANES, head_dim):
        for r in range(LANES):
            column[r] = lanes[r * head_dim + e]
        out[out_off + e] = reduce_add_16(column)
