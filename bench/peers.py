"""Peers side by side: llama.cpp's and ik_llama.cpp's ``llama-bench`` on the same model, threads, -p, -n, -r.

* llama.cpp runs the model as it is (TQ2_0);
* ik_llama.cpp runs it as IQ2_BN, its ternary type (made once next to the model: llama.cpp's
  ``llama-quantize`` to F16 — ik's quantizer fails on TQ2_0 input — then ik's ``llama-quantize`` to IQ2_BN),
  plain and with run-time repacking to IQ2_BN_R4 (``-rtr 1``, its fastest CPU path).

Binaries default to the builds under /work/peers; ``$TERNARY_LLAMA_CPP_BIN`` and ``$TERNARY_IK_LLAMA_BIN``
name other ``build/bin`` folders. ``compare_with_peers`` prints every engine's median t/s per test and our
ratio to each.

    python -m ternary.bench.peers MODEL.gguf -t 2 -p 128 -n 64 -r 5     # peers only, JSON lines out
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LLAMA_CPP = "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
DEFAULT_IK_LLAMA = "/work/peers/ik/build/bin"


@dataclass(frozen=True)
class Peer:
    """One engine's ``llama-bench``: where it is, the model type it runs, extra flags."""

    name: str
    bin_dir: Path
    quant: str | None = None  # requantize the model to this type first
    flags: tuple[str, ...] = ()

    @property
    def bench(self) -> Path:
        return self.bin_dir / "llama-bench"

    @property
    def available(self) -> bool:
        return self.bench.is_file() and os.access(self.bench, os.X_OK)


def default_peers() -> list[Peer]:
    llama = Path(os.environ.get("TERNARY_LLAMA_CPP_BIN", DEFAULT_LLAMA_CPP))
    ik = Path(os.environ.get("TERNARY_IK_LLAMA_BIN", DEFAULT_IK_LLAMA))
    return [
        Peer("llama.cpp TQ2_0", llama),
        Peer("ik_llama.cpp IQ2_BN", ik, "iq2_bn"),
        Peer("ik_llama.cpp IQ2_BN -rtr", ik, "iq2_bn", ("-rtr", "1")),
    ]


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {done.returncode}): {' | '.join(tail)}")
    return done


def peer_model(peer: Peer, model: Path, llama_cpp: Peer) -> Path:
    """The model file ``peer`` runs: ``model`` itself, or its ``peer.quant`` copy (made on first use)."""
    if peer.quant is None:
        return model
    out = model.with_name(f"{model.stem}.{peer.quant}.gguf")
    if out.is_file():
        return out
    f16 = model.with_name(f"{model.stem}.f16.tmp.gguf")
    try:
        _run([llama_cpp.bin_dir / "llama-quantize", "--allow-requantize", model, f16, "F16"])
        _run([peer.bin_dir / "llama-quantize", "--allow-requantize", f16, out, peer.quant])
    finally:
        f16.unlink(missing_ok=True)
    return out


def run_peer(
    peer: Peer, model: Path, threads: Sequence[int], prompts: Sequence[int], gens: Sequence[int], reps: int
) -> list[dict]:
    """``llama-bench -o json`` records of every (threads, test) for ``peer``."""
    lists = {"-t": threads, "-p": prompts, "-n": gens}
    cmd = [peer.bench, "-m", model, "-r", reps, "-o", "json", *peer.flags]
    for flag, values in lists.items():
        cmd += [flag, ",".join(str(v) for v in values)]
    return json.loads(_run(cmd).stdout)


def median_ts(record: dict) -> float:
    return statistics.median(record["samples_ts"])


def _key(record: dict) -> tuple[int, int, int]:
    return int(record["n_threads"]), int(record["n_prompt"]), int(record["n_gen"])


def compare_with_peers(
    model: str | os.PathLike[str],
    ours: Sequence,
    threads: Sequence[int],
    prompts: Sequence[int],
    gens: Sequence[int],
    reps: int,
    say: Callable[[str], None],
    echo: Callable[[str], None],
    peers: Sequence[Peer] | None = None,
) -> dict[str, list[dict]]:
    """Run every available peer with our settings and print a table of medians and ratios (ours ÷ peer)."""
    peers = list(peers if peers is not None else default_peers())
    llama_cpp = peers[0]
    records: dict[str, list[dict]] = {}
    for peer in peers:
        if not peer.available:
            say(f"{peer.name}: no llama-bench at {peer.bench}, skipped")
            continue
        say(f"{peer.name}: running llama-bench ...")
        try:
            path = peer_model(peer, Path(model), llama_cpp)
            records[peer.name] = run_peer(peer, path, threads, prompts, gens, reps)
        except (RuntimeError, ValueError, OSError) as exc:
            say(f"{peer.name}: {exc}")
    echo(peer_table(ours, records))
    return records


def peer_table(ours: Sequence, records: dict[str, list[dict]]) -> str:
    """Markdown: per (threads, test) our median t/s, each peer's, and our ratio to each."""
    names = list(records)
    header = ["threads", "test", "ternary"]
    for name in names:
        header += [name, f"÷ {name}"]
    rows = []
    for r in ours:
        d = r.as_dict()
        row = [str(d["n_threads"]), d["test"], f"{d['median_ts']:.2f}"]
        for name in names:
            match = [p for p in records[name] if _key(p) == (d["n_threads"], d["n_prompt"], d["n_gen"])]
            if match:
                theirs = median_ts(match[0])
                row += [f"{theirs:.2f}", f"{d['median_ts'] / theirs:.2f}×"]
            else:
                row += ["-", "-"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines) + "\n(median t/s of the repetitions; ratios are ours ÷ the peer's)"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="run the peers' llama-bench (JSON lines out)")
    parser.add_argument("model")
    parser.add_argument("-t", "--threads", default="2")
    parser.add_argument("-p", "--n-prompt", default="128")
    parser.add_argument("-n", "--n-gen", default="64")
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    args = parser.parse_args(argv)
    ints = [[int(v) for v in s.split(",")] for s in (args.threads, args.n_prompt, args.n_gen)]
    peers = default_peers()
    for peer in peers:
        if peer.available:
            path = peer_model(peer, Path(args.model), peers[0])
            for rec in run_peer(peer, path, *ints, args.repetitions):
                print(json.dumps({"peer": peer.name, **rec}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
