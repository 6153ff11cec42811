"""Where the threads run: NUMA nodes → physical cores → logical CPUs, thread counts, pinning, threading layer.

Decode is memory-bound, so one thread per physical core (never two SMT siblings) and threads kept on the node
that holds their weights matter more than the thread count. The topology comes from Linux sysfs
(``/sys/devices/system/node/node*/cpulist``, ``/sys/devices/system/cpu/cpu*/topology/``), with psutil as the
fallback where sysfs is missing; ``read_topology(root)`` takes another root so tests can use fixture trees.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numba
import psutil

_CPU_DIR = re.compile(r"cpu(\d+)$")
_NODE_DIR = re.compile(r"node(\d+)$")


@dataclass(frozen=True)
class Core:
    """One physical core: its NUMA node, package (socket), core id within the package, logical CPUs."""

    node: int
    package: int
    core_id: int
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    """The machine's physical cores, ordered by node, package and core id."""

    cores: tuple[Core, ...]

    @property
    def nodes(self) -> dict[int, tuple[Core, ...]]:
        out: dict[int, list[Core]] = {}
        for core in self.cores:
            out.setdefault(core.node, []).append(core)
        return {node: tuple(cores) for node, cores in sorted(out.items())}

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_cores(self) -> int:
        return len(self.cores)

    @property
    def logical_cpus(self) -> tuple[int, ...]:
        return tuple(sorted(cpu for core in self.cores for cpu in core.cpus))

    def node_cpus(self, node: int) -> tuple[int, ...]:
        return tuple(sorted(cpu for core in self.cores if core.node == node for cpu in core.cpus))

    def restricted_to(self, cpus: Iterable[int]) -> Topology:
        """Only the CPUs in ``cpus`` (e.g. this process's affinity mask); cores left empty are dropped."""
        allowed = set(cpus)
        kept = []
        for core in self.cores:
            mine = tuple(c for c in core.cpus if c in allowed)
            if mine:
                kept.append(Core(core.node, core.package, core.core_id, mine))
        return Topology(tuple(kept))

    def one_cpu_per_core(self, n: int | None = None) -> list[int]:
        """Up to ``n`` logical CPUs, one per physical core, filling node 0 first (then node 1, …)."""
        cpus = [core.cpus[0] for core in self.cores]
        return cpus if n is None else cpus[:n]


def parse_cpulist(text: str) -> list[int]:
    """A kernel CPU list such as ``"0-3,8,10-11"`` as sorted CPU numbers (empty text → [])."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"bad CPU list entry {part!r} in {text.strip()!r}")
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if hi < lo:
            raise ValueError(f"bad CPU range {part!r} in {text.strip()!r}")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return default


def read_topology(root: str | os.PathLike = "/") -> Topology:
    """The topology described by sysfs under ``root`` (psutil's counts when sysfs has no CPU tree)."""
    system = Path(root) / "sys" / "devices" / "system"
    cpu_dir = system / "cpu"
    online_file = cpu_dir / "online"
    if online_file.is_file():
        online = parse_cpulist(online_file.read_text())
    elif cpu_dir.is_dir():
        online = sorted(int(m.group(1)) for p in cpu_dir.iterdir() if (m := _CPU_DIR.match(p.name)))
    else:
        return _psutil_topology()
    node_of: dict[int, int] = {}
    node_dir = system / "node"
    if node_dir.is_dir():
        for p in node_dir.iterdir():
            m = _NODE_DIR.match(p.name)
            if m and (p / "cpulist").is_file():
                for cpu in parse_cpulist((p / "cpulist").read_text()):
                    node_of[cpu] = int(m.group(1))
    by_core: dict[tuple[int, int, int], list[int]] = {}
    for cpu in online:
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        package = _read_int(topo / "physical_package_id", 0)
        core_id = _read_int(topo / "core_id", -1 - cpu)  # unknown: a core of its own
        by_core.setdefault((node_of.get(cpu, 0), package, core_id), []).append(cpu)
    cores = (
        Core(node, package, core_id, tuple(sorted(cpus)))
        for (node, package, core_id), cpus in by_core.items()
    )
    return Topology(tuple(sorted(cores, key=lambda c: (c.node, c.package, c.cpus[0]))))


def _psutil_topology() -> Topology:
    """No sysfs: one node, logical CPUs dealt round-robin onto psutil's count of physical cores."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    groups: list[list[int]] = [[] for _ in range(physical)]
    for cpu in range(logical):
        groups[cpu % physical].append(cpu)
    return Topology(tuple(Core(0, 0, i, tuple(g)) for i, g in enumerate(groups) if g))


def current_topology() -> Topology:
    """This machine's topology, limited to the CPUs this process may run on."""
    topo = read_topology()
    try:
        return topo.restricted_to(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return topo


def default_threads() -> int:
    """Physical cores this process may use (llama.cpp users expect physical cores, not SMT threads)."""
    return max(1, current_topology().n_cores)


def pin_current_thread(cpus: Iterable[int], warn: bool = True) -> bool:
    """Restrict the calling thread (and threads it starts later) to ``cpus``; False, with a warning unless
    ``warn`` is false (a caller that reports failures itself), where the OS refuses or cannot (containers,
    non-Linux)."""
    cpus = set(cpus)
    try:
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError, ValueError) as exc:
        if warn:
            warnings.warn(f"cannot pin to CPUs {sorted(cpus)}: {exc}", RuntimeWarning, stacklevel=2)
        return False
    return True


def omp_binding_env(cpus: Iterable[int]) -> dict[str, str]:
    """Environment that binds OpenMP thread i to ``cpus[i]``; takes effect only if set before the OpenMP
    runtime starts (before the first parallel region), e.g. in a launcher."""
    places = ",".join(f"{{{cpu}}}" for cpu in cpus)
    return {"OMP_PLACES": places, "OMP_PROC_BIND": "close"}


def _layer_available(layer: str) -> bool:
    module = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}.get(layer)
    if module is None:
        return False
    try:
        __import__(f"numba.np.ufunc.{module}")
    except ImportError:
        return False
    return True


def configure_threading(preferred: str = "omp") -> str:
    """Choose Numba's threading layer before the first parallel region and return the one in use.

    ``omp`` launches a parallel region in ~1 µs; ``workqueue`` takes 50–80 µs, too slow for per-token work.
    A layer already running, or one the user chose with ``NUMBA_THREADING_LAYER``, is left alone.
    """
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        pass
    if numba.config.THREADING_LAYER != "default":
        return numba.config.THREADING_LAYER
    for layer in (preferred, "omp", "tbb", "workqueue"):
        if _layer_available(layer):
            if layer != preferred:
                warnings.warn(
                    f"Numba threading layer {preferred!r} is not available; using {layer!r} "
                    "(slower parallel-region launches)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            numba.config.THREADING_LAYER = layer
            return layer
    return numba.config.THREADING_LAYER
