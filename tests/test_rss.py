"""What keeps the engine's resident memory small, checked structurally (no RSS thresholds).

* uniform group scales (never read by the kernels) are stored in the repack cache's cold region, 2 MiB away
  from the hot arrays, and no page of them is resident after a forward pass;
* loading from the repack cache reads no weights through the map (the CRC is checked with file reads);
* ``load_transformer`` loads every kernel of the fused forward without touching the weights, so the first
  forward finds nothing left to load (and LLVM's pages, dropped after loading, stay out);
* LLVM's dropped pages come back transparently when a new kernel is compiled;
* a GGUF file's header pages leave memory once parsed, and ``release_pages`` lets the rest go.

Residency is read from ``/proc/self/pagemap`` (bit 63: page present), so these tests run on Linux only.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ORACLE
from ternary.engine.load import COMPILER_LIBRARY, release_compiler_pages
from ternary.engine.model import load_transformer
from ternary.formats.model_file import LINEAR_NAMES, open_model
from ternary.formats.reader import GGUFFile

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB2 = 2 << 20

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux /proc/self/pagemap"),
    pytest.mark.usefixtures("one_numba_thread"),
]


def resident_bytes(a: np.ndarray) -> int:
    """Bytes of ``a``'s pages present in this process (not merely in the page cache)."""
    if a.nbytes == 0:
        return 0
    first = a.ctypes.data // PAGE
    last = (a.ctypes.data + a.nbytes - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63))) * PAGE


def cache_header(folder: Path) -> dict:
    """The JSON header of the one repack cache file in ``folder`` (layout: repack_cache's docstring)."""
    (path,) = folder.glob("*.tnrp")
    with open(path, "rb") as f:
        magic, _version, header_len, _digest = struct.unpack("<8sII32s", f.read(48))
        assert magic == b"TNRYPACK"
        return json.loads(f.read(header_len))


def load(name: str, cache: Path | bool):
    with open_model(ORACLE / f"{name}.gguf") as mf:
        return load_transformer(mf, n_ctx=16, repack_cache=cache)


def forward(model, n: int = 3) -> np.ndarray:
    model.reset_slot(0)
    return model.forward(np.arange(1, n + 1), np.arange(n), np.zeros(n, dtype=np.int32))


def test_uniform_group_scales_are_stored_cold_and_stay_out_of_memory(tmp_path: Path) -> None:
    name = "tiny-tq2_0-f16"  # one scale per tensor: every row group is uniform
    first = load(name, tmp_path)  # builds and stores the cache
    header = cache_header(tmp_path)
    model = load(name, tmp_path)  # memory-maps it
    assert all(model.stacked[k].group_uniform.all() for k in LINEAR_NAMES)

    entries = {e["name"]: e for e in header["arrays"]}
    cold = [e for n, e in entries.items() if n.endswith(".group_scales")]
    hot = [e for n, e in entries.items() if not n.endswith(".group_scales")]
    assert len(cold) == len(LINEAR_NAMES)
    first_cold = min(e["offset"] for e in cold)
    assert first_cold % MIB2 == 0
    assert first_cold >= max(e["offset"] + e["nbytes"] for e in hot)

    logits = forward(model)
    np.testing.assert_array_equal(logits, forward(first))
    assert all(resident_bytes(model.stacked[k].packed) > 0 for k in LINEAR_NAMES)  # the check can see pages
    assert sum(resident_bytes(model.stacked[k].group_scales) for k in LINEAR_NAMES) == 0


def test_per_block_group_scales_stay_with_the_hot_arrays(tmp_path: Path) -> None:
    name = "tiny-tq2_0-blockscales-f16"
    reference = forward(load(name, False))
    load(name, tmp_path)
    model = load(name, tmp_path)
    entries = {e["name"]: e for e in cache_header(tmp_path)["arrays"]}
    mixed = [k for k in LINEAR_NAMES if not model.stacked[k].group_uniform.all()]
    assert mixed, "the model should have linears with per-block scales"
    last_hot = max(e["offset"] for n, e in entries.items() if n.endswith(".group_uniform"))
    assert all(entries[f"{k}.group_scales"]["offset"] < last_hot for k in mixed)
    np.testing.assert_array_equal(forward(model), reference)


def test_loading_from_the_cache_reads_no_weights_through_the_map(tmp_path: Path) -> None:
    name = "tiny-tq2_0-f16"
    load(name, tmp_path)
    model = load(name, tmp_path)
    packed = [model.stacked[k].packed for k in LINEAR_NAMES]
    assert sum(resident_bytes(p) for p in packed) == 0
    forward(model, 1)
    assert all(resident_bytes(p) > 0 for p in packed)


_FIRST_FORWARD = r"""
import sys, numpy as np
from numba.core.registry import CPUDispatcher
from ternary.engine.model import load_transformer
from ternary.formats.model_file import open_model

def overloads():
    found = {}
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("ternary.")]:
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher):
                found[f"{mod.__name__}.{name}"] = len(obj.overloads)
    return found

for path in sys.argv[1:]:
    with open_model(path) as mf:
        model = load_transformer(mf, n_ctx=8, repack_cache=False)
    before = overloads()
    model.forward([1, 2], [0, 1], [0, 0])
    model.forward([3], [2], [0])
    new = {k: v for k, v in overloads().items() if v != before.get(k, 0)}
    print(path, sorted(new))
"""


def test_the_first_forward_finds_every_kernel_loaded() -> None:
    """In a fresh process (kernels already loaded by other tests would hide a miss), for each head type."""
    names = ["tiny-tq1_0-q6k", "tiny-tq2_0-scaletensors-q8", "tiny-tq2_0-f16"]  # Q6_K, Q8_0, F16 heads
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_FORWARD, *(str(ORACLE / f"{n}.gguf") for n in names)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(names)
    for line in lines:
        assert line.endswith(" []"), f"kernels loaded by the first forward: {line}"


def _compiler_maps() -> list[dict[str, int]]:
    """Rss / Anonymous bytes of each read-only mapping of LLVM's library."""
    maps: list[dict[str, int]] = []
    mine = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):
                path = fields[5] if len(fields) > 5 else ""
                mine = os.path.basename(path).startswith(COMPILER_LIBRARY) and "w" not in fields[1]
                if mine:
                    maps.append({})
            elif mine and fields[0] in ("Rss:", "Anonymous:"):
                maps[-1][fields[0][:-1]] = int(fields[1]) * 1024
    return maps


def _compile_and_run(step: int) -> int:
    """Compile a new kernel (LLVM runs) and run it: the sum of range(0, 101, step)."""
    from numba import njit

    @njit(cache=False)
    def total(n, step):
        s = 0
        for i in range(0, n + 1, step):
            s += i
        return s

    return total(100, step)


def test_compiler_pages_are_dropped_and_come_back_when_needed() -> None:
    assert _compile_and_run(1) == 5050  # LLVM has just run: its pages are resident
    before = _compiler_maps()
    clean = sum(m["Rss"] for m in before if m["Anonymous"] == 0)
    assert clean > 0
    dropped = release_compiler_pages()
    assert dropped > clean // 2
    after = _compiler_maps()
    assert sum(m["Rss"] for m in after if m["Anonymous"] == 0) < dropped // 4  # a few may come back at once
    assert [m["Anonymous"] for m in after] == [m["Anonymous"] for m in before]  # private pages are kept
    assert _compile_and_run(2) == 2550  # compiling again reads LLVM's pages back from the file
    assert sum(m["Rss"] for m in _compiler_maps() if m["Anonymous"] == 0) > 0


def test_gguf_header_pages_leave_memory_once_parsed() -> None:
    with GGUFFile(ORACLE / "tiny-tq1_0-q6k.gguf") as f:
        whole = np.frombuffer(f._mmap, dtype=np.uint8)
        assert resident_bytes(whole[: f.data_offset]) == 0
        f.dequantize("output_norm.weight")
        assert resident_bytes(whole) > 0
        f.release_pages()
        assert resident_bytes(whole) == 0
        del whole


def test_the_rss_tool_measures_a_fresh_process() -> None:
    from ternary.bench.rss import measure

    path = ORACLE / "tiny-tq2_0-f16.gguf"
    result = measure(path, n_ctx=32, tokens=4, threads=1)
    assert result["generated"] == 4 and result["n_ctx"] == 32
    assert result["file_bytes"] == path.stat().st_size
    assert result["ratio"] == result["peak_rss"] / result["file_bytes"]
    assert all(result["peak_rss"] >= p["VmRSS"] for p in result["phases"].values())
    # the child waits while its maps are read: the per-mapping sums add up to the kernel's own total
    assert sum(result["groups"].values()) == result["rollup"]["Rss"]
    assert result["groups"]["model file"] > 0  # the F16 head is read from the file's map
