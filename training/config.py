"""TrainConfig: everything one training run needs, read from TOML/JSON files or named presets.

The model section uses the same field names as `ternary.formats.config.ModelConfig` (n_embd, n_head_kv,
n_ff, rms_eps, rope_base, ffn_act, ...) so a trained model exports without renaming anything. Unknown sections
or keys are errors that name the offending key: a typo in a config must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent / "presets"

FFN_ACTS = ("silu", "relu2")
OPTIMIZERS = ("adamw", "muon")
AUX_OPTIMIZERS = ("adamw", "lion")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


class ConfigError(ValueError):
    """A training configuration is malformed; the message names the key."""


@dataclass(frozen=True)
class ModelShape:
    """The transformer: BitNet b1.58 graph of spec §4 plus training-only switches."""

    n_vocab: int = 0  # 0: the training data's tokenizer vocabulary
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 0  # 0: n_head
    head_dim: int = 0  # 0: n_embd // n_head
    n_ff: int = 512
    n_ctx_train: int = 256
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_dim: int = 0  # 0: head_dim
    ffn_act: str = "silu"
    ternary: bool = True  # False: float reference run (no weight/activation quantization)
    weight_eps: float = 1e-5  # γ = mean|W| + weight_eps
    qk_norm: bool = False
    attn_softcap: float = 0.0  # 0: off
    logit_softcap: float = 0.0  # 0: off
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_head_kv == 0:
            object.__setattr__(self, "n_head_kv", self.n_head)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // max(self.n_head, 1))
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.n_vocab < 0:
            raise ConfigError(
                f"model.n_vocab: must be positive (or 0: from the tokenizer), got {self.n_vocab}"
            )
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "n_ctx_train"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"model.n_head_kv: {self.n_head_kv} does not divide n_head {self.n_head}")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ConfigError(
                f"model.rope_dim: must be even and ≤ head_dim {self.head_dim}, got {self.rope_dim}"
            )
        if self.ffn_act not in FFN_ACTS:
            raise ConfigError(f"model.ffn_act: {self.ffn_act!r} is not one of {', '.join(FFN_ACTS)}")
        if self.rms_eps <= 0 or self.weight_eps <= 0:
            raise ConfigError("model.rms_eps and model.weight_eps must be positive")

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass(frozen=True)
class OptimConfig:
    """AdamW for everything, or Muon for 2-D hidden weights with AdamW/Lion for embeddings and norms."""

    name: str = "adamw"
    lr: float = 3e-3  # AdamW/Lion peak learning rate
    muon_lr: float = 0.02  # Muon peak learning rate (when name = "muon")
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to 2-D weights only, never to norms
    muon_momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    aux_optimizer: str = "adamw"  # for the non-Muon parameters: "adamw" or "lion"
    lion_beta1: float = 0.9
    lion_beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm; 0: off

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name: {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.aux_optimizer not in AUX_OPTIMIZERS:
            raise ConfigError(
                f"optim.aux_optimizer: {self.aux_optimizer!r} is not one of {', '.join(AUX_OPTIMIZERS)}"
            )
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ConfigError("optim.lr and optim.muon_lr must be positive")


@dataclass(frozen=True)
class ScheduleConfig:
    """Warmup-stable-decay: linear warmup, constant peak, then a decay over the last `decay_frac` of steps."""

    steps: int = 1000
    warmup_steps: int = 50
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"schedule.steps: must be positive, got {self.steps}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"schedule.warmup_steps: {self.warmup_steps} is not in [0, schedule.steps = {self.steps}]"
            )
        if not 0 <= self.decay_frac <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("schedule.decay_frac and schedule.min_lr_ratio must be in [0, 1]")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(
                f"schedule.decay_shape: {self.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from: a corpus folder (corpus.py shards) or text files tokenized byte-level."""

    path: str = ""
    tokenizer: str = "bytes"  # "bytes" (256 byte tokens + <|endoftext|>) or a .gguf whose tokenizer to use
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name}: must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class RunConfig:
    """The loop: output, logging, checkpoints, loss extras and health warnings."""

    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 3
    entropy_weight: float = 0.0  # λ in loss = CE − λ·H
    entropy_warn: float = 0.1  # warn when mean entropy (nats) falls below this
    logit_warn: float = 1000.0  # warn when max |logit| exceeds this

    def __post_init__(self) -> None:
        if self.log_every <= 0 or self.ckpt_every <= 0 or self.keep_last <= 0:
            raise ConfigError("run.log_every, run.ckpt_every and run.keep_last must be positive")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: loss += weight · T² · KL(teacher ‖ student) at temperature T."""

    teacher: str = (
        ""  # "": off; a .gguf path (ternary.Engine); or an http(s) URL of an OpenAI-compatible server
    )
    weight: float = 0.5
    temperature: float = 1.0
    top_k: int = 0  # 0: the teacher's full distribution (Engine only); k: its top-k logprobs
    model: str = ""  # the "model" field sent to a server

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.weight < 0 or self.top_k < 0:
            raise ConfigError("distill.temperature must be positive, distill.weight and distill.top_k ≥ 0")


SECTIONS: dict[str, type] = {
    "model": ModelShape,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "run": RunConfig,
    "distill": DistillConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelShape = field(default_factory=ModelShape)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(SECTIONS)}")
        return cls(**{name: _section(name, kind, d.get(name, {})) for name, kind in SECTIONS.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted-key overrides applied, e.g. {"model.n_layer": 4, "run.out_dir": "x"}."""
        d = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                raise ConfigError(
                    f"override {key!r}: expected 'section.key' with section in {sorted(SECTIONS)}"
                )
            d[section][name] = value
        return TrainConfig.from_dict(d)


def _section(name: str, kind: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section [{name}] must be a table, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {sorted(unknown)}; known keys: {sorted(fields)}")
    defaults = kind()
    coerced = {key: _coerce(f"{name}.{key}", getattr(defaults, key), value) for key, value in values.items()}
    return kind(**coerced)


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check a value against its default's type; ints are accepted where floats are expected."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")


def load_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a .toml or .json file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> TrainConfig:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names()) or 'none'}")
    return load_config(path)
