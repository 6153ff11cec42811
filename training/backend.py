"""The trainer's compute boundary: every array operation the model, loss and optimizers perform.

This module is the NumPy (CPU) implementation. The CUDA backend (`ternary.training.cuda_ops`) is a
second implementation of exactly the functions named in `OPS`, with the same signatures and meanings, over
its own device arrays. `layers.py`, `model.py`, `optim.py` and `distill.py` touch arrays only through a
backend module (called `xp` there), so `load("cuda")` swaps the whole computation without touching the
model code.

Conventions every implementation follows:
- Arrays keep the dtype they come in with (float32 for training; float64 in gradient-check tests).
- Shapes: token rows are flattened to `[N, features]` (N = batch * seq); attention works on
  `[B, H, T, head_dim]`.
- Functions ending in `_` update their first argument in place and return None.
- Functions returning Python floats (`sum_squares`, `max_abs`, the loss sums) are the only device-to-host
  syncs.
- `aux` values returned by a forward are opaque: only the matching backward reads them (a flash-attention
  kernel may keep log-sum-exp rows there instead of the probability matrix).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

# The op set. A backend module must define every one of these names.
OPS = (
    # memory
    "asarray",
    "to_host",
    "zeros_like",
    # linear algebra, elementwise, reductions
    "matmul",
    "add",
    "add_",
    "scale_",
    "sum_squares",
    "max_abs",
    # fused layer kernels (forward, backward)
    "embedding",
    "embedding_backward",
    "rmsnorm",
    "rmsnorm_backward",
    "ternary_weight",
    "quantize_activations",
    "split_heads",
    "merge_heads",
    "rope",
    "attention",
    "attention_backward",
    "glu",
    "glu_backward",
    "softcap",
    "softcap_backward",
    # losses (forward and gradient in one pass)
    "cross_entropy",
    "kl_to_teacher",
    # optimizer updates
    "adamw_",
    "lion_",
    "newton_schulz5",
    "muon_",
)

DEVICES = ("cpu", "cuda")

Array = np.ndarray


BACKEND_MODULES = {"cpu": __name__, "cuda": "ternary.training.cuda_ops"}


class BackendError(RuntimeError):
    """The requested compute backend is unknown, cannot be loaded, or does not implement the op set."""


def load(device: str) -> ModuleType:
    """The backend module for `device` ('cpu' or 'cuda'), checked to implement every op in `OPS`."""
    if device not in BACKEND_MODULES:
        raise BackendError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")
    try:
        module = importlib.import_module(BACKEND_MODULES[device])
    except ImportError as exc:
        raise BackendError(
            f"device {device!r}: the backend {BACKEND_MODULES[device]} cannot be imported: {exc}"
        ) from exc
    missing = [name for name in OPS if not callable(getattr(module, name, None))]
    if missing:
        raise BackendError(f"device {device!r}: backend {module.__name__} lacks ops: {', '.join(missing)}")
    return module


# --------------------------------------------------------------------------------------------------- memory


def asarray(a: Any, dtype: Any = None) -> Array:
    """A backend-owned, C-contiguous copy of host data."""
    return np.array(a, dtype=dtype, order="C", copy=True)


def to_host(a: Array) -> np.ndarray:
    """A host NumPy copy of a backend array."""
    return np.array(a, copy=True)


def zeros_like(a: Array) -> Array:
    return np.zeros_like(a)


# ------------------------------------------------------------- linear algebra, elementwise, reductions


def matmul(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """op(a) @ op(b) for 2-D arrays, op = transpose when the flag is set (BLAS GEMM)."""
    return np.matmul(a.T if trans_a else a, b.T if trans_b else b)


def add(a: Array, b: Array) -> Array:
    return a + b


def add_(a: Array, b: Array) -> None:
    """a += b (gradient accumulation)."""
    a += b


def scale_(a: Array, s: float) -> None:
    a *= a.dtype.type(s)


def sum_squares(a: Array) -> float:
    """Σ a² accumulated in float64 (for the global gradient norm)."""
    flat = a.reshape(-1).astype(np.float64, copy=False)
    return float(np.dot(flat, flat))


def max_abs(a: Array) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


# ------------------------------------------------------------------------------------------- layer kernels


def embedding(table: Array, ids: Array) -> Array:
    """Rows of `table` [V, D] for int `ids` [N] -> [N, D]."""
    return table[ids]


def embedding_backward(dy: Array, ids: Array, n_rows: int) -> Array:
    """Scatter-add of row gradients dy [N, D] into a zero [n_rows, D] table gradient."""
    grad = np.zeros((n_rows, dy.shape[1]), dtype=dy.dtype)
    np.add.at(grad, ids, dy)
    return grad


def rmsnorm(x: Array, w: Array, eps: float) -> tuple[Array, Array]:
    """y = x / sqrt(mean(x², last axis) + eps) * w; returns (y, rstd) with rstd shaped [..., 1]."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + x.dtype.type(eps))
    return x * rstd * w, rstd


def rmsnorm_backward(dy: Array, x: Array, w: Array, rstd: Array) -> tuple[Array, Array]:
    """(dx, dw) of `rmsnorm`; dw sums over every leading axis."""
    xhat = x * rstd
    dw = np.sum((dy * xhat).reshape(-1, x.shape[-1]), axis=0)
    dxhat = dy * w
    dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dw


def ternary_weight(w: Array, eps: float) -> Array:
    """BitNet b1.58 absmean weights: γ = mean|W| + eps, W_t = clip(round(W/γ), -1, 1); returns W_t·γ."""
    gamma = np.mean(np.abs(w), dtype=np.float64) + eps
    codes = np.clip(np.round(w / w.dtype.type(gamma)), -1, 1)
    return codes * w.dtype.type(gamma)


def quantize_activations(x: Array) -> Array:
    """Per-token absmax int8 fake quantization: s = 127/max|x|, clip(round(x·s), -128, 127) / s.

    A row of zeros stays zero. Rounding is half-to-even (NumPy's, and torch.round's)."""
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = np.where(amax > 0, x.dtype.type(127.0) / np.where(amax > 0, amax, 1), 0).astype(x.dtype)
    inv = np.where(amax > 0, amax / x.dtype.type(127.0), 0).astype(x.dtype)
    return np.clip(np.round(x * scale), -128, 127) * inv


def split_heads(x: Array, batch: int, n_head: int) -> Array:
    """[B*T, H*hd] -> [B, H, T, hd] (contiguous)."""
    n, width = x.shape
    seq = n // batch
    return np.ascontiguousarray(x.reshape(batch, seq, n_head, width // n_head).transpose(0, 2, 1, 3))


def merge_heads(x: Array) -> Array:
    """[B, H, T, hd] -> [B*T, H*hd] (contiguous); the inverse of `split_heads`."""
    b, h, t, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b * t, h * d))


def rope(x: Array, cos: Array, sin: Array, inverse: bool = False) -> Array:
    """NEOX rotary embedding on the first 2·cos.shape[1] dims of each head; x [B, H, T, hd], cos/sin [T, r/2].

    Pairs (i, i + r/2) rotate by angle θ_i(pos):
    y_i = x_i cos − x_{i+r/2} sin, y_{i+r/2} = x_i sin + x_{i+r/2} cos.
    `inverse=True` rotates by −θ, which is also the backward pass (the rotation is orthogonal)."""
    half = cos.shape[1]
    x1 = x[..., :half]
    x2 = x[..., half : 2 * half]
    s = -sin if inverse else sin
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * s
    out[..., half : 2 * half] = x1 * s + x2 * cos
    return out


def _group(q: Array, n_head_kv: int) -> Array:
    """[B, Hq, T, d] -> [B, Hkv, g, T, d]: query head h reads kv head h // g."""
    b, h, t, d = q.shape
    return q.reshape(b, n_head_kv, h // n_head_kv, t, d)


def _causal_mask(t: int) -> Array:
    return np.triu(np.ones((t, t), dtype=bool), k=1)


def attention(q: Array, k: Array, v: Array, scale: float, softcap: float) -> tuple[Array, Any]:
    """Causal GQA attention: softmax(cap(q k^T · scale) + causal) v; q [B, Hq, T, d], k/v [B, Hkv, T, d].

    cap(s) = softcap · tanh(s / softcap) when softcap > 0.
    Returns (out [B, Hq, T, d], aux for the backward)."""
    n_kv = k.shape[1]
    qg = _group(q, n_kv)
    kg = k[:, :, None]
    scores = np.matmul(qg, np.swapaxes(kg, -1, -2)) * q.dtype.type(scale)
    capped = None
    if softcap > 0:
        capped = np.tanh(scores / q.dtype.type(softcap))
        scores = capped * q.dtype.type(softcap)
    scores[..., _causal_mask(q.shape[2])] = -np.inf
    scores -= np.max(scores, axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= np.sum(probs, axis=-1, keepdims=True)
    out = np.matmul(probs, v[:, :, None])
    return out.reshape(q.shape), (probs, capped)


def attention_backward(
    dout: Array, q: Array, k: Array, v: Array, aux: Any, scale: float, softcap: float
) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) of `attention`."""
    probs, capped = aux
    n_kv = k.shape[1]
    dog = _group(dout, n_kv)
    dv = np.sum(np.matmul(np.swapaxes(probs, -1, -2), dog), axis=2)
    dprobs = np.matmul(dog, np.swapaxes(v[:, :, None], -1, -2))
    dscores = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True))
    if capped is not None:
        dscores *= 1 - capped * capped
    dscores *= q.dtype.type(scale)
    dq = np.matmul(dscores, k[:, :, None]).reshape(q.shape)
    dk = np.sum(np.matmul(np.swapaxes(dscores, -1, -2), _group(q, n_kv)), axis=2)
    return dq, dk, dv


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def glu(g: Array, u: Array, act: str) -> Array:
    """Gated FFN activation: silu(g)·u or relu(g)²·u."""
    if act == "silu":
        return g * _sigmoid(g) * u
    if act == "relu2":
        r = np.maximum(g, 0)
        return r * r * u
    raise ValueError(f"unknown ffn activation {act!r}: expected 'silu' or 'relu2'")


def glu_backward(dh: Array, g: Array, u: Array, act: str) -> tuple[Array, Array]:
    """(dg, du) of `glu`."""
    if act == "silu":
        sig = _sigmoid(g)
        silu = g * sig
        return dh * u * (sig + silu * (1 - sig)), dh * silu
    if act == "relu2":
        r = np.maximum(g, 0)
        return 2 * dh * u * r, dh * r * r
    raise ValueError(f"unknown ffn activation {act!r}: expected 'silu' or 'relu2'")


def softcap(x: Array, cap: float) -> Array:
    """cap · tanh(x / cap)."""
    return x.dtype.type(cap) * np.tanh(x / x.dtype.type(cap))


def softcap_backward(dy: Array, y: Array, cap: float) -> Array:
    """dx of `softcap` given its output y: dy · (1 − (y/cap)²)."""
    t = y / y.dtype.type(cap)
    return dy * (1 - t * t)


# ------------------------------------------------------------------------------------------------- losses


def _log_softmax(z: Array) -> Array:
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def cross_entropy(
    logits: Array, targets: Array, entropy_weight: float, grad_scale: float
) -> tuple[float, float, Array]:
    """Σ CE and Σ entropy over rows whose target ≥ 0, and d(grad_scale · Σ (CE − λ·H))/d logits.

    logits [N, V], targets int [N] (−1 = ignore). H is the entropy of softmax(logits) in nats."""
    logp = _log_softmax(logits)
    p = np.exp(logp)
    valid = targets >= 0
    rows = np.nonzero(valid)[0]
    ce = -logp[rows, targets[rows]]
    ent = -np.sum(p * logp, axis=-1)
    grad = p.copy()
    grad[rows, targets[rows]] -= 1
    if entropy_weight:
        grad += logits.dtype.type(entropy_weight) * p * (logp + ent[:, None])
    grad[~valid] = 0
    grad *= logits.dtype.type(grad_scale)
    return float(np.sum(ce, dtype=np.float64)), float(np.sum(ent[valid], dtype=np.float64)), grad


def kl_to_teacher(
    logits: Array, teacher_ids: Array, teacher_probs: Array, temperature: float, grad_scale: float
) -> tuple[float, Array]:
    """Σ_rows KL(p_t ‖ softmax(logits/T)) over the teacher's support, and d(grad_scale · T² · Σ KL)/d logits.

    teacher_ids int [N, k] and teacher_probs [N, k] (rows sum to 1, or to 0 for rows to skip) describe the
    teacher's distribution at temperature T; with k = V this is the full distribution. The student is never
    renormalised to the top-k set: mass it puts elsewhere is penalised through log p_s."""
    t = logits.dtype.type(temperature)
    logq = _log_softmax(logits / t)
    rows = np.arange(logits.shape[0])[:, None]
    pt = teacher_probs.astype(logits.dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(pt > 0, pt * np.log(np.where(pt > 0, pt, 1)), 0)
    kl = np.sum(plogp - pt * logq[rows, teacher_ids], dtype=np.float64)
    mass = np.sum(pt, axis=-1, keepdims=True)
    grad = np.exp(logq) * mass
    np.add.at(grad, (np.broadcast_to(rows, teacher_ids.shape), teacher_ids), -pt)
    grad *= logits.dtype.type(grad_scale * temperature)
    return float(kl) * temperature * temperature, grad


# -------------------------------------------------------------------------------------------- optimizers


def adamw_(
    p: Array,
    g: Array,
    m: Array,
    v: Array,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One AdamW step (decoupled decay, bias-corrected moments); `step` counts from 1."""
    dt = p.dtype.type
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * g * g
    m_hat = m / dt(1 - beta1**step)
    v_hat = v / dt(1 - beta2**step)
    p *= dt(1 - lr * weight_decay)
    p -= dt(lr) * m_hat / (np.sqrt(v_hat) + dt(eps))


def lion_(p: Array, g: Array, m: Array, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step: p -= lr·(sign(β1·m + (1−β1)·g) + wd·p); m = β2·m + (1−β2)·g."""
    dt = p.dtype.type
    direction = np.sign(dt(beta1) * m + dt(1 - beta1) * g)
    p *= dt(1 - lr * weight_decay)
    p -= dt(lr) * direction
    m *= dt(beta2)
    m += dt(1 - beta2) * g


NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(g: Array, steps: int) -> Array:
    """Approximate orthogonalisation U·V^T of g = U·S·V^T by the quintic Newton–Schulz iteration (Muon).

    X ← X/‖X‖_F, then `steps` times X ← aX + (bA + cA²)X with A = XX^T, on the wide orientation."""
    a, b, c = NS5_COEFFS
    x = g.astype(g.dtype, copy=True)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x /= np.sqrt(np.sum(x * x)) + 1e-7
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return np.ascontiguousarray(x.T if tall else x).astype(g.dtype, copy=False)


def muon_(
    p: Array,
    g: Array,
    buf: Array,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    ns_steps: int,
) -> None:
    """One Muon step for a 2-D weight: buf = μ·buf + g; d = g + μ·buf (Nesterov) or buf;
    p -= lr·(NS5(d)·sqrt(max(1, rows/cols)) + wd·p)."""
    dt = p.dtype.type
    buf *= dt(momentum)
    buf += g
    direction = g + dt(momentum) * buf if nesterov else buf
    update = newton_schulz5(direction, ns_steps)
    update *= dt(max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
    p *= dt(1 - lr * weight_decay)
    p -= dt(lr) * update
