"""The trainer's GPU backend: every op of `backend.OPS` over numba.cuda device arrays (float32).

`backend.load("cuda")` returns this module; `layers.py`, `model.py` and `optim.py` then run unchanged on the
GPU. Each function has the NumPy backend's signature and meaning (see backend.py); the kernels live in
`cuda_kernels.py`. Differences worth knowing:
- Floating-point arrays are float32 (the GEMM is a float32 kernel); int arrays (token ids) are int32/int64.
- Everything runs on the default stream, in order. Device memory comes from a caching pool (freed blocks are
  reused for the next allocation of the same size), so a training step allocates nothing from the driver
  after the first one and never waits on a `cudaFree`.
- Results are reproducible bit for bit on one GPU: no reduction depends on the order of float atomics.
- `embedding_backward` reads the token ids back to the host to sort them (one small copy per step).
- `muon_` queues its update; the queue runs as one batched Newton–Schulz per weight shape before the next op
  of this module (any op), so results are as if each update ran in place, in order.
Set NUMBA_ENABLE_CUDASIM=1 before numba is first imported to run all of it on the CPU simulator (tests).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda
from ternary.training import cuda_kernels as K
from ternary.training.backend import NS5_COEFFS, OPS

Array = Any  # numba.cuda DeviceNDArray (FakeCUDAArray under the simulator)

INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
FLOAT_DTYPE = np.dtype(np.float32)


# ------------------------------------------------------------------------------------ device memory pool

if not K.SIMULATOR:
    from numba.cuda.cudadrv import driver as _driver

    class _PoolMemoryManager(_driver.NumbaCUDAMemoryManager):
        """numba's memory manager with a free list per (rounded) size: a released block is handed to the next
        request of its size instead of going back to the driver. Safe because every kernel and copy runs on
        the one default stream, in order.

        As in numba's own manager, the block's AutoFreePointer stays referenced here and callers get owned
        references to it (`.own()`); views (reshapes) add references, and the block returns to the pool when
        the last one is gone."""

        GRANULE = 512

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._free: dict[int, list] = defaultdict(list)
            self._live: dict[int, Any] = {}

        def memalloc(self, size: int):
            size = max(self.GRANULE, -(-size // self.GRANULE) * self.GRANULE)
            bucket = self._free[size]
            if bucket:
                ptr = bucket.pop()
            else:
                try:
                    ptr = _driver.driver.cuMemAlloc(size)
                except _driver.CudaAPIError:
                    self.release_cached()
                    ptr = _driver.driver.cuMemAlloc(size)
            key = int(ptr)
            mem = _driver.AutoFreePointer(
                weakref.proxy(self.context), ptr, size, finalizer=_back_to_pool(self._live, key, bucket, ptr)
            )
            self._live[key] = mem
            return mem.own()

        def release_cached(self) -> None:
            """Give every cached (free) block back to the driver."""
            _driver.driver.cuCtxSynchronize()
            for bucket in self._free.values():
                while bucket:
                    _driver.driver.cuMemFree(bucket.pop())

        def reset(self) -> None:
            self._free.clear()
            self._live.clear()
            super().reset()

    def _back_to_pool(live: dict, key: int, bucket: list, ptr: Any):
        def finalizer() -> None:
            live.pop(key, None)
            bucket.append(ptr)

        return finalizer

    cuda.set_memory_manager(_PoolMemoryManager)


# ------------------------------------------------------------------------------------------ launch helpers


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ew_grid(n: int) -> int:
    return max(1, min(K.MAX_EW_BLOCKS, _ceil_div(n, K.EW_BLOCK)))


def _reduce_grid(n: int) -> int:
    """Blocks of ROW_BLOCK threads for a grid-stride pass over n elements (at most N_PARTIALS)."""
    return max(1, min(K.N_PARTIALS, _ceil_div(n, K.ROW_BLOCK)))


def _flat(a: Array) -> Array:
    return a if a.ndim == 1 else a.reshape(a.size)


def _empty(shape: tuple[int, ...] | int, dtype: Any = np.float32) -> Array:
    return cuda.device_array(shape, dtype=dtype)


def _check_float(*arrays: Array) -> None:
    for a in arrays:
        if a.dtype != FLOAT_DTYPE:
            raise TypeError(f"the CUDA backend computes in float32, got an array of {a.dtype}")


def _check_same_shape(a: Array, b: Array, what: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")


_SM_COUNT = 1 if K.SIMULATOR else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def _install_thread_safe_shared_arrays() -> None:
    """The simulator keeps one array per `cuda.shared.array` source line and block, created by whichever of
    the block's threads gets there first, without a lock: two threads can each create their own, and a block
    reduction then reads garbage now and then. Make creating the array atomic (and accept `alignment`:
    NumPy's allocations are aligned enough for anything the kernels ask)."""
    import sys
    import threading

    from numba.cuda import types as cuda_types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    unlocked = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> np.ndarray:
        if shape == 0:  # dynamic shared memory: not ours to change
            return unlocked(self, shape, dtype)
        if isinstance(dtype, cuda_types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            arr = self._allocations.get(key)
            if arr is None:
                arr = self._allocations[key] = np.zeros(shape, dtype)
        return arr

    kernelapi.FakeCUDAShared.array = array


if K.SIMULATOR:
    # The simulator's array shapes refuse negative indices (`x.shape[-1]`), which real device arrays (plain
    # tuples) and the model code accept: give the simulator plain tuples too.
    from numba.cuda.simulator.cudadrv import devicearray as _sim_devicearray

    _sim_devicearray.FakeShape.__getitem__ = tuple.__getitem__
    _install_thread_safe_shared_arrays()


# ------------------------------------------------------------------------------------------------ memory


def asarray(a: Any, dtype: Any = None) -> Array:
    """A C-contiguous device copy of host data (or of a device array)."""
    if hasattr(a, "copy_to_host"):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return copy(a)
        a = a.copy_to_host()
    host = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    if host.dtype.kind == "f" and host.dtype != FLOAT_DTYPE:
        raise TypeError(f"the CUDA backend computes in float32, got {host.dtype} data")
    if host.dtype.kind not in "fiub":
        raise TypeError(f"the CUDA backend cannot hold {host.dtype} data")
    return cuda.to_device(host)


def to_host(a: Array) -> np.ndarray:
    return a.copy_to_host()


def zeros(shape: tuple[int, ...], dtype: Any = np.float32) -> Array:
    out = _empty(shape, dtype)
    if out.size:
        K.fill[_ew_grid(out.size), K.EW_BLOCK](_flat(out), out.dtype.type(0))
    return out


def zeros_like(a: Array) -> Array:
    return zeros(tuple(a.shape), a.dtype)


def copy(a: Array) -> Array:
    out = _empty(tuple(a.shape), a.dtype)
    if a.size:
        out.copy_to_device(a)
    return out


# ------------------------------------------------------------- linear algebra, elementwise, reductions


def _choose_splits(tiles: int, k: int) -> int:
    """Split K when the output has too few tiles to fill the GPU (weight gradients, where K is the token
    count; Newton–Schulz products of small matrices): about one wave of two blocks per multiprocessor,
    each split at least 128 deep."""
    if tiles >= _SM_COUNT or k < 256:
        return 1
    return max(1, min(2 * _SM_COUNT // tiles, k // 128))


def _gemm(
    a: Array,
    b: Array,
    c: Array,
    m: int,
    n: int,
    k: int,
    trans_a: bool = False,
    trans_b: bool = False,
    batch: int = 1,
    stride_a: int = 0,
    stride_b: int = 0,
    alpha: float = 1.0,
    beta: float = 0.0,
    splits: int | None = None,
    addend: Array | None = None,
) -> None:
    """c[z] = alpha·op(a[z])·op(b[z]) + beta·d[z] for z < batch, d = `addend` (shaped like c) or c itself
    (c's batches are contiguous [m, n])."""
    if m == 0 or n == 0:
        return
    if k == 0:  # an empty sum
        if beta == 0:
            K.fill[_ew_grid(c.size), K.EW_BLOCK](_flat(c), np.float32(0))
        else:
            if addend is not None:
                c.copy_to_device(addend)
            scale_(c, beta)
        return
    tiles_m, tiles_n = _ceil_div(m, K.TBM), _ceil_div(n, K.TBN)
    if splits is None:
        splits = _choose_splits(tiles_m * tiles_n * batch, k)
    k_chunk = _ceil_div(_ceil_div(k, splits), K.TBK) * K.TBK
    splits = _ceil_div(k, k_chunk)
    ta, tb = int(trans_a), int(trans_b)
    af, bf, cf = _flat(a), _flat(b), _flat(c)
    df = cf if addend is None else _flat(addend)
    if splits == 1:
        K.gemm[(tiles_n, tiles_m, batch), K.GEMM_THREADS](
            af, bf, cf, df, m, n, k, ta, tb, stride_a, stride_b, m * n, 1, k_chunk,
            np.float32(alpha), np.float32(beta),
        )  # fmt: skip
        return
    work = _empty(batch * splits * m * n)
    K.gemm[(tiles_n, tiles_m, batch * splits), K.GEMM_THREADS](
        af, bf, work, work, m, n, k, ta, tb, stride_a, stride_b, m * n, splits, k_chunk,
        np.float32(1), np.float32(0),
    )  # fmt: skip
    K.splitk_reduce[_ew_grid(batch * m * n), K.EW_BLOCK](
        work, cf, df, m * n, splits, np.float32(alpha), np.float32(beta)
    )


def matmul(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """op(a) @ op(b) for 2-D float32 arrays, op = transpose when the flag is set."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul takes 2-D arrays, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    _check_float(a, b)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb:
        raise ValueError(
            f"matmul: inner dimensions differ: op(a) is {m}x{k}, op(b) is {kb}x{n} "
            f"(trans_a={trans_a}, trans_b={trans_b})"
        )
    out = _empty((m, n))
    _gemm(a, b, out, m, n, k, trans_a, trans_b)
    return out


def add(a: Array, b: Array) -> Array:
    _check_same_shape(a, b, "add")
    out = _empty(tuple(a.shape), a.dtype)
    if out.size:
        K.add[_ew_grid(out.size), K.EW_BLOCK](_flat(a), _flat(b), _flat(out))
    return out


def add_(a: Array, b: Array) -> None:
    """a += b (gradient accumulation)."""
    _check_same_shape(a, b, "add_")
    if a.size:
        K.add_inplace[_ew_grid(a.size), K.EW_BLOCK](_flat(a), _flat(b))


def scale_(a: Array, s: float) -> None:
    if a.size:
        K.scale_inplace[_ew_grid(a.size), K.EW_BLOCK](_flat(a), a.dtype.type(s))


def _partials(kernel: Any, a: Array, dtype: Any) -> Array:
    """The per-block partial results of a two-pass reduction kernel over a (on the device)."""
    grid = _reduce_grid(a.size)
    partials = _empty(grid, dtype)
    kernel[grid, K.ROW_BLOCK](_flat(a), partials)
    return partials


def sum_squares(a: Array) -> float:
    """Σ a² accumulated in float64."""
    if a.size == 0:
        return 0.0
    return float(np.sum(_partials(K.sum_squares_partial, a, np.float64).copy_to_host()))


def max_abs(a: Array) -> float:
    if a.size == 0:
        return 0.0
    return float(np.max(_partials(K.max_abs_partial, a, np.float32).copy_to_host()))


# ------------------------------------------------------------------------------------------- layer kernels


def embedding(table: Array, ids: Array) -> Array:
    """Rows of `table` [V, D] for int `ids` [N] -> [N, D]."""
    width = table.shape[1]
    out = _empty((ids.size, width), table.dtype)
    if out.size:
        K.embedding[_ew_grid(out.size), K.EW_BLOCK](_flat(table), _flat(ids), _flat(out), width)
    return out


def embedding_backward(dy: Array, ids: Array, n_rows: int) -> Array:
    """Σ of dy's rows per id into a zero [n_rows, D] table gradient, in token order (deterministic)."""
    width = dy.shape[1]
    grad = zeros((n_rows, width), dy.dtype)
    host_ids = ids.copy_to_host().reshape(-1)
    if host_ids.size == 0:
        return grad
    order = np.argsort(host_ids, kind="stable")
    uniq, starts = np.unique(host_ids[order], return_index=True)
    bounds = np.append(starts, host_ids.size).astype(np.int64)
    grid = (uniq.size, _ceil_div(width, K.ROW_BLOCK))
    K.embedding_backward[grid, K.ROW_BLOCK](
        _flat(dy), cuda.to_device(order.astype(np.int64)), cuda.to_device(bounds),
        cuda.to_device(uniq.astype(np.int64)), _flat(grad), width,
    )  # fmt: skip
    return grad


def _rows(x: Array) -> tuple[int, int]:
    width = tuple(x.shape)[-1]
    return (x.size // width if width else 0), width


def rmsnorm(x: Array, w: Array, eps: float) -> tuple[Array, Array]:
    """y = x / sqrt(mean(x², last axis) + eps) * w; returns (y, rstd) with rstd shaped [..., 1]."""
    _check_float(x, w)
    n_rows, width = _rows(x)
    y = _empty(tuple(x.shape))
    rstd = _empty(tuple(x.shape[:-1]) + (1,))
    if n_rows:
        K.rmsnorm[n_rows, K.ROW_BLOCK](_flat(x), w, np.float32(eps), _flat(y), _flat(rstd), width)
    return y, rstd


def rmsnorm_backward(dy: Array, x: Array, w: Array, rstd: Array) -> tuple[Array, Array]:
    """(dx, dw) of `rmsnorm`; dw sums over every leading axis (per-chunk partials, then a fixed-order sum)."""
    n_rows, width = _rows(x)
    dx = _empty(tuple(x.shape))
    if n_rows == 0:
        return dx, zeros((width,))
    dw = _empty((width,))
    K.rmsnorm_backward_dx[n_rows, K.ROW_BLOCK](_flat(dy), _flat(x), w, _flat(rstd), _flat(dx), width)
    rows_per_chunk = max(16, _ceil_div(n_rows, 64))
    n_chunks = _ceil_div(n_rows, rows_per_chunk)
    partials = _empty(n_chunks * width)
    K.rmsnorm_backward_dw_partial[(_ceil_div(width, K.ROW_BLOCK), n_chunks), K.ROW_BLOCK](
        _flat(dy), _flat(x), _flat(rstd), partials, n_rows, width, rows_per_chunk
    )
    K.column_sums[_ew_grid(width), K.EW_BLOCK](partials, dw, n_chunks, width)
    return dx, dw


def ternary_weight(w: Array, eps: float) -> Array:
    """BitNet b1.58 absmean weights: γ = mean|W| + eps (float64 sum), W_t = clip(round(W/γ), -1, 1); W_t·γ."""
    _check_float(w)
    out = _empty(tuple(w.shape))
    if w.size == 0:
        return out
    partials = _partials(K.abs_sum_partial, w, np.float64)
    K.ternary_apply[_reduce_grid(w.size), K.ROW_BLOCK](
        _flat(w), partials, partials.size, float(eps), _flat(out)
    )
    return out


def quantize_activations(x: Array) -> Array:
    """Per-token absmax int8 fake quantization (round half to even); a row of zeros stays zero."""
    _check_float(x)
    n_rows, width = _rows(x)
    out = _empty(tuple(x.shape))
    if n_rows:
        K.quantize_activations[n_rows, K.ROW_BLOCK](_flat(x), _flat(out), width)
    return out


def split_heads(x: Array, batch: int, n_head: int) -> Array:
    """[B*T, H*hd] -> [B, H, T, hd] (contiguous)."""
    n, width = x.shape
    seq, head_dim = n // batch, width // n_head
    out = _empty((batch, n_head, seq, head_dim), x.dtype)
    if out.size:
        K.permute_heads[_ew_grid(out.size), K.EW_BLOCK](_flat(x), _flat(out), seq, n_head, head_dim, 1)
    return out


def merge_heads(x: Array) -> Array:
    """[B, H, T, hd] -> [B*T, H*hd] (contiguous); the inverse of `split_heads`."""
    b, h, t, d = x.shape
    out = _empty((b * t, h * d), x.dtype)
    if out.size:
        K.permute_heads[_ew_grid(out.size), K.EW_BLOCK](_flat(x), _flat(out), t, h, d, 0)
    return out


def rope(x: Array, cos: Array, sin: Array, inverse: bool = False) -> Array:
    """NEOX rotary embedding of the first 2·cos.shape[1] dims of each head; x [B, H, T, hd], cos/sin
    [T, r/2]; `inverse` rotates back (the backward pass)."""
    _check_float(x, cos, sin)
    seq, head_dim, half = x.shape[2], x.shape[3], cos.shape[1]
    out = _empty(tuple(x.shape))
    if out.size:
        K.rope[_ew_grid(out.size), K.EW_BLOCK](
            _flat(x), _flat(cos), _flat(sin), _flat(out), seq, head_dim, half,
            np.float32(-1.0 if inverse else 1.0),
        )  # fmt: skip
    return out


def _attention_dims(q: Array, k: Array) -> tuple[int, int, int, int, int]:
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or tuple(k.shape) != (b, hkv, t, d):
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} do not match")
    return b, hkv, hq // hkv, t, d


def attention(q: Array, k: Array, v: Array, scale: float, softcap: float) -> tuple[Array, Any]:
    """Causal GQA attention: softmax(cap(q k^T · scale) + causal) v; q [B, Hq, T, d], k/v [B, Hkv, T, d].

    The g query heads sharing a kv head are one [g·T, d] matrix, so each product is one batched GEMM over
    B·Hkv. aux = (probabilities [B, Hq, T, T], tanh of the capped scores or None)."""
    _check_float(q, k, v)
    b, hkv, g, t, d = _attention_dims(q, k)
    n_rows = b * hkv * g * t
    probs = _empty((b, hkv * g, t, t))
    capped = _empty(tuple(probs.shape)) if softcap > 0 else _empty(1)
    out = _empty(tuple(q.shape))
    if n_rows == 0:
        return out, (probs, None)
    _gemm(q, k, probs, g * t, t, d, trans_b=True, batch=b * hkv, stride_a=g * t * d, stride_b=t * d)
    K.attention_softmax[n_rows, K.ROW_BLOCK](
        _flat(probs), _flat(capped), t, t, np.float32(scale), np.float32(softcap)
    )
    _gemm(probs, v, out, g * t, d, t, batch=b * hkv, stride_a=g * t * t, stride_b=t * d)
    return out, (probs, capped if softcap > 0 else None)


def attention_backward(
    dout: Array, q: Array, k: Array, v: Array, aux: Any, scale: float, softcap: float
) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) of `attention`; dk and dv sum over each kv head's query group inside one GEMM."""
    probs, capped = aux
    b, hkv, g, t, d = _attention_dims(q, k)
    n_rows = b * hkv * g * t
    dq, dk, dv = _empty(tuple(q.shape)), _empty(tuple(k.shape)), _empty(tuple(v.shape))
    if n_rows == 0:
        return dq, dk, dv
    ds = _empty(tuple(probs.shape))
    _gemm(dout, v, ds, g * t, t, d, trans_b=True, batch=b * hkv, stride_a=g * t * d, stride_b=t * d)
    K.attention_softmax_backward[n_rows, K.ROW_BLOCK](
        _flat(ds), _flat(probs), _flat(capped if capped is not None else probs), t, t,
        np.float32(scale), np.float32(softcap),
    )  # fmt: skip
    _gemm(ds, k, dq, g * t, d, t, batch=b * hkv, stride_a=g * t * t, stride_b=t * d)
    _gemm(ds, q, dk, t, d, g * t, trans_a=True, batch=b * hkv, stride_a=g * t * t, stride_b=g * t * d)
    _gemm(probs, dout, dv, t, d, g * t, trans_a=True, batch=b * hkv, stride_a=g * t * t, stride_b=g * t * d)
    return dq, dk, dv


def _act_code(act: str) -> int:
    if act == "silu":
        return K.ACT_SILU
    if act == "relu2":
        return K.ACT_RELU2
    raise ValueError(f"unknown ffn activation {act!r}: expected 'silu' or 'relu2'")


def glu(g: Array, u: Array, act: str) -> Array:
    """Gated FFN activation: silu(g)·u or relu(g)²·u."""
    code = _act_code(act)
    _check_same_shape(g, u, "glu")
    out = _empty(tuple(g.shape))
    if out.size:
        K.glu[_ew_grid(out.size), K.EW_BLOCK](_flat(g), _flat(u), _flat(out), code)
    return out


def glu_backward(dh: Array, g: Array, u: Array, act: str) -> tuple[Array, Array]:
    """(dg, du) of `glu`."""
    code = _act_code(act)
    dg, du = _empty(tuple(g.shape)), _empty(tuple(u.shape))
    if dh.size:
        K.glu_backward[_ew_grid(dh.size), K.EW_BLOCK](
            _flat(dh), _flat(g), _flat(u), _flat(dg), _flat(du), code
        )
    return dg, du


def softcap(x: Array, cap: float) -> Array:
    """cap · tanh(x / cap)."""
    out = _empty(tuple(x.shape))
    if out.size:
        K.softcap[_ew_grid(out.size), K.EW_BLOCK](_flat(x), _flat(out), np.float32(cap))
    return out


def softcap_backward(dy: Array, y: Array, cap: float) -> Array:
    """dx of `softcap` given its output y: dy · (1 − (y/cap)²)."""
    out = _empty(tuple(y.shape))
    if out.size:
        K.softcap_backward[_ew_grid(out.size), K.EW_BLOCK](_flat(dy), _flat(y), _flat(out), np.float32(cap))
    return out


# ------------------------------------------------------------------------------------------------- losses


def cross_entropy(
    logits: Array, targets: Array, entropy_weight: float, grad_scale: float
) -> tuple[float, float, Array]:
    """Σ CE and Σ entropy over rows whose target ≥ 0, and d(grad_scale · Σ (CE − λ·H))/d logits."""
    _check_float(logits)
    n_rows, width = logits.shape
    grad = _empty((n_rows, width))
    if n_rows == 0:
        return 0.0, 0.0, grad
    ce_rows, ent_rows = _empty(n_rows), _empty(n_rows)
    K.cross_entropy[n_rows, K.ROW_BLOCK](
        _flat(logits), _flat(targets), np.float32(entropy_weight), np.float32(grad_scale), _flat(grad),
        ce_rows, ent_rows, width,
    )  # fmt: skip
    ce = float(np.sum(ce_rows.copy_to_host(), dtype=np.float64))
    ent = float(np.sum(ent_rows.copy_to_host(), dtype=np.float64))
    return ce, ent, grad


def kl_to_teacher(
    logits: Array, teacher_ids: Array, teacher_probs: Array, temperature: float, grad_scale: float
) -> tuple[float, Array]:
    """Σ_rows KL(p_t ‖ softmax(logits/T)) over the teacher's support; d(grad_scale · T² · Σ KL)/d logits."""
    _check_float(logits, teacher_probs)
    n_rows, width = logits.shape
    k = teacher_ids.shape[1]
    grad = _empty((n_rows, width))
    if n_rows == 0:
        return 0.0, grad
    kl_rows = _empty(n_rows)
    K.kl_to_teacher[n_rows, K.ROW_BLOCK](
        _flat(logits), _flat(teacher_ids), _flat(teacher_probs), np.float32(1.0 / temperature),
        np.float32(grad_scale * temperature), _flat(grad), kl_rows, width, k,
    )  # fmt: skip
    kl = float(np.sum(kl_rows.copy_to_host(), dtype=np.float64))
    return kl * temperature * temperature, grad


# -------------------------------------------------------------------------------------------- optimizers


def adamw_(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One AdamW step (decoupled decay, bias-corrected moments); `step` counts from 1."""
    f = np.float32
    K.adamw[_ew_grid(p.size), K.EW_BLOCK](
        _flat(p), _flat(g), _flat(m), _flat(v), f(lr), f(beta1), f(beta2), f(1 - beta1), f(1 - beta2),
        f(1 - beta1**step), f(1 - beta2**step), f(eps), f(1 - lr * weight_decay),
    )  # fmt: skip


def lion_(p: Array, g: Array, m: Array, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step: p -= lr·(sign(β1·m + (1−β1)·g) + wd·p); m = β2·m + (1−β2)·g."""
    f = np.float32
    K.lion[_ew_grid(p.size), K.EW_BLOCK](
        _flat(p), _flat(g), _flat(m), f(lr), f(beta1), f(beta2), f(1 - beta1), f(1 - beta2),
        f(1 - lr * weight_decay),
    )  # fmt: skip


def _transpose(x: Array) -> Array:
    rows, cols = x.shape
    out = _empty((cols, rows), x.dtype)
    K.transpose[_ew_grid(out.size), K.EW_BLOCK](_flat(x), _flat(out), rows, cols)
    return out


def _newton_schulz_stack(x: Array, steps: int) -> Array:
    """NS5 of each wide matrix of x [G, r, c] (r ≤ c) at once: per-matrix normalisation, then each product
    as one batched GEMM over the G matrices (the polynomial with an addend: P = cA² + bA, X' = PX + aX)."""
    a_coef, b_coef, c_coef = NS5_COEFFS
    n, rows, cols = x.shape
    per = rows * cols
    blocks = _reduce_grid(per)
    partials = _empty(n * blocks, np.float64)
    K.batched_sum_squares_partial[(blocks, n), K.ROW_BLOCK](_flat(x), partials, per)
    K.batched_scale_by_inverse_norm[(blocks, n), K.ROW_BLOCK](_flat(x), partials, blocks, 1e-7, per)
    square = rows * rows
    for _ in range(steps):
        gram = _empty((n, rows, rows))
        _gemm(x, x, gram, rows, rows, cols, trans_b=True, batch=n, stride_a=per, stride_b=per)
        poly = _empty((n, rows, rows))
        _gemm(gram, gram, poly, rows, rows, rows, batch=n, stride_a=square, stride_b=square,
              alpha=c_coef, beta=b_coef, addend=gram)  # fmt: skip
        x_next = _empty((n, rows, cols))
        _gemm(poly, x, x_next, rows, cols, rows, batch=n, stride_a=square, stride_b=per,
              alpha=1.0, beta=a_coef, addend=x)  # fmt: skip
        x = x_next
    return x


def newton_schulz5(g: Array, steps: int) -> Array:
    """Approximate orthogonalisation U·V^T of g = U·S·V^T by the quintic Newton–Schulz iteration (Muon):
    X ← X/‖X‖_F, then `steps` times X ← aX + (bA + cA²)X with A = XX^T, on the wide orientation."""
    _flush_muon()
    _check_float(g)
    tall = g.shape[0] > g.shape[1]
    x = _transpose(g) if tall else copy(g)
    x = _newton_schulz_stack(x.reshape(1, *x.shape), steps)
    x = x.reshape(x.shape[1], x.shape[2])
    return _transpose(x) if tall else x


# Muon updates are collected and run together: `muon_` only queues its update, and the queue is applied, one
# batched Newton–Schulz per weight shape, before any other op runs (see `_ordered` below), so every op still
# sees the parameters updated in program order. One optimizer step's dozens of small per-matrix iterations
# become a few batched ones: far fewer launches (the host is the limit there) and fuller GPU waves.
_PENDING_MUON: list[tuple[Array, Array, Array, tuple]] = []
_PENDING_ADDRESSES: set[int] = set()


def _address(a: Array) -> int:
    """Where a device array's data starts (views from reshapes share it)."""
    if K.SIMULATOR:
        return int(a.ctypes.data)  # the simulator's arrays wrap NumPy arrays
    return int(a.device_ctypes_pointer.value or 0)


def muon_(
    p: Array,
    g: Array,
    buf: Array,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
) -> None:
    """One Muon step for a 2-D weight: buf = μ·buf + g; d = g + μ·buf (Nesterov) or buf;
    p -= lr·(NS5(d)·sqrt(max(1, rows/cols)) + wd·p). Applied (batched with the other queued updates of the
    same shape) before the next op of this module runs."""
    _check_float(p, g, buf)
    if len(p.shape) != 2 or tuple(g.shape) != tuple(p.shape) or tuple(buf.shape) != tuple(p.shape):
        raise ValueError(
            f"muon_: p {tuple(p.shape)}, g {tuple(g.shape)} and buf {tuple(buf.shape)} must be one 2-D shape"
        )
    addresses = {_address(p), _address(g), _address(buf)}
    if addresses & _PENDING_ADDRESSES:  # the same tensor twice in one queue: keep the order
        _flush_muon()
    _PENDING_MUON.append(
        (p, g, buf, (float(lr), float(momentum), bool(nesterov), float(weight_decay), int(ns_steps)))
    )
    _PENDING_ADDRESSES.update(addresses)


def _flush_muon() -> None:
    """Apply the queued Muon updates: per (shape, hyper-parameters) group, gather the momentum directions
    (transposed to wide), run one batched NS5, and write each weight's update."""
    if not _PENDING_MUON:
        return
    groups: dict[tuple, list[tuple[Array, Array, Array]]] = defaultdict(list)
    for p, g, buf, hyper in _PENDING_MUON:
        groups[(tuple(p.shape), hyper)].append((p, g, buf))
    _PENDING_MUON.clear()
    _PENDING_ADDRESSES.clear()
    for ((rows, cols), (lr, momentum, nesterov, weight_decay, ns_steps)), items in groups.items():
        tall = rows > cols
        per = rows * cols
        stack = _empty((len(items), min(rows, cols), max(rows, cols)))
        flat_stack = _flat(stack)
        for i, (_, g, buf) in enumerate(items):
            K.muon_momentum[_ew_grid(per), K.EW_BLOCK](
                _flat(g), _flat(buf), flat_stack, i * per, np.float32(momentum), int(nesterov),
                rows, cols, int(tall),
            )  # fmt: skip
        result = _flat(_newton_schulz_stack(stack, ns_steps))
        scale = np.float32(math.sqrt(max(1.0, rows / cols)))
        decay = np.float32(1 - lr * weight_decay)
        for i, (p, _, _) in enumerate(items):
            K.muon_apply[_ew_grid(per), K.EW_BLOCK](
                _flat(p), result, i * per, scale, np.float32(lr), decay, rows, cols, int(tall)
            )


def _ordered(op: Callable, exempt_unless_aliasing: bool = False) -> Callable:
    """`op` preceded by the queued Muon updates (optimizer updates of other tensors need not wait)."""

    @functools.wraps(op)
    def run(*args: Any, **kwargs: Any) -> Any:
        if _PENDING_MUON and (
            not exempt_unless_aliasing
            or any(_address(a) in _PENDING_ADDRESSES for a in args if hasattr(a, "copy_to_host"))
        ):
            _flush_muon()
        return op(*args, **kwargs)

    return run


def empty_cache() -> None:
    """Return the pool's free blocks to the driver (e.g. before handing the GPU to another library)."""
    _flush_muon()
    if not K.SIMULATOR:
        cuda.current_context().memory_manager.release_cached()


for _name in OPS:
    if _name not in ("muon_", "newton_schulz5"):
        globals()[_name] = _ordered(globals()[_name], exempt_unless_aliasing=_name in ("adamw_", "lion_"))
