"""Output-head benchmarks: Q6_K / Q8_0 / F16 head GEMV per kernel path and thread count, against bandwidth.

Decode reads the whole head once per token, so the figure of merit is GB/s of head bytes as a share of the
streaming read bandwidth of a plain sum over the very same buffer (``stream_over`` from bench_kernels),
timed back to back with it in 5 rounds; the round with the median ratio is reported (on a shared VM the
bandwidth differs between memory regions and moves within seconds). The Q6_K head has BitNet 2B4T's shape,
128256×2560 (269 MB, far beyond any L3); Q8_0 and F16 use 32000×2560. A few-token GEMM (prefill's last rows)
is reported in GOPS (2·N·K·T / s).

    python -m pytest bench/bench_head.py --benchmark-only          # pytest-benchmark tables (+ summary)
    python bench/bench_head.py [--threads 1,2] [--paths avx512vnni,generic] [--types Q6_K] [--quick]
                                                                   # plain table, then one JSON line

Not collected by CI (``testpaths = tests``). The generic path streams ~30× slower: leave it out unless asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np
from ternary.bench.bench_kernels import (
    Result,
    _median_seconds,
    _threads,
    max_threads,
    print_table,
    stream_over,
)
from ternary.engine import activations, cpu_features, simd
from ternary.engine import head_kernels as hk
from ternary.engine.planar import aligned_empty
from ternary.formats import quants

SHAPES = {"Q6_K": (128256, 2560), "Q8_0": (32000, 2560), "F16": (32000, 2560)}
GEMM_TOKENS = 8
DEFAULT_PATHS = [p for p in cpu_features.supported_paths() if p != "generic"]


def _random_head(kind: str, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random head bytes of ``kind`` (every code possible, finite scales), 128-byte aligned."""
    ggml_type = {"Q6_K": quants.Q6_K, "Q8_0": quants.Q8_0, "F16": quants.F16}[kind]
    raw = aligned_empty(quants.tensor_nbytes(ggml_type, (n_out, n_in)))
    if kind == "F16":
        raw.view(np.float16)[:] = rng.uniform(-1, 1, size=raw.size // 2).astype(np.float16)
        return raw
    raw[:] = rng.integers(0, 256, size=raw.size, dtype=np.uint8)
    block, d_at = (210, 208) if kind == "Q6_K" else (34, 0)
    d = np.full(raw.size // block, 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    raw.reshape(-1, block)[:, d_at : d_at + 2] = d
    return raw


class HeadCase:
    """One head and its activations (quantized as the head's type wants), ready to time."""

    def __init__(self, kind: str, path: str, tokens: int) -> None:
        rng = np.random.default_rng(0)
        self.kind, self.n_out, self.n_in = kind, *SHAPES[kind]
        self.raw = _random_head(kind, self.n_out, self.n_in, rng)
        self.isa = simd.ISAS[path]
        x = rng.standard_normal((tokens, self.n_in)).astype(np.float32)
        self.out = np.empty((tokens, self.n_out), np.float32)
        if kind == "Q6_K":
            self.xq, self.xd = activations.quantize_q8k(x)
            self.bsums = hk.q8k_bsums(self.xq)
        elif kind == "Q8_0":
            self.xq, self.xd = activations.quantize_q8_0(x)
        else:
            self.x16 = activations.round_to_f16(x)

    def __call__(self) -> None:
        if self.kind == "Q6_K":
            hk.q6k_matmul(self.isa, self.raw, self.n_in, self.xq, self.xd, self.bsums, self.out)
        elif self.kind == "Q8_0":
            hk.q8_0_matmul(self.isa, self.raw, self.n_in, self.xq, self.xd, self.out)
        else:
            hk.f16_matmul(self.isa, self.raw.view(np.uint16), self.n_in, self.x16, self.out)


def paired_rounds(case: HeadCase, threads: int, rounds: int, repeats: int) -> tuple[float, float]:
    """(GEMV seconds, stream GB/s) of the round whose GEMV/stream ratio is the median of ``rounds``.

    Each round times a plain sum over the head's own buffer and then the GEMV, back to back: on a shared VM
    the bandwidth moves by 2x within seconds, so only numbers taken together are compared.
    """
    pairs = []
    with _threads(threads):
        case()  # compile / warm
        for _ in range(rounds):
            stream = stream_over([case.raw], threads, repeats=repeats)
            seconds = _median_seconds(case, repeats)
            pairs.append((case.raw.nbytes / seconds / stream, seconds, stream))
    pairs.sort()
    _, seconds, stream = pairs[len(pairs) // 2]
    return seconds, stream


def measure(kind: str, path: str, tokens: int, threads: int, repeats: int) -> Result:
    """A GEMV from ``paired_rounds``, or the median time of a few-token GEMM."""
    case = HeadCase(kind, path, tokens)
    if tokens == 1:
        seconds, stream = paired_rounds(case, threads, rounds=5, repeats=repeats)
    else:
        with _threads(threads):
            case()
            seconds, stream = _median_seconds(case, repeats), None
    gemv = "gemv" if tokens == 1 else "gemm"
    return Result(gemv, path, case.n_out, case.n_in, tokens, kind, threads, seconds, case.raw.nbytes, stream)


# ---------------------------------------------------------------- pytest-benchmark suite
# (fixture ``kernel_log`` and the summary table come from bench/conftest.py)

try:
    import pytest
except ImportError:  # plain script use without pytest installed
    pytest = None

if pytest is not None:
    _THREADS = sorted({1, max_threads()})

    def _record(benchmark, log, kind: str, path: str, tokens: int, threads: int) -> None:
        case = HeadCase(kind, path, tokens)
        with _threads(threads):
            case()
            benchmark.pedantic(case, rounds=15 if tokens == 1 else 5, iterations=1, warmup_rounds=1)
        seconds, stream = benchmark.stats.stats.median, None
        if tokens == 1:  # the share of bandwidth from back-to-back pairs (see paired_rounds)
            seconds, stream = paired_rounds(case, threads, rounds=5, repeats=5)
        res = Result("gemv" if tokens == 1 else "gemm", path, case.n_out, case.n_in, tokens, kind, threads,
                     seconds, case.raw.nbytes, stream)  # fmt: skip
        benchmark.extra_info.update({"GB/s": round(res.gbps, 2), "GOPS": round(res.gops, 1)})
        if stream:
            benchmark.extra_info.update(
                {"stream_GB/s": round(stream, 2), "pct_of_stream": round(res.pct_of_stream, 1)}
            )
        log["results"].append(res)

    @pytest.mark.parametrize("threads", _THREADS)
    @pytest.mark.parametrize("kind", list(SHAPES))
    @pytest.mark.parametrize("path", DEFAULT_PATHS)
    def test_head_gemv_from_dram(benchmark, kernel_log, path, kind, threads):
        _record(benchmark, kernel_log, kind, path, 1, threads)

    @pytest.mark.parametrize("threads", _THREADS)
    @pytest.mark.parametrize("path", DEFAULT_PATHS)
    def test_q6k_head_few_tokens(benchmark, kernel_log, path, threads):
        _record(benchmark, kernel_log, "Q6_K", path, GEMM_TOKENS, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="comma list, default 1 and all (≤2)")
    parser.add_argument("--paths", default=None, help="comma list of kernel paths, default all but generic")
    parser.add_argument("--types", default=",".join(SHAPES), help="comma list of Q6_K, Q8_0, F16")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, max_threads()})
    paths = args.paths.split(",") if args.paths else DEFAULT_PATHS
    for p in paths:
        cpu_features.select_path(p)  # clear error for an unsupported path
    kinds = args.types.split(",")
    for kind in kinds:
        if kind not in SHAPES:
            parser.error(f"unknown head type {kind!r}: choose from {', '.join(SHAPES)}")
    repeats = 5 if args.quick else 15
    results = []
    for path in paths:
        for t in threads:
            for kind in kinds:
                results.append(measure(kind, path, 1, t, repeats))
            if "Q6_K" in kinds:
                results.append(measure("Q6_K", path, GEMM_TOKENS, t, max(3, repeats // 3)))
    print_table(results, {}, print)  # the stream column: a sum over each head's own buffer
    print(json.dumps({"results": [dict(asdict(r), gbps=round(r.gbps, 2), gops=round(r.gops, 1),
                                       pct_of_stream=r.pct_of_stream) for r in results]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
