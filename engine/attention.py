"""RoPE and causal GQA attention in the float order of llama.cpp's non-flash CPU path (x86, AVX-512 build).

Every rounding here is placed where ggml places it, so that given llama.cpp's Q/K/V the attention output is
bit-identical to its ``kqv_out`` (an ulp off moves Q8_K roundings near a tie in the next matmul, and random
models spread that to every later token). The graph is ``kq = mul_mat(K, Q)`` → ``soft_max_ext(kq, mask,
scale)`` → ``kqv = mul_mat(Vᵀ, kq)``, over a KV cache padded to a multiple of 256 cells: masked and unused
cells contribute exact zeros, so only the lane each key falls into matters, never the padding itself.

* K·Q: ``ggml_vec_dot_f32`` (Q is a permuted view, so llamafile's sgemm declines it): 4 accumulators of
  16 lanes, FMA per 64-element step, reduced ``(a0+a2) + (a1+a3)`` then ``_mm512_reduce_add_ps``.
* softmax: ``kq·scale`` in float32, max, ``ggml_v_expf(x − max)`` 16 keys at a time, each group of 16 summed
  by ``_mm512_reduce_add_ps`` in float32 and the groups in float64; then ``p·(float)(1/sum)``.
* V·p: llamafile's tinyBLAS order, one 16-lane FMA accumulator per output (key j in lane j % 16), then
  ``_mm512_reduce_add_ps``. The one-token decode path uses the same order: llama.cpp's one-at-a-time logits
  of the Q8_0-head oracle model equal its batch logits bit for bit, and only this order reproduces them
  (``ggml_vec_dot_f32``'s 4×16 layout, the fallback its source suggests for a single token, does not).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from ternary.engine.kernels import fma_f32, ggml_expf

LANES = 16  # float32 lanes of a 512-bit register
VEC_DOT_STEP = 64  # ggml_vec_dot_f32: GGML_F32_STEP, 4 registers of 16 lanes


@njit(cache=True)
def apply_rope(x, cos, sin, n_head, head_dim, n_rot, neox):
    """Rotate the first ``n_rot`` dims of every head of ``x`` float32[T, n_head*head_dim] in place.

    NEOX pairs dims (i, i + n_rot/2), the normal style (2i, 2i+1); ``cos``/``sin`` float32[T, n_rot/2].
    ggml's ``rotate_pairs`` writes ``x0·c − x1·s`` and ``x0·s + x1·c``; the compiler contracts the first
    product of each into an FMA: ``fma(x0, c, −(x1·s))`` and ``fma(x0, s, x1·c)``.
    """
    n_tok = x.shape[0]
    half = n_rot // 2
    for t in range(n_tok):
        for h in range(n_head):
            base = h * head_dim
            for i in range(half):
                if neox:
                    a = base + i
                    b = base + i + half
                else:
                    a = base + 2 * i
                    b = a + 1
                x0 = x[t, a]
                x1 = x[t, b]
                c = cos[t, i]
                s = sin[t, i]
                x[t, a] = fma_f32(x0, c, -(x1 * s))
                x[t, b] = fma_f32(x0, s, x1 * c)


@njit(cache=True)
def reduce_add_16(v):
    """``_mm512_reduce_add_ps`` of ``v`` float32[16]: halves 8+8, 4+4, then pairs (0+2, 1+3), then 0+1."""
    a0 = (v[0] + v[8]) + (v[4] + v[12])
    a1 = (v[1] + v[9]) + (v[5] + v[13])
    a2 = (v[2] + v[10]) + (v[6] + v[14])
    a3 = (v[3] + v[11]) + (v[7] + v[15])
    return (a0 + a2) + (a1 + a3)


@njit(cache=True)
def vec_dot_f32(x, y, acc):
    """``ggml_vec_dot_f32`` of float32 vectors ``x``·``y`` (``acc`` float32[64] scratch).

    Element i of each 64-step goes to register (i % 64) // 16, lane i % 16, by FMA; the registers reduce
    ``(r0 + r2) + (r1 + r3)`` and then across lanes; leftovers past the last full step add on in float32.
    """
    n = x.shape[0]
    acc[:] = np.float32(0.0)
    n_main = n - n % VEC_DOT_STEP
    for i0 in range(0, n_main, VEC_DOT_STEP):
        for i in range(VEC_DOT_STEP):
            acc[i] = fma_f32(x[i0 + i], y[i0 + i], acc[i])
    for i in range(LANES):
        acc[i] = (acc[i] + acc[2 * LANES + i]) + (acc[LANES + i] + acc[3 * LANES + i])
    total = reduce_add_16(acc)
    for i in range(n_main, n):
        total = fma_f32(x[i], y[i], total)
    return total


@njit(cache=True)
def softmax_weights(scores, n_keys, scale, out):
    """``soft_max_ext`` of ``scores[:n_keys]`` float32 (the masked rest are −inf → 0) into ``out``.

    ``out`` must hold ``n_keys`` rounded up to 16 (the tail of the last group is set to 0).
    """
    vmax = np.float32(-np.inf)
    for j in range(n_keys):
        scores[j] = scores[j] * scale
        vmax = max(vmax, scores[j])
    n_pad = out.shape[0]
    total = 0.0  # ggml_float
    for g0 in range(0, n_pad, LANES):
        for j in range(g0, g0 + LANES):
            out[j] = ggml_expf(scores[j] - vmax) if j < n_keys else np.float32(0.0)
        total += np.float64(reduce_add_16(out[g0 : g0 + LANES]))
    inv = np.float32(1.0 / total)
    for j in range(n_keys):
        out[j] = out[j] * inv


@njit(parallel=True, cache=True)
def attention(q, k_cache, v_cache, slots, positions, n_head, head_dim, scale, out):
    """Causal GQA attention of every query row over its own slot's cached keys 0..position.

    ``q`` float32[T, n_head*head_dim]; ``k_cache``/``v_cache`` float32[n_slots, n_ctx, n_head_kv, head_dim]
    (one layer); query head h reads KV head ``h // (n_head / n_head_kv)``; ``scale`` is ggml's float32
    ``kq_scale``. Float order as in the module docstring; parallel over (token, head) pairs.
    """
    n_tok = q.shape[0]
    n_head_kv = k_cache.shape[2]
    group = n_head // n_head_kv
    scale32 = np.float32(scale)
    for th in prange(n_tok * n_head):
        t = th // n_head
        h = th % n_head
        kvh = h // group
        s = slots[t]
        n_keys = positions[t] + 1
        qo = h * head_dim
        lanes = np.empty(VEC_DOT_STEP, dtype=np.float32)
        scores = np.empty(n_keys, dtype=np.float32)
        for j in range(n_keys):
            scores[j] = vec_dot_f32(k_cache[s, j, kvh], q[t, qo : qo + head_dim], lanes)
        p = np.empty((n_keys + LANES - 1) // LANES * LANES, dtype=np.float32)
        softmax_weights(scores, n_keys, scale32, p)
        for e in range(head_dim):
            lanes[:LANES] = np.float32(0.0)
            for j in range(n_keys):
                lanes[j % LANES] = fma_f32(v_cache[s, j, kvh, e], p[j], lanes[j % LANES])
            out[t, qo + e] = reduce_add_16(lanes[:LANES])
