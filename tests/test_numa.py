"""NUMA placement: splits from the 1-, 2- and 4-node sysfs fixtures, node-local copies made by pinned workers
(a fake 2-node machine over this machine's CPUs), huge-page advice per frame, the loader's hook (copies for
several nodes, the memory-mapped cache untouched for one), bit-identical logits, Numba threads bound."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from conftest import ORACLE, read_ids
from hypothesis import given
from hypothesis import strategies as st
from ternary.engine import load, numa
from ternary.engine.model import load_transformer
from ternary.engine.topology import Core, Topology, read_topology
from ternary.formats.model_file import LINEAR_NAMES, open_model

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = ORACLE / "tiny-tq2_0-blockscales-f16.gguf"  # every block its own scale: group_scales are read
CPUS = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs this process may run on")


def fake_two_nodes() -> Topology:
    """Two one-core nodes over real CPUs, node 0 on the highest CPU (so a pin is never a no-op by luck)."""
    return Topology((Core(0, 0, 0, (CPUS[-1],)), Core(1, 1, 0, (CPUS[0],))))


def covered(bounds: np.ndarray, n: int) -> bool:
    """Every item of range(n) in exactly one of the ranges, in order."""
    ranges = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    return bool(np.array_equal(np.concatenate(ranges), np.arange(n)))


# ---------------------------------------------------------------- plans and splits


@given(st.integers(0, 5000), st.lists(st.integers(0, 9), min_size=1, max_size=8).filter(any))
def test_proportional_bounds_cover_every_item_once_within_one_of_the_share(n, weights):
    b = numa.proportional_bounds(n, weights)
    assert covered(b, n)
    exact = n * np.array(weights) / sum(weights)
    assert np.all(np.abs(np.diff(b) - exact) < 1)


def test_proportional_bounds_reject_bad_weights():
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        numa.proportional_bounds(10, [0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        numa.proportional_bounds(10, [3, -1])


@pytest.mark.parametrize(
    "fixture, n_threads, threads, cpus_of_node_1",
    [
        ("sysfs_2node", 8, (4, 4), (4, 5, 6, 7, 12, 13, 14, 15)),
        ("sysfs_2node", 3, (2, 1), (4, 5, 6, 7, 12, 13, 14, 15)),
        ("sysfs_4node", 7, (2, 2, 2, 1), (2, 3)),
        ("sysfs_4node", 4, (1, 1, 1, 1), (2, 3)),
    ],
)
def test_plans_from_fixtures_deal_threads_by_cores(fixture, n_threads, threads, cpus_of_node_1):
    plan = numa.plan_numa(read_topology(FIXTURES / fixture), n_threads)
    assert plan.threads == threads and plan.n_threads == n_threads
    assert plan.node_cpus[1] == cpus_of_node_1


@pytest.mark.parametrize("fixture", ["sysfs_2node", "sysfs_4node"])
@pytest.mark.parametrize("n_threads", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("n_groups", [1, 7, 64, 640, 1728])
def test_node_and_thread_splits_cover_every_group_once_in_proportion(fixture, n_threads, n_groups):
    plan = numa.plan_numa(read_topology(FIXTURES / fixture), n_threads)
    node = plan.node_bounds(n_groups)
    assert covered(node, n_groups)
    share = n_groups * np.array(plan.threads) / plan.n_threads
    assert np.all(np.abs(np.diff(node) - share) < 1)
    thread = plan.thread_bounds(n_groups)
    assert covered(thread, n_groups) and len(thread) == plan.n_threads + 1
    # node-major threads: each thread's groups lie inside its own node's range
    owner = plan.thread_nodes(plan.n_threads)
    assert owner == [i for i, n in enumerate(plan.threads) for _ in range(n)]
    for t, i in enumerate(owner):
        assert node[i] <= thread[t] <= thread[t + 1] <= node[i + 1]


def test_fewer_threads_than_the_plan_read_the_node_at_the_middle_of_their_share():
    plan = numa.plan_numa(read_topology(FIXTURES / "sysfs_2node"), 3)  # 2 + 1: node 0 holds 2/3
    assert plan.thread_nodes(1) == [0]  # one thread reads everything
    assert plan.thread_nodes(2) == [0, 1]
    assert plan.thread_nodes(4) == [0, 0, 0, 1]


def test_one_node_or_one_thread_has_no_plan():
    assert numa.plan_numa(read_topology(FIXTURES / "sysfs_1node"), 4) is None
    assert numa.plan_numa(read_topology(FIXTURES / "sysfs_2node"), 1) is None
    assert numa.plan_numa(read_topology(FIXTURES / "sysfs_2node").restricted_to({0, 1, 8}), 3) is None


def test_numa_setting(monkeypatch):
    monkeypatch.delenv(numa.ENV, raising=False)
    assert numa.numa_mode(None) == "distribute"
    assert numa.numa_mode(False) == numa.numa_mode("off") == numa.numa_mode(" OFF ") == "off"
    assert numa.numa_mode(True) == numa.numa_mode("numactl") == "distribute"
    monkeypatch.setenv(numa.ENV, "off")
    assert numa.numa_mode(None) == "off" and numa.resolve_plan(None, 8) is None
    assert numa.numa_mode("distribute") == "distribute"  # an explicit setting beats the environment
    with pytest.raises(ValueError, match="'isolate' is not supported: run under `numactl"):
        numa.numa_mode("isolate")
    with pytest.raises(ValueError, match="unknown numa mode 'spread'"):
        numa.numa_mode("spread")


# ---------------------------------------------------------------- node-local copies


def planar_like(n_layer: int, n_groups: int, n_blocks: int, rng: np.random.Generator) -> list:
    """Arrays shaped as a stacked linear's (packed, group_scales, row_scales, group_uniform)."""
    return [
        rng.integers(0, 256, (n_layer, n_groups * n_blocks * 256), dtype=np.uint8),
        rng.standard_normal((n_layer, n_groups, n_blocks, 4), dtype=np.float32),
        rng.standard_normal((n_layer, 4 * n_groups), dtype=np.float32),
        rng.integers(0, 2, (n_layer, n_groups), dtype=np.uint8),
    ]


@two_cpus
def test_each_node_copy_is_made_by_a_worker_pinned_to_that_node():
    plan = numa.plan_numa(fake_two_nodes(), 2)
    copier = numa.NodeLocalCopier(plan)
    sources = planar_like(3, 9, 2, np.random.default_rng(1))
    copies = [copier.copy(a, 9) for a in sources]
    for a, c in zip(sources, copies, strict=True):
        assert c.dtype == a.dtype and c.shape == a.shape and np.array_equal(c, a)
        assert c.flags.c_contiguous and c.flags.writeable and not np.shares_memory(a, c)
    for record, cpus in zip(copier.log, [(CPUS[-1],), (CPUS[0],)], strict=True):
        assert record.pinned and record.cpus == cpus
        assert record.affinity_seen == [frozenset(cpus)] * len(sources)
    bounds = plan.node_bounds(9)
    assert [r.nbytes for r in copier.log] == [
        sum(a.nbytes * int(bounds[i + 1] - bounds[i]) // 9 for a in sources) for i in range(2)
    ]
    nodes = numa.page_nodes(copies[0])
    if nodes is not None:  # every page was touched (first touch happened in the copy), on this one node
        assert np.all(nodes == 0)


@two_cpus
@pytest.mark.skipif(read_topology().n_nodes != 1, reason="counts pages of a one-node machine")
def test_local_fraction_counts_pages_on_the_node_that_reads_them():
    """On one real node, a fake 2-node split has node 0's half of the pages local and node 1's not."""
    plan = numa.plan_numa(fake_two_nodes(), 2)
    page = os.sysconf("SC_PAGE_SIZE")
    copy = numa.NodeLocalCopier(plan).copy(np.ones((3, 2 * 8 * page), dtype=np.uint8), 2)  # whole pages
    if numa.page_nodes(copy) is None:
        pytest.skip("move_pages is not available here")
    assert numa.local_fraction(copy, 2, plan) == 0.5
    lopsided = numa.NumaPlan(plan.nodes, plan.node_cpus, (3, 1))  # node 0 holds 3 of 4 groups
    copy = numa.NodeLocalCopier(lopsided).copy(np.ones((2, 4 * page), dtype=np.uint8), 4)
    assert numa.local_fraction(copy, 4, lopsided) == 0.75


def test_copies_for_a_four_node_fixture_are_exact_and_unpinned_nodes_are_reported():
    plan = numa.plan_numa(read_topology(FIXTURES / "sysfs_4node"), 7)  # CPUs this machine may not have
    copier = numa.NodeLocalCopier(plan)
    sources = planar_like(2, 13, 1, np.random.default_rng(2))
    for a in sources:
        assert np.array_equal(copier.copy(a, 13), a)
    assert sum(r.nbytes for r in copier.log) == sum(a.nbytes for a in sources)
    missing = [r.node for r in copier.log if not set(r.cpus) <= set(CPUS)]
    assert [r.node for r in copier.log if not r.pinned] == missing
    if missing:
        with pytest.warns(
            RuntimeWarning, match=re.escape(f"could not pin the copying thread of node(s) {missing}")
        ):
            copier.warn_if_unpinned()


def test_bad_group_count_is_named():
    copier = numa.NodeLocalCopier(numa.plan_numa(read_topology(FIXTURES / "sysfs_2node"), 2))
    with pytest.raises(ValueError, match=r"cannot cut an array of shape \(2, 10\) into 3 row groups"):
        copier.copy(np.zeros((2, 10), dtype=np.uint8), 3)


def test_a_failed_slice_copy_is_raised_not_returned(monkeypatch):
    copier = numa.NodeLocalCopier(numa.plan_numa(read_topology(FIXTURES / "sysfs_2node"), 2))

    def refuse(cpus, warn=True):
        if 4 in cpus:
            raise MemoryError("node 1 is full")
        return True

    monkeypatch.setattr(numa, "pin_current_thread", refuse)
    with pytest.raises(MemoryError, match="node 1 is full"):
        copier.copy(np.ones((2, 8), dtype=np.uint8), 2)


def vm_flags(array: np.ndarray) -> list[tuple[int, int, set[str]]]:
    """(start, end, VmFlags) of the mappings under ``array``, offsets relative to its first byte."""
    lo, hi = array.ctypes.data, array.ctypes.data + array.nbytes
    found, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = (start - lo, end - lo) if start < hi and end > lo else None
            elif current is not None and fields and fields[0] == "VmFlags:":
                found.append((*current, set(fields[1:])))
    return found


@two_cpus
def test_huge_pages_only_on_frames_inside_one_nodes_slice():
    """2 layers × 6 MiB, split 3 + 3 MiB: frames [0,2) [4,6) [6,8) [10,12) MiB are one node's, the others
    straddle two nodes."""
    copier = numa.NodeLocalCopier(numa.plan_numa(fake_two_nodes(), 2))
    a = np.arange(2 * (6 << 20), dtype=np.uint32).astype(np.uint8).reshape(2, 6 << 20)
    c = copier.copy(a, 6)
    assert np.array_equal(c, a) and c.ctypes.data % numa.HUGE_PAGE == 0
    mib = 1 << 20
    advice = {}
    for start, end, flags in vm_flags(c):
        for frame in range(max(start, 0) // (2 * mib), min(end, c.nbytes) // (2 * mib)):
            advice[frame] = "hg" if "hg" in flags else "nh" if "nh" in flags else None
    assert advice == {0: "hg", 1: "nh", 2: "hg", 3: "hg", 4: "nh", 5: "hg"}


# ---------------------------------------------------------------- the loader's hook


def mapped_file(array: np.ndarray) -> str:
    """The path of the mapping holding ``array``'s first byte ('' for anonymous memory)."""
    address = array.ctypes.data
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    raise AssertionError("address not mapped")


@pytest.fixture
def fake_machine(monkeypatch):
    """``numa.current_topology`` answering with a given topology; TERNARY_NUMA unset."""
    monkeypatch.delenv(numa.ENV, raising=False)

    def use(topology: Topology) -> None:
        monkeypatch.setattr(numa, "current_topology", lambda: topology)

    return use


@two_cpus
def test_loader_places_read_arrays_and_leaves_cold_ones_in_the_cache(tmp_path, fake_machine):
    fake_machine(fake_two_nodes())
    with open_model(ORACLE / "tiny-tq2_0-f16.gguf") as mf:  # one scale per tensor: group scales cold
        reference = load.load_stacked_linears(mf, False, numa=False)
        load.load_stacked_linears(mf, tmp_path, numa=False)  # writes the cache
        plan = numa.resolve_plan(None, n_threads=2)  # not the calling thread's count: tests may set 1
        placed = load.load_stacked_linears(mf, tmp_path, numa=plan)
    for name in LINEAR_NAMES:
        for field in load.PLANAR_FIELDS:
            a, b = getattr(reference[name], field), getattr(placed[name], field)
            assert np.array_equal(a, b) and b.flags.writeable
            where = mapped_file(b)
            assert where.endswith(".tnrp") if field == "group_scales" else where == ""


def test_one_node_keeps_the_memory_mapped_cache(tmp_path, fake_machine):
    fake_machine(read_topology(FIXTURES / "sysfs_1node"))
    with open_model(MODEL) as mf:
        load.load_stacked_linears(mf, tmp_path)
        stacked = load.load_stacked_linears(mf, tmp_path, numa=True)
    assert all(mapped_file(s.packed).endswith(".tnrp") for s in stacked.values())


@two_cpus
def test_logits_are_bit_identical_with_and_without_the_split(tmp_path, fake_machine, monkeypatch):
    tokens = read_ids(ORACLE / "tiny-tq2_0-blockscales-f16.prompt_tokens.txt")
    fake_machine(fake_two_nodes())
    previous = numba.get_num_threads()
    numba.set_num_threads(2)  # the plan deals the calling thread's count: one per fake node
    try:
        logits = {}
        for setting in ("off", "distribute"):
            monkeypatch.setenv(numa.ENV, setting)
            with open_model(MODEL) as mf:
                model = load_transformer(mf, repack_cache=tmp_path)
            where = {mapped_file(s.packed) for s in model.stacked.values()}
            assert where == ({""} if setting == "distribute" else {str(next(tmp_path.glob("*.tnrp")))})
            n = len(tokens)
            logits[setting] = model.forward(np.array(tokens), np.arange(n), np.zeros(n, dtype=np.int32))
    finally:
        numba.set_num_threads(previous)
    assert np.array_equal(logits["off"], logits["distribute"])


# ---------------------------------------------------------------- Numba's threads on their nodes

BIND = """
import numba, numpy as np
from numba import njit, prange, types
from ternary.engine import numa
from ternary.engine.topology import Core, Topology
import os
lo, hi = {lo}, {hi}
plan = numa.plan_numa(Topology((Core(0, 0, 0, (hi,)), Core(1, 1, 0, (lo,)))), 2)
numba.set_num_threads(2)
getcpu = types.ExternalFunction("sched_getcpu", types.int32())

@njit(parallel=True)
def where(cpu, tid):
    for t in prange(cpu.size):
        cpu[t] = getcpu()
        tid[t] = numba.get_thread_id()

b = numa.bind_threads(plan)
print("bound", b.nodes, b.cpus, b.thread_ids, sorted(os.sched_getaffinity(0)))
cpu, tid = np.zeros(2, np.int32), np.zeros(2, np.int64)
for _ in range(20):
    where(cpu, tid)
    print("ran", tuple(cpu.tolist()), tuple(tid.tolist()))
"""


@two_cpus
def test_numba_thread_t_is_bound_to_its_node_and_runs_item_t():
    """In a fresh interpreter (pinning the test process's threads would outlive the test)."""
    lo, hi = CPUS[0], CPUS[-1]
    script = BIND.format(lo=lo, hi=hi)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == f"bound (0, 1) ({hi}, {lo}) (0, 1) [{hi}]"  # team thread 0 is the caller
    assert set(lines[1:]) == {f"ran ({hi}, {lo}) (0, 1)"}  # a prange of 2 items: item t on thread t


ENGINE = """
import os, numpy as np
from ternary.engine import numa
from ternary.engine.engine import Engine
from ternary.engine.topology import Core, Topology
lo, hi = {lo}, {hi}
numa.current_topology = lambda: Topology((Core(0, 0, 0, (hi,)), Core(1, 1, 0, (lo,))))
ids = [1, 5, 9, 3, 7, 2]
out = {{}}
for setting in ("off", "distribute"):
    e = Engine({model!r}, threads=2, n_ctx=32, numa=setting, repack_cache=False)
    out[setting] = e.logits(ids)
    print(setting, e.numa_plan is not None, sorted(os.sched_getaffinity(0)))
print("equal", bool(np.array_equal(out["off"], out["distribute"])))
"""


@two_cpus
def test_engine_places_weights_pins_its_team_and_keeps_the_logits():
    """Engine(numa=...) end to end on a fake 2-node machine, in a fresh interpreter (pins outlive a test)."""
    lo, hi = CPUS[0], CPUS[-1]
    script = ENGINE.format(lo=lo, hi=hi, model=str(MODEL))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"off False {CPUS}", f"distribute True [{hi}]", "equal True"]
