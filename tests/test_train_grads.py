"""Hand-written backward passes of the trainer against float64 central finite differences.

Every layer type is checked on tiny float64 inputs: BitLinear (float mode, and in ternary mode through its
straight-through definition), RMSNorm, RoPE, GQA attention (with and without soft-capping), the silu and relu²
gated FFN, soft-capping, cross-entropy with the entropy term, the distillation KL, and the whole model.
Forward passes are also checked against independent formulations (exact integer products, complex rotation,
naive loops).
"""

from __future__ import annotations

import numpy as np
import pytest
from ternary.training import backend as xp
from ternary.training import layers
from ternary.training.config import ModelShape
from ternary.training.model import Transformer, init_params, param_shapes

RNG = np.random.default_rng(1234)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f() in every entry of x (x is modified in place, then restored)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def assert_grad_close(analytic: np.ndarray, numeric: np.ndarray, rtol: float = 1e-6) -> None:
    scale = max(np.max(np.abs(numeric)), 1e-8)
    err = np.max(np.abs(analytic - numeric)) / scale
    assert err < rtol, f"relative gradient error {err:.3e}"


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


# ------------------------------------------------------------------------------------------------ BitLinear


def test_bitlinear_float_mode_gradients():
    x, w1, w2 = randn(6, 8), randn(5, 8), randn(3, 8)
    r1, r2 = randn(6, 5), randn(6, 3)

    def loss():
        (y1, y2), _ = layers.bitlinear_forward(xp, x, [w1, w2], ternary=False, eps=1e-5)
        return np.sum(y1 * r1) + np.sum(y2 * r2)

    _, cache = layers.bitlinear_forward(xp, x, [w1, w2], ternary=False, eps=1e-5)
    dx, (dw1, dw2) = layers.bitlinear_backward(xp, [r1, r2], cache)
    assert_grad_close(dx, numeric_grad(loss, x))
    assert_grad_close(dw1, numeric_grad(loss, w1))
    assert_grad_close(dw2, numeric_grad(loss, w2))


def test_bitlinear_ternary_forward_is_exact_integer_product():
    x, w = randn(4, 16), randn(6, 16) * 0.3
    (y,), _ = layers.bitlinear_forward(xp, x, [w], ternary=True, eps=1e-5)
    gamma = np.mean(np.abs(w)) + 1e-5
    w_codes = np.clip(np.round(w / gamma), -1, 1).astype(np.int64)
    amax = np.max(np.abs(x), axis=1, keepdims=True)
    x_codes = np.clip(np.round(x * 127 / amax), -128, 127).astype(np.int64)
    assert set(np.unique(w_codes)) <= {-1, 0, 1}
    expected = (x_codes @ w_codes.T) * gamma * amax / 127  # exact int64 product, then the two scales
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_bitlinear_ternary_backward_is_straight_through():
    """STE: dX is the gradient of X ↦ X·Q_w(W)ᵀ and dW that of W ↦ Q_a(X)·Wᵀ, quantizers held fixed."""
    x, w = randn(5, 8), randn(4, 8)
    r = randn(5, 4)
    (_,), cache = layers.bitlinear_forward(xp, x, [w], ternary=True, eps=1e-5)
    dx, (dw,) = layers.bitlinear_backward(xp, [r], cache)
    wq, xq = xp.ternary_weight(w, 1e-5), xp.quantize_activations(x)
    x_var, w_var = x.copy(), w.copy()
    assert_grad_close(dx, numeric_grad(lambda: np.sum((x_var @ wq.T) * r), x_var))
    assert_grad_close(dw, numeric_grad(lambda: np.sum((xq @ w_var.T) * r), w_var))
    assert not np.allclose(dx, r @ w), "ternary mode must use the quantized weights in the backward"


def test_activation_quantizer_keeps_zero_rows():
    x = np.zeros((2, 8))
    x[1] = randn(8)
    q = xp.quantize_activations(x)
    assert np.all(q[0] == 0) and np.all(np.isfinite(q))
    assert np.max(np.abs(q[1] - x[1])) <= np.max(np.abs(x[1])) / 127 / 2 + 1e-12


# -------------------------------------------------------------------------------------------------- RMSNorm


def test_rmsnorm_gradients():
    x, w, r = randn(2, 3, 8), randn(8), randn(2, 3, 8)

    def loss():
        return np.sum(layers.rmsnorm_forward(xp, x, w, 1e-5)[0] * r)

    y, cache = layers.rmsnorm_forward(xp, x, w, 1e-5)
    np.testing.assert_allclose(y, x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-5) * w, rtol=1e-12)
    dx, dw = layers.rmsnorm_backward(xp, r, cache)
    assert_grad_close(dx, numeric_grad(loss, x))
    assert_grad_close(dw, numeric_grad(loss, w))


# ----------------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("rope_dim", [8, 6])
def test_rope_matches_complex_rotation_and_gradient(rope_dim):
    x, r = randn(2, 3, 5, 8), randn(2, 3, 5, 8)
    cos, sin = layers.rope_tables(5, rope_dim, 10000.0)
    y = layers.rope_forward(xp, x, cos, sin)
    half = rope_dim // 2
    theta = np.arange(5)[:, None] * 10000.0 ** (-2 * np.arange(half) / rope_dim)
    z = (x[..., :half] + 1j * x[..., half:rope_dim]) * np.exp(1j * theta)
    np.testing.assert_allclose(y[..., :half], z.real, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[..., half:rope_dim], z.imag, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(y[..., rope_dim:], x[..., rope_dim:])
    dx = layers.rope_backward(xp, r, cos, sin)
    assert_grad_close(dx, numeric_grad(lambda: np.sum(layers.rope_forward(xp, x, cos, sin) * r), x))


# ------------------------------------------------------------------------------------------------ attention


def naive_attention(q, k, v, softcap):
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                s = np.array([q[bi, h, i] @ k[bi, h // group, j] / np.sqrt(d) for j in range(i + 1)])
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, h, i] = sum(p[j] * v[bi, h // group, j] for j in range(i + 1))
    return out


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_attention_forward_and_gradients(softcap):
    q, k, v = randn(2, 4, 5, 4), randn(2, 2, 5, 4), randn(2, 2, 5, 4)
    r = randn(2, 4, 5, 4)
    out, cache = layers.attention_forward(xp, q, k, v, softcap)
    np.testing.assert_allclose(out, naive_attention(q, k, v, softcap), rtol=1e-10, atol=1e-12)

    def loss():
        return np.sum(layers.attention_forward(xp, q, k, v, softcap)[0] * r)

    dq, dk, dv = layers.attention_backward(xp, r, cache)
    assert_grad_close(dq, numeric_grad(loss, q))
    assert_grad_close(dk, numeric_grad(loss, k))
    assert_grad_close(dv, numeric_grad(loss, v))


# ------------------------------------------------------------------------------------------------------ FFN


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_gated_ffn_gradients(act):
    g, u, r = randn(6, 7), randn(6, 7), randn(6, 7)
    h, cache = layers.glu_forward(xp, g, u, act)
    expected = g / (1 + np.exp(-g)) * u if act == "silu" else np.maximum(g, 0) ** 2 * u
    np.testing.assert_allclose(h, expected, rtol=1e-12, atol=1e-14)
    dg, du = layers.glu_backward(xp, r, cache)

    def loss():
        return np.sum(layers.glu_forward(xp, g, u, act)[0] * r)

    assert_grad_close(dg, numeric_grad(loss, g))
    assert_grad_close(du, numeric_grad(loss, u))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="gelu"):
        xp.glu(randn(2, 2), randn(2, 2), "gelu")


def test_softcap_gradient():
    x, r = randn(4, 6) * 5, randn(4, 6)
    y, cache = layers.softcap_forward(xp, x, 3.0)
    np.testing.assert_allclose(y, 3.0 * np.tanh(x / 3.0), rtol=1e-12)
    assert np.max(np.abs(y)) < 3.0
    dx = layers.softcap_backward(xp, r, cache)
    assert_grad_close(dx, numeric_grad(lambda: np.sum(layers.softcap_forward(xp, x, 3.0)[0] * r), x))


# ---------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("entropy_weight", [0.0, 0.3])
def test_cross_entropy_with_entropy_term(entropy_weight):
    z = randn(5, 7) * 2
    targets = np.array([3, 0, -1, 6, 2])
    valid = targets >= 0
    scale = 1 / valid.sum()

    def loss():
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ce = -np.log(p[np.arange(5), np.maximum(targets, 0)])
        ent = -np.sum(p * np.log(p), -1)
        return scale * np.sum((ce - entropy_weight * ent)[valid])

    ce, ent, dz = xp.cross_entropy(z, targets, entropy_weight, scale)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    assert ce == pytest.approx(-np.sum(np.log(p[np.arange(5), targets])[valid]), rel=1e-12)
    assert ent == pytest.approx(-np.sum((p * np.log(p)).sum(-1)[valid]), rel=1e-12)
    assert np.all(dz[~valid] == 0)
    assert_grad_close(dz, numeric_grad(loss, z))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_to_teacher_full_and_top_k(temperature):
    z, zt = randn(4, 6), randn(4, 6)
    pt = np.exp(zt / temperature)
    pt /= pt.sum(-1, keepdims=True)
    full_ids = np.tile(np.arange(6), (4, 1))
    top_ids = np.argsort(-pt, axis=-1)[:, :3]
    top_p = np.take_along_axis(pt, top_ids, -1)
    top_p /= top_p.sum(-1, keepdims=True)
    for ids, probs in ((full_ids, pt), (top_ids, top_p)):

        def loss(ids=ids, probs=probs):
            logq = z / temperature - np.log(np.sum(np.exp(z / temperature), -1, keepdims=True))
            kl = np.sum(probs * (np.log(probs) - np.take_along_axis(logq, ids, -1)))
            return 0.5 * temperature**2 * kl

        kl, dz = xp.kl_to_teacher(z, ids, probs, temperature, 0.5)
        assert 0.5 * kl == pytest.approx(loss(), rel=1e-12)
        assert_grad_close(dz, numeric_grad(loss, z))
    # a row of zero teacher mass (ignored position) contributes nothing
    probs = pt.copy()
    probs[1] = 0
    _, dz = xp.kl_to_teacher(z, full_ids, probs, temperature, 1.0)
    assert np.all(dz[1] == 0)


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize(
    "extra",
    [
        dict(ffn_act="silu"),
        dict(ffn_act="relu2", qk_norm=True, attn_softcap=3.0, logit_softcap=4.0, rope_dim=2),
    ],
)
def test_whole_model_gradients_float_mode(extra):
    cfg = ModelShape(
        n_vocab=11, n_embd=8, n_layer=2, n_head=2, n_head_kv=1, head_dim=4, n_ff=12, n_ctx_train=8,
        ternary=False, init_std=0.5, **extra,
    )  # fmt: skip
    rng = np.random.default_rng(7)
    params = {k: v.astype(np.float64) for k, v in init_params(cfg, rng).items()}
    for p in params.values():  # non-trivial norm weights too
        if p.ndim == 1:
            p += rng.normal(0, 0.3, p.shape)
    ids = rng.integers(0, 11, size=(2, 5))
    targets = rng.integers(0, 11, size=(2, 5))
    targets[0, 1] = -1
    model = Transformer(cfg, xp)
    n = int(np.sum(targets >= 0))

    def loss():
        logits, _ = model.forward(params, ids)
        ce, ent, _ = xp.cross_entropy(logits, targets.reshape(-1), 0.1, 1.0)
        return (ce - 0.1 * ent) / n

    stats, grads = model.loss_and_grads(params, ids, targets, 1 / n, entropy_weight=0.1)
    assert stats.n_tokens == n and (stats.ce_sum - 0.1 * stats.entropy_sum) / n == pytest.approx(loss())
    assert list(grads) == list(param_shapes(cfg))
    for name, p in params.items():
        # a random handful of entries per tensor keeps this fast; every tensor is covered
        idx = [tuple(rng.integers(0, s) for s in p.shape) for _ in range(4)]
        for i in idx:
            old = p[i]
            p[i] = old + 1e-6
            fp = loss()
            p[i] = old - 1e-6
            fm = loss()
            p[i] = old
            numeric = (fp - fm) / 2e-6
            assert grads[name][i] == pytest.approx(numeric, rel=1e-5, abs=1e-8), f"{name}{i}"


def test_model_rejects_bad_ids():
    cfg = ModelShape(n_vocab=11, n_embd=8, n_layer=1, n_head=2, n_ff=8, n_ctx_train=4)
    model = Transformer(cfg, xp)
    params = init_params(cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        model.forward(params, np.array([[1, 11]]))
    with pytest.raises(ValueError, match="n_ctx_train"):
        model.forward(params, np.zeros((1, 5), dtype=np.int64))
