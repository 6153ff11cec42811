"""NUMA: each node's share of every weight matrix in that node's memory, read by threads on that node.

Decode streams every weight once per token, so on a machine with several memory nodes a thread reading a
matrix row that lives on another node pays the interconnect. Here a matrix's row groups are split across
the nodes in proportion to the threads each node runs (``NumaPlan``); each node's slice of every layer is
copied into anonymous memory by a worker thread pinned to that node's CPUs, so Linux's first-touch policy
places its pages on that node (``NodeLocalCopier``); 2 MiB frames that lie wholly inside one node's slice are
advised ``MADV_HUGEPAGE``, frames shared by two nodes ``MADV_NOHUGEPAGE`` (a huge page would land whole on
whichever node touched it first). The arrays keep their shapes and layout, so the kernels are unchanged.

Threads follow the same split (``bind_threads``): Numba's thread ``t`` (node-major: node 0's threads first)
is pinned to the CPUs of the node that holds row groups ``thread_bounds[t]:thread_bounds[t+1]``. A prange of
exactly ``n_threads`` items runs item ``t`` on thread ``t`` (Numba's static chunking, omp and workqueue
layers; tbb steals work), which is how a driver binds explicit per-thread row ranges.

One node, ``numa=False``/``"off"`` or ``$TERNARY_NUMA=off``: no plan, no copy (the repack cache stays
memory-mapped). Only the stdlib: ``os.sched_setaffinity``, ``mmap.madvise``, ``move_pages`` through ctypes
(to check where pages are); no libnuma. A process memory policy (``numactl --membind/--interleave``)
overrides first touch: placement then follows the policy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
from numba import njit, prange, types
from ternary.engine.topology import Topology, current_topology, pin_current_thread

ENV = "TERNARY_NUMA"
MODES = ("off", "distribute", "numactl")  # llama.cpp's --numa values we honour (numactl: within the mask)
HUGE_PAGE = 2 << 20
_PAGE = mmap.PAGESIZE
_MASK_WORDS = 16  # cpu_set_t of 1024 CPUs, as glibc's

NumaSetting = bool | str | None  # None: $TERNARY_NUMA, else "distribute"; False/"off": never split


@dataclass(frozen=True)
class NumaPlan:
    """The nodes that run threads, their CPUs and how many threads each runs (threads numbered node-major)."""

    nodes: tuple[int, ...]
    node_cpus: tuple[tuple[int, ...], ...]
    threads: tuple[int, ...]

    @property
    def n_threads(self) -> int:
        return sum(self.threads)

    def node_bounds(self, n_groups: int) -> np.ndarray:
        """int64[n_nodes + 1]: node ``i`` holds row groups ``[b[i], b[i+1])``, in proportion to threads."""
        return proportional_bounds(n_groups, self.threads)

    def thread_bounds(self, n_groups: int) -> np.ndarray:
        """int64[n_threads + 1]: thread ``t``'s row groups, equal shares of its node's (never crossing)."""
        node = self.node_bounds(n_groups)
        parts = [np.array([0], dtype=np.int64)]
        for i, n in enumerate(self.threads):
            if n:
                parts.append(node[i] + proportional_bounds(int(node[i + 1] - node[i]), [1] * n)[1:])
        return np.concatenate(parts)

    def thread_nodes(self, n_threads: int) -> list[int]:
        """Index (into ``nodes``) of the node whose rows thread ``t`` of ``n_threads`` reads under static
        chunking (the row fraction at the middle of its share); node-major ``t`` when ``n_threads`` is the
        plan's."""
        edges = np.cumsum(self.threads) / self.n_threads
        return [int(np.searchsorted(edges, (t + 0.5) / n_threads)) for t in range(n_threads)]


def proportional_bounds(n: int, weights: Sequence[int]) -> np.ndarray:
    """int64[len(weights) + 1]: ``n`` items cut into contiguous ranges, range ``i`` within one item of
    ``n · w_i / Σw`` (floors of the cumulative shares: every item exactly once)."""
    cum = np.concatenate([[0], np.cumsum(np.asarray(weights, dtype=np.int64))])
    if cum[-1] <= 0 or (np.diff(cum) < 0).any():
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return (np.int64(n) * cum) // cum[-1]


def numa_mode(setting: NumaSetting) -> str:
    """``"off"`` or ``"distribute"`` from an API/CLI setting (None: ``$TERNARY_NUMA``, else distribute)."""
    if setting is None:
        setting = os.environ.get(ENV) or "distribute"
    if setting is True:
        return "distribute"
    if setting is False:
        return "off"
    mode = str(setting).strip().lower()
    if mode == "isolate":
        raise ValueError(
            "numa mode 'isolate' is not supported: run under `numactl --cpunodebind=N --membind=N` "
            "(one node in the CPU mask: nothing is split)"
        )
    if mode not in MODES:
        raise ValueError(f"unknown numa mode {setting!r}: expected one of {', '.join(MODES)}")
    return "off" if mode == "off" else "distribute"


def plan_numa(topology: Topology, n_threads: int) -> NumaPlan | None:
    """Threads dealt to the nodes in proportion to their physical cores (largest remainders); None when
    fewer than two nodes get threads (nothing to split)."""
    nodes = topology.nodes
    if len(nodes) < 2 or n_threads < 2:
        return None
    cores = np.array([len(c) for c in nodes.values()], dtype=np.int64)
    exact = n_threads * cores / cores.sum()
    threads = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - threads), kind="stable")[: n_threads - int(threads.sum())]:
        threads[i] += 1
    kept = [i for i, n in enumerate(threads) if n > 0]
    if len(kept) < 2:
        return None
    ids = list(nodes)
    return NumaPlan(
        nodes=tuple(ids[i] for i in kept),
        node_cpus=tuple(topology.node_cpus(ids[i]) for i in kept),
        threads=tuple(int(threads[i]) for i in kept),
    )


def resolve_plan(setting: NumaSetting | NumaPlan, n_threads: int | None = None) -> NumaPlan | None:
    """The plan for this process: ``setting`` itself if it is one, else from this machine's topology
    (restricted to the CPU mask) and ``n_threads`` (None: Numba's count on the calling thread)."""
    if isinstance(setting, NumaPlan):
        return setting
    if numa_mode(setting) == "off":
        return None
    return plan_numa(current_topology(), numba.get_num_threads() if n_threads is None else n_threads)


# ---------------------------------------------------------------- node-local copies


@dataclass
class NodeCopy:
    """What one node's copying workers did: the CPUs asked for, the affinity each worker saw, bytes."""

    node: int
    cpus: tuple[int, ...]
    affinity_seen: list[frozenset[int]] = field(default_factory=list)
    pinned: bool = True
    nbytes: int = 0


class NodeLocalCopier:
    """Copies ``[L, n_groups·…]`` arrays so that each node's row groups (in every layer) are on that node."""

    def __init__(self, plan: NumaPlan) -> None:
        self.plan = plan
        self.log = [NodeCopy(node, cpus) for node, cpus in zip(plan.nodes, plan.node_cpus, strict=True)]
        self._failures: list[BaseException] = []

    def copy(self, array: np.ndarray, n_groups: int) -> np.ndarray:
        """A copy of ``array`` (shape ``[L, …]``, each layer's slice ``n_groups`` equal group blocks) in
        anonymous memory, each node's groups written (first touched) by a worker pinned to that node."""
        a = np.ascontiguousarray(array)
        if a.ndim < 2 or n_groups <= 0 or a[0].size % n_groups:
            raise ValueError(f"cannot cut an array of shape {a.shape} into {n_groups} row groups per layer")
        n_layer = a.shape[0]
        src = a.reshape(n_layer, n_groups, -1)
        buf, offset = _anonymous(a.nbytes)
        out = np.frombuffer(buf, dtype=np.uint8, count=a.nbytes, offset=offset).view(a.dtype).reshape(a.shape)
        dst = out.reshape(src.shape)
        bounds = self.plan.node_bounds(n_groups)
        group_bytes = src[0, 0].nbytes
        _advise_huge_pages(buf, offset, n_layer, n_groups * group_bytes, bounds * group_bytes)
        workers = [
            threading.Thread(
                target=self._copy_slice,
                args=(record, src, dst, int(bounds[i]), int(bounds[i + 1])),
                name=f"numa-copy-node{record.node}",
            )
            for i, record in enumerate(self.log)
        ]
        self._failures.clear()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if self._failures:  # a slice not copied would be zeros in the weights: never return it
            raise self._failures[0]
        return out

    def _copy_slice(self, record: NodeCopy, src: np.ndarray, dst: np.ndarray, g0: int, g1: int) -> None:
        try:
            if not pin_current_thread(record.cpus, warn=False):
                record.pinned = False
            record.affinity_seen.append(frozenset(os.sched_getaffinity(0)))
            dst[:, g0:g1] = src[:, g0:g1]  # NumPy drops the GIL: the nodes copy side by side
            record.nbytes += dst[:, g0:g1].nbytes
        except BaseException as exc:  # re-raised by ``copy`` on the calling thread
            self._failures.append(exc)

    def warn_if_unpinned(self) -> None:
        """One warning naming the nodes whose copies could not be pinned (their pages went anywhere)."""
        missed = [r.node for r in self.log if not r.pinned]
        if missed:
            warnings.warn(
                f"NUMA: could not pin the copying thread of node(s) {missed} to their CPUs; "
                "those weights may sit on another node",
                RuntimeWarning,
                stacklevel=2,
            )


def _anonymous(nbytes: int) -> tuple[mmap.mmap, int]:
    """Private anonymous memory for ``nbytes`` (nothing resident until touched) and the offset in it where
    the data starts: on a 2 MiB boundary when the data spans a huge page (so frames are whole huge pages)."""
    pad = HUGE_PAGE if nbytes >= HUGE_PAGE else 0
    buf = mmap.mmap(-1, max(_PAGE, -(-nbytes // _PAGE) * _PAGE + pad), flags=mmap.MAP_PRIVATE)
    address = np.frombuffer(buf, dtype=np.uint8, count=1).ctypes.data
    return buf, (-address) % HUGE_PAGE if pad else 0


def _advise_huge_pages(
    buf: mmap.mmap, offset: int, n_layer: int, layer_bytes: int, node_edges: np.ndarray
) -> None:
    """``MADV_HUGEPAGE`` on the 2 MiB frames (from ``offset``, a 2 MiB boundary) inside one node's slice of
    one layer, ``MADV_NOHUGEPAGE`` on frames that straddle two nodes or layers (a huge page lands whole on
    the node that touches it first). Best effort: nothing where the OS lacks the advice."""
    huge, no_huge = getattr(mmap, "MADV_HUGEPAGE", None), getattr(mmap, "MADV_NOHUGEPAGE", None)
    n_frames = -(-n_layer * layer_bytes // HUGE_PAGE)
    if huge is None or no_huge is None or n_layer * layer_bytes < HUGE_PAGE:
        return
    first = np.arange(n_frames, dtype=np.int64) * HUGE_PAGE
    last = first + HUGE_PAGE - 1
    owner_first = np.searchsorted(node_edges, first % layer_bytes, side="right")
    owner_last = np.searchsorted(node_edges, last % layer_bytes, side="right")
    whole = (first // layer_bytes == last // layer_bytes) & (owner_first == owner_last)
    whole &= last < n_layer * layer_bytes
    start = 0
    for f in range(1, n_frames + 1):  # one madvise per run of frames with the same advice
        if f == n_frames or whole[f] != whole[start]:
            length = min(f * HUGE_PAGE, len(buf) - offset) - start * HUGE_PAGE
            try:
                buf.madvise(huge if whole[start] else no_huge, offset + start * HUGE_PAGE, length)
            except OSError:
                return
            start = f


# ---------------------------------------------------------------- Numba's threads on their nodes

_sched_setaffinity = types.ExternalFunction(
    "sched_setaffinity", types.int32(types.int32, types.uint64, types.intp)
)
_sched_getcpu = types.ExternalFunction("sched_getcpu", types.int32())


@njit(cache=True, parallel=True)
def _pin_team(masks, status, cpu_seen, thread_ids):
    """Item ``t`` of a prange of one item per thread pins the thread that runs it to ``masks[t]``."""
    for t in prange(masks.shape[0]):
        status[t] = _sched_setaffinity(0, masks.shape[1] * 8, masks[t].ctypes.data)
        cpu_seen[t] = _sched_getcpu()
        thread_ids[t] = numba.get_thread_id()


def cpu_masks(cpu_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """uint64[len(cpu_sets), 16]: each CPU set as a glibc ``cpu_set_t``."""
    masks = np.zeros((len(cpu_sets), _MASK_WORDS), dtype=np.uint64)
    for row, cpus in enumerate(cpu_sets):
        for cpu in cpus:
            if not 0 <= cpu < _MASK_WORDS * 64:
                raise ValueError(f"CPU {cpu} is outside a {_MASK_WORDS * 64}-CPU mask")
            masks[row, cpu // 64] |= np.uint64(1 << (cpu % 64))
    return masks


@dataclass(frozen=True)
class ThreadBinding:
    """Per Numba thread: the node it was pinned to, the CPU it ran on right after, Numba's thread id."""

    nodes: tuple[int, ...]
    cpus: tuple[int, ...]
    thread_ids: tuple[int, ...]


def bind_threads(plan: NumaPlan) -> ThreadBinding:
    """Pin the calling thread's Numba team (its current thread count) so that thread ``t`` runs on the CPUs
    of the node holding the rows it reads (``NumaPlan.thread_nodes``).

    Affinity belongs to OS threads and each Python thread that starts parallel work has its own team, so
    this must run on the thread that runs the forward pass, after its thread count is set. Team thread 0 is
    the calling thread itself. ``OSError`` if the OS refuses a mask.
    """
    n = numba.get_num_threads()
    nodes = plan.thread_nodes(n)
    masks = cpu_masks([plan.node_cpus[i] for i in nodes])
    status = np.zeros(n, dtype=np.int32)
    cpu_seen = np.zeros(n, dtype=np.int32)
    ids = np.zeros(n, dtype=np.int64)
    _pin_team(masks, status, cpu_seen, ids)
    if (status != 0).any():
        bad = [plan.nodes[nodes[t]] for t in np.flatnonzero(status)]
        raise OSError(f"sched_setaffinity refused the CPUs of node(s) {sorted(set(bad))}")
    return ThreadBinding(tuple(plan.nodes[i] for i in nodes), tuple(cpu_seen.tolist()), tuple(ids.tolist()))


# ---------------------------------------------------------------- where pages are (for checks)

_MOVE_PAGES = {"x86_64": 279, "aarch64": 239}.get(platform.machine())


def page_nodes(view: np.ndarray) -> np.ndarray | None:
    """int32 per page under ``view``: the node holding it, or a negative errno (-2: not yet touched);
    None where the ``move_pages`` query is unavailable (other architectures, seccomp)."""
    if _MOVE_PAGES is None or view.nbytes == 0:
        return None
    start = view.ctypes.data // _PAGE * _PAGE
    addrs = np.arange(start, view.ctypes.data + view.nbytes, _PAGE, dtype=np.uint64)
    status = np.zeros(addrs.size, dtype=np.int32)
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(
        ctypes.c_long(_MOVE_PAGES),
        ctypes.c_int(0),
        ctypes.c_ulong(addrs.size),
        ctypes.c_void_p(addrs.ctypes.data),
        None,
        ctypes.c_void_p(status.ctypes.data),
        ctypes.c_int(0),
    )
    return None if rc != 0 else status


def local_fraction(array: np.ndarray, n_groups: int, plan: NumaPlan) -> float | None:
    """The share of the pages under each node's row groups (every layer) that sit on that node; None where
    pages cannot be queried. The check for a real multi-node machine: 1.0 after ``NodeLocalCopier``."""
    layers = np.ascontiguousarray(array).reshape(array.shape[0], n_groups, -1)
    bounds = plan.node_bounds(n_groups)
    local = total = 0
    for i, node in enumerate(plan.nodes):
        for layer in layers:
            nodes = page_nodes(layer[bounds[i] : bounds[i + 1]])
            if nodes is None:
                if bounds[i + 1] > bounds[i]:
                    return None
                continue
            local += int((nodes == node).sum())
            total += nodes.size
    return local / total if total else None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ternary.engine.numa MODEL [THREADS]``: the plan on this machine, and for each linear the
    share of its pages on the node whose threads read them (after loading with the split) and where the
    bound Numba threads ran."""
    import sys

    from ternary.engine.load import load_stacked_linears
    from ternary.formats.model_file import LINEAR_NAMES, open_model

    args = list(sys.argv[1:] if argv is None else argv)
    if args[1:]:
        numba.set_num_threads(int(args[1]))
    plan = resolve_plan("distribute")
    print(f"nodes {sorted(current_topology().nodes)}, {numba.get_num_threads()} threads, plan {plan}")
    if plan is None or not args:
        return
    with open_model(args[0]) as mf:
        stacked = load_stacked_linears(mf, numa=plan)
        for name in LINEAR_NAMES:
            s = stacked[name]
            n_groups = s.group_uniform.shape[1]
            print(f"{name}: packed {local_fraction(s.packed, n_groups, plan)} local")
    print(bind_threads(plan))


if __name__ == "__main__":
    main()
