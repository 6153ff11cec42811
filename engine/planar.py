"""``PlanarMatrix``: the fast ternary weight layout (same interface as ``weights.TernaryMatrix``).

Layout (version ``LAYOUT_VERSION``), chosen so that each thread reads one sequential stream and the SIMD
kernels need no shuffles (see ``simd.py``):

* codes are stored as w+1 ∈ {0,1,2}, 2 bits each: the unsigned operand of ``vpdpbusd``;
* rows are taken 4 at a time (a *row group*; N is padded with zero rows to a multiple of 4);
* for every group and every 256-weight block along K, the 4 rows × 64 bytes are contiguous, blocks in K order,
  groups in row order; byte j of a row-block holds weights s·64 + j at bits 2s (s = 0..3);
* the buffer starts on a 128-byte boundary (streams from DRAM lose 10–18% at 16-byte offsets).

Scales are expanded to one per 256-block and stored group-major (``group_scales`` float32[n_groups, K/256, 4]:
the 4 rows of a block side by side, one vector load); a group whose rows each have one scale for all their
blocks is flagged in ``group_uniform`` and uses ``row_scales`` (float32[4·n_groups]) instead: an integer-only
inner loop. K must be a multiple of 256 and the weight block a multiple of 256 (TQ1_0/TQ2_0 and I2_S are).
"""

from __future__ import annotations

import numpy as np
from ternary.engine import cpu_features, simd, topology
from ternary.engine.kernels_fast import planar_matmul
from ternary.engine.simd import BLOCK, ROW_BLOCK_BYTES, ROW_GROUP

topology.configure_threading()  # omp: ~1 µs per parallel region, before any region runs

LAYOUT_VERSION = 1
ALIGNMENT = 128
MAX_N_IN = 1 << 22  # keeps every int32 accumulator lane of the one-token kernel far from overflow


def aligned_empty(nbytes: int, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised uint8 buffer of ``nbytes`` whose first byte sits on an ``alignment`` boundary."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + nbytes]


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] in {-1,0,1} → planar bytes (N padded to a multiple of 4), 128-byte aligned."""
    n_out, n_in = codes.shape
    n_groups = -(-n_out // ROW_GROUP)
    n_blocks = n_in // BLOCK
    padded = np.zeros((n_groups * ROW_GROUP, n_in), dtype=np.uint8)
    np.add(codes, 1, out=padded[:n_out], casting="unsafe")
    padded[n_out:] = 1  # padding rows: weight 0
    fields = padded.reshape(n_groups * ROW_GROUP, n_blocks, 4, ROW_BLOCK_BYTES)
    row_bytes = fields[:, :, 0] | (fields[:, :, 1] << 2) | (fields[:, :, 2] << 4) | (fields[:, :, 3] << 6)
    grouped = row_bytes.reshape(n_groups, ROW_GROUP, n_blocks, ROW_BLOCK_BYTES).transpose(0, 2, 1, 3)
    packed = aligned_empty(grouped.size)
    packed.reshape(grouped.shape)[...] = grouped
    return packed


def unpack_codes(packed: np.ndarray, n_out: int, n_in: int) -> np.ndarray:
    """The inverse of ``pack_codes``: int8 codes [n_out, n_in]."""
    n_groups = -(-n_out // ROW_GROUP)
    n_blocks = n_in // BLOCK
    grouped = packed.reshape(n_groups, n_blocks, ROW_GROUP, ROW_BLOCK_BYTES).transpose(0, 2, 1, 3)
    row_bytes = grouped.reshape(n_groups * ROW_GROUP, n_blocks, 1, ROW_BLOCK_BYTES)
    fields = (row_bytes >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    return (fields.reshape(n_groups * ROW_GROUP, n_in)[:n_out].astype(np.int8) - 1).astype(np.int8)


class PlanarMatrix:
    """Ternary weights in the planar layout; ``matmul`` runs the best kernel path this machine supports.

    ``kernels`` picks a path by name (``cpu_features.KERNEL_PATHS``); None means ``$TERNARY_KERNELS``, else
    the fastest.
    """

    def __init__(
        self,
        packed: np.ndarray,
        group_scales: np.ndarray,
        row_scales: np.ndarray,
        group_uniform: np.ndarray,
        n_out: int,
        kernels: str | None = None,
    ) -> None:
        if group_scales.ndim != 3 or group_scales.shape[2] != ROW_GROUP:
            raise ValueError(
                f"group_scales must be float32[n_groups, n_blocks, {ROW_GROUP}], got {group_scales.shape}"
            )
        n_groups, n_blocks, _ = group_scales.shape
        if n_groups != -(-n_out // ROW_GROUP):
            raise ValueError(f"{n_groups} row groups cannot hold {n_out} rows")
        if packed.dtype != np.uint8 or packed.shape != (n_groups * n_blocks * ROW_GROUP * ROW_BLOCK_BYTES,):
            expected = n_groups * n_blocks * ROW_GROUP * ROW_BLOCK_BYTES
            raise ValueError(f"packed weights: expected uint8[{expected}], got {_describe(packed)}")
        if row_scales.shape != (n_groups * ROW_GROUP,) or group_uniform.shape != (n_groups,):
            raise ValueError(
                f"row_scales {row_scales.shape} / group_uniform {group_uniform.shape} "
                f"do not fit {n_groups} row groups"
            )
        self.packed = packed
        self.group_scales = np.ascontiguousarray(group_scales, dtype=np.float32)
        self.row_scales = np.ascontiguousarray(row_scales, dtype=np.float32)
        self.group_uniform = np.ascontiguousarray(group_uniform, dtype=np.uint8)
        self._n_out = int(n_out)
        self.kernels = kernels

    @classmethod
    def from_codes(
        cls, codes: np.ndarray, block_scales: np.ndarray, block: int, kernels: str | None = None
    ) -> PlanarMatrix:
        """Repack int8 codes [N, K] in {-1,0,1} with float32 scales [N, K // block]."""
        codes = np.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"ternary codes must be 2-D [n_out, n_in], got shape {codes.shape}")
        n_out, n_in = codes.shape
        if n_in == 0 or n_in % BLOCK:
            raise ValueError(f"planar layout needs n_in to be a multiple of {BLOCK}, got {n_in}")
        if n_in > MAX_N_IN:
            raise ValueError(f"planar layout supports n_in up to {MAX_N_IN}, got {n_in}")
        if block <= 0 or block % BLOCK or n_in % block:
            raise ValueError(f"weight block {block} must be a multiple of {BLOCK} that divides n_in {n_in}")
        block_scales = np.asarray(block_scales, dtype=np.float32)
        if block_scales.shape != (n_out, n_in // block):
            raise ValueError(
                f"block_scales shape {block_scales.shape} does not match codes {codes.shape} "
                f"with block {block}"
            )
        if codes.size and (codes.min() < -1 or codes.max() > 1):
            raise ValueError("ternary codes must be -1, 0 or +1")
        n_groups = -(-n_out // ROW_GROUP)
        scales = np.zeros((n_groups * ROW_GROUP, n_in // BLOCK), dtype=np.float32)  # padding rows: scale 0
        scales[:n_out] = np.repeat(block_scales, block // BLOCK, axis=1)
        group_uniform = (scales == scales[:, :1]).all(axis=1).reshape(n_groups, ROW_GROUP).all(axis=1)
        group_scales = scales.reshape(n_groups, ROW_GROUP, -1).transpose(0, 2, 1)
        return cls(
            pack_codes(codes),
            group_scales,
            scales[:, 0].copy(),
            group_uniform.astype(np.uint8),
            n_out,
            kernels,
        )

    @property
    def n_out(self) -> int:
        return self._n_out

    @property
    def n_in(self) -> int:
        return self.group_scales.shape[1] * BLOCK

    @property
    def kernels(self) -> str:
        """The kernel path ``matmul`` uses."""
        return self._isa.name

    @kernels.setter
    def kernels(self, name: str | None) -> None:
        self._isa = simd.ISAS[cpu_features.select_path(name)]

    @property
    def nbytes(self) -> int:
        return (
            self.packed.nbytes + self.group_scales.nbytes + self.row_scales.nbytes + self.group_uniform.nbytes
        )

    def codes(self) -> np.ndarray:
        """The int8 codes [N, K] back (for tests and debugging)."""
        return unpack_codes(self.packed, self.n_out, self.n_in)

    def block_scales(self) -> np.ndarray:
        """The float32 scale of every 256-block, [N, K/256]."""
        return self.group_scales.transpose(0, 2, 1).reshape(-1, self.group_scales.shape[1])[: self.n_out]

    def dequantize(self) -> np.ndarray:
        """The float32 weights [N, K]."""
        return self.codes().astype(np.float32) * np.repeat(self.block_scales(), BLOCK, axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild the matrix, as arrays (for the repack cache)."""
        return {
            "packed": self.packed,
            "group_scales": self.group_scales,
            "row_scales": self.row_scales,
            "group_uniform": self.group_uniform,
            "n_out": np.array([self.n_out], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], kernels: str | None = None) -> PlanarMatrix:
        missing = {"packed", "group_scales", "row_scales", "group_uniform", "n_out"} - set(arrays)
        if missing:
            raise ValueError(f"planar matrix arrays lack {sorted(missing)}")
        return cls(
            arrays["packed"],
            arrays["group_scales"],
            arrays["row_scales"],
            arrays["group_uniform"],
            int(arrays["n_out"][0]),
            kernels,
        )

    def matmul(self, xq: np.ndarray, x_scale: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[t, n] = Σ_seg float32(Σ w·xq) · (w_scale · x_scale)``: exact integer dots, float32 sums.

        ``xq`` int8[T, K]; ``x_scale`` float32[T, C] with one column per activation block (C = 1: per token,
        C = K/256: llama.cpp's Q8_K); ``out`` float32[T, N], C-contiguous (written in place and returned).
        Segments: see ``kernels_fast``.
        """
        if not isinstance(xq, np.ndarray) or xq.dtype != np.int8 or xq.ndim != 2 or xq.shape[1] != self.n_in:
            raise ValueError(f"activations must be int8[T, {self.n_in}], got {_describe(xq)}")
        n_tok = xq.shape[0]
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n_tok, self.n_out):
            raise ValueError(f"output must be float32[{n_tok}, {self.n_out}], got {_describe(out)}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("output array must be C-contiguous and writable")
        x_scale = np.asarray(x_scale)
        n_blocks = self.n_in // BLOCK
        if x_scale.dtype != np.float32 or x_scale.ndim != 2 or x_scale.shape[0] != n_tok:
            raise ValueError(f"x_scale must be float32[{n_tok}, C], got {_describe(x_scale)}")
        if x_scale.shape[1] == 0 or n_blocks % x_scale.shape[1]:
            raise ValueError(
                f"x_scale has {x_scale.shape[1]} columns: n_in/{x_scale.shape[1]} "
                f"must be a multiple of {BLOCK}"
            )
        if n_tok == 0 or self.n_out == 0:
            return out
        planar_matmul(
            self._isa,
            self.packed,
            self.group_scales,
            self.row_scales,
            self.group_uniform,
            self.n_out,
            np.ascontiguousarray(xq),
            np.ascontiguousarray(x_scale),
            out,
        )
        return out


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype}{list(a.shape)}"
    return type(a).__name__
