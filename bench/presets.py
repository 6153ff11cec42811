"""Benchmark models: random ternary weights in real model shapes, written once to a cache folder.

* ``A``: BitNet b1.58 2B4T's shapes (hidden 2560, 30 layers, 20/5 heads of 128, FFN 6912, vocab 128256);
* ``B``: a 125M-class shape (hidden 768, 12 layers, 12/4 heads of 64, FFN 2048, vocab 32000).

Both are ``bitnet`` GGUFs llama.cpp loads: TQ2_0 linears (each tensor = ternary codes × one scale, as a
trained BitNet stores them, so every 256-block has the same d), a tied Q6_K embedding/head, and a byte-level
tokenizer padded to the vocabulary with unused filler tokens. Tensors are generated lazily from per-tensor
seeds, so writing model A never holds more than one float tensor (its Q6_K head encode takes about a minute).
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ternary.formats.config import ModelConfig
from ternary.formats.model_file import expected_shapes
from ternary.formats.writer import write_model

ENV_DIR = "TERNARY_BENCH_DIR"
UNUSED_TOKEN = 5  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: ModelConfig

    @property
    def filename(self) -> str:
        c = self.config
        return f"bench-{self.name}-{c.n_embd}x{c.n_layer}-v{c.n_vocab}-tq2_0-q6k.gguf"


def _bitnet(n_vocab: int, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int) -> ModelConfig:
    head_dim = n_embd // n_head
    return ModelConfig(
        arch="bitnet", n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_ff=n_ff, n_ctx_train=4096, rms_eps=1e-5, rope_base=500000.0, rope_dim=head_dim,
    )  # fmt: skip


PRESETS = {
    "A": Preset("A", "BitNet b1.58 2B4T shapes", _bitnet(128256, 2560, 30, 20, 5, 6912)),
    "B": Preset("B", "125M-class shapes", _bitnet(32000, 768, 12, 12, 4, 2048)),
}


def default_directory() -> Path:
    """``$TERNARY_BENCH_DIR``, else ``$XDG_CACHE_HOME/ternary/bench``, else ``~/.cache/ternary/bench``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ternary" / "bench"


class RandomTensors(Mapping):
    """The model's float tensors, each made on access from a seed derived from its name (same every time)."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.shapes = expected_shapes(config)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        if name.endswith("norm.weight"):
            return rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
        if name == "token_embd.weight":
            return (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
        n_in = shape[1]
        codes = rng.integers(-1, 2, size=shape, dtype=np.int8)
        return codes.astype(np.float32) * np.float32(1.0 / np.sqrt(n_in))

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def tokenizer_metadata(n_vocab: int) -> dict[str, Any]:
    """A byte-level vocabulary (256 bytes + special tokens) padded to ``n_vocab`` with unused tokens."""
    from ternary.training.bpe_trainer import build_metadata

    md = build_metadata([])
    tokens = list(md["tokenizer.ggml.tokens"])
    types = list(md["tokenizer.ggml.token_type"])
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab {n_vocab} is below the {len(tokens)} tokens of the byte-level vocabulary")
    filler = n_vocab - len(tokens)
    md["tokenizer.ggml.tokens"] = tokens + [f"<|unused_{i}|>" for i in range(filler)]
    md["tokenizer.ggml.token_type"] = types + [UNUSED_TOKEN] * filler
    return md


def preset_model(name: str, directory: str | os.PathLike[str] | None = None, verbose: bool = True) -> Path:
    """The path of preset ``name``'s GGUF, written first if it is not there yet."""
    key = name.upper()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[key]
    folder = Path(directory) if directory is not None else default_directory()
    path = folder / preset.filename
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"writing bench model {key} ({preset.description}) to {path} ...", file=sys.stderr, flush=True)
    write_model(
        path,
        preset.config,
        RandomTensors(preset.config),
        tokenizer_metadata(preset.config.n_vocab),
        linear_type="TQ2_0",
        embed_type="Q6_K",
        name=f"ternary-bench-{key}",
    )
    return path
