"""Benchmark session plumbing: a log the kernel benchmarks fill, printed as one table at the end."""

from __future__ import annotations

import pytest

_LOG = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def kernel_log(request) -> dict:
    """``{"results": [Result, ...], "bandwidth": {threads: GB/s}}`` shared by the benchmarks of one run."""
    return request.config.stash.setdefault(_LOG, {"results": [], "bandwidth": {}})


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    log = config.stash.get(_LOG, None)
    if log and log["results"]:
        from ternary.bench.bench_kernels import print_table

        print_table(log["results"], log["bandwidth"], terminalreporter.write_line)
