"""Block codecs for the GGML tensor types a BitNet GGUF uses, NumPy-vectorised.

Decoders turn a tensor's raw bytes into float32 (``dequantize``) or, for the ternary types, into exact codes
plus per-block scales (``ternary_codes``) that the engine repacks once at load. Encoders (``quantize``)
reproduce llama.cpp's reference quantizers byte for byte (``quantize_row_*_ref`` in ``ggml-quants.c``)
so files we write are the files ``llama-quantize`` would write. The BitNet fork's I2_S (type 36) follows
microsoft/BitNet's x86 layout.

Layouts (QK_K = 256; ``shape`` is NumPy order, rows first, the last axis is ggml's contiguous ``ne0``):
  TQ2_0 66 B/256: qs[64], fp16 d.            TQ1_0 54 B/256: qs[48], qh[4], fp16 d (base-3, 5 trits a byte).
  Q8_0  34 B/32:  fp16 d, int8 qs[32].        Q6_K 210 B/256: ql[128], qh[64], int8 scales[16], fp16 d.
  I2_S  N*K/4 + 32 B: 128-weight blocks of 32 bytes (weight j in byte j%32 at shift 6-2*(j//32), code 0/1/2 =
        -1/0/+1), then a 32-byte tail whose first 4 bytes are the float32 tensor scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gguf.quants
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

F32 = 0
F16 = 1
Q8_0 = 8
Q6_K = 14
BF16 = 30
TQ1_0 = 34
TQ2_0 = 35
I2_S = 36

QK_K = 256
I2S_BLOCK = 128  # weights per 32-byte I2_S block
I2S_TAIL = 32  # bytes after the packed codes; the first 4 hold the float32 scale

TERNARY_TYPES = frozenset({TQ1_0, TQ2_0, I2_S})

_CHUNK_BLOCKS = 1 << 15  # blocks decoded per step: bounds temporaries to a few tens of MB for big tensors

_SIZES: dict[int, tuple[int, int]] = {int(t): s for t, s in GGML_QUANT_SIZES.items()}
_SIZES[I2_S] = (4, 1)  # 4 weights per byte, plus the tail (see tensor_nbytes)
_NAMES: dict[int, str] = {int(t): t.name for t in GGMLQuantizationType}
_NAMES[I2_S] = "I2_S"


def type_name(ggml_type: int) -> str:
    """The ggml name of a type id (``"TQ2_0"``), or ``"type <id>"`` for ids nobody knows."""
    return _NAMES.get(int(ggml_type), f"type {ggml_type}")


def is_known_type(ggml_type: int) -> bool:
    return int(ggml_type) in _SIZES


def block_geometry(ggml_type: int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a type; ValueError for an unknown type id."""
    try:
        return _SIZES[int(ggml_type)]
    except KeyError:
        raise ValueError(f"unknown ggml type id {ggml_type}") from None


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and NumPy-order shape occupies in a file (Python ints: never overflows).

    ValueError when the contiguous (last) dimension is not a whole number of blocks.
    """
    block, size = block_geometry(ggml_type)
    ne0 = shape[-1] if shape else 1
    n = math.prod(shape)
    if ggml_type == I2_S:
        if n % I2S_BLOCK:
            raise ValueError(f"I2_S needs a multiple of {I2S_BLOCK} weights, got {n}")
        return n // 4 + I2S_TAIL
    if ne0 % block:
        raise ValueError(f"{type_name(ggml_type)} rows must be a multiple of {block} values, got {ne0}")
    return n // block * size


def _check_raw(ggml_type: int, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"raw bytes must be a 1-D uint8 array, got {raw.dtype} with {raw.ndim} dims")
    expected = tensor_nbytes(ggml_type, shape)
    if raw.size != expected:
        raise ValueError(f"{type_name(ggml_type)} {shape} needs {expected} bytes, got {raw.size}")
    return raw


def _blockwise(
    blocks: np.ndarray, width: int, dtype: type, decode: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply ``decode((nb, bytes) uint8) -> (nb, width)`` chunk by chunk into one (nb, width) array."""
    out = np.empty((blocks.shape[0], width), dtype=dtype)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = decode(blocks[start : start + _CHUNK_BLOCKS])
    return out


# ---------------------------------------------------------------- ternary codes (int8 in {-1,0,1}) per block

_TQ2_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
_POW3_5 = np.array([1, 3, 9, 27, 81], dtype=np.uint8).reshape(1, 5, 1)
_POW3_4 = np.array([1, 3, 9, 27], dtype=np.uint8).reshape(1, 4, 1)
_I2S_SHIFTS = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)


def _tq2_codes(blocks: np.ndarray) -> np.ndarray:
    """(nb, 66) -> (nb, 256) int8: weight 128h + 32n + m is bits 2n of qs[32h + m], minus 1 (code 3 -> +2)."""
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    q = (qs >> _TQ2_SHIFTS) & np.uint8(3)
    return q.reshape(-1, QK_K).view(np.int8) - np.int8(1)


def _tq2_ternary_codes(blocks: np.ndarray) -> np.ndarray:
    codes = _tq2_codes(blocks)
    if (codes > 1).any():
        raise ValueError("TQ2_0 code 3 (+2) is not a ternary value (codes are 0, 1, 2 = -1, 0, +1)")
    return codes


def _trits(packed: np.ndarray, pow3: np.ndarray) -> np.ndarray:
    """Trit n of each byte b (most significant first): ((uint8)(b * 3^n) * 3) >> 8. (nb, B) -> (nb, n, B)."""
    shifted = packed[:, None, :] * pow3  # uint8 multiply wraps mod 256, as in ggml
    return ((shifted.astype(np.uint16) * np.uint16(3)) >> np.uint16(8)).astype(np.int8)


def _tq1_codes(blocks: np.ndarray) -> np.ndarray:
    """(nb, 54) -> (nb, 256) int8: qs[0:32] hold weights m+32n, qs[32:48] 160+m+16n, qh[0:4] 240+j+4n."""
    nb = blocks.shape[0]
    t5 = _trits(blocks[:, :48], _POW3_5)  # (nb, 5, 48)
    t4 = _trits(blocks[:, 48:52], _POW3_4)  # (nb, 4, 4)
    codes = np.concatenate(
        [t5[:, :, :32].reshape(nb, 160), t5[:, :, 32:].reshape(nb, 80), t4.reshape(nb, 16)], axis=1
    )
    return codes - np.int8(1)


def _i2s_codes(packed: np.ndarray) -> np.ndarray:
    """(nb, 32) -> (nb, 128) int8: weight j of a block is bits 6-2*(j//32) of byte j%32, minus 1."""
    q = (packed[:, None, :] >> _I2S_SHIFTS) & np.uint8(3)
    codes = q.reshape(-1, I2S_BLOCK).view(np.int8) - np.int8(1)
    if (codes > 1).any():
        raise ValueError("I2_S code 3 is not a ternary value (codes are 0, 1, 2 = -1, 0, +1)")
    return codes


def _fp16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset : offset + 2].copy().view(np.float16).reshape(-1).astype(np.float32)


def i2s_scale(raw: np.ndarray, shape: tuple[int, ...]) -> float:
    """The float32 tensor scale stored in an I2_S tensor's tail."""
    n = math.prod(shape)
    return float(raw[n // 4 : n // 4 + 4].copy().view(np.float32)[0])


def ternary_codes(
    ggml_type: int, raw: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact ternary weights of a TQ1_0 / TQ2_0 / I2_S matrix.

    Returns ``(codes int8[N, K] in {-1, 0, 1}, block_scales float32[N, K // block], block)``, so that
    ``W[n, k] = codes[n, k] * block_scales[n, k // block]``: block 256 for TQ types (one fp16 d per block) and
    block K for I2_S (its one tensor scale repeated per row).
    """
    if len(shape) != 2:
        raise ValueError(f"ternary codes need a 2-D matrix, got shape {shape}")
    raw = _check_raw(ggml_type, raw, shape)
    n_rows, k = shape
    if ggml_type in (TQ1_0, TQ2_0):
        type_size = 54 if ggml_type == TQ1_0 else 66
        decode = _tq1_codes if ggml_type == TQ1_0 else _tq2_ternary_codes
        blocks = raw.reshape(-1, type_size)
        codes = _blockwise(blocks, QK_K, np.int8, decode)
        scales = _fp16_at(blocks, type_size - 2).reshape(n_rows, k // QK_K)
        return codes.reshape(n_rows, k), scales, QK_K
    if ggml_type == I2_S:
        codes = _blockwise(raw[: n_rows * k // 4].reshape(-1, 32), I2S_BLOCK, np.int8, _i2s_codes)
        scales = np.full((n_rows, 1), i2s_scale(raw, shape), dtype=np.float32)
        return codes.reshape(n_rows, k), scales, k
    raise ValueError(f"{type_name(ggml_type)} is not a ternary type (expected TQ1_0, TQ2_0 or I2_S)")


# ---------------------------------------------------------------- float decoders


def _dequant_tq2(blocks: np.ndarray) -> np.ndarray:
    return _tq2_codes(blocks).astype(np.float32) * _fp16_at(blocks, 64)[:, None]


def _dequant_tq1(blocks: np.ndarray) -> np.ndarray:
    return _tq1_codes(blocks).astype(np.float32) * _fp16_at(blocks, 52)[:, None]


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _fp16_at(blocks, 0)[:, None]


_Q6K_QH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Element e = 128h + 32s + l of a block: 6-bit q from ql/qh, times d * scales[e // 16]."""
    nb = blocks.shape[0]
    ql = blocks[:, :128].reshape(nb, 2, 2, 32)  # [half, low/high 32 bytes, l]
    qh = blocks[:, 128:192].reshape(nb, 2, 1, 32)
    low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2)  # quarters s = 0..3
    high = (qh >> _Q6K_QH_SHIFTS) & np.uint8(3)
    q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _fp16_at(blocks, 208)[:, None] * sc  # (nb, 16): float32 d*sc, then * q, as in ggml
    return (d[:, :, None] * q.reshape(nb, 16, 16).astype(np.float32)).reshape(nb, QK_K)


_DECODERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    TQ2_0: _dequant_tq2,
    TQ1_0: _dequant_tq1,
    Q8_0: _dequant_q8_0,
    Q6_K: _dequant_q6_k,
}


def dequantize(ggml_type: int, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes -> float32 array of ``shape`` (NumPy order), exactly as ggml dequantizes them.

    Other types gguf-py can decode (Q4_K, ...) are decoded by ``gguf.quants`` as a fallback.
    """
    raw = _check_raw(ggml_type, raw, shape)
    shape = tuple(int(s) for s in shape)
    if ggml_type == F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if ggml_type == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    if ggml_type == I2_S:
        codes, scales, _ = ternary_codes(I2_S, raw, (math.prod(shape[:-1]), shape[-1]))
        return (codes.astype(np.float32) * scales).reshape(shape)
    decode = _DECODERS.get(ggml_type)
    if decode is not None:
        block, type_size = block_geometry(ggml_type)
        return _blockwise(raw.reshape(-1, type_size), block, np.float32, decode).reshape(shape)
    return _fallback_dequantize(ggml_type, raw, shape)


def _fallback_dequantize(ggml_type: int, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        out = gguf.quants.dequantize(raw, GGMLQuantizationType(ggml_type))
    except Exception as e:  # gguf-py raises NotImplementedError, ValueError, ... for types it cannot decode
        raise ValueError(f"cannot decode {type_name(ggml_type)}: {e}") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------- encoders (llama.cpp reference quantizers)


def _lround(v: np.ndarray) -> np.ndarray:
    """C ``lroundf``/``roundf``: round half away from zero (in float64, so exact for float32 input)."""
    v = v.astype(np.float64)
    return np.trunc(v + np.copysign(0.5, v))


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int``: round half to even (the 1.5*2^23 trick) for float32 values."""
    return np.rint(v.astype(np.float32)).astype(np.int32)


def _as_blocks(x: np.ndarray, block: int, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(f"{name} rows must be a multiple of {block} values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: cannot quantize NaN or infinite values")
    return x.reshape(-1, block)


def _inverse_or_zero(d: np.ndarray) -> np.ndarray:
    """C's ``id = d ? 1.0f/d : 0.0f`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _quantize_tq2_0(x: np.ndarray) -> np.ndarray:
    blocks = _as_blocks(x, QK_K, "TQ2_0")
    d = np.abs(blocks).max(axis=1)
    q = (_lround(blocks * _inverse_or_zero(d)[:, None]) + 1).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # weight 128h + 32n + m -> [h, n, m]
    qs = (q << _TQ2_SHIFTS).sum(axis=2, dtype=np.uint8).reshape(-1, 64)
    return np.concatenate([qs, d.astype(np.float16).view(np.uint8).reshape(-1, 2)], axis=1).reshape(-1)


def _pack_trits(q: np.ndarray, n_trits: int) -> np.ndarray:
    """(nb, n_trits, B) trits, first most significant -> (nb, B) bytes ceil(v * 256 / 243), v as 5 trits."""
    v = np.zeros(q.shape[::2], dtype=np.uint16)
    for n in range(n_trits):
        v = v * np.uint16(3) + q[:, n, :]
    v = v * np.uint16(3 ** (5 - n_trits))
    return ((v.astype(np.uint32) * 256 + 242) // 243).astype(np.uint8)


def _quantize_tq1_0(x: np.ndarray) -> np.ndarray:
    blocks = _as_blocks(x, QK_K, "TQ1_0")
    nb = blocks.shape[0]
    d = np.abs(blocks).max(axis=1)
    q = (_lround(blocks * _inverse_or_zero(d)[:, None]) + 1).astype(np.uint16)
    qs0 = _pack_trits(q[:, :160].reshape(nb, 5, 32), 5)
    qs1 = _pack_trits(q[:, 160:240].reshape(nb, 5, 16), 5)
    qh = _pack_trits(q[:, 240:].reshape(nb, 4, 4), 4)
    dh = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([qs0, qs1, qh, dh], axis=1).reshape(-1)


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    blocks = _as_blocks(x, 32, "Q8_0")
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    qs = _lround(blocks * _inverse_or_zero(d)[:, None]).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1).reshape(-1)


GROUP_MAX_EPS = np.float32(1e-15)


def _make_qx_quants_rmse1(xt: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` for G groups at once.

    xt: float32 (n, G), one group per column (rows contiguous, so the loops below stream memory). Returns
    (scale float32 (G,), L float32 (n, G) holding integers in [0, 2*nmax)). Sums run sequentially over the
    n elements in float32 with the C evaluation order ((w*x)*l, (w*l)*l), so the scale matches bit for bit.
    """
    n, g = xt.shape
    cols = np.arange(g)
    xmax = xt[np.abs(xt).argmax(axis=0), cols]  # first largest |x|, as the strict '>' loop picks
    zero = np.abs(xmax) < GROUP_MAX_EPS
    safe_max = np.where(zero, np.float32(1), xmax).astype(np.float32)
    w = xt * xt
    wx = w * xt
    lo, hi = np.float32(-nmax), np.float32(nmax - 1)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ls = np.clip(np.rint(iscale * xt), lo, hi)  # nearest_int: round half to even, in float32
        sumlx = np.zeros(g, dtype=np.float32)
        suml2 = np.zeros(g, dtype=np.float32)
        for i in range(n):
            sumlx += wx[i] * ls[i]
            suml2 += (w[i] * ls[i]) * ls[i]
        return ls, sumlx, suml2

    labels, sumlx, suml2 = trial(np.float32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0)).astype(np.float32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / safe_max
        ls, sumlx, suml2 = trial(iscale.astype(np.float32))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            labels = np.where(better, ls, labels)
            with np.errstate(divide="ignore", invalid="ignore"):
                new_scale = sumlx / suml2
            scale = np.where(better, new_scale, scale)
            best = np.where(better, new_scale * sumlx, best)
    labels = np.where(zero, np.float32(-nmax), labels) + np.float32(nmax)
    return np.where(zero, np.float32(0), scale).astype(np.float32), labels


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """llama.cpp ``quantize_row_q6_K_ref``: 16 sub-block scales (make_qx_quants) as int8 under one fp16 d."""
    blocks = _as_blocks(x, QK_K, "Q6_K")
    out = np.empty((blocks.shape[0], 210), dtype=np.uint8)
    step = 4096  # blocks per chunk: keeps the (16, 16 * step) work arrays in cache
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = _q6_k_blocks(blocks[start : start + step])
    return out.reshape(-1)


def _q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    scales, labels = _make_qx_quants_rmse1(np.ascontiguousarray(blocks.reshape(nb * 16, 16).T), 32)
    scales = scales.reshape(nb, 16)
    labels = labels.T.reshape(nb, 16, 16)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, np.float32(0), np.float32(-128) / max_scale).astype(np.float32)
        d16 = np.where(empty, np.float32(0), np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d_sub = d16.astype(np.float32)[:, None] * sc.astype(np.float32)  # (nb, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(blocks.reshape(nb, 16, 16) / d_sub[:, :, None]), -32, 31) + 32
    # sub-blocks whose d came out 0 keep make_qx_quants' labels, as the C code skips them
    labels = np.where((d_sub != 0)[:, :, None], q, labels).astype(np.uint8).reshape(nb, 2, 4, 32)
    low = labels & np.uint8(0x0F)
    ql = low[:, :, 0:2, :] | (low[:, :, 2:4, :] << np.uint8(4))
    qh = ((labels >> np.uint8(4)) << _Q6K_QH_SHIFTS).sum(axis=2, dtype=np.uint8)  # (nb, 2, 32)
    out = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)],
        axis=1,
    )
    out[empty] = 0
    return out


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    """ggml ``GGML_FP32_TO_BF16``: round to nearest even, NaN kept quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)
    return out.view(np.uint8)


def quantize_i2_s(x: np.ndarray) -> np.ndarray:
    """The BitNet fork's ``quantize_i2_s``: scale = max|x| over the tensor, code = sign (0 where |x| < 1e-6).

    Input must already be ternary times one scale (W_t * gamma); other values are reduced to their sign.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size % I2S_BLOCK:
        raise ValueError(f"I2_S needs a multiple of {I2S_BLOCK} weights, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError("I2_S: cannot quantize NaN or infinite values")
    flat = x.reshape(-1)
    scale = np.float32(np.abs(flat).max()) if flat.size else np.float32(0)
    codes = np.where(np.abs(flat) < 1e-6, 1, np.where(flat > 0, 2, 0)).astype(np.uint8)
    packed = (codes.reshape(-1, 4, 32) << _I2S_SHIFTS).sum(axis=1, dtype=np.uint8).reshape(-1)
    tail = np.zeros(I2S_TAIL, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype=np.float32).view(np.uint8)
    return np.concatenate([packed, tail])


_ENCODERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    F32: lambda x: np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint8),
    F16: lambda x: np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).reshape(-1).view(np.uint8),
    BF16: _quantize_bf16,
    Q8_0: _quantize_q8_0,
    Q6_K: _quantize_q6_k,
    TQ1_0: _quantize_tq1_0,
    TQ2_0: _quantize_tq2_0,
    I2_S: quantize_i2_s,
}


def quantize(ggml_type: int, x: np.ndarray) -> np.ndarray:
    """float32 array (rows along the last axis) -> uint8 bytes of ``ggml_type``, as llama.cpp writes them."""
    encode = _ENCODERS.get(int(ggml_type))
    if encode is None:
        raise ValueError(f"no encoder for {type_name(ggml_type)}")
    return np.ascontiguousarray(encode(np.asarray(x)))
