"""Repacking a model file's ternary linears into the planar layout, once, then from the on-disk cache.

Every linear kind (``attn_q`` … ``ffn_down``) is stacked over the layers (``fused.StackedLinear``): the fused
forward indexes layers inside one jitted call, and each layer's slice is still a ``PlanarMatrix`` view for the
step-by-step path. The first load of a model decodes each GGUF tensor, packs it and drops the source pages it
read (so the file's pages and the packed copy are not resident together); the arrays go to the repack cache
(``repack_cache.RepackCache``), and later loads memory-map them. Models whose packed weights are below
``MIN_CACHED_BYTES`` are repacked every time: that takes milliseconds and leaves no files behind.

The per-block ``group_scales`` of a linear whose every row group is uniform are never read by the kernels
(they use ``row_scales``): such arrays are stored as the cache's cold arrays, so they stay out of memory.

On a machine with several NUMA nodes the arrays the kernels read are then copied, each node's row groups
into that node's memory (``numa.py``); with one node (or ``numa=False``) the memory-mapped cache is kept.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
from ternary.engine.fused import PLANAR_FIELDS, StackedLinear
from ternary.engine.numa import NodeCopy, NodeLocalCopier, NumaPlan, NumaSetting, resolve_plan
from ternary.engine.planar import LAYOUT_VERSION, PlanarMatrix, aligned_empty
from ternary.engine.repack_cache import RepackCache
from ternary.engine.simd import BLOCK
from ternary.formats.model_file import LINEAR_NAMES, ModelFile

STACK_FORMAT = 2  # names, shapes and order of the cached stacked arrays; part of the cache key
MIN_CACHED_BYTES = 8 << 20  # packed ternary bytes below which the cache is not used
PROGRESS_BYTES = 256 << 20  # a progress bar for repacks of at least this many bytes of ternary tensors

CacheSetting = str | os.PathLike[str] | bool | None  # None: default folder, False: off, a path: that folder


def ternary_bytes(mf: ModelFile) -> int:
    """Bytes of all ternary tensors in the file."""
    return sum(
        lin.weight.raw.nbytes for il in range(mf.config.n_layer) for lin in mf.layer(il).linears().values()
    )


def load_stacked_linears(
    mf: ModelFile, cache: CacheSetting = None, numa: NumaSetting | NumaPlan = None
) -> dict[str, StackedLinear]:
    """``{"attn_q": StackedLinear, ...}`` for ``mf``, from the repack cache when it holds them.

    A cache folder that cannot be written only costs the cache (a ``RuntimeWarning`` says so). ``numa``
    (``numa.resolve_plan``: None = ``$TERNARY_NUMA`` or distribute, False = off, or a plan): on a machine
    with several nodes each node's row groups are copied into that node's memory (``place_on_nodes``).
    """
    misfit = planar_misfit(mf)
    if misfit is not None:
        raise ValueError(f"{mf.path}: {misfit}: the planar layout cannot hold it")
    store = _cache_for(cache, ternary_bytes(mf))
    extra = f"stacked-{STACK_FORMAT}"
    arrays = None if store is None else store.load(mf.path, extra)
    if arrays is None:
        arrays = repack(mf)
        if store is not None:
            try:
                store.store(mf.path, arrays, extra, cold=unread_scales(arrays))
            except OSError as exc:
                warnings.warn(
                    f"repack cache not written ({exc}); the model is repacked on every load",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                arrays = store.load(mf.path, extra, verify=False) or arrays  # the memory-mapped copy
    plan = resolve_plan(numa)
    if plan is not None:
        place_on_nodes(arrays, plan)
    out = {}
    for name in LINEAR_NAMES:
        lins = [mf.layer(il).linears()[name] for il in range(mf.config.n_layer)]
        has = np.array([lin.scale is not None for lin in lins])
        scale = np.array([1.0 if lin.scale is None else lin.scale for lin in lins], dtype=np.float32)
        fields = {f: arrays[f"{name}.{f}"] for f in PLANAR_FIELDS}
        out[name] = StackedLinear(**fields, scale=scale, has_scale=has, n_out=lins[0].shape[0])
    return out


def place_on_nodes(arrays: dict[str, np.ndarray], plan: NumaPlan) -> list[NodeCopy]:
    """Replace each array the kernels read by its node-local copy (``numa.NodeLocalCopier``), one at a time,
    dropping the source's pages as it goes (so the file map and the copies are not resident together).

    Unread group scales stay where they are (cold, never resident). Returns what each node's workers did.
    """
    copier = NodeLocalCopier(plan)
    cold = set(unread_scales(arrays))
    for name in LINEAR_NAMES:
        n_groups = arrays[f"{name}.group_uniform"].shape[1]
        for f in PLANAR_FIELDS:
            key = f"{name}.{f}"
            if key not in cold:
                source = arrays[key]
                arrays[key] = copier.copy(source, n_groups)
                _release_unwritten(source)
    copier.warn_if_unpinned()
    return copier.log


def _release_unwritten(source: np.ndarray) -> None:
    """Drop the file pages under a repack-cache array that nothing wrote (the map is copy-on-write, and the
    weights are only read, so its pages are still the file's); anonymous arrays are freed by the caller."""
    base = source
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    if isinstance(base, np.memmap):
        read_only = source.view()
        read_only.flags.writeable = False
        release_pages(read_only)


def unread_scales(arrays: dict[str, np.ndarray]) -> list[str]:
    """The ``<kind>.group_scales`` arrays no kernel reads: those of kinds whose row groups are all uniform."""
    return [f"{n}.group_scales" for n in LINEAR_NAMES if arrays[f"{n}.group_uniform"].all()]


def planar_misfit(mf: ModelFile) -> str | None:
    """Why the planar layout cannot hold ``mf`` (a linear whose input length is not a multiple of 256, as
    every TQ1_0/TQ2_0 tensor's is), or None."""
    for il in range(mf.config.n_layer):
        for name, lin in mf.layer(il).linears().items():
            if lin.shape[1] % BLOCK:
                return f"blk.{il}.{name}: input length {lin.shape[1]} is not a multiple of {BLOCK}"
    return None


def _cache_for(setting: CacheSetting, nbytes: int) -> RepackCache | None:
    if setting is False or (setting is None and nbytes < MIN_CACHED_BYTES):
        return None
    directory = None if setting is None or setting is True else Path(setting)
    return RepackCache(directory, layout_version=LAYOUT_VERSION)


def repack(mf: ModelFile) -> dict[str, np.ndarray]:
    """The planar arrays of every linear kind, stacked over layers: ``"<kind>.<field>"`` → array."""
    n_layer = mf.config.n_layer
    total = ternary_bytes(mf)
    arrays: dict[str, np.ndarray] = {}
    with _progress(
        total, f"repacking {os.path.basename(mf.path)} ({total / 2**20:.0f} MiB of ternary weights)"
    ) as bar:
        for name in LINEAR_NAMES:
            for il in range(n_layer):
                linear = mf.layer(il).linears()[name]
                m = PlanarMatrix.from_codes(*mf.ternary_codes(linear))
                if il == 0:
                    for f, a in m.to_arrays().items():
                        if f in PLANAR_FIELDS:
                            arrays[f"{name}.{f}"] = _stacked_empty(n_layer, a)
                for f, a in m.to_arrays().items():
                    if f in PLANAR_FIELDS:
                        arrays[f"{name}.{f}"][il] = a
                del m
                release_pages(linear.weight.raw)
                bar(linear.weight.raw.nbytes)
    return arrays


def _stacked_empty(n_layer: int, like: np.ndarray) -> np.ndarray:
    """An array of ``n_layer`` copies of ``like``'s shape; byte buffers start 128-byte aligned."""
    if like.dtype == np.uint8 and like.ndim == 1:
        return aligned_empty(n_layer * like.nbytes).reshape(n_layer, like.size)
    return np.empty((n_layer, *like.shape), dtype=like.dtype)


@contextmanager
def _progress(total: int, label: str) -> Iterator:
    """``update(nbytes)`` for a progress bar on stderr, shown only for large repacks."""
    if total < PROGRESS_BYTES:
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, width=30) as bar:
        yield bar.update


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
COMPILER_LIBRARY = "libllvmlite"  # file name prefix of LLVM's library as llvmlite ships it


def release_pages(view: np.ndarray) -> None:
    """Drop the resident pages of a file mapping under ``view``; they are read from the file again if touched.

    The repack reads each GGUF tensor once, and its pages would otherwise count towards the process's memory
    next to the packed copy. Writable views are left alone: dropping a written private page would lose the
    write. Best effort: nothing happens where madvise is unavailable.
    """
    if _MADV_DONTNEED is None or view.nbytes == 0 or view.flags.writeable:
        return
    page = mmap.PAGESIZE
    start = view.ctypes.data
    first = -(-start // page) * page  # whole pages inside the view only: neighbours may be in use
    last = (start + view.nbytes) // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def release_compiler_pages(library: str = COMPILER_LIBRARY) -> int:
    """Drop the resident pages of LLVM's library once the kernels are loaded; returns the bytes dropped.

    Numba runs LLVM only to compile or load a kernel; after that its code and read-only data (~65 MiB for a
    model's kernels) would sit in memory unused. Only mappings that are not writable and hold no private
    (written or anonymous) pages are dropped: their pages are the file's own bytes, read back transparently
    if LLVM runs again (a kernel for new argument types). Best effort: nothing happens without
    ``/proc/self/smaps`` or madvise.
    """
    if _MADV_DONTNEED is None:
        return 0
    try:
        maps = _clean_read_only_maps(library)
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    dropped = 0
    for start, end, resident in maps:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            dropped += resident
    return dropped


def _clean_read_only_maps(library: str) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of every read-only mapping of a file named ``library*`` whose pages are
    all the file's (``/proc/self/smaps``: no Private_Dirty, no Anonymous)."""
    found, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if not fields[0].endswith(":"):  # a mapping's header: range, perms, offset, dev, inode, path
                path = fields[5] if len(fields) > 5 else ""
                mine = os.path.basename(path).startswith(library) and "w" not in fields[1]
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = {"range": (start, end)} if mine else None
                if mine:
                    found.append(current)
            elif current is not None and fields[0] in ("Rss:", "Private_Dirty:", "Anonymous:"):
                current[fields[0]] = int(fields[1]) * 1024
    return [
        (*m["range"], m.get("Rss:", 0))
        for m in found
        if m.get("Private_Dirty:", 1) == 0 and m.get("Anonymous:", 1) == 0
    ]
