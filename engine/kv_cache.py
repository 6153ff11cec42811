"""A preallocated, slot-based KV cache: several independent sequences share one pair of arrays.

Slot ``s`` holds one sequence; its keys/values for position ``p`` live at ``[layer, s, p]``. A batch may mix
a prompt chunk of one slot with single decode tokens of others (continuous batching): the caller gives each
token's slot and position, the forward pass writes K/V there and attends over positions ``0..p`` of that slot.
``lengths[s]`` is the number of valid positions; writing at ``p < length`` rewinds the sequence to ``p``.
"""

from __future__ import annotations

import mmap

import numpy as np


class KVCache:
    """float32 keys and values ``[n_layer, n_slots, n_ctx, n_head_kv, head_dim]`` plus each slot's length."""

    def __init__(self, n_layer: int, n_slots: int, n_ctx: int, n_head_kv: int, head_dim: int) -> None:
        if min(n_layer, n_slots, n_ctx, n_head_kv, head_dim) <= 0:
            raise ValueError(
                f"KV cache sizes must be positive: n_layer={n_layer} n_slots={n_slots} n_ctx={n_ctx} "
                f"n_head_kv={n_head_kv} head_dim={head_dim}"
            )
        shape = (n_layer, n_slots, n_ctx, n_head_kv, head_dim)
        self.k = lazy_zeros(shape)
        self.v = lazy_zeros(shape)
        self.lengths = np.zeros(n_slots, dtype=np.int64)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def n_ctx(self) -> int:
        return self.k.shape[2]

    def reset(self, slot: int) -> None:
        """Forget slot ``slot``'s sequence (its rows are overwritten by the next writes)."""
        self._check_slot(slot)
        self.lengths[slot] = 0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} out of range: the cache has {self.n_slots} slots")

    def check_batch(self, positions: np.ndarray, slots: np.ndarray) -> None:
        """Refuse a batch that would leave a hole or run past the context.

        Per slot, the batch's positions must be consecutive, ascending, and start at or before the slot's
        length.
        """
        if positions.shape != slots.shape or positions.ndim != 1:
            raise ValueError(f"positions {positions.shape}, slots {slots.shape}: expected 1-D, same length")
        if slots.size == 0:
            return
        if slots.min() < 0 or slots.max() >= self.n_slots:
            raise ValueError(f"slot ids must be in [0, {self.n_slots}), got {sorted(set(slots.tolist()))}")
        if positions.min() < 0 or positions.max() >= self.n_ctx:
            raise ValueError(
                f"positions must be in [0, {self.n_ctx}) (the context size), "
                f"got {positions.min()}..{positions.max()}"
            )
        for s in np.unique(slots):
            pos = positions[slots == s]
            if np.any(np.diff(pos) != 1):
                raise ValueError(f"slot {s}: positions in one batch must be consecutive, ascending: {pos}")
            if pos[0] > self.lengths[s]:
                raise ValueError(
                    f"slot {s}: position {pos[0]} leaves a hole, the slot holds {self.lengths[s]} tokens"
                )

    def commit(self, positions: np.ndarray, slots: np.ndarray) -> None:
        """Record that each slot now ends right after its last position in the batch."""
        for s in np.unique(slots):
            self.lengths[s] = int(positions[slots == s].max()) + 1


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros whose memory is taken page by page where written: a long context costs what it uses.

    Not ``np.zeros``: NumPy advises huge pages for large arrays, so one K/V row written per layer would make
    2 MiB resident instead of 4 KiB (at n_ctx=4096 that was ~180 MiB for a three-token warm-up of a 30-layer
    model). An anonymous mapping is zero-filled by the kernel and is asked not to use huge pages.
    """
    nbytes = int(np.prod(shape)) * np.dtype(np.float32).itemsize
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=np.float32).reshape(shape)
