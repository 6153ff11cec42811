"""``ternary-bench``: prompt and generation speed of a model, shaped like llama.cpp's ``llama-bench``.

    ternary-bench model.gguf -t 1,2 -p 128 -n 64 -r 5           # markdown table: | model | size | ... | t/s |
    ternary-bench --preset B -o json                             # llama-bench's JSON keys (plus a few more)
    ternary-bench --preset A --peers                             # llama.cpp, ik_llama, bitnet.cpp alongside
    ternary-bench --preset B --kernels                           # GOPS, GB/s, % of measured read bandwidth
    ternary-bench --preset B --warmup                            # cold vs warm start (JIT and repack caches)

Tests are llama-bench's: ``pp<N>`` evaluates N random tokens as one prompt from an empty context (logits of
the last one only), ``tg<N>`` evaluates N tokens one at a time from an empty context; each test runs once
for warm-up, then ``-r`` times; t/s is ``mean ± sd`` over the repetitions (JSON also has ``median_ts``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
from ternary.bench.rss import peak_rss
from ternary.formats import quants
from ternary.formats.reader import GGUFFile

OUTPUTS = ("md", "json", "jsonl")


@dataclass(frozen=True)
class ModelInfo:
    """What llama-bench reports about a model file."""

    filename: str
    model_type: str  # "<arch> <params> <linear type>", e.g. "bitnet 100M TQ2_0"
    size: int  # bytes of tensor data
    n_params: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> ModelInfo:
        with GGUFFile(path) as f:
            size = sum(t.raw.nbytes for t in f.tensors.values())
            n_params = sum(t.n_elements for t in f.tensors.values())
            linear = f.tensors.get("blk.0.attn_q.weight")
            kind = quants.type_name(linear.ggml_type) if linear is not None else "?"
            arch = f.architecture
        return cls(str(Path(path).resolve()), f"{arch} {_count(n_params)} {kind}", size, n_params)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


@dataclass
class BenchResult:
    """One test (``pp<N>`` or ``tg<N>``) at one thread count: its repetitions in nanoseconds."""

    model: ModelInfo
    backend: str
    n_threads: int
    n_prompt: int
    n_gen: int
    samples_ns: list[int] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"

    @property
    def samples_ts(self) -> list[float]:
        n = self.n_prompt + self.n_gen
        return [n * 1e9 / ns for ns in self.samples_ns]

    def as_dict(self) -> dict[str, object]:
        """llama-bench's JSON keys first (same meaning), then ours."""
        ts = self.samples_ts
        return {
            "model_filename": self.model.filename,
            "model_type": self.model.model_type,
            "model_size": self.model.size,
            "model_n_params": self.model.n_params,
            "backends": self.backend,
            "n_threads": self.n_threads,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "avg_ns": int(statistics.mean(self.samples_ns)),
            "stddev_ns": int(_stdev(self.samples_ns)),
            "avg_ts": statistics.mean(ts),
            "stddev_ts": _stdev(ts),
            "samples_ns": list(self.samples_ns),
            "samples_ts": ts,
            "median_ts": statistics.median(ts),
            "test": self.name,
            **self.extra,
        }


def _stdev(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------- running the tests


def _timed(fn: Callable[[], None]) -> int:
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def prompt_test(engine, tokens: np.ndarray) -> Callable[[], None]:
    """Evaluate ``tokens`` as one prompt in a fresh slot 0, in the engine's prompt chunks (last logits)."""
    from ternary.engine.engine import PROMPT_CHUNK

    def run() -> None:
        engine.reset_slot(0)
        n = len(tokens)
        for start in range(0, n, PROMPT_CHUNK):
            stop = min(n, start + PROMPT_CHUNK)
            want = np.arange(start, stop) == n - 1
            engine.eval_batch(
                tokens[start:stop], np.arange(start, stop), np.zeros(stop - start, np.int32), want
            )

    return run


def generation_test(engine, tokens: np.ndarray) -> Callable[[], None]:
    """Evaluate ``tokens`` one at a time from position 0 of a fresh slot 0 (logits every step)."""

    def run() -> None:
        engine.reset_slot(0)
        for i, tok in enumerate(tokens.tolist()):
            engine.eval_batch([tok], [i], [0])

    return run


def run_benchmarks(
    engine,
    model: ModelInfo,
    threads: Sequence[int],
    prompts: Sequence[int],
    gens: Sequence[int],
    repetitions: int,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Every (threads, test) pair: one warm-up run, then ``repetitions`` timed runs."""
    rng = np.random.default_rng(seed)
    backend = f"CPU numba {engine.model.isa.name}"
    extra = {
        "layout": engine.layout,
        "act_quant": engine.model.act_quant,
        "kernel_path": engine.model.isa.name,
    }
    results = []
    for t in threads:
        engine.set_threads(t)
        tests = [(p, 0) for p in prompts if p > 0] + [(0, n) for n in gens if n > 0]
        for n_prompt, n_gen in tests:
            tokens = rng.integers(0, engine.n_vocab, size=n_prompt or n_gen).astype(np.int32)
            run = prompt_test(engine, tokens) if n_prompt else generation_test(engine, tokens)
            res = BenchResult(model, backend, t, n_prompt, n_gen, extra=dict(extra))
            if progress:
                progress(f"{res.name}, {t} thread(s): warm-up + {repetitions} runs")
            run()
            res.samples_ns = [_timed(run) for _ in range(repetitions)]
            results.append(res)
    return results


# ---------------------------------------------------------------- output


def markdown_table(results: Sequence[BenchResult]) -> str:
    """llama-bench's table: | model | size | params | backend | threads | test | t/s |."""
    header = ("model", "size", "params", "backend", "threads", "test", "t/s")
    rows = []
    for r in results:
        d = r.as_dict()
        rows.append(
            (
                r.model.model_type,
                f"{r.model.size / 2**20:.2f} MiB",
                f"{r.model.n_params / 1e6:.2f} M",
                r.backend,
                str(r.n_threads),
                r.name,
                f"{d['avg_ts']:.2f} ± {d['stddev_ts']:.2f}",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    right = {1, 2, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "| "
        + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths))
        + " |"
    )
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def render(results: Sequence[BenchResult], output: str) -> str:
    if output == "md":
        return markdown_table(results)
    if output == "json":
        return json.dumps([r.as_dict() for r in results], indent=2)
    return "\n".join(json.dumps(r.as_dict()) for r in results)


# ---------------------------------------------------------------- kernel and start-up measurements


def kernel_report(engine, threads: Sequence[int], n_tokens: int, say: Callable[[str], None]) -> None:
    """GEMV (weights from DRAM) and GEMM GOPS / GB/s for the model's linear shapes, against the streaming
    read bandwidth measured in the same run (``bench_kernels``' helpers and table)."""
    from ternary.bench.bench_kernels import print_table, stream_read_bandwidth

    shapes = sorted({(s.n_out, s.group_scales.shape[2] * 256) for s in engine.model.stacked.values()})
    bandwidth = {t: stream_read_bandwidth(t) for t in threads}
    results = []
    for t in threads:
        for n_out, n_in in shapes:
            for tokens in (1, n_tokens):
                say(f"kernel {n_out}x{n_in}, {tokens} token(s), {t} thread(s)")
                results.append(
                    measure_kernel(engine.model.act_quant, engine.model.isa.name, n_out, n_in, tokens, t)
                )
    print_table(results, bandwidth, say)


def measure_kernel(act_quant: str, path: str, n_out: int, n_in: int, tokens: int, threads: int):
    """``bench_kernels.Result`` of the kernel the engine runs for ``act_quant``: the planar kernels for
    ``per_token``, the llama.cpp-order lane kernel (``kernels_q8k``) for ``q8k``. A GEMV streams its weights
    from DRAM (copies beyond the last-level cache), compared with a plain sum over those same buffers."""
    import numba
    from ternary.bench.bench_kernels import DRAM_ROTATION_BYTES, KernelCase, Result, stream_over
    from ternary.engine.kernels_q8k import lane_sums, q8k_matmul

    gemv = tokens == 1
    case = KernelCase(n_out, n_in, tokens, act_quant, path, DRAM_ROTATION_BYTES if gemv else 0)
    run: Callable[[], None] = case
    if act_quant == "q8k":
        sums = np.empty((tokens, n_in // 256, 8), dtype=np.int32)
        lane_sums(case.xq, sums)
        turn = iter(range(1 << 62))

        def run() -> None:
            packed = case.packs[next(turn) % len(case.packs)]
            m = case.matrix
            q8k_matmul(
                case.isa, packed, m.group_scales, m.row_scales, m.group_uniform, n_out, case.xq, sums,
                case.x_scale, case.out,
            )  # fmt: skip

    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        run()
        stream = stream_over(case.packs, threads) if gemv else None
        samples = [_timed(run) for _ in range(31 if gemv else 5)]
    finally:
        numba.set_num_threads(before)
    kind = "gemv" if gemv else "gemm"
    seconds = statistics.median(samples) / 1e9
    return Result(
        kind, path, n_out, n_in, tokens, act_quant, threads, seconds, case.matrix.packed.nbytes, stream
    )


def start_up_report(
    model: str, engine_options: dict[str, object], say: Callable[[str], None]
) -> dict[str, float]:
    """Seconds from a new process to the first token: cold (empty JIT and repack caches) and warm (both
    filled by the cold run), each in a subprocess with its own cache folders."""
    code = (
        "import json, sys, time; t0 = time.perf_counter()\n"
        "from ternary.engine.engine import Engine\n"
        "t1 = time.perf_counter()\n"
        f"e = Engine({model!r}, **{engine_options!r})\n"
        "t2 = time.perf_counter()\n"
        "e.eval_batch([1], [0], [0])\n"
        "t3 = time.perf_counter()\n"
        "print(json.dumps({'import': t1 - t0, 'engine': t2 - t1, 'load': e.stats.load_seconds, "
        "'jit': e.stats.jit_seconds, 'first_token': t3 - t2, 'total': t3 - t0}))\n"
    )
    out = {}
    with tempfile.TemporaryDirectory(prefix="ternary-bench-") as tmp:
        env = dict(
            os.environ, NUMBA_CACHE_DIR=str(Path(tmp) / "numba"), TERNARY_CACHE_DIR=str(Path(tmp) / "repack")
        )
        for label in ("cold", "warm"):
            say(f"{label} start in a new process ...")
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise click.ClickException(f"{label} start failed: {done.stderr.strip().splitlines()[-1:]}")
            times = json.loads(done.stdout.strip().splitlines()[-1])
            out[label] = times["total"]
            say(
                f"{label} start: {times['total']:.2f} s to the first token (import {times['import']:.2f} s, "
                f"load {times['load']:.2f} s, JIT/warm-up {times['jit']:.2f} s, "
                f"first token {times['first_token'] * 1e3:.1f} ms)"
            )
    return out


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise click.BadParameter(f"expected non-negative integers, got {text!r}")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("-m", "--model", "model_opt", help="model GGUF (or give it as the argument)")
@click.option(
    "--preset", type=click.Choice(["A", "B", "a", "b"]), help="a bench model (written on first use)"
)
@click.option(
    "-t", "--threads", "threads", default=None, help="thread counts, comma-separated (default: cores)"
)
@click.option(
    "-p", "--n-prompt", "prompts", default="128", show_default=True, help="prompt lengths (0: none)"
)
@click.option("-n", "--n-gen", "gens", default="64", show_default=True, help="generation lengths (0: none)")
@click.option(
    "-r", "--repetitions", default=5, show_default=True, type=click.IntRange(1), help="runs per test"
)
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default="md", show_default=True)
@click.option(
    "--act-quant", default="q8k", show_default=True, help="q8k (llama.cpp's) or per_token (BitNet's)"
)
@click.option("--layout", type=click.Choice(["planar", "reference"]), default="planar", show_default=True)
@click.option("--decode-threads", type=click.IntRange(1), default=None, help="threads for decode steps")
@click.option("--kernels", "kernels_mode", is_flag=True, help="kernel GOPS / GB/s vs measured read bandwidth")
@click.option("--warmup", "warmup_mode", is_flag=True, help="cold vs warm start to the first token")
@click.option("--peers", "peers_mode", is_flag=True, help="peers' llama-bench (llama.cpp, ik, bitnet.cpp)")
@click.option("--bench-dir", default=None, help="folder for preset models (default: ~/.cache/ternary/bench)")
def cli(
    model: str | None,
    model_opt: str | None,
    preset: str | None,
    threads: str | None,
    prompts: str,
    gens: str,
    repetitions: int,
    output: str,
    act_quant: str,
    layout: str,
    decode_threads: int | None,
    kernels_mode: bool,
    warmup_mode: bool,
    peers_mode: bool,
    bench_dir: str | None,
) -> None:
    """Benchmark a BitNet GGUF like llama-bench (see the module docstring)."""
    from ternary.bench.presets import preset_model

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    given = [m for m in (model, model_opt) if m]
    if preset and given or len(set(given)) > 1:
        raise click.UsageError("give one model: MODEL, -m MODEL or --preset A|B")
    if preset:
        path = str(preset_model(preset, bench_dir))
    elif given:
        path = given[0]
        if not Path(path).is_file():
            raise click.UsageError(f"{path}: no such file")
    else:
        raise click.UsageError("no model: ternary-bench MODEL.gguf (or -m MODEL.gguf, or --preset A|B)")
    prompt_list, gen_list = _int_list(prompts), _int_list(gens)
    from ternary.engine.engine import Engine, default_threads

    thread_list = _int_list(threads) if threads else [default_threads()]
    if min(thread_list) < 1:
        raise click.BadParameter("thread counts must be at least 1", param_hint="-t")
    options = {"act_quant": act_quant, "layout": layout}
    if warmup_mode:
        start_up_report(path, dict(options, threads=thread_list[0]), say)
    info = ModelInfo.of(path)
    n_ctx = max(prompt_list) + max(gen_list) + 1
    engine = Engine(path, threads=thread_list[0], n_ctx=n_ctx, decode_threads=decode_threads, **options)
    if kernels_mode:
        kernel_report(engine, thread_list, max(prompt_list) or 128, say)
        return
    results = run_benchmarks(engine, info, thread_list, prompt_list, gen_list, repetitions, progress=say)
    peak = peak_rss()
    if peak is not None:  # this process's, n_ctx as above (``python -m ternary.bench.rss``: load + generate)
        for result in results:
            result.extra["peak_rss"] = peak
        say(f"peak RSS {peak / 2**20:.0f} MiB = {peak / os.path.getsize(path):.2f} x the model file")
    click.echo(render(results, output))
    if peers_mode:
        from ternary.bench.peers import compare_with_peers

        compare_with_peers(path, results, thread_list, prompt_list, gen_list, repetitions, say, click.echo)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="ternary-bench")


if __name__ == "__main__":
    main()
