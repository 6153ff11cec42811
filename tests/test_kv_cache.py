"""The KV cache's buffers: zero-filled, writable, and resident only where written."""

from __future__ import annotations

import numpy as np
import psutil
from ternary.engine.kv_cache import lazy_zeros


def test_lazy_zeros_are_writable_float32_zeros() -> None:
    a = lazy_zeros((3, 5, 7))
    assert a.shape == (3, 5, 7) and a.dtype == np.float32 and a.flags.writeable
    assert not a.any()
    a[1, 2, 3] = 4.5
    assert a[1, 2, 3] == np.float32(4.5) and np.count_nonzero(a) == 1


def test_a_long_context_costs_only_the_pages_written() -> None:
    """One value written every 1 MiB of a 256 MiB buffer: a few 4 KiB pages each, not the whole buffer (nor
    2 MiB huge pages, which NumPy's own allocation advice would give where transparent huge pages are on)."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    a = lazy_zeros((256, 1 << 18))  # 256 rows of 1 MiB
    a[:, 0] = 1.0
    grown = proc.memory_info().rss - before
    assert grown < 32 << 20, f"{grown / 2**20:.1f} MiB resident after touching 256 pages"
    assert a.sum() == 256.0
