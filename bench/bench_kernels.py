"""Kernel benchmarks: planar ternary GEMV/GEMM per kernel path and thread count, against measured bandwidth.

Decode (GEMV) is memory-bound, so its figure of merit is GB/s of packed 2-bit weights as a share of the
streaming read bandwidth measured in the same run over the same buffers (weights rotate through copies larger
than the last-level cache, so they really come from DRAM; a plain vectorized sum over those very copies is the
reference, timed right before the GEMV, because bandwidth differs between memory regions on a VM: a 1 GiB
array streamed at ~25 GB/s where the rotating 4.4 MB copies streamed at ~39). Prefill (GEMM, 128 tokens) is
compute-bound: GOPS (2·N·K·T / s).

    python -m pytest bench/bench_kernels.py --benchmark-only          # pytest-benchmark tables (+ summary)
    python bench/bench_kernels.py [--threads 1,2] [--paths avx512vnni,generic] [--quick]
                                                                      # plain table, then one JSON line

Not collected by CI (``testpaths = tests``). Shapes: BitNet 2B4T's FFN, 2560×6912 (down: N=2560, K=6912) and
6912×2560 (gate/up). Modes: ``per_token`` (one activation scale per token: the integer-only loop) and ``q8k``
(llama.cpp's per-256 scales and float order: ``kernels_q8k``, the engine's default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numba
import numpy as np
from numba import njit, prange
from ternary.engine import cpu_features, simd
from ternary.engine.kernels_fast import activation_sums, planar_matmul_summed
from ternary.engine.kernels_q8k import lane_sums, q8k_matmul
from ternary.engine.planar import PlanarMatrix, aligned_empty

GEMV_SHAPES = ((2560, 6912), (6912, 2560))
GEMM_TOKENS = 128
MODES = ("per_token", "q8k")
STREAM_BYTES = 1 << 30
DRAM_ROTATION_BYTES = 256 << 20  # weight copies cycled through, well beyond any L3


# Not cached: this file runs both as a script and as pytest's ``bench.bench_kernels``, and a cache entry
# written under one module name fails to load under the other.
@njit(parallel=True)
def _stream_sum(words):
    total = np.uint64(0)
    for i in prange(words.size):
        total += words[i]
    return total


def stream_read_bandwidth(threads: int, repeats: int = 9) -> float:
    """Median GB/s of a parallel sum over a fresh 1 GiB array: read-only streaming from DRAM."""
    words = np.ones(STREAM_BYTES // 8, dtype=np.uint64)
    nbytes = words.nbytes
    with _threads(threads):
        _stream_sum(words)
        seconds = _median_seconds(lambda: _stream_sum(words), repeats)
    return nbytes / seconds / 1e9


def stream_over(buffers: list[np.ndarray], threads: int, repeats: int = 21) -> float:
    """Median GB/s of a plain sum over ``buffers`` in turn: the same pages a GEMV benchmark streams."""
    words = [b.view(np.uint64) for b in buffers]
    turn = [0]

    def one() -> None:
        _stream_sum(words[turn[0] % len(words)])
        turn[0] += 1

    with _threads(threads):
        one()
        seconds = _median_seconds(one, repeats)
    return buffers[0].nbytes / seconds / 1e9


@dataclass
class Result:
    kind: str  # "gemv" or "gemm"
    path: str
    n_out: int
    n_in: int
    tokens: int
    mode: str
    threads: int
    seconds: float
    weight_bytes: int
    stream_gbps: float | None = None  # streaming bandwidth over the same buffers, measured alongside (GEMV)

    @property
    def gbps(self) -> float:
        return self.weight_bytes / self.seconds / 1e9

    @property
    def pct_of_stream(self) -> float | None:
        return None if not self.stream_gbps else 100 * self.gbps / self.stream_gbps

    @property
    def gops(self) -> float:
        return 2 * self.n_out * self.n_in * self.tokens / self.seconds / 1e9


class KernelCase:
    """One matrix (plus copies for DRAM streaming) and its activations, ready to time."""

    def __init__(
        self, n_out: int, n_in: int, tokens: int, mode: str, path: str, copies_bytes: int = 0
    ) -> None:
        rng = np.random.default_rng(0)
        codes = rng.integers(-1, 2, size=(n_out, n_in)).astype(np.int8)
        scales = np.full((n_out, n_in // 256), 0.02, np.float32)
        self.matrix = PlanarMatrix.from_codes(codes, scales, 256, kernels=path)
        self.isa = simd.ISAS[path]
        n_copies = max(1, -(-copies_bytes // self.matrix.packed.nbytes))
        self.packs = [self.matrix.packed] + [_aligned_copy(self.matrix.packed) for _ in range(n_copies - 1)]
        self.xq = rng.integers(-127, 128, size=(tokens, n_in)).astype(np.int8)
        cols = 1 if mode == "per_token" else n_in // 256
        self.x_scale = rng.uniform(1e-3, 1e-2, size=(tokens, cols)).astype(np.float32)
        self.block_sums, self.token_sums = activation_sums(self.xq)
        self.lane_sums = np.empty((tokens, n_in // 256, 8), np.int32)
        lane_sums(self.xq, self.lane_sums)
        self.mode = mode
        self.out = np.empty((tokens, n_out), np.float32)
        self._next = 0

    def __call__(self) -> None:
        """The kernel the engine runs for the mode: the integer-only planar kernel (``per_token``), the
        llama.cpp-order lane kernel (``q8k``)."""
        packed = self.packs[self._next]
        self._next = (self._next + 1) % len(self.packs)
        m = self.matrix
        if self.mode == "q8k":
            q8k_matmul(
                self.isa, packed, m.group_scales, m.row_scales, m.group_uniform, m.n_out, self.xq,
                self.lane_sums, self.x_scale, self.out,
            )  # fmt: skip
            return
        planar_matmul_summed(
            self.isa, packed, m.group_scales, m.row_scales, m.group_uniform, m.n_out,
            self.xq, self.block_sums, self.token_sums, self.x_scale, self.out,
        )  # fmt: skip


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    b = aligned_empty(a.nbytes)
    b[:] = a
    return b


class _threads:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = numba.get_num_threads()
        numba.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        numba.set_num_threads(self.before)


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(kind: str, path: str, n_out: int, n_in: int, mode: str, threads: int, repeats: int) -> Result:
    """Median time of one GEMV (weights from DRAM) or one 128-token GEMM.

    A GEMV is timed in 3 rounds, each right after a streaming-bandwidth measurement over its weight copies, so
    that its share of the bandwidth compares numbers taken under the same conditions (the machine may be
    shared).
    """
    tokens = 1 if kind == "gemv" else GEMM_TOKENS
    case = KernelCase(n_out, n_in, tokens, mode, path, DRAM_ROTATION_BYTES if kind == "gemv" else 0)
    rounds = 3 if kind == "gemv" else 1
    times, streams = [], []
    with _threads(threads):
        case()  # compile / warm
        for _ in range(rounds):
            if kind == "gemv":
                streams.append(stream_over(case.packs, threads, repeats))
            times.append(_median_seconds(case, repeats))
    stream = statistics.median(streams) if streams else None
    return Result(
        kind,
        path,
        n_out,
        n_in,
        tokens,
        mode,
        threads,
        statistics.median(times),
        case.matrix.packed.nbytes,
        stream,
    )


def max_threads() -> int:
    return min(2, numba.config.NUMBA_NUM_THREADS)


# ---------------------------------------------------------------- pytest-benchmark suite
# (fixtures ``kernel_log`` and the summary table come from bench/conftest.py)

try:
    import pytest
except ImportError:  # plain script use without pytest installed
    pytest = None

if pytest is not None:
    _THREADS = sorted({1, max_threads()})

    def _record(benchmark, log, kind, path, shape, mode, threads, tokens, copies):
        case = KernelCase(*shape, tokens, mode, path, copies)
        # the bandwidth over the same buffers right before the kernel runs: like with like on a shared machine
        bw = stream_over(case.packs, threads)
        with _threads(threads):
            case()
            benchmark.pedantic(case, rounds=40 if kind == "gemv" else 8, iterations=1, warmup_rounds=2)
        seconds = benchmark.stats.stats.median
        weight_bytes = case.matrix.packed.nbytes
        stream = bw if kind == "gemv" else None
        res = Result(kind, path, *shape, tokens, mode, threads, seconds, weight_bytes, stream)
        benchmark.extra_info.update({"GB/s": round(res.gbps, 2), "GOPS": round(res.gops, 1)})
        if kind == "gemv":
            benchmark.extra_info["stream_GB/s"] = round(bw, 2)
            benchmark.extra_info["pct_of_stream"] = round(res.pct_of_stream, 1)
        log["results"].append(res)

    @pytest.mark.parametrize("threads", _THREADS)
    def test_stream_read_bandwidth(benchmark, kernel_log, threads):
        words = np.ones(STREAM_BYTES // 8, dtype=np.uint64)
        with _threads(threads):
            _stream_sum(words)
            benchmark.pedantic(_stream_sum, args=(words,), rounds=5, iterations=1)
        kernel_log["bandwidth"][threads] = STREAM_BYTES / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GB/s"] = round(kernel_log["bandwidth"][threads], 2)

    @pytest.mark.parametrize("threads", _THREADS)
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
    @pytest.mark.parametrize("path", cpu_features.supported_paths())
    def test_gemv_from_dram(benchmark, kernel_log, path, shape, mode, threads):
        _record(benchmark, kernel_log, "gemv", path, shape, mode, threads, 1, DRAM_ROTATION_BYTES)

    @pytest.mark.parametrize("threads", _THREADS)
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("path", cpu_features.supported_paths())
    def test_gemm_128_tokens(benchmark, kernel_log, path, mode, threads):
        _record(benchmark, kernel_log, "gemm", path, GEMV_SHAPES[0], mode, threads, GEMM_TOKENS, 0)


def print_table(results: list[Result], bandwidth: dict[int, float], write: Callable[[str], None]) -> None:
    """GB/s, % of the stream bandwidth (GEMV) and GOPS, one line per result."""
    if not results:
        return
    write("")
    if bandwidth:
        lines = ", ".join(f"{t} thread(s) {bw:.1f} GB/s" for t, bw in sorted(bandwidth.items()))
        write(f"stream read bandwidth, 1 GiB array: {lines} (the %bw column uses the GEMV's own buffers)")
    columns = ("kind", 5), ("path", 11), ("shape", 10), ("mode", 9), ("thr", 3), ("median", 10), ("GB/s", 7)
    write(" ".join(name.ljust(width) for name, width in columns) + " stream   %bw    GOPS")
    for r in results:
        stream = f"{r.stream_gbps:6.1f}" if r.stream_gbps else "     -"
        pct = f"{r.pct_of_stream:5.0f}" if r.pct_of_stream else "    -"
        write(
            f"{r.kind:5} {r.path:11} {f'{r.n_out}x{r.n_in}':10} {r.mode:9} {r.threads:3d} "
            f"{r.seconds * 1e6:8.0f}us {r.gbps:7.1f} {stream} {pct} {r.gops:7.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="comma list, default 1 and all (≤2)")
    parser.add_argument("--paths", default=None, help="comma list of kernel paths, default all supported")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, max_threads()})
    paths = args.paths.split(",") if args.paths else list(cpu_features.supported_paths())
    for p in paths:
        cpu_features.select_path(p)  # clear error for an unsupported path
    repeats_gemv, repeats_gemm = (11, 3) if args.quick else (31, 9)
    bandwidth = {t: stream_read_bandwidth(t) for t in threads}
    results = []
    for path in paths:
        for t in threads:
            for mode in MODES:
                for shape in GEMV_SHAPES:
                    results.append(measure("gemv", path, *shape, mode, t, repeats_gemv))
                results.append(measure("gemm", path, *GEMV_SHAPES[0], mode, t, repeats_gemm))
    print_table(results, bandwidth, print)
    summary = {
        "stream_gbps": {str(t): round(bw, 2) for t, bw in bandwidth.items()},
        "results": [
            dict(asdict(r), gbps=round(r.gbps, 2), gops=round(r.gops, 1), pct_of_stream=r.pct_of_stream)
            for r in results
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
