"""Fused forward pass: every layer of a batch in ONE jitted call over the planar weights of all layers.

A 125M-parameter model decodes a token in ~1.2 ms; a Python call per matmul (7 per layer) would cost a good
share of that. ``forward_layers`` runs the whole stack of layers inside Numba: RMSNorm, the activations
quantized once per norm and shared (Q/K/V in one parallel region, gate/up in another with the gate
activation applied right there), RoPE, the KV-cache write, attention, sub-norms, O and down with their
residuals. The same code serves a one-token decode, a batch of decodes from several slots and a prompt
(the matmuls then run the register-tile GEMM path of the planar kernels).

Threads claim the work items of the matmul and attention regions as they go (``claim``: an atomic counter
per region), so a thread the machine stalls costs the others an item, not its whole share. A prompt of one
slot attends over contiguous copies of its keys (``kernels_attention.compact_kv``, once per layer), the query
heads of each KV head in one item (``attend_heads``).

Float order is the one of the step-by-step ``model.Transformer``, operation for operation (where this module
runs a faster twin (``rms_norm_8``, ``kernels_attention.attend_head``/``attend_heads``/``rope_neox_rows``,
``kernels_ffn.gate_rows``, ``kernels_q8k.quantize_q8k_rows_into``) the twin is tested bit-identical), so in
``q8k`` mode the logits are bit-identical to the reference layout (``kernels_q8k`` keeps llama.cpp's TQ × Q8_K
lane order); ``per_token`` activations take the integer-only planar kernels.

Weights come as ``StackedLinear`` tuples: the planar arrays of one linear for every layer stacked on a leading
layer axis (``(packed uint8[L, B], group_scales float32[L, G, K/256, 4], row_scales float32[L, 4G],
group_uniform uint8[L, G], scale float32[L])``, ``scale`` = the ``<name>.scale`` tensor or 1.0).

Numba note: this function owns every ``prange`` it runs and calls only serial kernels: a cached function that
calls a parallel function loaded from the cache segfaults (numba #8578).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from ternary.engine.attention import LANES
from ternary.engine.attention import apply_rope as rope_rows
from ternary.engine.kernels import quantize_per_token_rows, rms_norm_rows
from ternary.engine.kernels_attention import (
    attend_head,
    attend_heads,
    blocked_head_dim,
    compact_kv,
    rope_neox_rows,
)
from ternary.engine.kernels_fast import activation_sums, planar_chunk_groups, planar_matmul_groups
from ternary.engine.kernels_ffn import gate_rows
from ternary.engine.kernels_q8k import LANES as Q8K_LANES
from ternary.engine.kernels_q8k import (
    lane_sums,
    pair_buffers,
    pair_layout,
    q8k_matmul_groups,
    quantize_q8k_rows_into,
    uses_pairs,
)
from ternary.engine.simd import BLOCK, ROW_GROUP, tile_tokens
from ternary.engine.weights import PlanarQ8KMatrix

WORK_ITEMS_PER_THREAD = 4  # parallel work items per thread in a matmul region (claimed as threads go)
REGIONS = 5  # claimed regions per layer: Q/K/V, attention, O, gate/up, down
COMPACT_MIN_TOKENS = 8  # prompt batches from this size attend over contiguous copies of their keys
COMPACT_ROWS = 64  # cache rows per copying work item
ROWS_PER_ITEM = 8  # row-wise steps (residual, norm, quantizer) take rows 8 at a time
PLANAR_FIELDS = ("packed", "group_scales", "row_scales", "group_uniform")


@dataclass
class StackedLinear:
    """One linear (say ``attn_q``) of every layer in the planar layout, stacked on a leading layer axis.

    ``scale`` float32[L] holds each layer's ``<name>.scale`` (1.0 where ``has_scale`` is false: multiplying by
    1.0 changes no bits).
    """

    packed: np.ndarray  # uint8[L, bytes per layer], every layer's slice 128-byte aligned
    group_scales: np.ndarray  # float32[L, n_groups, K/256, 4]
    row_scales: np.ndarray  # float32[L, 4·n_groups]
    group_uniform: np.ndarray  # uint8[L, n_groups]
    scale: np.ndarray  # float32[L]
    has_scale: np.ndarray  # bool[L]
    n_out: int

    def arrays(self) -> tuple[np.ndarray, ...]:
        """What ``forward_layers`` takes for this linear."""
        return self.packed, self.group_scales, self.row_scales, self.group_uniform, self.scale

    def matrix(self, layer: int, kernels: str | None = None) -> PlanarQ8KMatrix:
        """Layer ``layer``'s matrix as a ``PlanarQ8KMatrix`` over views of the stacked arrays (no copy)."""
        return PlanarQ8KMatrix(
            self.packed[layer],
            self.group_scales[layer],
            self.row_scales[layer],
            self.group_uniform[layer],
            self.n_out,
            kernels,
        )

    def layer_scale(self, layer: int) -> float | None:
        return float(self.scale[layer]) if self.has_scale[layer] else None


# ---------------------------------------------------------------- quantized activations, shared by matmuls


@njit(cache=True)
def _quantized(isa, q8k, n_tok, k):
    """Activation buffers for ``n_tok`` rows of length ``k``: (int8 values, scales, llama.cpp's lane sums,
    block sums, token sums, the q8k kernels' token-pair layout); which are filled depends on the scales
    (see ``_lane_order``)."""
    nb = k // BLOCK
    xq = np.empty((n_tok, k), dtype=np.int8)
    xs = np.empty((n_tok, nb if q8k else 1), dtype=np.float32)
    sums = np.empty((n_tok, nb, Q8K_LANES), dtype=np.int32)
    block_sums = np.empty((n_tok, nb), dtype=np.int64)
    token_sums = np.empty(n_tok, dtype=np.int64)
    mixed, neg_sums, pair_scales = pair_buffers(isa, n_tok, k)
    return xq, xs, sums, block_sums, token_sums, mixed, neg_sums, pair_scales


@njit(cache=True, inline="always")
def _lane_order(act):
    """Activation blocks of 256 take llama.cpp's lane-order kernel (``TernaryMatrix``'s rule, so both layouts
    agree bit for bit); other scales (one per token) take the planar integer-only kernels."""
    xq, xs = act[0], act[1]
    return xs.shape[1] * BLOCK == xq.shape[1]


def _transpose_patterns() -> list[list[tuple[int, int, list[int]]]]:
    """Shuffles that transpose 8 vectors of 16 lanes as two 8×8 blocks (lanes 0–7 and 8–15): three stages,
    stage k swapping bit k of the vector index with bit k of the lane; each entry (first, second, indices)
    builds one output vector from two inputs."""
    stages = []
    for k in range(3):
        bit = 1 << k
        outs = []
        for o in range(8):
            beta = (o >> k) & 1
            lo_vec, hi_vec = o & ~bit, o | bit
            indices = []
            for lane in range(16):
                lam = (lane >> k) & 1
                src_lane = (lane & ~bit) | (beta << k)
                indices.append(src_lane + (16 if lam else 0))
            outs.append((lo_vec, hi_vec, indices))
        stages.append(outs)
    return stages


@intrinsic
def sum_squares_8(typingctx, x, offset, stride, n_rows, k):
    """Σ float64(x·x) (x·x rounded in float32 first) over k elements of 8 rows at ``x[offset + i·stride:]``
    (rows past ``n_rows`` repeat the last one), each row summed strictly in order like
    ``kernels.rms_norm_rows``: 16 columns at a time, transposed so that the 8 rows' sums are one vector."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 1 and x.layout == "C"):
        return None
    ret = types.UniTuple(types.float64, 8)
    sig = ret(x, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        x_a, off, stride, n_rows, k = args
        f32, f64 = ir.FloatType(), ir.DoubleType()
        v16, v8d = ir.VectorType(f32, 16), ir.VectorType(f64, 8)
        i32 = ir.IntType(32)
        base = context.make_array(sig.args[0])(context, builder, x_a).data
        last = builder.sub(n_rows, ir.Constant(n_rows.type, 1))
        rows = []
        for i in range(8):
            ii = ir.Constant(n_rows.type, i)
            use = builder.select(builder.icmp_signed("<", ii, n_rows), ii, last)
            rows.append(builder.add(off, builder.mul(use, stride)))
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8d, None))
        n16 = builder.sdiv(k, ir.Constant(k.type, 16))
        stages = _transpose_patterns()
        lo8 = ir.Constant(ir.VectorType(i32, 8), list(range(8)))
        hi8 = ir.Constant(ir.VectorType(i32, 8), list(range(8, 16)))
        with cgutils.for_range(builder, n16) as loop:
            col = builder.mul(loop.index, ir.Constant(k.type, 16))
            vecs = []
            for i in range(8):
                ptr = builder.bitcast(builder.gep(base, [builder.add(rows[i], col)]), v16.as_pointer())
                v = builder.load(ptr, align=4)
                vecs.append(builder.fmul(v, v))
            for stage in stages:
                vecs = [
                    builder.shuffle_vector(vecs[a], vecs[b], ir.Constant(ir.VectorType(i32, 16), idx))
                    for a, b, idx in stage
                ]
            total = builder.load(acc)
            for half in (lo8, hi8):  # columns 0..7, then 8..15: each row's adds stay in order
                for c in range(8):
                    part = builder.shuffle_vector(vecs[c], vecs[c], half)
                    total = builder.fadd(total, builder.fpext(part, v8d))
            builder.store(total, acc)
        total = builder.load(acc)
        # a tail past the last 16 columns, one column at a time
        done = builder.mul(n16, ir.Constant(k.type, 16))
        with cgutils.for_range(builder, builder.sub(k, done)) as loop:
            col = builder.add(done, loop.index)
            vals = []
            for i in range(8):
                v = builder.load(builder.gep(base, [builder.add(rows[i], col)]))
                vals.append(builder.fpext(builder.fmul(v, v), f64))
            vec = ir.Constant(v8d, None)
            for i, v in enumerate(vals):
                vec = builder.insert_element(vec, v, ir.Constant(i32, i))
            builder.store(builder.fadd(builder.load(acc), vec), acc)
        total = builder.load(acc)
        return context.make_tuple(
            builder, ret, [builder.extract_element(total, ir.Constant(i32, i)) for i in range(8)]
        )

    return sig, codegen


@njit(cache=True)
def rms_norm_8(x, t0, t1, weight, eps, out):
    """``kernels.rms_norm_rows`` on rows [t0, t1) (at most 8), bit for bit, with the rows' float64 sums of
    squares computed side by side (``sum_squares_8``: each sum is one sequential chain of adds, latency-bound
    alone). One row alone goes straight to ``rms_norm_rows``."""
    if t1 - t0 == 1:
        rms_norm_rows(x[t0:t1], weight, eps, out[t0:t1])
        return
    k = x.shape[1]
    sums = sum_squares_8(x.reshape(x.size), t0 * k, k, t1 - t0, k)
    for i in range(t1 - t0):
        mean = np.float32(sums[i] / k)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
        for j in range(k):
            out[t0 + i, j] = (x[t0 + i, j] * scale) * weight[j]


@njit(cache=True)
def _rows_in(isa, t0, t1, src, residual, add_residual, norm, normalize, eps, dst, q8k, act):
    """Rows [t0, t1) (at most 8, ``t0`` even) of a matmul input: ``src += residual`` (if ``add_residual``),
    ``dst = rms_norm(src)`` (if ``normalize``; else ``dst`` is ``src``), then quantized into ``act`` with the
    sums (and token pairs) its kernel needs."""
    if add_residual:
        for t in range(t0, t1):
            for e in range(src.shape[1]):
                src[t, e] = src[t, e] + residual[t, e]
    if normalize:
        rms_norm_8(src, t0, t1, norm, eps, dst)
    xq, xs, sums, block_sums, token_sums, mixed, neg_sums, pair_scales = act
    if q8k:  # (block scales: the lane-order kernel)
        quantize_q8k_rows_into(dst, t0, t1, xq, xs, sums, mixed, neg_sums, pair_scales, uses_pairs(isa))
        return
    quantize_per_token_rows(dst[t0:t1], xq[t0:t1], xs[t0:t1])
    if _lane_order(act):  # rows of one block: token scales are block scales
        lane_sums(xq[t0:t1], sums[t0:t1])
        if uses_pairs(isa):
            pair_layout(xq, sums, xs, t0, t1, mixed, neg_sums, pair_scales)
    else:
        b, s = activation_sums(xq[t0:t1])
        block_sums[t0:t1] = b
        token_sums[t0:t1] = s


@njit(cache=True)
def _rope_store(t0, t1, q, k, v, rope, il, slots, positions, cache, heads):
    """RoPE on rows [t0, t1) of ``q`` and ``k``, then their K/V into the cache at (slot, position)."""
    cos, sin, rope_dim, rope_neox = rope
    k_cache, v_cache = cache
    n_head, n_head_kv, head_dim = heads
    if rope_neox:
        rope_neox_rows(q, t0, t1, cos, sin, n_head, head_dim, rope_dim)
        rope_neox_rows(k, t0, t1, cos, sin, n_head_kv, head_dim, rope_dim)
    else:
        rope_rows(q[t0:t1], cos[t0:t1], sin[t0:t1], n_head, head_dim, rope_dim, rope_neox)
        rope_rows(k[t0:t1], cos[t0:t1], sin[t0:t1], n_head_kv, head_dim, rope_dim, rope_neox)
    for t in range(t0, t1):
        k_row = k_cache[il, slots[t], positions[t]].reshape(k.shape[1])
        v_row = v_cache[il, slots[t], positions[t]].reshape(v.shape[1])
        k_row[:] = k[t]
        v_row[:] = v[t]


@njit(cache=True)
def _add_rows(x, o, t0, t1):
    for t in range(t0, t1):
        for e in range(x.shape[1]):
            x[t, e] = x[t, e] + o[t, e]


@njit(cache=True)
def _linear_groups(isa, w, il, g0, g1, act, out):
    """Row groups [g0, g1) of layer ``il`` of the stacked linear ``w`` on the activations ``act``, times its
    scale."""
    packed, group_scales, row_scales, group_uniform, scale = w
    xq, xs, sums, block_sums, token_sums, mixed, neg_sums, pair_scales = act
    n_out = out.shape[1]
    if _lane_order(act):
        q8k_matmul_groups(
            isa,
            g0,
            g1,
            packed[il],
            group_scales[il],
            row_scales[il],
            group_uniform[il],
            n_out,
            xq,
            sums,
            xs,
            mixed,
            neg_sums,
            pair_scales,
            out,
        )
    else:
        planar_matmul_groups(
            isa, g0, g1, packed[il], group_scales[il], row_scales[il], group_uniform[il], n_out,
            xq, block_sums, token_sums, xs, out,
        )  # fmt: skip
    s = scale[il]
    if s != np.float32(1.0):
        for t in range(out.shape[0]):
            for n in range(g0 * ROW_GROUP, min(g1 * ROW_GROUP, n_out)):
                out[t, n] *= s


@njit(cache=True)
def _chunk_groups(isa, n_tok, k, n_groups, n_threads):
    """Row groups per parallel work item for a region of ``n_groups`` groups (over one or more matrices).

    ``WORK_ITEMS_PER_THREAD`` items per thread, which threads claim as they go (``claim``): a thread the
    machine stalls costs the others an item, not its share. Prefill items are at most the planar kernels'
    L2-sized chunks (the weights stay hot while every token tile passes); decode items are a few dozen groups
    (call overhead stays small). (``n_threads`` comes from the caller: ``numba.get_num_threads()`` in jitted
    code defeats the disk cache.)
    """
    even = max(1, -(-n_groups // (WORK_ITEMS_PER_THREAD * n_threads)))
    if n_tok >= tile_tokens(isa):
        return min(even, planar_chunk_groups(isa, n_tok, k))
    return even


@intrinsic
def claim(typingctx, counters, index):
    """Atomically take the next work item of a region: ``counters[index]`` before adding 1 to it."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.ndim == 1):
        return None
    sig = types.int64(counters, types.intp)

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(arr.data, [args[1]])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

    return sig, codegen


# ---------------------------------------------------------------- the layers


@njit(cache=True, parallel=True)
def forward_layers(
    isa, q8k, relu2, has_sub_norms, x, positions, slots, cos, sin,
    attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm,
    wq, wk, wv, wo, w_gate, w_up, w_down,
    k_cache, v_cache, n_head, n_head_kv, head_dim, rope_dim, rope_neox, eps, kq_scale, n_threads,
):  # fmt: skip
    """Run every layer on hidden states ``x`` float32[T, n_embd] in place; K/V land at (slot, position).

    ``cos``/``sin`` float32[T, rope_dim/2] (``model.rope_tables``); ``k_cache``/``v_cache``
    float32[L, n_slots, n_ctx, n_head_kv, head_dim]; norms float32[L, width]; linears as described in the
    module docstring;
    ``n_threads``: Numba's thread count on the calling thread (sizes the parallel work items).
    """
    n_tok, n_embd = x.shape
    n_layer = attn_norm.shape[0]
    n_q = n_head * head_dim
    n_kv = n_head_kv * head_dim
    n_ff = w_down[1].shape[2] * BLOCK  # the down projection's input
    group = n_head // n_head_kv
    scale32 = np.float32(kq_scale)
    n_row_items = (n_tok + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM

    h = np.empty((n_tok, n_embd), dtype=np.float32)
    q = np.empty((n_tok, n_q), dtype=np.float32)
    k = np.empty((n_tok, n_kv), dtype=np.float32)
    v = np.empty((n_tok, n_kv), dtype=np.float32)
    a = np.empty((n_tok, n_q), dtype=np.float32)
    q_flat = q.reshape(q.size)
    a_flat = a.reshape(a.size)
    o = np.empty((n_tok, n_embd), dtype=np.float32)
    g = np.empty((n_tok, n_ff), dtype=np.float32)
    u = np.empty((n_tok, n_ff), dtype=np.float32)
    f = np.empty((n_tok, n_ff), dtype=np.float32)
    act_h = _quantized(isa, q8k, n_tok, n_embd)
    act_a = _quantized(isa, q8k, n_tok, n_q)
    act_f = _quantized(isa, q8k, n_tok, n_ff)
    counters = np.zeros(REGIONS * n_layer, dtype=np.int64)  # the next work item of every claimed region
    # prompt attention over contiguous copies of the keys (one slot, enough queries to pay for the copy)
    compact = n_tok >= COMPACT_MIN_TOKENS and blocked_head_dim(head_dim) and (slots == slots[0]).all()
    max_keys = positions.max() + 1
    n_rows = max_keys if compact else 0
    n_row_blocks = -(-n_rows // COMPACT_ROWS)
    k_rows = np.empty((n_head_kv, n_rows, head_dim), dtype=np.float32)
    v_blocks = np.empty((n_head_kv, head_dim // LANES, n_rows, LANES), dtype=np.float32)
    k_flat = k_rows.reshape(k_rows.size)
    v_flat = v_blocks.reshape(v_blocks.size)

    gq, gk, gv, go = wq[3].shape[1], wk[3].shape[1], wv[3].shape[1], wo[3].shape[1]
    gf, gd = w_gate[3].shape[1], w_down[3].shape[1]
    c_qkv = _chunk_groups(isa, n_tok, n_embd, gq + gk + gv, n_threads)
    nq, nk, nv = -(-gq // c_qkv), -(-gk // c_qkv), -(-gv // c_qkv)
    co = _chunk_groups(isa, n_tok, n_q, go, n_threads)
    cf = _chunk_groups(isa, n_tok, n_embd, 2 * gf, n_threads)
    cd = _chunk_groups(isa, n_tok, n_ff, gd, n_threads)
    no, nf, nd = -(-go // co), -(-gf // cf), -(-gd // cd)
    n_ctx = k_cache.shape[2]
    rope = (cos, sin, rope_dim, rope_neox)
    cache = (k_cache, v_cache)
    heads = (n_head, n_head_kv, head_dim)

    for il in range(n_layer):
        sub_a = attn_sub_norm[il % attn_sub_norm.shape[0]]  # (a 1-row placeholder when there are none)
        sub_f = ffn_sub_norm[il % ffn_sub_norm.shape[0]]
        add_prev = il > 0  # the previous layer's down projection, still in ``o``
        # ---- attention: norm, quantize once, Q/K/V in one parallel region, RoPE, KV write, attention
        if n_row_items > 1:
            for c in prange(n_row_items):
                t0 = c * ROWS_PER_ITEM
                t1 = min(t0 + ROWS_PER_ITEM, n_tok)
                _rows_in(isa, t0, t1, x, o, add_prev, attn_norm[il], True, eps, h, q8k, act_h)
        else:
            _rows_in(isa, 0, n_tok, x, o, add_prev, attn_norm[il], True, eps, h, q8k, act_h)
        for _ in prange(n_threads):
            while True:
                c = claim(counters, il * REGIONS)
                if c >= nq + nk + nv:
                    break
                if c < nq:
                    c0 = c * c_qkv
                    _linear_groups(isa, wq, il, c0, min(c0 + c_qkv, gq), act_h, q)
                elif c < nq + nk:
                    c0 = (c - nq) * c_qkv
                    _linear_groups(isa, wk, il, c0, min(c0 + c_qkv, gk), act_h, k)
                else:
                    c0 = (c - nq - nk) * c_qkv
                    _linear_groups(isa, wv, il, c0, min(c0 + c_qkv, gv), act_h, v)
        if n_row_items > 1:
            for c in prange(n_row_items):
                t0 = c * ROWS_PER_ITEM
                _rope_store(
                    t0, min(t0 + ROWS_PER_ITEM, n_tok), q, k, v, rope, il, slots, positions, cache, heads
                )
        else:
            _rope_store(0, n_tok, q, k, v, rope, il, slots, positions, cache, heads)
        if compact:  # one slot's prompt: its keys 0..n_rows-1 copied contiguous, per KV head
            for c in prange(n_head_kv * n_row_blocks):
                kvh, r0 = c // n_row_blocks, (c % n_row_blocks) * COMPACT_ROWS
                compact_kv(
                    k_cache[il], v_cache[il], slots[0], kvh, r0, min(r0 + COMPACT_ROWS, n_rows), k_rows[kvh],
                    v_blocks[kvh],
                )  # fmt: skip
        kc = k_cache[il].reshape(k_cache[il].size)
        vc = v_cache[il].reshape(v_cache[il].size)
        n_items = n_tok * (n_head_kv if compact else n_head)
        for _ in prange(n_threads):
            scratch = np.empty(LANES * head_dim + group * (2 * (max_keys + LANES) + 1), dtype=np.float32)
            while True:
                th = claim(counters, il * REGIONS + 1)
                if th >= n_items:
                    break
                # head-major: the heads of one KV head follow each other, causal work grows with t
                t = th % n_tok
                n_keys = positions[t] + 1
                if compact:  # the query heads of one KV head together
                    kvh = th // n_tok
                    qo = t * n_q + kvh * group * head_dim
                    off = kvh * n_rows * head_dim
                    attend_heads(
                        q_flat, qo, group, k_flat, off, head_dim, v_flat, off, LANES, n_rows * LANES, n_keys,
                        head_dim, scale32, a_flat, qo, scratch,
                    )  # fmt: skip
                else:
                    hh = th // n_tok
                    qo = t * n_q + hh * head_dim
                    kv_off = (slots[t] * n_ctx * n_head_kv + hh // group) * head_dim
                    attend_head(
                        q_flat, qo, kc, vc, kv_off, n_kv, n_keys, head_dim, scale32, a_flat, qo, scratch
                    )

        # ---- sub-norm, O projection
        if n_row_items > 1:
            for c in prange(n_row_items):
                t0 = c * ROWS_PER_ITEM
                t1 = min(t0 + ROWS_PER_ITEM, n_tok)
                _rows_in(isa, t0, t1, a, a, False, sub_a, has_sub_norms, eps, a, q8k, act_a)
        else:
            _rows_in(isa, 0, n_tok, a, a, False, sub_a, has_sub_norms, eps, a, q8k, act_a)
        for _ in prange(n_threads):
            while True:
                c = claim(counters, il * REGIONS + 2)
                if c >= no:
                    break
                _linear_groups(isa, wo, il, c * co, min(c * co + co, go), act_a, o)

        # ---- residual, FFN norm, gate/up with the activation applied per chunk
        if n_row_items > 1:
            for c in prange(n_row_items):
                t0 = c * ROWS_PER_ITEM
                t1 = min(t0 + ROWS_PER_ITEM, n_tok)
                _rows_in(isa, t0, t1, x, o, True, ffn_norm[il], True, eps, h, q8k, act_h)
        else:
            _rows_in(isa, 0, n_tok, x, o, True, ffn_norm[il], True, eps, h, q8k, act_h)
        for _ in prange(n_threads):
            while True:
                c = claim(counters, il * REGIONS + 3)
                if c >= nf:
                    break
                g0, g1 = c * cf, min(c * cf + cf, gf)
                _linear_groups(isa, w_gate, il, g0, g1, act_h, g)
                _linear_groups(isa, w_up, il, g0, g1, act_h, u)
                gate_rows(g, u, relu2, f, g0 * ROW_GROUP, min(g1 * ROW_GROUP, n_ff))

        # ---- sub-norm, down projection, residual
        if n_row_items > 1:
            for c in prange(n_row_items):
                t0 = c * ROWS_PER_ITEM
                t1 = min(t0 + ROWS_PER_ITEM, n_tok)
                _rows_in(isa, t0, t1, f, f, False, sub_f, has_sub_norms, eps, f, q8k, act_f)
        else:
            _rows_in(isa, 0, n_tok, f, f, False, sub_f, has_sub_norms, eps, f, q8k, act_f)
        for _ in prange(n_threads):
            while True:
                c = claim(counters, il * REGIONS + 4)
                if c >= nd:
                    break
                _linear_groups(isa, w_down, il, c * cd, min(c * cd + cd, gd), act_f, o)
        # (its residual is added by the next layer's first row step, or below after the last layer)

    if n_row_items > 1:
        for c in prange(n_row_items):
            t0 = c * ROWS_PER_ITEM
            _add_rows(x, o, t0, min(t0 + ROWS_PER_ITEM, n_tok))
    else:
        _add_rows(x, o, 0, n_tok)
