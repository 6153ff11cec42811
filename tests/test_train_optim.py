"""Optimizer updates against values worked out by hand, gradient clipping, and the WSD schedule's shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ternary.training import backend as xp
from ternary.training.config import ConfigError, OptimConfig, ScheduleConfig
from ternary.training.optim import Optimizer, clip_grad_norm_
from ternary.training.schedule import lr_multiplier


def test_adamw_two_steps_by_hand():
    p = np.array([1.0])
    m, v = np.zeros(1), np.zeros(1)
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    # step 1, g = 0.5: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25, update = 0.5 / 0.5 = 1
    xp.adamw_(p, np.array([0.5]), m, v, lr, b1, b2, eps, wd, step=1)
    assert m[0] == pytest.approx(0.05) and v[0] == pytest.approx(0.00025)
    assert p[0] == pytest.approx(1.0 * (1 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8), rel=1e-12)
    # step 2, g = -0.25: m = 0.045 - 0.025 = 0.02, v = 0.00024975 + 0.0000625 = 0.00031225
    xp.adamw_(p, np.array([-0.25]), m, v, lr, b1, b2, eps, wd, step=2)
    m_hat, v_hat = 0.02 / 0.19, 0.00031225 / (1 - 0.999**2)
    expected = (0.999 - 0.1 * 0.5 / (0.5 + 1e-8)) * 0.999 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert p[0] == pytest.approx(expected, rel=1e-12)
    assert p[0] == pytest.approx(0.8714673, abs=1e-6)


def test_lion_step_by_hand():
    p, m = np.array([1.0, -2.0]), np.array([0.2, 0.0])
    g = np.array([0.5, 0.1])
    xp.lion_(p, g, m, lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)
    # direction sign(0.9·m + 0.1·g) = sign([0.23, 0.01]) = [+1, +1]
    np.testing.assert_allclose(p, [1.0 * 0.999 - 0.01, -2.0 * 0.999 - 0.01], rtol=1e-12)
    np.testing.assert_allclose(m, [0.99 * 0.2 + 0.01 * 0.5, 0.01 * 0.1], rtol=1e-12)


def quintic(s: float, steps: int = 5) -> float:
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(3, 5), (5, 3)])
def test_newton_schulz5_maps_singular_values_by_the_quintic(shape):
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    k = min(shape)
    sv = np.array([4.0, 1.0, 0.25])[:k]
    g = u[:, :k] @ np.diag(sv) @ v[:, :k].T
    out = xp.newton_schulz5(g, 5)
    expected = u[:, :k] @ np.diag([quintic(s / np.linalg.norm(sv)) for s in sv]) @ v[:, :k].T
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert np.all(np.abs(np.linalg.svd(out, compute_uv=False) - 1) < 0.35)  # roughly orthogonal


def test_muon_first_step_uses_nesterov_momentum_and_shape_scale():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((6, 3))
    g = rng.standard_normal((6, 3))
    p, buf = p0.copy(), np.zeros_like(p0)
    xp.muon_(p, g, buf, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5)
    np.testing.assert_allclose(buf, g)
    # direction (1 + μ)·g orthogonalises like g; rows/cols = 2 → scale sqrt(2)
    expected = p0 * (1 - 0.002) - 0.02 * math.sqrt(2) * xp.newton_schulz5(1.95 * g, 5)
    np.testing.assert_allclose(p, expected, rtol=1e-10)


def test_optimizer_routes_parameters():
    params = {
        "token_embd.weight": np.zeros((5, 4)),
        "blk.0.attn_q.weight": np.zeros((4, 4)),
        "blk.0.attn_norm.weight": np.ones(4),
    }
    muon = Optimizer(OptimConfig(name="muon", aux_optimizer="lion"), params, xp)
    assert muon.rules == {
        "token_embd.weight": "lion",
        "blk.0.attn_q.weight": "muon",
        "blk.0.attn_norm.weight": "lion",
    }
    adamw = Optimizer(OptimConfig(name="adamw"), params, xp)
    assert set(adamw.rules.values()) == {"adamw"}


def test_norm_weights_get_no_weight_decay():
    params = {"blk.0.attn_norm.weight": np.ones(3), "blk.0.attn_q.weight": np.ones((3, 3))}
    opt = Optimizer(OptimConfig(name="adamw", lr=0.1, weight_decay=0.5), params, xp)
    opt.step(params, {k: np.zeros_like(v) for k, v in params.items()}, lr_mult=1.0)
    np.testing.assert_array_equal(params["blk.0.attn_norm.weight"], 1.0)
    np.testing.assert_allclose(params["blk.0.attn_q.weight"], 1 - 0.1 * 0.5)


def test_clip_grad_norm():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm_(xp, grads, 1.0) == pytest.approx(5.0)
    assert grads["a"][0] == pytest.approx(0.6, rel=1e-6) and grads["b"][0, 0] == pytest.approx(0.8, rel=1e-6)
    small = {"a": np.array([0.3])}
    assert clip_grad_norm_(xp, small, 1.0) == pytest.approx(0.3) and small["a"][0] == 0.3


def test_wsd_schedule_shape():
    cfg = ScheduleConfig(steps=100, warmup_steps=10, decay_frac=0.2, min_lr_ratio=0.1)
    lr = [lr_multiplier(cfg, s) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lr[:9], lr[1:10], strict=True))  # warmup rises linearly
    np.testing.assert_allclose(np.diff(lr[:10]), 0.1)
    assert all(x == 1.0 for x in lr[10:80])  # stable
    assert all(b < a for a, b in zip(lr[79:99], lr[80:100], strict=True))  # decay falls
    assert lr[80] == pytest.approx(1 - 0.9 / 20) and lr[99] == pytest.approx(0.1)
    cos = ScheduleConfig(steps=100, warmup_steps=0, decay_frac=0.5, decay_shape="cosine")
    assert lr_multiplier(cos, 74) == pytest.approx(0.5) and lr_multiplier(cos, 99) == pytest.approx(0.0)
    sq = ScheduleConfig(steps=100, warmup_steps=0, decay_frac=0.04, decay_shape="sqrt")
    assert lr_multiplier(sq, 96) == pytest.approx(1 - math.sqrt(0.25))
    # past the end: the last value, also without a decay stage (was a division by zero)
    assert lr_multiplier(cfg, 150) == pytest.approx(0.1)
    assert lr_multiplier(ScheduleConfig(steps=100, warmup_steps=0, decay_frac=0.0), 120) == 1.0


def test_schedule_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="warmup_steps"):
        ScheduleConfig(steps=10, warmup_steps=11)
    with pytest.raises(ConfigError, match="decay_shape"):
        ScheduleConfig(decay_shape="exp")
