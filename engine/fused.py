"""Fused forward pass: every layer of a batch in ONE jitted call over the planar weights of all layers.

A 125M-parameter model decodes a token in ~1.5 ms; a Python call per matmul (7 per layer) would cost more than
the arithmetic. ``forward_layers`` runs the whole stack of layers inside Numba: RMSNorm, the activations
quantized once per norm and shared (Q/K/V in one parallel region, gate/up in another with the gate
activation applied right there), RoPE, the KV-cache write, attention, sub-norms, O and down with their
residuals. The same code serves a one-token decode, a batch of decodes from several slots and a prompt
(the matmuls then run the register-tile GEMM path of the planar kernels).

Float order is the one of the unfused ``model.Transformer`` step for step (it calls the same serial
kernels), so in ``q8k`` mode the logits are bit-identical to the reference layout (``kernels_q8k`` keeps
llama.cpp's TQ × Q8_K lane order); ``per_token`` mode uses the integer-only planar kernels.

Weights come as ``StackedLinear`` tuples: the planar arrays of one linear for every layer stacked on a leading
layer axis (``(packed uint8[L, B], group_scales float32[L, G, K/256, 4], row_scales float32[L, 4G],
group_uniform uint8[L, G], scale float32[L])``, ``scale`` = the ``<name>.scale`` tensor or 1.0).

Numba note: this function owns every ``prange`` it runs and calls only serial kernels: a cached function that
calls a parallel function loaded from the cache segfaults (numba #8578).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from ternary.engine.attention import LANES
from ternary.engine.attention import apply_rope as rope_rows
from ternary.engine.kernels import quantize_per_token_rows, quantize_q8k_rows, rms_norm_rows
from ternary.engine.kernels_attention import attend_head
from ternary.engine.kernels_fast import activation_sums, planar_chunk_groups, planar_matmul_groups
from ternary.engine.kernels_ffn import gate_rows
from ternary.engine.kernels_q8k import LANES as Q8K_LANES
from ternary.engine.kernels_q8k import lane_sums, q8k_matmul_groups
from ternary.engine.simd import BLOCK, ROW_GROUP, tile_tokens
from ternary.engine.weights import PlanarQ8KMatrix

WORK_ITEMS_PER_THREAD = 4  # decode: parallel work items per thread in a matmul region
PARALLEL_ROWS_MIN = 4  # below this many tokens, row-wise steps (norms, quantizers) run on the calling thread
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
def _quantize_row(q8k, x, xq, xs, sums, block_sums, token_sums, t):
    """Quantize row ``t`` of ``x`` and compute the sums its matmuls need (lane sums or block/token sums)."""
    if q8k:
        quantize_q8k_rows(x[t : t + 1], xq[t : t + 1], xs[t : t + 1])
        lane_sums(xq[t : t + 1], sums[t : t + 1])
    else:
        quantize_per_token_rows(x[t : t + 1], xq[t : t + 1], xs[t : t + 1])
        b, s = activation_sums(xq[t : t + 1])
        block_sums[t] = b[0]
        token_sums[t] = s[0]


@njit(cache=True)
def _quantized(q8k, n_tok, k):
    """Empty activation buffers for ``n_tok`` rows of length ``k``: (xq, x_scale, lane sums, block sums,
    token sums)."""
    nb = k // BLOCK
    xq = np.empty((n_tok, k), dtype=np.int8)
    xs = np.empty((n_tok, nb if q8k else 1), dtype=np.float32)
    sums = np.empty((n_tok, nb, Q8K_LANES), dtype=np.int32)
    block_sums = np.empty((n_tok, nb), dtype=np.int64)
    token_sums = np.empty(n_tok, dtype=np.int64)
    return xq, xs, sums, block_sums, token_sums


@njit(cache=True)
def _linear_groups(isa, q8k, w, il, g0, g1, xq, xs, sums, block_sums, token_sums, out):
    """Row groups [g0, g1) of layer ``il`` of the stacked linear ``w``, times its scale."""
    packed, group_scales, row_scales, group_uniform, scale = w
    n_out = out.shape[1]
    if q8k:
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

    Prefill: the planar kernels' L2-sized chunks (the weights stay hot while every token tile passes).
    Decode: ``WORK_ITEMS_PER_THREAD`` equal items per thread: Numba splits a prange into equal contiguous
    ranges, so equal items balance the threads, and a few dozen groups per call keep call overhead small.
    (``n_threads`` comes from the caller: ``numba.get_num_threads()`` in jitted code defeats the disk cache.)
    """
    if n_tok >= tile_tokens(isa):
        return planar_chunk_groups(isa, n_tok, k)
    return max(1, n_groups // (WORK_ITEMS_PER_THREAD * n_threads))


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
    many = n_tok >= PARALLEL_ROWS_MIN

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
    hq, hs, h_sums, h_bsums, h_tsums = _quantized(q8k, n_tok, n_embd)
    aq, a_s, a_sums, a_bsums, a_tsums = _quantized(q8k, n_tok, n_q)
    fq, fs, f_sums, f_bsums, f_tsums = _quantized(q8k, n_tok, n_ff)

    gq, gk, gv, go = wq[3].shape[1], wk[3].shape[1], wv[3].shape[1], wo[3].shape[1]
    gf, gd = w_gate[3].shape[1], w_down[3].shape[1]
    c_qkv = _chunk_groups(isa, n_tok, n_embd, gq + gk + gv, n_threads)
    nq, nk, nv = -(-gq // c_qkv), -(-gk // c_qkv), -(-gv // c_qkv)
    co = _chunk_groups(isa, n_tok, n_q, go, n_threads)
    cf = _chunk_groups(isa, n_tok, n_embd, 2 * gf, n_threads)
    cd = _chunk_groups(isa, n_tok, n_ff, gd, n_threads)
    no, nf, nd = -(-go // co), -(-gf // cf), -(-gd // cd)

    for il in range(n_layer):
        # ---- attention block: norm, quantize once, Q/K/V in one parallel region
        if many:
            for t in prange(n_tok):
                rms_norm_rows(x[t : t + 1], attn_norm[il], eps, h[t : t + 1])
                _quantize_row(q8k, h, hq, hs, h_sums, h_bsums, h_tsums, t)
        else:
            for t in range(n_tok):
                rms_norm_rows(x[t : t + 1], attn_norm[il], eps, h[t : t + 1])
                _quantize_row(q8k, h, hq, hs, h_sums, h_bsums, h_tsums, t)
        for c in prange(nq + nk + nv):
            if c < nq:
                c0 = c * c_qkv
                _linear_groups(isa, q8k, wq, il, c0, min(c0 + c_qkv, gq), hq, hs, h_sums, h_bsums, h_tsums, q)
            elif c < nq + nk:
                c0 = (c - nq) * c_qkv
                _linear_groups(isa, q8k, wk, il, c0, min(c0 + c_qkv, gk), hq, hs, h_sums, h_bsums, h_tsums, k)
            else:
                c0 = (c - nq - nk) * c_qkv
                _linear_groups(isa, q8k, wv, il, c0, min(c0 + c_qkv, gv), hq, hs, h_sums, h_bsums, h_tsums, v)
        rope_rows(q, cos, sin, n_head, head_dim, rope_dim, rope_neox)
        rope_rows(k, cos, sin, n_head_kv, head_dim, rope_dim, rope_neox)
        for t in range(n_tok):
            for kh in range(n_head_kv):
                for e in range(head_dim):
                    k_cache[il, slots[t], positions[t], kh, e] = k[t, kh * head_dim + e]
                    v_cache[il, slots[t], positions[t], kh, e] = v[t, kh * head_dim + e]
        kc = k_cache[il].reshape(k_cache[il].size)
        vc = v_cache[il].reshape(v_cache[il].size)
        n_ctx = k_cache.shape[2]
        for th in prange(n_tok * n_head):
            t = th // n_head
            hh = th % n_head
            n_keys = positions[t] + 1
            scratch = np.empty(LANES * head_dim + 2 * (n_keys + LANES), dtype=np.float32)
            kv_off = (slots[t] * n_ctx * n_head_kv + hh // group) * head_dim
            attend_head(
                q_flat, t * n_q + hh * head_dim, kc, vc, kv_off, n_kv, n_keys, head_dim, scale32,
                a_flat, t * n_q + hh * head_dim, scratch,
            )  # fmt: skip

        # ---- sub-norm, O projection, residual
        if many:
            for t in prange(n_tok):
                if has_sub_norms:
                    rms_norm_rows(a[t : t + 1], attn_sub_norm[il], eps, a[t : t + 1])
                _quantize_row(q8k, a, aq, a_s, a_sums, a_bsums, a_tsums, t)
        else:
            for t in range(n_tok):
                if has_sub_norms:
                    rms_norm_rows(a[t : t + 1], attn_sub_norm[il], eps, a[t : t + 1])
                _quantize_row(q8k, a, aq, a_s, a_sums, a_bsums, a_tsums, t)
        for c in prange(no):
            _linear_groups(
                isa, q8k, wo, il, c * co, min(c * co + co, go), aq, a_s, a_sums, a_bsums, a_tsums, o
            )

        # ---- residual, FFN norm, gate/up with the activation applied per chunk
        if many:
            for t in prange(n_tok):
                for e in range(n_embd):
                    x[t, e] = x[t, e] + o[t, e]
                rms_norm_rows(x[t : t + 1], ffn_norm[il], eps, h[t : t + 1])
                _quantize_row(q8k, h, hq, hs, h_sums, h_bsums, h_tsums, t)
        else:
            for t in range(n_tok):
                for e in range(n_embd):
                    x[t, e] = x[t, e] + o[t, e]
                rms_norm_rows(x[t : t + 1], ffn_norm[il], eps, h[t : t + 1])
                _quantize_row(q8k, h, hq, hs, h_sums, h_bsums, h_tsums, t)
        for c in prange(nf):
            g0, g1 = c * cf, min(c * cf + cf, gf)
            _linear_groups(isa, q8k, w_gate, il, g0, g1, hq, hs, h_sums, h_bsums, h_tsums, g)
            _linear_groups(isa, q8k, w_up, il, g0, g1, hq, hs, h_sums, h_bsums, h_tsums, u)
            gate_rows(g, u, relu2, f, g0 * ROW_GROUP, min(g1 * ROW_GROUP, n_ff))

        # ---- sub-norm, down projection, residual
        if many:
            for t in prange(n_tok):
                if has_sub_norms:
                    rms_norm_rows(f[t : t + 1], ffn_sub_norm[il], eps, f[t : t + 1])
                _quantize_row(q8k, f, fq, fs, f_sums, f_bsums, f_tsums, t)
        else:
            for t in range(n_tok):
                if has_sub_norms:
                    rms_norm_rows(f[t : t + 1], ffn_sub_norm[il], eps, f[t : t + 1])
                _quantize_row(q8k, f, fq, fs, f_sums, f_bsums, f_tsums, t)
        for c in prange(nd):
            _linear_groups(
                isa, q8k, w_down, il, c * cd, min(c * cd + cd, gd), fq, fs, f_sums, f_bsums, f_tsums, o
            )
        for t in range(n_tok):
            for e in range(n_embd):
                x[t, e] = x[t, e] + o[t, e]
