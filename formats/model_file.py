"""open_model: a GGUF file whose every tensor has been checked against its ModelConfig.

After ``open_model`` returns, the engine can trust names, shapes and types: each linear weight is a ternary
matrix (TQ1_0, TQ2_0 or I2_S) of the shape the config implies, norms are float vectors, optional
``<name>.scale`` tensors are F32[1], and there are no tensors the graph would ignore.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import TracebackType

import numpy as np
from ternary.formats import quants
from ternary.formats.config import ModelConfig
from ternary.formats.errors import GGUFError
from ternary.formats.reader import GGUFFile, TensorInfo

LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FLOAT_TYPES = frozenset({quants.F32, quants.F16, quants.BF16})
# embeddings: anything ggml can get_rows from that we decode
EMBED_TYPES = frozenset({quants.F32, quants.F16, quants.BF16, quants.Q8_0, quants.Q6_K})


@dataclass(frozen=True)
class Linear:
    """A ternary weight ``[n_out, n_in]`` and the optional per-tensor output multiplier (``<name>.scale``)."""

    weight: TensorInfo
    scale: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerTensors:
    attn_norm: TensorInfo
    attn_q: Linear
    attn_k: Linear
    attn_v: Linear
    attn_output: Linear
    ffn_norm: TensorInfo
    ffn_gate: Linear
    ffn_up: Linear
    ffn_down: Linear
    attn_sub_norm: TensorInfo | None = None  # present exactly for the BitNet arches
    ffn_sub_norm: TensorInfo | None = None

    def linears(self) -> dict[str, Linear]:
        return {name: getattr(self, name) for name in LINEAR_NAMES}


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph reads -> its NumPy-order shape (``.scale`` tensors and a tied head excluded)."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.n_vocab, c.n_embd),
        "output_norm.weight": (c.n_embd,),
    }
    if not c.tied_head:
        shapes["output.weight"] = (c.n_vocab, c.n_embd)
    for layer in range(c.n_layer):
        b = f"blk.{layer}."
        shapes |= {
            b + "attn_norm.weight": (c.n_embd,),
            b + "attn_q.weight": (c.n_embd_q, c.n_embd),
            b + "attn_k.weight": (c.n_embd_kv, c.n_embd),
            b + "attn_v.weight": (c.n_embd_kv, c.n_embd),
            b + "attn_output.weight": (c.n_embd, c.n_embd_q),
            b + "ffn_norm.weight": (c.n_embd,),
            b + "ffn_gate.weight": (c.n_ff, c.n_embd),
            b + "ffn_up.weight": (c.n_ff, c.n_embd),
            b + "ffn_down.weight": (c.n_embd, c.n_ff),
        }
        if c.has_sub_norms:
            shapes[b + "attn_sub_norm.weight"] = (c.n_embd_q,)
            shapes[b + "ffn_sub_norm.weight"] = (c.n_ff,)
    return shapes


def is_linear_weight(name: str) -> bool:
    """``blk.N.<linear>.weight`` for one of LINEAR_NAMES."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_NAMES and parts[3] == "weight"


def scaled_weight(name: str) -> str | None:
    """The weight a ``blk.N.<linear>.scale`` tensor multiplies, or None if ``name`` is no such scale."""
    if not name.endswith(".scale"):
        return None
    weight = name.removesuffix(".scale") + ".weight"
    return weight if is_linear_weight(weight) else None


class ModelFile:
    """A validated model: ``.gguf`` (the open GGUFFile), ``.config``, ``.layer(l)``, embedding and head."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig) -> None:
        self.gguf = gguf
        self.config = config
        self.path = gguf.path
        self._check_tensors()
        self._layers = [self._layer(layer) for layer in range(config.n_layer)]

    # ------------------------------------------------------------------ validation

    def _fail(self, where: str, problem: str) -> GGUFError:
        return GGUFError(self.path, where, problem)

    def _check_tensors(self) -> None:
        expected = expected_shapes(self.config)
        tensors = self.gguf.tensors
        for name, shape in expected.items():
            t = tensors.get(name)
            if t is None:
                raise self._fail(name, f"required tensor is missing (arch {self.config.arch})")
            if t.shape != shape:
                raise self._fail(name, f"shape {t.shape} does not match the config, expected {shape}")
            self._check_type(t)
        for name, t in tensors.items():
            if name in expected:
                continue
            if scaled_weight(name) in expected:
                if t.ggml_type != quants.F32 or t.n_elements != 1:
                    raise self._fail(name, f"must be F32 with one element, got {t.type_name} {t.shape}")
                value = float(t.raw.view(np.float32)[0])
                if not math.isfinite(value):
                    raise self._fail(name, f"scale {value} is not finite")
                continue
            if name.endswith("_sub_norm.weight") and not self.config.has_sub_norms:
                raise self._fail(
                    name, f"arch {self.config.arch} has no sub-norms; this tensor would be ignored"
                )
            raise self._fail(name, f"unexpected tensor for arch {self.config.arch} (would be ignored)")

    def _check_type(self, t: TensorInfo) -> None:
        if is_linear_weight(t.name):
            if t.ggml_type not in quants.TERNARY_TYPES:
                raise self._fail(t.name, f"type {t.type_name} is not ternary (expected TQ1_0, TQ2_0 or I2_S)")
        elif t.name in ("token_embd.weight", "output.weight"):
            if t.ggml_type not in EMBED_TYPES:
                raise self._fail(
                    t.name, f"type {t.type_name} is not supported (expected F32/F16/BF16/Q8_0/Q6_K)"
                )
        elif t.ggml_type not in FLOAT_TYPES:
            raise self._fail(t.name, f"norm weights must be F32/F16/BF16, got {t.type_name}")

    def _linear(self, name: str) -> Linear:
        weight = self.gguf.tensors[name + ".weight"]
        scale_t = self.gguf.tensors.get(name + ".scale")
        scale = None if scale_t is None else float(scale_t.raw.view(np.float32)[0])
        return Linear(weight, scale)

    def _layer(self, layer: int) -> LayerTensors:
        b = f"blk.{layer}."
        t = self.gguf.tensors
        return LayerTensors(
            attn_norm=t[b + "attn_norm.weight"],
            ffn_norm=t[b + "ffn_norm.weight"],
            attn_sub_norm=t.get(b + "attn_sub_norm.weight"),
            ffn_sub_norm=t.get(b + "ffn_sub_norm.weight"),
            **{name: self._linear(b + name) for name in LINEAR_NAMES},
        )

    # ------------------------------------------------------------------ access

    def layer(self, layer: int) -> LayerTensors:
        if not 0 <= layer < self.config.n_layer:
            raise IndexError(f"layer {layer} out of range (model has {self.config.n_layer})")
        return self._layers[layer]

    @property
    def token_embd(self) -> TensorInfo:
        return self.gguf.tensors["token_embd.weight"]

    @property
    def output_norm(self) -> TensorInfo:
        return self.gguf.tensors["output_norm.weight"]

    @property
    def output(self) -> TensorInfo:
        """The head ``[n_vocab, n_embd]``: ``output.weight`` or, when tied, the token embedding."""
        return self.gguf.tensors.get("output.weight", self.token_embd)

    def dequantize(self, tensor: TensorInfo | str) -> np.ndarray:
        return self.gguf.dequantize(tensor if isinstance(tensor, str) else tensor.name)

    def ternary_codes(self, linear: Linear) -> tuple[np.ndarray, np.ndarray, int]:
        """(codes int8[N, K], block_scales float32[N, K // block], block); ``linear.scale`` not folded in."""
        return self.gguf.ternary_codes(linear.weight.name)

    def close(self) -> None:
        self.gguf.close()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_model(path: str | os.PathLike[str], ffn_act: str | None = None) -> ModelFile:
    """Open and fully validate a BitNet model GGUF; ``ffn_act`` ('silu' | 'relu2') overrides the file."""
    f = GGUFFile(path)
    try:
        return ModelFile(f, ModelConfig.from_gguf(f, ffn_act=ffn_act))
    except BaseException:
        f.close()
        raise
