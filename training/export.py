"""Checkpoint → `bitnet` GGUF that llama.cpp and `ternary-run` load, through `ternary.formats.writer`.

    ternary-train export runs/x/ckpt-00001000.tck model.gguf --linear-type TQ2_0 --embed-type F16

Every BitLinear weight is written as W_t·γ (absmean ternary codes times the per-tensor scale, the
trainer's own `ternary_weight`), so each TQ 256-block has absmax γ and stores d = fp16(γ) with exact codes:
the per-tensor scale is folded into the block scales as llama.cpp's converter does, and no `.scale` tensors
are written. The embedding (also the tied head) and the norms stay float (F16/Q8_0/Q6_K/F32 embedding,
F32 norms). `bitnet.hidden_act` states the FFN activation; the checkpoint's tokenizer metadata goes in
unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from ternary.training import backend as host
from ternary.training.checkpoint import load_checkpoint
from ternary.training.config import ModelShape, TrainConfig
from ternary.training.model import is_hidden_matrix, param_shapes

TQ_BLOCK = 256


class ExportError(ValueError):
    """The checkpoint cannot be written as a llama.cpp `bitnet` model; the message says why."""


def _check_exportable(m: ModelShape, linear_type: str, where: str) -> None:
    unsupported = [
        ("model.qk_norm", m.qk_norm),
        ("model.attn_softcap", m.attn_softcap > 0),
        ("model.logit_softcap", m.logit_softcap > 0),
    ]
    for key, on in unsupported:
        if on:
            raise ExportError(
                f"{where}: {key} is set, but llama.cpp's `bitnet` graph has no such step; the exported "
                "file would compute different logits"
            )
    if not m.ternary:
        raise ExportError(f"{where}: model.ternary is false: a float model cannot be stored as {linear_type}")
    for key, width in (("n_embd", m.n_embd), ("n_head·head_dim", m.n_embd_q), ("n_ff", m.n_ff)):
        if width % TQ_BLOCK:
            raise ExportError(
                f"{where}: model.{key} = {width} is not a multiple of {TQ_BLOCK}, the {linear_type} block "
                "size along a weight row"
            )


def model_config(m: ModelShape) -> Any:
    """The `ternary.formats.config.ModelConfig` of a trained model (arch `bitnet`, NEOX RoPE, tied head)."""
    from ternary.formats.config import ModelConfig

    return ModelConfig(
        arch="bitnet",
        n_vocab=m.n_vocab,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_head_kv=m.n_head_kv,
        head_dim=m.head_dim,
        n_ff=m.n_ff,
        n_ctx_train=m.n_ctx_train,
        rms_eps=m.rms_eps,
        rope_base=m.rope_base,
        rope_dim=m.rope_dim,
        rope_neox=True,
        ffn_act=m.ffn_act,
        tied_head=True,
    )


def export_tensors(m: ModelShape, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensors from trained float parameters: BitLinear weights → W_t·γ, everything else as is."""
    out = {}
    for name in param_shapes(m):
        w = np.asarray(params[name], dtype=np.float32)
        out[name] = host.ternary_weight(w, m.weight_eps) if is_hidden_matrix(name) else w
    return out


def export_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    linear_type: str = "TQ2_0",
    embed_type: str = "F16",
) -> Path:
    """Write the model of checkpoint `ckpt` to the GGUF `out` (atomically); returns `out`."""
    from ternary.formats.writer import write_model

    arrays, state = load_checkpoint(ckpt)
    cfg = TrainConfig.from_dict(state["config"])
    m = cfg.model
    _check_exportable(m, linear_type, str(ckpt))
    tokenizer = state.get("tokenizer")
    if not tokenizer:
        raise ExportError(f"{ckpt}: the checkpoint carries no tokenizer metadata to embed in the GGUF")
    n_tokens = len(tokenizer.get("tokenizer.ggml.tokens", []))
    if n_tokens != m.n_vocab:
        raise ExportError(f"{ckpt}: the tokenizer has {n_tokens} tokens but model.n_vocab = {m.n_vocab}")
    params = {}
    for name in param_shapes(m):
        if f"model/{name}" not in arrays:
            raise ExportError(f"{ckpt}: tensor {name} is missing from the checkpoint")
        params[name] = arrays[f"model/{name}"]
    tensors = export_tensors(m, params)
    try:
        write_model(
            out,
            model_config(m),
            tensors,
            tokenizer,
            linear_type,
            embed_type,
            name=Path(cfg.run.out_dir).name or "ternary",
            hidden_act=True,
        )
    except ValueError as exc:
        raise ExportError(f"{ckpt} -> {out}: {exc}") from exc
    return Path(out)
