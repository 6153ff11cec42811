"""ModelConfig: the hyperparameters of a BitNet-style transformer, read from GGUF metadata.

Knows the key names of llama.cpp's ``bitnet``, the BitNet fork's ``bitnet-b1.58`` / ``bitnet-25`` and ternary
``llama`` files, and the per-architecture defaults that are not stored in the file: the FFN activation
(upstream ``bitnet`` and ``llama`` compute SiLU; the fork's arches compute relu², the real 2B4T's activation)
and the RoPE style (NEOX pairs (i, i + d/2) for the BitNet arches, adjacent pairs for ``llama``). Every value
is range-checked so absurd headers (n_embd = 2**40) fail here with a clear message instead of as a huge
allocation later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ternary.formats.errors import GGUFError

ARCHITECTURES = ("bitnet", "bitnet-b1.58", "bitnet-25", "llama")
FFN_ACTS = ("silu", "relu2")
_ACT_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "swiglu": "silu",
    "relu2": "relu2",
    "relu_sqr": "relu2",
    "relu_squared": "relu2",
    "squared_relu": "relu2",
    "relu^2": "relu2",
    "relu²": "relu2",
}
_DEFAULT_ACT = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2", "llama": "silu"}
_ROPE_NEOX = {"bitnet": True, "bitnet-b1.58": True, "bitnet-25": True, "llama": False}
# archs whose blocks carry attn_sub_norm / ffn_sub_norm (BitNet's SubLN)
SUB_NORM_ARCHS = frozenset({"bitnet", "bitnet-b1.58", "bitnet-25"})

# generous upper bounds: far above any real model, far below sizes that would exhaust memory
LIMITS = {
    "n_vocab": 1 << 22,
    "n_embd": 1 << 17,
    "n_layer": 1 << 10,
    "n_head": 1 << 10,
    "n_head_kv": 1 << 10,
    "head_dim": 1 << 12,
    "n_ff": 1 << 19,
    "n_ctx_train": 1 << 24,
    "rope_dim": 1 << 12,
}

# field -> metadata key suffix after "<arch>."
_KEYS = {
    "n_ctx_train": "context_length",
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_ff": "feed_forward_length",
    "n_head": "attention.head_count",
    "n_head_kv": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_eps": "attention.layer_norm_rms_epsilon",
    "rope_base": "rope.freq_base",
    "rope_dim": "rope.dimension_count",
    "n_vocab": "vocab_size",
}

# GGUF value type ids (see reader.py): which are integers / floats
_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_FLOAT_TYPES = frozenset({6, 12})


def normalize_ffn_act(name: str) -> str:
    """'silu' | 'relu2' from the spellings configs use ('swish', 'relu_squared', ...), else ValueError."""
    act = _ACT_ALIASES.get(str(name).strip().lower())
    if act is None:
        raise ValueError(f"unknown FFN activation {name!r} (expected one of {', '.join(FFN_ACTS)})")
    return act


def default_ffn_act(arch: str) -> str:
    """The activation an architecture computes when the file does not say: what llama.cpp / the fork run."""
    return _DEFAULT_ACT[arch]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and constants of the model. ``head_dim * n_head`` is the attention width (usually ``n_embd``)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dim: int = 0  # 0: = head_dim
    rope_neox: bool = True
    ffn_act: str = "silu"
    tied_head: bool = True

    def __post_init__(self) -> None:
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        problem = _first_problem(self)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")

    @property
    def has_sub_norms(self) -> bool:
        return self.arch in SUB_NORM_ARCHS

    @property
    def n_embd_q(self) -> int:
        """Width of the query / attention output (n_head * head_dim)."""
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        """Width of the keys and values (n_head_kv * head_dim)."""
        return self.n_head_kv * self.head_dim

    def metadata_key(self, field_name: str) -> str:
        """The GGUF key that stores a field (``"bitnet.embedding_length"`` for ``n_embd``)."""
        return f"{self.arch}.{_KEYS[field_name]}"

    @classmethod
    def from_metadata(
        cls,
        metadata: dict[str, Any],
        *,
        value_types: dict[str, int] | None = None,
        tied_head: bool = True,
        n_vocab: int | None = None,
        ffn_act: str | None = None,
        path: str = "<metadata>",
    ) -> ModelConfig:
        """Build from GGUF metadata. ``value_types`` (GGUFFile.value_types) enables strict key-type checks;
        ``n_vocab`` is the fallback when the file has neither a token list nor ``<arch>.vocab_size``;
        ``ffn_act`` overrides the file and the architecture default. Problems raise GGUFError naming the key.
        """
        return _Loader(metadata, value_types, path).config(tied_head, n_vocab, ffn_act)

    @classmethod
    def from_gguf(cls, f: Any, ffn_act: str | None = None) -> ModelConfig:
        """From an open ``GGUFFile``: the head is tied unless an ``output.weight`` tensor exists."""
        embd = f.tensors.get("token_embd.weight")
        n_vocab = embd.shape[0] if embd is not None and len(embd.shape) == 2 else None
        return cls.from_metadata(
            f.metadata,
            value_types=f.value_types,
            tied_head="output.weight" not in f.tensors,
            n_vocab=n_vocab,
            ffn_act=ffn_act,
            path=f.path,
        )


def _first_problem(c: ModelConfig) -> tuple[str, str] | None:
    """(field, problem) for the first inconsistency of a config, or None."""
    if c.arch not in ARCHITECTURES:
        return "arch", f"unsupported architecture {c.arch!r} (supported: {', '.join(ARCHITECTURES)})"
    for f in fields(c):
        value = getattr(c, f.name)
        if f.name in LIMITS:
            if isinstance(value, bool) or not isinstance(value, int):
                return f.name, f"must be an integer, got {value!r}"
            if not 1 <= value <= LIMITS[f.name]:
                return f.name, f"{value} is out of range (1 to {LIMITS[f.name]})"
    for name in ("rms_eps", "rope_base"):
        value = getattr(c, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            return name, f"must be a positive finite number, got {value!r}"
    if c.rms_eps >= 1:
        return "rms_eps", f"{c.rms_eps} is not a small epsilon"
    if c.n_head % c.n_head_kv:
        return "n_head_kv", f"n_head {c.n_head} is not a multiple of n_head_kv {c.n_head_kv}"
    if c.rope_dim > c.head_dim or c.rope_dim % 2:
        return "rope_dim", f"{c.rope_dim} must be even and at most head_dim {c.head_dim}"
    if c.ffn_act not in FFN_ACTS:
        return "ffn_act", f"{c.ffn_act!r} is not one of {', '.join(FFN_ACTS)}"
    return None


class _Loader:
    """Reads typed values out of metadata, raising GGUFError(path, key, problem)."""

    def __init__(self, md: dict[str, Any], value_types: dict[str, int] | None, path: str) -> None:
        self.md = md
        self.types = value_types
        self.path = path

    def fail(self, key: str, problem: str) -> GGUFError:
        return GGUFError(self.path, key, problem)

    def get_int(self, key: str, default: int | None = None) -> int:
        if key not in self.md:
            if default is None:
                raise self.fail(key, "required key is missing")
            return default
        value = self.md[key]
        if self.types is not None and self.types.get(key) not in _INT_TYPES:
            if isinstance(value, list):
                raise self.fail(key, "per-layer arrays are not supported, expected one integer")
            raise self.fail(key, f"must be an integer (UINT32), got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: float | None = None) -> float:
        if key not in self.md:
            if default is None:
                raise self.fail(key, "required key is missing")
            return default
        value = self.md[key]
        ok_type = self.types is None or self.types.get(key) in _FLOAT_TYPES | _INT_TYPES
        if not ok_type or isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number (FLOAT32), got {value!r}")
        return float(value)

    def get_str(self, key: str) -> str | None:
        value = self.md.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {value!r}")
        return value

    def config(self, tied_head: bool, n_vocab_fallback: int | None, ffn_act: str | None) -> ModelConfig:
        arch = self.get_str("general.architecture")
        if arch is None:
            raise self.fail("general.architecture", "required key is missing")
        if arch not in ARCHITECTURES:
            raise self.fail(
                "general.architecture",
                f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})",
            )
        p = arch + "."
        values: dict[str, Any] = {"arch": arch, "tied_head": tied_head, "rope_neox": _ROPE_NEOX[arch]}
        for name in ("n_ctx_train", "n_embd", "n_layer", "n_ff", "n_head"):
            values[name] = self._bounded(name, p + _KEYS[name], None)
        values["n_head_kv"] = self._bounded("n_head_kv", p + _KEYS["n_head_kv"], values["n_head"])
        if values["n_embd"] % values["n_head"] and p + _KEYS["head_dim"] not in self.md:
            raise self.fail(
                p + _KEYS["n_head"], f"n_embd {values['n_embd']} is not a multiple of {values['n_head']}"
            )
        head_dim = self._bounded("head_dim", p + _KEYS["head_dim"], values["n_embd"] // values["n_head"])
        value_dim = self._bounded("head_dim", p + "attention.value_length", head_dim)
        if value_dim != head_dim:
            raise self.fail(
                p + "attention.value_length", f"{value_dim} != key_length {head_dim} (unsupported)"
            )
        values["head_dim"] = head_dim
        values["rope_dim"] = self._bounded("rope_dim", p + _KEYS["rope_dim"], head_dim)
        values["rms_eps"] = self.get_float(p + _KEYS["rms_eps"])
        values["rope_base"] = self.get_float(p + _KEYS["rope_base"], 10000.0)
        values["n_vocab"] = self._n_vocab(p, n_vocab_fallback)
        values["ffn_act"] = self._ffn_act(arch, ffn_act)
        try:
            return ModelConfig(**values)
        except ValueError as e:
            field_name, _, problem = str(e).partition(": ")
            key = p + _KEYS[field_name] if field_name in _KEYS else field_name
            raise self.fail(key, problem) from None

    def _bounded(self, name: str, key: str, default: int | None) -> int:
        value = self.get_int(key, default)
        if not 1 <= value <= LIMITS[name]:
            raise self.fail(key, f"{value} is out of range (1 to {LIMITS[name]})")
        return value

    def _n_vocab(self, p: str, fallback: int | None) -> int:
        tokens = self.md.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and tokens:
            return len(tokens)
        if p + _KEYS["n_vocab"] in self.md:
            return self._bounded("n_vocab", p + _KEYS["n_vocab"], None)
        if fallback is None:
            raise self.fail("tokenizer.ggml.tokens", "no token list and no vocab_size: cannot tell n_vocab")
        return fallback

    def _ffn_act(self, arch: str, override: str | None) -> str:
        if override is not None:
            try:
                return normalize_ffn_act(override)
            except ValueError as e:
                raise self.fail("ffn_act", str(e)) from None
        for key in (f"{arch}.hidden_act", f"{arch}.hidden_activation"):
            name = self.get_str(key)
            if name is not None:
                try:
                    return normalize_ffn_act(name)
                except ValueError as e:
                    raise self.fail(key, str(e)) from None
        return _DEFAULT_ACT[arch]
