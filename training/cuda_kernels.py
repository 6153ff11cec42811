"""numba.cuda kernels of the trainer's GPU backend (`cuda_ops` launches them; nothing else should).

Every kernel is a top-level `@cuda.jit(cache=True)` function over C-contiguous arrays, usually their flat
1-D views, with sizes passed explicitly. Conventions:
- Elementwise kernels: grid-stride loops over the flat array, blocks of `EW_BLOCK`.
- Row kernels (norms, softmax, losses): one block of `ROW_BLOCK` threads per row; block reductions go through
  a shared buffer (a tree, so the order is fixed and results are reproducible).
- No float atomics where an order matters: reductions write one partial per block and a second kernel adds
  the partials in a fixed order, so a training run gives the same bits every time on the same GPU.
- The GEMM is a 128x128 tile per block of 256 threads, 8x8 outputs per thread, BK=8 with register
  prefetching of the next tile; it runs any op(A)·op(B) (transposes, batches, split-K).

Under the simulator (NUMBA_ENABLE_CUDASIM=1) the blocks and GEMM tiles are smaller so CI stays fast; the
code is the same.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)

EW_BLOCK = 32 if SIMULATOR else 256
ROW_BLOCK = 8 if SIMULATOR else 256  # a power of two
N_PARTIALS = 8 if SIMULATOR else 512  # most blocks of a two-pass reduction
MAX_EW_BLOCKS = 2 if SIMULATOR else 8192  # grid-stride loops cover larger arrays

# GEMM tiling: a block computes a TBM x TBN tile of C with GEMM_THREADS threads, each TM x TN outputs.
# Shared tiles hold pairs of adjacent rows (A) / columns (B) as complex64, so one 8-byte shared load feeds two
# FMAs columns: a thread owns row pairs GEMM_TY·i + ty and column pairs GEMM_TX·j + tx, which makes every
# warp's fragment loads conflict-free 128-byte lines (B) or broadcasts (A).
# (The simulator runs one Python thread per GPU thread: it gets 16x16 tiles of 16 threads.)
TBM = 16 if SIMULATOR else 128
TBN = TBM
TBK = 8
GEMM_TX = 4 if SIMULATOR else 16
GEMM_TY = GEMM_TX
GEMM_THREADS = GEMM_TX * GEMM_TY
TM = TBM // GEMM_TY  # outputs per thread: TM/2 row pairs x TN/2 column pairs
TN = TBN // GEMM_TX
PAIR_PAD = 2  # shared rows are TBM/2 + 2 pairs long: the strided pair stores then hit distinct banks
A_PAIRS = TBM // 2 + PAIR_PAD
B_PAIRS = TBN // 2 + PAIR_PAD
A_SIZE = TBK * A_PAIRS  # (shared-array shapes must be plain constants)
B_SIZE = TBK * B_PAIRS
A_LOADS = TBM // 2 * TBK // GEMM_THREADS  # pairs per thread per tile
B_LOADS = TBN // 2 * TBK // GEMM_THREADS

ACT_SILU = 0
ACT_RELU2 = 1


# ------------------------------------------------------------------------------------------ device helpers


@cuda.jit(device=True)
def _block_sum(buf, v):
    """Sum of `v` over the block's ROW_BLOCK threads (all must call); `buf` is a shared [ROW_BLOCK]."""
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = ROW_BLOCK // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    r = buf[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _block_max(buf, v):
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = ROW_BLOCK // 2
    while s > 0:
        if t < s:
            buf[t] = max(buf[t], buf[t + s])
        cuda.syncthreads()
        s //= 2
    r = buf[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _sum_partials(buf64, partials, start, n):
    """Σ partials[start : start + n] (float64) in a fixed order, on every thread of the block."""
    t = cuda.threadIdx.x
    acc = 0.0
    for i in range(t, n, ROW_BLOCK):
        acc += partials[start + i]
    return _block_sum(buf64, acc)


@cuda.jit(device=True)
def _rint(x):
    """Round half to even (NumPy's np.round, torch.round)."""
    return float(round(x))


# ------------------------------------------------------------------------------------- elementwise kernels


@cuda.jit(cache=True)
def fill(out, value):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = value


@cuda.jit(cache=True)
def add(a, b, out):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit(cache=True)
def add_inplace(a, b):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] += b[i]


@cuda.jit(cache=True)
def scale_inplace(a, s):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] *= s


@cuda.jit(cache=True)
def glu(g, u, out, act):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        x = g[i]
        if act == ACT_SILU:
            out[i] = x * (0.5 * (1.0 + math.tanh(0.5 * x))) * u[i]
        else:
            r = max(x, 0.0)
            out[i] = r * r * u[i]


@cuda.jit(cache=True)
def glu_backward(dh, g, u, dg, du, act):
    for i in range(cuda.grid(1), dh.size, cuda.gridsize(1)):
        x = g[i]
        d = dh[i]
        if act == ACT_SILU:
            sig = 0.5 * (1.0 + math.tanh(0.5 * x))
            silu = x * sig
            dg[i] = d * u[i] * (sig + silu * (1.0 - sig))
            du[i] = d * silu
        else:
            r = max(x, 0.0)
            dg[i] = 2.0 * d * u[i] * r
            du[i] = d * r * r


@cuda.jit(cache=True)
def softcap(x, out, cap):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = cap * math.tanh(x[i] / cap)


@cuda.jit(cache=True)
def softcap_backward(dy, y, out, cap):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        t = y[i] / cap
        out[i] = dy[i] * (1.0 - t * t)


@cuda.jit(cache=True)
def embedding(table, ids, out, width):
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        row = i // width
        out[i] = table[ids[row] * width + i % width]


@cuda.jit(cache=True)
def permute_heads(src, dst, seq, n_head, head_dim, to_heads):
    """[B, T, H, hd] <-> [B, H, T, hd] (to_heads: 1 splits, 0 merges); one thread per destination element."""
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        d = i % head_dim
        r = i // head_dim
        if to_heads:  # dst [B, H, T, hd]
            t = r % seq
            r //= seq
            h = r % n_head
            b = r // n_head
        else:  # dst [B, T, H, hd]
            h = r % n_head
            r //= n_head
            t = r % seq
            b = r // seq
        heads_index = ((b * n_head + h) * seq + t) * head_dim + d
        tokens_index = ((b * seq + t) * n_head + h) * head_dim + d
        if to_heads:
            dst[i] = src[tokens_index]
        else:
            dst[i] = src[heads_index]


@cuda.jit(cache=True)
def rope(x, cos, sin, out, seq, head_dim, half, sign):
    """NEOX rotation of pairs (d, d + half) by sign·θ(t, d); dims ≥ 2·half pass through."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        d = i % head_dim
        t = (i // head_dim) % seq
        if d < half:
            c = cos[t * half + d]
            s = sign * sin[t * half + d]
            out[i] = x[i] * c - x[i + half] * s
        elif d < 2 * half:
            c = cos[t * half + d - half]
            s = sign * sin[t * half + d - half]
            out[i] = x[i - half] * s + x[i] * c
        else:
            out[i] = x[i]


@cuda.jit(cache=True)
def transpose(src, dst, rows, cols):
    """dst [cols, rows] = src [rows, cols]ᵀ."""
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        c = i // rows
        r = i % rows
        dst[i] = src[r * cols + c]


# ------------------------------------------------------------------------------------------ reductions


@cuda.jit(cache=True)
def sum_squares_partial(a, partials):
    """partials[block] = Σ a² (float64) over a grid-stride share of a; launch N_PARTIALS blocks."""
    buf = cuda.shared.array(ROW_BLOCK, np.float64)
    acc = 0.0
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        v = np.float64(a[i])
        acc += v * v
    s = _block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = s


@cuda.jit(cache=True)
def abs_sum_partial(a, partials):
    buf = cuda.shared.array(ROW_BLOCK, np.float64)
    acc = 0.0
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        acc += abs(np.float64(a[i]))
    s = _block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = s


@cuda.jit(cache=True)
def max_abs_partial(a, partials):
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    acc = np.float32(0.0)
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        acc = max(acc, abs(a[i]))
    s = _block_max(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.x] = s


@cuda.jit(cache=True)
def ternary_apply(w, partials, n_partials, eps, out):
    """out = clip(round(w/γ), −1, 1)·γ with γ = Σ|w|/n + eps from `abs_sum_partial`'s partials."""
    buf = cuda.shared.array(ROW_BLOCK, np.float64)
    total = _sum_partials(buf, partials, 0, n_partials)
    gamma = np.float32(total / w.size + eps)
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        q = _rint(w[i] / gamma)
        out[i] = min(max(q, -1.0), 1.0) * gamma


@cuda.jit(cache=True)
def batched_sum_squares_partial(x, partials, per):
    """partials[z, block] = Σ x[z]² (float64) over a grid-stride share of matrix z (x holds matrices of `per`
    elements back to back); grid (blocks per matrix, matrices)."""
    buf = cuda.shared.array(ROW_BLOCK, np.float64)
    base = cuda.blockIdx.y * per
    acc = 0.0
    for i in range(cuda.blockIdx.x * ROW_BLOCK + cuda.threadIdx.x, per, cuda.gridDim.x * ROW_BLOCK):
        v = np.float64(x[base + i])
        acc += v * v
    s = _block_sum(buf, acc)
    if cuda.threadIdx.x == 0:
        partials[cuda.blockIdx.y * cuda.gridDim.x + cuda.blockIdx.x] = s


@cuda.jit(cache=True)
def batched_scale_by_inverse_norm(x, partials, n_partials, eps, per):
    """x[z] /= sqrt(Σ x[z]²) + eps from `batched_sum_squares_partial`'s partials (Newton–Schulz
    normalisation); grid (blocks per matrix, matrices)."""
    buf = cuda.shared.array(ROW_BLOCK, np.float64)
    z = cuda.blockIdx.y
    total = _sum_partials(buf, partials, z * n_partials, n_partials)
    norm = np.float32(math.sqrt(total) + eps)
    base = z * per
    for i in range(cuda.blockIdx.x * ROW_BLOCK + cuda.threadIdx.x, per, cuda.gridDim.x * ROW_BLOCK):
        x[base + i] = x[base + i] / norm


@cuda.jit(cache=True)
def column_sums(partials, out, n_rows, width):
    """out[c] = Σ_r partials[r, c] (r in order)."""
    c = cuda.grid(1)
    if c < width:
        acc = partials[c]
        for r in range(1, n_rows):
            acc += partials[r * width + c]
        out[c] = acc


# ------------------------------------------------------------------------------------------ row kernels


@cuda.jit(cache=True)
def rmsnorm(x, w, eps, y, rstd, width):
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    row = cuda.blockIdx.x
    base = row * width
    t = cuda.threadIdx.x
    acc = np.float32(0.0)
    for j in range(t, width, ROW_BLOCK):
        v = x[base + j]
        acc += v * v
    ms = _block_sum(buf, acc) / width
    r = np.float32(1.0) / math.sqrt(ms + eps)
    if t == 0:
        rstd[row] = r
    for j in range(t, width, ROW_BLOCK):
        y[base + j] = x[base + j] * r * w[j]


@cuda.jit(cache=True)
def rmsnorm_backward_dx(dy, x, w, rstd, dx, width):
    """dx = rstd·(dy·w − x̂·mean(dy·w·x̂)), x̂ = x·rstd."""
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    row = cuda.blockIdx.x
    base = row * width
    t = cuda.threadIdx.x
    r = rstd[row]
    acc = np.float32(0.0)
    for j in range(t, width, ROW_BLOCK):
        acc += dy[base + j] * w[j] * (x[base + j] * r)
    mean = _block_sum(buf, acc) / width
    for j in range(t, width, ROW_BLOCK):
        dx[base + j] = r * (dy[base + j] * w[j] - x[base + j] * r * mean)


@cuda.jit(cache=True)
def rmsnorm_backward_dw_partial(dy, x, rstd, partials, n_rows, width, rows_per_chunk):
    """partials[chunk, c] = Σ_{rows of chunk} dy·x·rstd; grid (column blocks, chunks)."""
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    chunk = cuda.blockIdx.y
    if c < width:
        acc = np.float32(0.0)
        end = min((chunk + 1) * rows_per_chunk, n_rows)
        for r in range(chunk * rows_per_chunk, end):
            acc += dy[r * width + c] * (x[r * width + c] * rstd[r])
        partials[chunk * width + c] = acc


@cuda.jit(cache=True)
def quantize_activations(x, out, width):
    """Per-row absmax int8 fake quantization: clip(round(x·127/amax), −128, 127)·amax/127."""
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    base = cuda.blockIdx.x * width
    t = cuda.threadIdx.x
    acc = np.float32(0.0)
    for j in range(t, width, ROW_BLOCK):
        acc = max(acc, abs(x[base + j]))
    amax = _block_max(buf, acc)
    if amax > 0:
        scale = np.float32(127.0) / amax
        inv = amax / np.float32(127.0)
    else:
        scale = np.float32(0.0)
        inv = np.float32(0.0)
    for j in range(t, width, ROW_BLOCK):
        q = _rint(x[base + j] * scale)
        out[base + j] = min(max(q, -128.0), 127.0) * inv


@cuda.jit(cache=True)
def embedding_backward(dy, order, starts, uniq, out, width):
    """out[uniq[u], c] = Σ_{s in [starts[u], starts[u+1])} dy[order[s], c], summed in token order."""
    u = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if c < width:
        acc = np.float32(0.0)
        for s in range(starts[u], starts[u + 1]):
            acc += dy[order[s] * width + c]
        out[uniq[u] * width + c] = acc


@cuda.jit(cache=True)
def attention_softmax(scores, capped, seq, width, scale, cap):
    """Rows of scores [rows, seq] (row r is query position r % seq) → causal softmax(cap(s·scale)), in place.

    With cap > 0 also stores tanh(s·scale/cap) in `capped` for the backward."""
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    row = cuda.blockIdx.x
    base = row * width
    tq = row % seq
    t = cuda.threadIdx.x
    mx = np.float32(-np.inf)
    for j in range(t, tq + 1, ROW_BLOCK):
        s = scores[base + j] * scale
        if cap > 0:
            c = math.tanh(s / cap)
            capped[base + j] = c
            s = c * cap
        scores[base + j] = s
        mx = max(mx, s)
    mx = _block_max(buf, mx)
    acc = np.float32(0.0)
    for j in range(t, tq + 1, ROW_BLOCK):
        e = math.exp(scores[base + j] - mx)
        scores[base + j] = e
        acc += e
    inv = np.float32(1.0) / _block_sum(buf, acc)
    for j in range(t, width, ROW_BLOCK):
        if j <= tq:
            scores[base + j] = scores[base + j] * inv
        else:
            scores[base + j] = 0.0
            if cap > 0:
                capped[base + j] = 0.0


@cuda.jit(cache=True)
def attention_softmax_backward(dp, probs, capped, seq, width, scale, cap):
    """dp → d(scores before scaling) in place: p·(dp − Σ dp·p)·(1 − c²)·scale (causal rows)."""
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    row = cuda.blockIdx.x
    base = row * width
    tq = row % seq
    t = cuda.threadIdx.x
    acc = np.float32(0.0)
    for j in range(t, tq + 1, ROW_BLOCK):
        acc += dp[base + j] * probs[base + j]
    dot = _block_sum(buf, acc)
    for j in range(t, width, ROW_BLOCK):
        if j <= tq:
            d = probs[base + j] * (dp[base + j] - dot)
            if cap > 0:
                c = capped[base + j]
                d *= 1.0 - c * c
            dp[base + j] = d * scale
        else:
            dp[base + j] = 0.0


@cuda.jit(cache=True)
def cross_entropy(logits, targets, entropy_weight, grad_scale, grad, ce_rows, ent_rows, width):
    """Per row: log-softmax, CE against the target (−1: ignored row), entropy, and the loss gradient."""
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    row = cuda.blockIdx.x
    base = row * width
    t = cuda.threadIdx.x
    target = targets[row]
    mx = np.float32(-np.inf)
    for j in range(t, width, ROW_BLOCK):
        mx = max(mx, logits[base + j])
    mx = _block_max(buf, mx)
    se = np.float32(0.0)
    sez = np.float32(0.0)
    for j in range(t, width, ROW_BLOCK):
        z = logits[base + j] - mx
        e = math.exp(z)
        se += e
        sez += e * z
    se = _block_sum(buf, se)
    sez = _block_sum(buf, sez)
    log_se = math.log(se)
    ent = log_se - sez / se  # −Σ p·log p
    valid = target >= 0
    for j in range(t, width, ROW_BLOCK):
        if valid:
            logp = logits[base + j] - mx - log_se
            p = math.exp(logp)
            g = p
            if j == target:
                g -= 1.0
            if entropy_weight != 0:
                g += entropy_weight * p * (logp + ent)
            grad[base + j] = g * grad_scale
        else:
            grad[base + j] = 0.0
    if t == 0:
        if valid:
            ce_rows[row] = -(logits[base + target] - mx - log_se)
            ent_rows[row] = ent
        else:
            ce_rows[row] = 0.0
            ent_rows[row] = 0.0


@cuda.jit(cache=True)
def kl_to_teacher(logits, teacher_ids, teacher_probs, inv_temp, grad_scale, grad, kl_rows, width, k):
    """Per row: KL(p_t ‖ softmax(z/T)) over the teacher's k entries and its gradient (·grad_scale)."""
    buf = cuda.shared.array(ROW_BLOCK, np.float32)
    row = cuda.blockIdx.x
    base = row * width
    tb = row * k
    t = cuda.threadIdx.x
    mx = np.float32(-np.inf)
    for j in range(t, width, ROW_BLOCK):
        mx = max(mx, logits[base + j] * inv_temp)
    mx = _block_max(buf, mx)
    se = np.float32(0.0)
    for j in range(t, width, ROW_BLOCK):
        se += math.exp(logits[base + j] * inv_temp - mx)
    log_se = math.log(_block_sum(buf, se))
    mass = np.float32(0.0)
    kl = np.float32(0.0)
    for i in range(t, k, ROW_BLOCK):
        p = teacher_probs[tb + i]
        mass += p
        if p > 0:
            logq = logits[base + teacher_ids[tb + i]] * inv_temp - mx - log_se
            kl += p * (math.log(p) - logq)
    mass = _block_sum(buf, mass)
    kl = _block_sum(buf, kl)
    for j in range(t, width, ROW_BLOCK):
        grad[base + j] = math.exp(logits[base + j] * inv_temp - mx - log_se) * mass * grad_scale
    cuda.syncthreads()
    for i in range(t, k, ROW_BLOCK):
        cuda.atomic.add(grad, base + teacher_ids[tb + i], -teacher_probs[tb + i] * grad_scale)
    if t == 0:
        kl_rows[row] = kl


# -------------------------------------------------------------------------------------------- optimizers


@cuda.jit(cache=True)
def adamw(p, g, m, v, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bc1, bc2, eps, decay):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = g[i]
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + one_minus_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - lr * (mi / bc1) / (math.sqrt(vi / bc2) + eps)


@cuda.jit(cache=True)
def lion(p, g, m, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, decay):
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        gi = g[i]
        mi = m[i]
        c = beta1 * mi + one_minus_beta1 * gi
        direction = np.float32(1.0) if c > 0 else (np.float32(-1.0) if c < 0 else np.float32(0.0))
        p[i] = p[i] * decay - lr * direction
        m[i] = beta2 * mi + one_minus_beta2 * gi


@cuda.jit(cache=True)
def muon_momentum(g, buf, out, offset, momentum, nesterov, rows, cols, transposed):
    """buf = μ·buf + g; d = g + μ·buf (Nesterov) or buf, written to out[offset:] as [rows, cols] or, when
    `transposed`, as its transpose [cols, rows] (Newton–Schulz runs on the wide orientation)."""
    for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        b = buf[i] * momentum + g[i]
        buf[i] = b
        at = (i % cols) * rows + i // cols if transposed else i
        out[offset + at] = g[i] + momentum * b if nesterov else b


@cuda.jit(cache=True)
def muon_apply(p, update, offset, update_scale, lr, decay, rows, cols, transposed):
    """p = p·decay − lr·scale·U with U read from update[offset:] ([rows, cols], or transposed)."""
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        at = (i % cols) * rows + i // cols if transposed else i
        p[i] = p[i] * decay - lr * (update[offset + at] * update_scale)


# ------------------------------------------------------------------------------------------------- GEMM


@cuda.jit(device=True, inline="always")
def _gemm_pair(x, offset, row, col, rows, cols, ld, k_end, transposed):
    """Elements (row, col) and (row + 1, col) of op(X), zero outside [rows, k_end): two loads of X stored
    [rows, ·] (transposed = 0) or [·, rows] (transposed = 1, then the pair is adjacent in memory)."""
    v0 = np.float32(0.0)
    v1 = np.float32(0.0)
    if col < k_end:
        if row < rows:
            v0 = x[np.uint64(offset + (col * ld + row if transposed else row * ld + col))]
        if row + 1 < rows:
            v1 = x[np.uint64(offset + (col * ld + row + 1 if transposed else (row + 1) * ld + col))]
    return complex(v0, v1)


@cuda.jit(device=True, inline="always")
def _gemm_pair_index(q, transposed):
    """(k within the tile, pair index) of the q-th pair a block loads; consecutive q run along the
    contiguous direction of the stored matrix (pairs when transposed, k otherwise)."""
    if transposed:
        return q // (TBM // 2), q % (TBM // 2)
    return q % TBK, q // TBK


@cuda.jit(cache=True)
def gemm(a, b, c, d, m, n, k, trans_a, trans_b, stride_a, stride_b, stride_c, splits, k_chunk, alpha, beta):
    """C = alpha·op(A)·op(B) + beta·D for each batch z; flat float32 arrays, op(A) [m, k], op(B) [k, n],
    D laid out like C (D may be C itself; it is not read when beta = 0).

    A is stored [m, k] (trans_a = 0) or [k, m]; B [k, n] (trans_b = 0) or [n, k]; C [m, n].
    grid (ceil(n/TBN), ceil(m/TBM), batch·splits): split s of a batch covers k in [s·k_chunk, (s+1)·k_chunk)
    and, when splits > 1, writes its raw partial product to C[(z·splits + s)] (alpha 1, beta 0 expected).
    Every tile's global loads go to registers first, so the next tile loads while this one multiplies."""
    a_s = cuda.shared.array(A_SIZE, np.complex64, alignment=16)  # [TBK, A_PAIRS] row pairs of op(A)
    b_s = cuda.shared.array(B_SIZE, np.complex64, alignment=16)  # [TBK, B_PAIRS] column pairs of op(B)
    acc = cuda.local.array((TM, TN), np.float32)
    a_reg = cuda.local.array(A_LOADS, np.complex64)
    b_reg = cuda.local.array(B_LOADS, np.complex64)
    a_frag = cuda.local.array(TM, np.float32)
    b_frag = cuda.local.array(TN, np.float32)

    tid = cuda.threadIdx.x
    ty = tid // GEMM_TX
    tx = tid % GEMM_TX
    zz = cuda.blockIdx.z
    batch = zz // splits
    split = zz % splits
    m0 = cuda.blockIdx.y * TBM
    n0 = cuda.blockIdx.x * TBN
    a_off = batch * stride_a
    b_off = batch * stride_b
    c_off = zz * stride_c
    k_begin = split * k_chunk
    k_end = min(k_begin + k_chunk, k)
    lda = m if trans_a else k
    ldb = k if trans_b else n
    ta_pairs = 1 if trans_a else 0  # A's row pairs are adjacent in memory when A is stored [k, m]
    tb_pairs = 0 if trans_b else 1  # B's column pairs are adjacent when B is stored [k, n]

    for i in range(TM):
        for j in range(TN):
            acc[i, j] = 0.0

    for r in range(A_LOADS):
        kk, p = _gemm_pair_index(tid + r * GEMM_THREADS, ta_pairs)
        a_reg[r] = _gemm_pair(a, a_off, m0 + 2 * p, k_begin + kk, m, k, lda, k_end, ta_pairs)
    for r in range(B_LOADS):
        kk, p = _gemm_pair_index(tid + r * GEMM_THREADS, tb_pairs)
        b_reg[r] = _gemm_pair(b, b_off, n0 + 2 * p, k_begin + kk, n, k, ldb, k_end, tb_pairs)

    for k0 in range(k_begin, k_end, TBK):
        for r in range(A_LOADS):
            kk, p = _gemm_pair_index(tid + r * GEMM_THREADS, ta_pairs)
            a_s[kk * A_PAIRS + p] = a_reg[r]
        for r in range(B_LOADS):
            kk, p = _gemm_pair_index(tid + r * GEMM_THREADS, tb_pairs)
            b_s[kk * B_PAIRS + p] = b_reg[r]
        cuda.syncthreads()
        k1 = k0 + TBK
        if k1 < k_end:  # prefetch the next tile while this one is multiplied
            for r in range(A_LOADS):
                kk, p = _gemm_pair_index(tid + r * GEMM_THREADS, ta_pairs)
                a_reg[r] = _gemm_pair(a, a_off, m0 + 2 * p, k1 + kk, m, k, lda, k_end, ta_pairs)
            for r in range(B_LOADS):
                kk, p = _gemm_pair_index(tid + r * GEMM_THREADS, tb_pairs)
                b_reg[r] = _gemm_pair(b, b_off, n0 + 2 * p, k1 + kk, n, k, ldb, k_end, tb_pairs)
        kk = 0
        while kk < TBK:  # (a while loop and unsigned indices keep the address arithmetic out of this loop)
            a_row = np.uint64(kk * A_PAIRS + ty)
            b_row = np.uint64(kk * B_PAIRS + tx)
            for i in range(TM // 2):
                pair = a_s[a_row + np.uint64(i * GEMM_TY)]
                a_frag[2 * i] = pair.real
                a_frag[2 * i + 1] = pair.imag
            for j in range(TN // 2):
                pair = b_s[b_row + np.uint64(j * GEMM_TX)]
                b_frag[2 * j] = pair.real
                b_frag[2 * j + 1] = pair.imag
            for i in range(TM):
                for j in range(TN):
                    acc[i, j] += a_frag[i] * b_frag[j]
            kk += 1
        cuda.syncthreads()

    for i in range(TM):
        gi = m0 + 2 * (ty + (i // 2) * GEMM_TY) + i % 2
        if gi < m:
            for j in range(TN):
                gj = n0 + 2 * (tx + (j // 2) * GEMM_TX) + j % 2
                if gj < n:
                    at = np.uint64(c_off + gi * n + gj)
                    if beta != 0:
                        c[at] = alpha * acc[i, j] + beta * d[at]
                    else:
                        c[at] = alpha * acc[i, j]


@cuda.jit(cache=True)
def splitk_reduce(partials, c, d, mn, splits, alpha, beta):
    """C[z] = alpha·Σ_s partials[z, s] + beta·D[z] (s in order); grid over batch·mn elements."""
    for i in range(cuda.grid(1), c.size, cuda.gridsize(1)):
        z = i // mn
        e = i % mn
        base = z * splits * mn + e
        acc = partials[base]
        for s in range(1, splits):
            acc += partials[base + s * mn]
        if beta != 0:
            c[i] = alpha * acc + beta * d[i]
        else:
            c[i] = alpha * acc
