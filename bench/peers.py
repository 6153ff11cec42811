"""Peers side by side: llama.cpp's, ik_llama.cpp's and bitnet.cpp's ``llama-bench`` with our -t, -p, -n, -r.

* llama.cpp runs the model as it is (TQ2_0);
* ik_llama.cpp runs it as IQ2_BN, its ternary type (made once next to the model: llama.cpp's
  ``llama-quantize`` to F16 — ik's quantizer fails on TQ2_0 input — then ik's ``llama-quantize`` to IQ2_BN),
  plain and with run-time repacking to IQ2_BN_R4 (``-rtr 1``, its fastest CPU path);
* bitnet.cpp (microsoft/BitNet) runs it as I2_S, its x86 ternary type with one scale per tensor, written once
  next to the model by our own writer (``write_i2s_copy``): the same codes and scales, the head and norms
  copied byte for byte, so every engine multiplies the same weights.

Binaries default to the builds under /work/peers; ``$TERNARY_LLAMA_CPP_BIN``, ``$TERNARY_IK_LLAMA_BIN`` and
``$TERNARY_BITNET_CPP_BIN`` name other ``build/bin`` folders. ``compare_with_peers`` prints every engine's
median t/s per test and our ratio to each.

    python -m ternary.bench.peers MODEL.gguf -t 2 -p 128 -n 64 -r 5     # peers only, JSON lines out
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ternary.formats import quants
from ternary.formats.model_file import ModelFile, is_linear_weight, open_model
from ternary.formats.reader import TensorInfo
from ternary.formats.writer import write_model

DEFAULT_LLAMA_CPP = "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
DEFAULT_IK_LLAMA = "/work/peers/ik/build/bin"
DEFAULT_BITNET_CPP = "/work/peers/bitnet/build/bin"


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
    bitnet = Path(os.environ.get("TERNARY_BITNET_CPP_BIN", DEFAULT_BITNET_CPP))
    return [
        Peer("llama.cpp TQ2_0", llama),
        Peer("ik_llama.cpp IQ2_BN", ik, "iq2_bn"),
        Peer("ik_llama.cpp IQ2_BN -rtr", ik, "iq2_bn", ("-rtr", "1")),
        Peer("bitnet.cpp I2_S", bitnet, "i2_s"),
    ]


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {done.returncode}): {' | '.join(tail)}")
    return done


class I2STensors(Mapping):
    """``write_model``'s tensors for an I2_S copy: each ternary linear as codes × its one scale (made on
    access, so a 2B model never holds more than one float matrix), every other tensor as the file's bytes."""

    def __init__(self, model: ModelFile) -> None:
        self.model = model
        self.tensors = model.gguf.tensors

    def __getitem__(self, name: str) -> np.ndarray | TensorInfo:
        t = self.tensors[name]
        if not is_linear_weight(name):
            return t
        codes, scales, _ = quants.ternary_codes(t.ggml_type, t.raw, t.shape)
        scale = scales.flat[0] if scales.size else np.float32(0)
        if np.any(scales != scale):
            raise ValueError(
                f"{self.model.path}: {name}: {len(np.unique(scales))} different block scales; I2_S keeps one "
                "scale per tensor, so an I2_S copy would not be the same model"
            )
        return codes.astype(np.float32) * np.float32(scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def write_i2s_copy(model: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write ``model`` (TQ1_0 / TQ2_0 / I2_S linears, one scale per tensor) as an I2_S GGUF bitnet.cpp loads.

    Our own writer does it, so a bitnet.cpp run also proves the writer's I2_S: same architecture, config and
    tokenizer; linears re-encoded as I2_S; embedding, head, norms and ``.scale`` tensors copied byte for byte.
    """
    with open_model(model) as m:
        if m.config.arch == "bitnet" and m.config.ffn_act != "silu":
            raise ValueError(
                f"{m.path}: its FFN is {m.config.ffn_act} but bitnet.cpp computes the `bitnet` architecture "
                "with SiLU (it ignores <arch>.hidden_act), so it would run a different model"
            )
        md = m.gguf.metadata
        tokenizer = {k: v for k, v in md.items() if k.startswith("tokenizer.")}
        write_model(
            out,
            m.config,
            I2STensors(m),
            tokenizer,
            linear_type="I2_S",
            name=str(md.get("general.name", "ternary")),
        )


def weight_differences(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """What differs between two model files (empty: the same tensors, whatever ternary type stores each
    linear): config, tokenizer, each linear's exact values (codes × scales), every other tensor's bytes."""
    with open_model(a) as ma, open_model(b) as mb:
        diffs = [] if ma.config == mb.config else [f"config: {ma.config} != {mb.config}"]
        tok_a, tok_b = (
            {k: v for k, v in m.gguf.metadata.items() if k.startswith("tokenizer.")} for m in (ma, mb)
        )
        diffs += [
            f"{k}: differs" for k in sorted(tok_a.keys() | tok_b.keys()) if tok_a.get(k) != tok_b.get(k)
        ]
        ta, tb = ma.gguf.tensors, mb.gguf.tensors
        diffs += [f"{n}: only in one file" for n in sorted(ta.keys() ^ tb.keys())]
        for name in sorted(ta.keys() & tb.keys()):
            x, y = ta[name], tb[name]
            if is_linear_weight(name):
                same = np.array_equal(_linear_values(x), _linear_values(y))
            else:
                same = x.ggml_type == y.ggml_type and np.array_equal(x.raw, y.raw)
            if not same:
                diffs.append(f"{name}: {x.type_name} and {y.type_name} values differ")
    return diffs


def _linear_values(t: TensorInfo) -> np.ndarray:
    """A ternary matrix's exact float32 values, codes × the scale of their block."""
    codes, scales, block = quants.ternary_codes(t.ggml_type, t.raw, t.shape)
    return codes.astype(np.float32) * np.repeat(scales, block, axis=1)


OWN_WRITERS: dict[str, Callable[[Path, Path], None]] = {"i2_s": write_i2s_copy}


def peer_model(peer: Peer, model: Path, llama_cpp: Peer) -> Path:
    """The model file ``peer`` runs: ``model`` itself, or its ``peer.quant`` copy (made on first use, and
    again when ``model`` is newer than the copy)."""
    if peer.quant is None:
        return model
    out = model.with_name(f"{model.stem}.{peer.quant}.gguf")
    if out.is_file() and out.stat().st_mtime >= model.stat().st_mtime:
        return out
    if peer.quant in OWN_WRITERS:
        OWN_WRITERS[peer.quant](model, out)
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
    return parse_bench_json(_run(cmd).stdout, peer.name)


BENCH_KEYS = ("n_threads", "n_prompt", "n_gen", "samples_ts")


def parse_bench_json(text: str, source: str) -> list[dict]:
    """``llama-bench -o json`` output -> its records, each checked for the keys the table reads."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: llama-bench output is not JSON ({e})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{source}: llama-bench JSON is not a list of records")
    for r in records:
        missing = [k for k in BENCH_KEYS if k not in r]
        if missing:
            raise ValueError(f"{source}: a llama-bench record lacks {', '.join(missing)}")
        if not r["samples_ts"]:
            raise ValueError(f"{source}: a llama-bench record has no samples")
    return records


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
