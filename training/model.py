"""The BitNet b1.58 transformer for training: parameters under GGUF tensor names, hand-written backward.

The graph is the one llama.cpp runs for arch `bitnet` (spec §4), so a trained model exports as is:
embedding → per layer [attn_norm → q/k/v BitLinear → (QK-norm) → RoPE NEOX → causal GQA attention →
attn_sub_norm → o BitLinear → residual; ffn_norm → gate/up BitLinear → silu|relu² gate → ffn_sub_norm →
down BitLinear → residual] → output_norm → tied head (token_embd) → (logit soft-cap).
Weights are stored numpy-shaped [out, in]. QK-norm and the soft-caps are training options that
llama.cpp's `bitnet` graph does not have (export refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from ternary.training import layers
from ternary.training.config import ModelShape

Array = Any
Params = dict[str, Array]

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def param_shapes(cfg: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every trainable tensor's GGUF name and numpy shape, in a fixed order."""
    d, q, kv, ff = cfg.n_embd, cfg.n_embd_q, cfg.n_embd_kv, cfg.n_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.n_vocab, d)}
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        shapes[b + "attn_norm.weight"] = (d,)
        shapes[b + "attn_q.weight"] = (q, d)
        shapes[b + "attn_k.weight"] = (kv, d)
        shapes[b + "attn_v.weight"] = (kv, d)
        if cfg.qk_norm:
            shapes[b + "attn_q_norm.weight"] = (cfg.head_dim,)
            shapes[b + "attn_k_norm.weight"] = (cfg.head_dim,)
        shapes[b + "attn_sub_norm.weight"] = (q,)
        shapes[b + "attn_output.weight"] = (d, q)
        shapes[b + "ffn_norm.weight"] = (d,)
        shapes[b + "ffn_gate.weight"] = (ff, d)
        shapes[b + "ffn_up.weight"] = (ff, d)
        shapes[b + "ffn_sub_norm.weight"] = (ff,)
        shapes[b + "ffn_down.weight"] = (d, ff)
    shapes["output_norm.weight"] = (d,)
    return shapes


def is_hidden_matrix(name: str) -> bool:
    """2-D weights inside the blocks (the BitLinear ones): Muon's parameters."""
    return name.startswith("blk.") and any(name.endswith(f".{lin}.weight") for lin in LINEARS)


def init_params(cfg: ModelShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Host float32 parameters: N(0, init_std) matrices (output projections scaled by 1/sqrt(2·n_layer)),
    unit norm weights."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if len(shape) == 1:
            params[name] = np.ones(shape, dtype=np.float32)
            continue
        std = cfg.init_std
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            std /= (2 * cfg.n_layer) ** 0.5
        params[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
    return params


@dataclass
class LossStats:
    """Sums over the valid (target ≥ 0) tokens of one micro-batch; divide by `n_tokens` for means."""

    ce_sum: float
    entropy_sum: float
    kl_sum: float
    n_tokens: int
    max_abs_logit: float


class Transformer:
    """Forward/backward of the whole model over a backend `xp`; parameters are passed in, not owned."""

    def __init__(self, cfg: ModelShape, xp: ModuleType):
        self.cfg = cfg
        self.xp = xp
        cos, sin = layers.rope_tables(cfg.n_ctx_train, cfg.rope_dim, cfg.rope_base)
        self._rope_host = (cos, sin)
        self._rope: dict[Any, tuple[Array, Array]] = {}

    def _rope_for(self, seq: int, dtype: Any) -> tuple[Array, Array]:
        key = (seq, np.dtype(dtype).str)
        if key not in self._rope:
            cos, sin = self._rope_host
            if seq > cos.shape[0]:
                raise ValueError(f"sequence length {seq} exceeds model.n_ctx_train {cos.shape[0]}")
            self._rope[key] = (self.xp.asarray(cos[:seq], dtype), self.xp.asarray(sin[:seq], dtype))
        return self._rope[key]

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, params: Params, ids: np.ndarray) -> tuple[Array, list]:
        """Logits [B·T, n_vocab] for host int token ids [B, T], and the cache `backward` needs."""
        xp, cfg = self.xp, self.cfg
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [batch, seq], got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.n_vocab):
            raise ValueError(f"token ids must be in [0, {cfg.n_vocab}), got range [{ids.min()}, {ids.max()}]")
        batch, seq = ids.shape
        embd = params["token_embd.weight"]
        cos, sin = self._rope_for(seq, embd.dtype)
        flat_ids = xp.asarray(ids.reshape(-1), np.int64)
        x = xp.embedding(embd, flat_ids)
        caches: list = [(flat_ids, seq)]
        for i in range(cfg.n_layer):
            x, c = self._block_forward(params, f"blk.{i}.", x, batch, cos, sin)
            caches.append(c)
        h, c_norm = layers.rmsnorm_forward(xp, x, params["output_norm.weight"], cfg.rms_eps)
        logits = xp.matmul(h, embd, trans_b=True)
        logits, c_cap = layers.softcap_forward(xp, logits, cfg.logit_softcap)
        caches.append((h, c_norm, c_cap))
        return logits, caches

    def _block_forward(
        self, p: Params, b: str, x: Array, batch: int, cos: Array, sin: Array
    ) -> tuple[Array, tuple]:
        xp, cfg = self.xp, self.cfg
        h, c_an = layers.rmsnorm_forward(xp, x, p[b + "attn_norm.weight"], cfg.rms_eps)
        (q, k, v), c_qkv = layers.bitlinear_forward(
            xp,
            h,
            [p[b + "attn_q.weight"], p[b + "attn_k.weight"], p[b + "attn_v.weight"]],
            cfg.ternary,
            cfg.weight_eps,
        )
        q = xp.split_heads(q, batch, cfg.n_head)
        k = xp.split_heads(k, batch, cfg.n_head_kv)
        v = xp.split_heads(v, batch, cfg.n_head_kv)
        c_qn = c_kn = None
        if cfg.qk_norm:
            q, c_qn = layers.rmsnorm_forward(xp, q, p[b + "attn_q_norm.weight"], cfg.rms_eps)
            k, c_kn = layers.rmsnorm_forward(xp, k, p[b + "attn_k_norm.weight"], cfg.rms_eps)
        q = layers.rope_forward(xp, q, cos, sin)
        k = layers.rope_forward(xp, k, cos, sin)
        a, c_att = layers.attention_forward(xp, q, k, v, cfg.attn_softcap)
        a, c_sn = layers.rmsnorm_forward(xp, xp.merge_heads(a), p[b + "attn_sub_norm.weight"], cfg.rms_eps)
        (o,), c_o = layers.bitlinear_forward(
            xp, a, [p[b + "attn_output.weight"]], cfg.ternary, cfg.weight_eps
        )
        x = xp.add(x, o)
        h, c_fn = layers.rmsnorm_forward(xp, x, p[b + "ffn_norm.weight"], cfg.rms_eps)
        (g, u), c_gu = layers.bitlinear_forward(
            xp, h, [p[b + "ffn_gate.weight"], p[b + "ffn_up.weight"]], cfg.ternary, cfg.weight_eps
        )
        f, c_glu = layers.glu_forward(xp, g, u, cfg.ffn_act)
        f, c_fsn = layers.rmsnorm_forward(xp, f, p[b + "ffn_sub_norm.weight"], cfg.rms_eps)
        (dn,), c_d = layers.bitlinear_forward(xp, f, [p[b + "ffn_down.weight"]], cfg.ternary, cfg.weight_eps)
        x = xp.add(x, dn)
        return x, (batch, c_an, c_qkv, c_qn, c_kn, c_att, c_sn, c_o, c_fn, c_gu, c_glu, c_fsn, c_d)

    # ------------------------------------------------------------------------------------------ backward

    def backward(self, params: Params, caches: list, dlogits: Array) -> Params:
        """Gradients of every parameter given d(loss)/d(logits) [B·T, n_vocab]."""
        xp, cfg = self.xp, self.cfg
        embd = params["token_embd.weight"]
        flat_ids, seq = caches[0]
        cos, sin = self._rope_for(seq, embd.dtype)
        grads: Params = {}
        h, c_norm, c_cap = caches[-1]
        dz = layers.softcap_backward(xp, dlogits, c_cap)
        d_embd = xp.matmul(dz, h, trans_a=True)
        dh = xp.matmul(dz, embd)
        dx, grads["output_norm.weight"] = layers.rmsnorm_backward(xp, dh, c_norm)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(f"blk.{i}.", dx, caches[1 + i], cos, sin, grads)
        xp.add_(d_embd, xp.embedding_backward(dx, flat_ids, cfg.n_vocab))
        grads["token_embd.weight"] = d_embd
        return {name: grads[name] for name in param_shapes(cfg)}

    def _block_backward(
        self, b: str, dx: Array, cache: tuple, cos: Array, sin: Array, grads: Params
    ) -> Array:
        xp, cfg = self.xp, self.cfg
        batch, c_an, c_qkv, c_qn, c_kn, c_att, c_sn, c_o, c_fn, c_gu, c_glu, c_fsn, c_d = cache
        # FFN half: x_out = x_mid + down(subnorm(glu(gate(h), up(h)))), h = ffn_norm(x_mid)
        df, (grads[b + "ffn_down.weight"],) = layers.bitlinear_backward(xp, [dx], c_d)
        df, grads[b + "ffn_sub_norm.weight"] = layers.rmsnorm_backward(xp, df, c_fsn)
        dg, du = layers.glu_backward(xp, df, c_glu)
        dh, (grads[b + "ffn_gate.weight"], grads[b + "ffn_up.weight"]) = layers.bitlinear_backward(
            xp, [dg, du], c_gu
        )
        dh, grads[b + "ffn_norm.weight"] = layers.rmsnorm_backward(xp, dh, c_fn)
        dx = xp.add(dx, dh)
        # attention half: x_mid = x_in + o(subnorm(attn(rope(q), rope(k), v)))
        da, (grads[b + "attn_output.weight"],) = layers.bitlinear_backward(xp, [dx], c_o)
        da, grads[b + "attn_sub_norm.weight"] = layers.rmsnorm_backward(xp, da, c_sn)
        da = xp.split_heads(da, batch, cfg.n_head)
        dq, dk, dv = layers.attention_backward(xp, da, c_att)
        dq = layers.rope_backward(xp, dq, cos, sin)
        dk = layers.rope_backward(xp, dk, cos, sin)
        if cfg.qk_norm:
            dq, grads[b + "attn_q_norm.weight"] = layers.rmsnorm_backward(xp, dq, c_qn)
            dk, grads[b + "attn_k_norm.weight"] = layers.rmsnorm_backward(xp, dk, c_kn)
        dh, (grads[b + "attn_q.weight"], grads[b + "attn_k.weight"], grads[b + "attn_v.weight"]) = (
            layers.bitlinear_backward(xp, [xp.merge_heads(dq), xp.merge_heads(dk), xp.merge_heads(dv)], c_qkv)
        )
        dh, grads[b + "attn_norm.weight"] = layers.rmsnorm_backward(xp, dh, c_an)
        return xp.add(dx, dh)

    # ---------------------------------------------------------------------------------------------- loss

    def loss_and_grads(
        self,
        params: Params,
        ids: np.ndarray,
        targets: np.ndarray,
        grad_scale: float,
        entropy_weight: float = 0.0,
        teacher: tuple[np.ndarray, np.ndarray] | None = None,
        distill_weight: float = 0.0,
        temperature: float = 1.0,
    ) -> tuple[LossStats, Params]:
        """One micro-batch: the gradient of grad_scale · Σ_tokens (CE − λ·H + α·T²·KL) and the loss sums.

        targets [B, T] (−1 = ignore); teacher = (ids [B·T, k], probs [B·T, k]) at temperature T, or None."""
        xp = self.xp
        logits, caches = self.forward(params, ids)
        flat_targets = np.asarray(targets).reshape(-1)
        ce, ent, dlogits = xp.cross_entropy(
            logits, xp.asarray(flat_targets, np.int64), entropy_weight, grad_scale
        )
        kl = 0.0
        if teacher is not None and distill_weight > 0:
            t_ids, t_probs = teacher
            kl, dkl = xp.kl_to_teacher(
                logits,
                xp.asarray(t_ids, np.int64),
                xp.asarray(t_probs, logits.dtype),
                temperature,
                grad_scale * distill_weight,
            )
            xp.add_(dlogits, dkl)
        stats = LossStats(ce, ent, kl, int(np.sum(flat_targets >= 0)), xp.max_abs(logits))
        return stats, self.backward(params, caches, dlogits)

    def logits(self, params: Params, ids: np.ndarray) -> np.ndarray:
        """Host logits [B, T, n_vocab] (evaluation and export checks)."""
        ids = np.asarray(ids)
        logits, _ = self.forward(params, ids)
        return self.xp.to_host(logits).reshape(*ids.shape, self.cfg.n_vocab)
