"""Topology from sysfs fixture trees of 1-, 2- and 4-node machines; threads, pinning, threading layer."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from ternary.engine import topology
from ternary.engine.topology import Core, parse_cpulist, read_topology

FIXTURES = Path(__file__).parent / "fixtures"


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("5") == [5]
    assert parse_cpulist("\n") == []
    with pytest.raises(ValueError, match="bad CPU list entry 'x'"):
        parse_cpulist("0-3,x")
    with pytest.raises(ValueError, match="bad CPU range '5-2'"):
        parse_cpulist("5-2")


def test_one_node_with_smt_siblings():
    topo = read_topology(FIXTURES / "sysfs_1node")
    assert topo.n_nodes == 1 and topo.n_cores == 4
    assert [c.cpus for c in topo.cores] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert topo.logical_cpus == tuple(range(8))
    assert topo.one_cpu_per_core() == [0, 1, 2, 3]  # never two siblings of one core
    assert topo.one_cpu_per_core(2) == [0, 1]


def test_two_nodes_two_packages_with_repeated_core_ids():
    topo = read_topology(FIXTURES / "sysfs_2node")
    assert topo.n_nodes == 2 and topo.n_cores == 8
    assert topo.node_cpus(0) == (0, 1, 2, 3, 8, 9, 10, 11)
    assert topo.node_cpus(1) == (4, 5, 6, 7, 12, 13, 14, 15)
    assert topo.nodes[1][0] == Core(node=1, package=1, core_id=0, cpus=(4, 12))
    assert topo.one_cpu_per_core() == [0, 1, 2, 3, 4, 5, 6, 7]  # node 0 filled first


def test_four_nodes_with_an_offline_cpu():
    topo = read_topology(FIXTURES / "sysfs_4node")
    assert topo.n_nodes == 4 and topo.n_cores == 7  # CPU 7 is offline
    assert {n: len(cores) for n, cores in topo.nodes.items()} == {0: 2, 1: 2, 2: 2, 3: 1}
    assert topo.node_cpus(3) == (6,)
    assert all(len(c.cpus) == 1 for c in topo.cores)


def test_restricting_to_an_affinity_mask():
    topo = read_topology(FIXTURES / "sysfs_2node").restricted_to({4, 12, 5, 0})
    assert [c.cpus for c in topo.cores] == [(0,), (4, 12), (5,)]
    assert topo.n_nodes == 2


def test_sysfs_without_node_directory_is_one_node(tmp_path):
    cpu = tmp_path / "sys/devices/system/cpu"
    for i in range(3):
        (cpu / f"cpu{i}").mkdir(parents=True)  # no online file, no topology files
    topo = read_topology(tmp_path)
    assert topo.n_nodes == 1 and topo.n_cores == 3
    assert topo.logical_cpus == (0, 1, 2)


def test_missing_sysfs_falls_back_to_psutil(tmp_path):
    topo = read_topology(tmp_path)
    assert topo.n_cores >= 1
    assert len(topo.logical_cpus) == (os.cpu_count() or 1)


def test_this_machine():
    topo = topology.current_topology()
    assert set(topo.logical_cpus) <= set(os.sched_getaffinity(0))
    assert 1 <= topology.default_threads() <= (os.cpu_count() or 1)


def test_pinning_where_allowed_and_a_warning_where_not():
    allowed = os.sched_getaffinity(0)
    assert topology.pin_current_thread(allowed)  # a no-op pin is always permitted
    assert os.sched_getaffinity(0) == allowed
    with pytest.warns(RuntimeWarning, match="cannot pin to CPUs"):
        assert not topology.pin_current_thread([100_000])
    assert os.sched_getaffinity(0) == allowed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a caller that reports failures itself gets no warning
        assert not topology.pin_current_thread([100_000], warn=False)
    assert os.sched_getaffinity(0) == allowed


def test_omp_binding_env():
    assert topology.omp_binding_env([0, 2, 4]) == {"OMP_PLACES": "{0},{2},{4}", "OMP_PROC_BIND": "close"}


PROBE = """
from ternary.engine import topology
chosen = topology.configure_threading()
import numba, numpy as np
@numba.njit(parallel=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.size):
        s += a[i]
    return s
assert total(np.ones(1000)) == 1000.0
print(chosen, numba.threading_layer())
"""


def test_configured_threading_layer_is_the_one_that_runs():
    """In a fresh interpreter (the layer is fixed at the first parallel region): omp where it exists."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    chosen, running = result.stdout.split()
    assert chosen == running
    if topology._layer_available("omp"):
        assert running == "omp"
