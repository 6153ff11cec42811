"""Peak resident memory of opening a model and generating from it, measured in a fresh process.

    python -m ternary.bench.rss MODEL.gguf                   # default settings, 32 generated tokens
    python -m ternary.bench.rss --preset A --n-ctx 4096 --tokens 32 --json

A child process imports the engine, opens the model with ``Engine(path, n_ctx=...)`` and generates greedily;
its peak RSS (``VmHWM`` of ``/proc/<pid>/status``: transient peaks during loading count too) is compared with
the file's size. Before it exits, the parent reads the child's ``/proc/<pid>/smaps`` and groups the resident
pages by mapping (repack cache, the model file, shared libraries, anonymous memory), so a regression shows
where it lives. Run it once first if the repack or Numba caches are cold (``--prime`` does that): a cold
start repacks and compiles, which is a different measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import click

MIB = 1 << 20
GROUPS = ("repack cache", "model file", "shared libraries", "anonymous", "other")

# Runs in the child (a fresh interpreter): the engine is imported after the first reading.
_CHILD = r"""
import json, sys
from ternary.bench.rss import read_status as status
phases = {"start": status()}
from ternary.engine.engine import Engine
phases["import"] = status()
model, n_ctx, tokens, threads, prompt = json.loads(sys.argv[1])
engine = Engine(model, n_ctx=n_ctx, threads=threads)
phases["load"] = status()
text = engine.generate(prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True, stream=False)
phases["generate"] = status()
stats = engine.stats
print(json.dumps({"phases": phases, "n_ctx": engine.n_ctx, "threads": engine.threads,
    "generated": stats.generated_tokens, "tokens_per_second": stats.generation_tokens_per_second,
    "load_seconds": stats.load_seconds, "jit_seconds": stats.jit_seconds}), flush=True)
sys.stdin.readline()  # the parent reads /proc/<pid>/smaps meanwhile
"""


def read_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (bytes) of a process."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def peak_rss() -> int | None:
    """This process's peak RSS in bytes (``VmHWM``), or None where ``/proc`` does not say."""
    try:
        return read_status().get("VmHWM")
    except OSError:
        return None


def read_smaps(pid: int | str = "self") -> list[tuple[str, int]]:
    """(path or pseudo-name, resident bytes) of every mapping of a process, from ``/proc/<pid>/smaps``."""
    maps, name = [], ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                name = head[5].strip() if len(head) > 5 else ""
            elif head[0] == "Rss:":
                maps.append((name, int(head[1]) * 1024))
    return maps


def read_rollup(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup``'s totals in bytes (Rss, Pss, Anonymous, Private_Dirty, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def group_of(name: str, model: str) -> str:
    """Which of ``GROUPS`` a mapping belongs to."""
    if name.endswith(".tnrp"):
        return "repack cache"
    if name and name == model:
        return "model file"
    if ".so" in os.path.basename(name):
        return "shared libraries"
    if not name or name == "[heap]" or name.startswith("[anon"):
        return "anonymous"
    return "other"


def breakdown(maps: Sequence[tuple[str, int]], model: str, top: int = 4) -> dict[str, object]:
    """Resident bytes per group, and the largest shared libraries by name."""
    groups = dict.fromkeys(GROUPS, 0)
    libs: dict[str, int] = {}
    for name, rss in maps:
        group = group_of(name, model)
        groups[group] += rss
        if group == "shared libraries":
            lib = os.path.basename(name)
            libs[lib] = libs.get(lib, 0) + rss
    largest = dict(sorted(libs.items(), key=lambda kv: -kv[1])[:top])
    return {"groups": groups, "largest_libraries": largest}


def measure(
    model: str | os.PathLike[str],
    n_ctx: int | None = None,
    tokens: int = 32,
    threads: int | None = None,
    prompt: str = "The quick brown fox jumps over the lazy dog.",
) -> dict[str, object]:
    """Run the load + generate child once; its peak RSS, phases and a breakdown of what is resident at
    the end."""
    path = str(Path(model).resolve())
    args = json.dumps([path, n_ctx, tokens, threads, prompt])
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        if not line:
            child.wait()
            tail = child.stderr.read().strip().splitlines()[-5:]
            raise RuntimeError(f"the measuring process failed (exit {child.returncode}): " + "\n".join(tail))
        result = json.loads(line)
        result.update(
            breakdown(read_smaps(child.pid), path),
            rollup=read_rollup(child.pid),
            status=read_status(child.pid),
        )
    finally:
        if child.poll() is None:
            child.communicate("\n", timeout=60)
    size = os.path.getsize(path)
    peak = result["status"]["VmHWM"]
    result.update(model=path, file_bytes=size, peak_rss=peak, ratio=peak / size)
    return result


def report(result: dict[str, object]) -> str:
    """The measurement as text."""

    def mib(n: int) -> str:
        return f"{n / MIB:7.1f} MiB"

    lines = [
        f"model      {result['model']} ({result['file_bytes'] / MIB:.1f} MiB, {result['file_bytes']} bytes)",
        f"settings   n_ctx {result['n_ctx']}, threads {result['threads']}, {result['generated']} tokens "
        f"generated ({result['tokens_per_second']:.2f} t/s; load {result['load_seconds']:.1f} s, "
        f"warm-up {result['jit_seconds']:.1f} s)",
        f"peak RSS   {mib(result['peak_rss'])} = {result['ratio']:.3f} x the file",
        "phases     " + ", ".join(
            f"{k} {v['VmRSS'] / MIB:.0f}/{v['VmHWM'] / MIB:.0f}" for k, v in result["phases"].items()
        ) + " (MiB, RSS/peak after each)",
        "resident at the end, by mapping:",
    ]  # fmt: skip
    for group, n in result["groups"].items():
        lines.append(f"  {group:<17}{mib(n)}")
    lines.append(f"  {'total':<17}{mib(sum(result['groups'].values()))}")
    libs = ", ".join(f"{k} {v / MIB:.1f}" for k, v in result["largest_libraries"].items())
    lines.append(f"  largest libraries (MiB): {libs}")
    roll = result["rollup"]
    lines.append(
        "  smaps_rollup (MiB): "
        + ", ".join(f"{k} {roll.get(k, 0) / MIB:.1f}" for k in ("Rss", "Pss", "Anonymous", "Private_Dirty"))
    )
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--preset", type=click.Choice(["A", "B", "a", "b"]), help="a bench model instead of MODEL")
@click.option("--n-ctx", type=click.IntRange(1), default=None, help="context length (default: the model's)")
@click.option("--tokens", type=click.IntRange(1), default=32, show_default=True, help="tokens to generate")
@click.option("-t", "--threads", type=click.IntRange(1), default=None, help="threads (default: cores)")
@click.option("--prime", is_flag=True, help="run once first (fills the repack and Numba caches)")
@click.option("--json", "as_json", is_flag=True, help="print the measurement as JSON")
def cli(
    model: str | None,
    preset: str | None,
    n_ctx: int | None,
    tokens: int,
    threads: int | None,
    prime: bool,
    as_json: bool,
) -> None:
    """Peak RSS of loading MODEL and generating ``--tokens`` tokens, against the file's size."""
    if bool(model) == bool(preset):
        raise click.UsageError("give one model: MODEL or --preset A|B")
    if preset:
        from ternary.bench.presets import preset_model

        model = str(preset_model(preset))
    elif not Path(model).is_file():
        raise click.UsageError(f"{model}: no such file")
    try:
        if prime:
            measure(model, n_ctx, tokens, threads)
        result = measure(model, n_ctx, tokens, threads)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2) if as_json else report(result))


if __name__ == "__main__":
    cli()
