"""The CUDA backend (ternary.training.cuda_ops) against the NumPy backend and float64 NumPy, op by op, and a
whole `ternary-train --device cuda` step against the CPU one.

By default this runs on numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set below before numba.cuda is
imported), so CI needs no GPU; shapes are tiny because the simulator runs one Python thread per GPU thread.
On a GPU machine run it with NUMBA_ENABLE_CUDASIM=0: the same checks then run on the hardware, plus the
`gpu`-marked ones (tile-sized shapes, split-K, bitwise reproducibility).
"""

from __future__ import annotations

import json
import json.encoder
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="the CUDA backend needs the numba-cuda package")

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
try:  # numba (if installed) may have read its environment before this module set the variable
    import numba.core.config

    numba.core.config.reload_config()
except ImportError:  # numba-cuda alone reads it when numba.cuda is first imported
    pass

from click.testing import CliRunner  # noqa: E402
from numba import cuda  # noqa: E402
from numba.cuda.core import config as cuda_config  # noqa: E402
from ternary.training import backend as cpu  # noqa: E402
from ternary.training.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from ternary.training.cli import main as cli_main  # noqa: E402
from ternary.training.layers import rope_tables  # noqa: E402

SIMULATOR = bool(cuda_config.ENABLE_CUDASIM)
if not SIMULATOR and not cuda.is_available():
    pytest.skip(
        "numba.cuda was imported without the simulator and there is no GPU (run this module in its own "
        "process, or with NUMBA_ENABLE_CUDASIM=1 set before numba is imported)",
        allow_module_level=True,
    )

from ternary.training import cuda_ops as gpu  # noqa: E402

RNG = np.random.default_rng(20240611)
gpu_only = pytest.mark.skipif(SIMULATOR, reason="needs a real GPU (NUMBA_ENABLE_CUDASIM=0)")


@pytest.fixture(scope="module", autouse=True)
def fast_thread_switching():
    """The simulator's threads meet at every syncthreads(); switching threads often makes that much faster."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def dev(a: np.ndarray):
    return gpu.asarray(a)


def host(a) -> np.ndarray:
    return gpu.to_host(a)


def assert_close(actual, expected, rtol: float = 2e-6, atol: float = 2e-6) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


# ------------------------------------------------------------------------------------------------ plumbing


def test_backend_load_gives_every_op():
    assert cpu.load("cuda") is gpu
    assert all(callable(getattr(gpu, name)) for name in cpu.OPS)


def test_memory_ops_round_trip_and_reject_float64():
    a = randn(3, 5)
    d = dev(a)
    assert tuple(d.shape) == (3, 5) and d.dtype == np.float32
    np.testing.assert_array_equal(host(d), a)
    np.testing.assert_array_equal(host(gpu.copy(d)), a)
    np.testing.assert_array_equal(host(gpu.zeros((2, 3))), np.zeros((2, 3), np.float32))
    ids = gpu.asarray([1, 2, 3], np.int64)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(host(gpu.zeros_like(ids)), [0, 0, 0])
    with pytest.raises(TypeError, match="float32"):
        gpu.asarray(np.zeros(3, np.float64))


@gpu_only
def test_memory_pool_keeps_a_block_while_a_view_lives_and_reuses_it_after():
    a = gpu.asarray(np.arange(1000, dtype=np.float32))
    view = a.reshape(10, 100)
    del a
    other = gpu.zeros((1000,))  # same size: must get another block while `view` still uses the first
    np.testing.assert_array_equal(host(view).reshape(-1), np.arange(1000, dtype=np.float32))
    address = view.device_ctypes_pointer.value
    del view
    assert gpu.zeros((1000,)).device_ctypes_pointer.value == address
    assert other.device_ctypes_pointer.value != address


# -------------------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_all_transposes_against_float64(trans_a, trans_b):
    m, k, n = 19, 37, 21  # not multiples of any tile size
    a = randn(k, m) if trans_a else randn(m, k)
    b = randn(n, k) if trans_b else randn(k, n)
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    assert_close(host(gpu.matmul(dev(a), dev(b), trans_a, trans_b)), expected, rtol=1e-5, atol=1e-5)


def test_matmul_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="inner dimensions"):
        gpu.matmul(dev(randn(3, 4)), dev(randn(5, 6)))


def test_gemm_batches_split_k_alpha_beta():
    """C[z] = alpha·A[z]·B[z]ᵀ + beta·C[z] with K split in 3 (partials summed by a second kernel)."""
    batch, m, n, k = 2, 5, 7, 40
    a, b, c0 = randn(batch, m, k), randn(batch, n, k), randn(batch, m, n)
    c = dev(c0)
    gpu._gemm(dev(a), dev(b), c, m, n, k, trans_b=True, batch=batch, stride_a=m * k, stride_b=n * k,
              alpha=0.5, beta=-2.0, splits=3)  # fmt: skip
    expected = 0.5 * np.einsum("zmk,znk->zmn", a.astype(np.float64), b) - 2.0 * c0
    assert_close(host(c), expected, rtol=1e-5, atol=1e-5)


@gpu_only
def test_gemm_large_tiles_and_split_k_on_gpu():
    a, b = randn(300, 2500), randn(2500, 200)  # few output tiles, long K: the split-K path
    expected = a.astype(np.float64) @ b
    assert_close(host(gpu.matmul(dev(a), dev(b))), expected, rtol=1e-4, atol=1e-4)
    assert_close(host(gpu.matmul(dev(b), dev(a), True, True)), expected.T, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ elementwise, reductions


def test_add_scale_and_reductions():
    a, b = randn(4, 9), randn(4, 9)
    assert_close(host(gpu.add(dev(a), dev(b))), a + b)
    d = dev(a)
    gpu.add_(d, dev(b))
    gpu.scale_(d, 0.25)
    assert_close(host(d), (a + b) * np.float32(0.25))
    assert gpu.sum_squares(dev(a)) == pytest.approx(float(np.sum(a.astype(np.float64) ** 2)), rel=1e-12)
    assert gpu.max_abs(dev(a)) == float(np.max(np.abs(a)))
    with pytest.raises(ValueError, match="shapes"):
        gpu.add(dev(a), dev(randn(9, 4)))


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_glu_forward_backward(act):
    g, u, dh = randn(3, 11), randn(3, 11), randn(3, 11)
    assert_close(host(gpu.glu(dev(g), dev(u), act)), cpu.glu(g, u, act))
    for got, want in zip(
        gpu.glu_backward(dev(dh), dev(g), dev(u), act), cpu.glu_backward(dh, g, u, act), strict=True
    ):
        assert_close(host(got), want)
    with pytest.raises(ValueError, match="ffn activation"):
        gpu.glu(dev(g), dev(u), "gelu")


def test_softcap_forward_backward():
    x, dy = randn(5, 6) * 4, randn(5, 6)
    y = gpu.softcap(dev(x), 3.0)
    assert_close(host(y), cpu.softcap(x, 3.0))
    assert_close(
        host(gpu.softcap_backward(dev(dy), y, 3.0)), cpu.softcap_backward(dy, cpu.softcap(x, 3.0), 3.0)
    )


# -------------------------------------------------------------------------------------------- layer kernels


def test_embedding_and_its_backward_sum_repeated_ids_exactly():
    table, ids = randn(10, 6), np.array([3, 1, 3, 9, 0, 3, 1])
    np.testing.assert_array_equal(host(gpu.embedding(dev(table), gpu.asarray(ids, np.int64))), table[ids])
    dy = randn(7, 6)
    got = host(gpu.embedding_backward(dev(dy), gpu.asarray(ids, np.int64), 10))
    np.testing.assert_array_equal(got, cpu.embedding_backward(dy, ids, 10))  # same order of additions
    assert not got[[2, 4, 5, 6, 7, 8]].any()


@pytest.mark.parametrize("shape", [(6, 40), (2, 3, 4, 8)])  # token rows; per-head rows (QK-norm)
def test_rmsnorm_forward_backward(shape):
    x, w, dy = randn(*shape), randn(shape[-1]), randn(*shape)
    y, rstd = gpu.rmsnorm(dev(x), dev(w), 1e-5)
    y_ref, rstd_ref = cpu.rmsnorm(x, w, 1e-5)
    assert_close(host(y), y_ref)
    assert_close(host(rstd), rstd_ref)
    dx, dw = gpu.rmsnorm_backward(dev(dy), dev(x), dev(w), rstd)
    dx_ref, dw_ref = cpu.rmsnorm_backward(dy, x, w, rstd_ref)
    assert_close(host(dx), dx_ref, rtol=1e-5, atol=1e-5)
    assert_close(host(dw), dw_ref, rtol=1e-5, atol=1e-5)


def test_ternary_weight_is_absmean_codes_times_gamma():
    w = randn(9, 13)
    got = host(gpu.ternary_weight(dev(w), 1e-5))
    np.testing.assert_array_equal(got, cpu.ternary_weight(w, 1e-5))
    gamma = np.float32(np.mean(np.abs(w.astype(np.float64))) + 1e-5)
    assert set(np.unique(got / gamma)) <= {-1.0, 0.0, 1.0}


def test_quantize_activations_rounds_half_to_even_and_keeps_zero_rows():
    x = randn(4, 10)
    x[1] = 0.0
    x[2, :5] = [127.0, 0.5, 1.5, -2.5, 3.5]  # amax 127: scale 1, exact ties
    got = host(gpu.quantize_activations(dev(x)))
    np.testing.assert_array_equal(got, cpu.quantize_activations(x))
    np.testing.assert_array_equal(got[2, :5], [127.0, 0.0, 2.0, -2.0, 4.0])
    assert not got[1].any()


def test_split_merge_heads_and_rope():
    x = randn(2 * 5, 3 * 8)
    heads = gpu.split_heads(dev(x), 2, 3)
    np.testing.assert_array_equal(host(heads), cpu.split_heads(x, 2, 3))
    np.testing.assert_array_equal(host(gpu.merge_heads(heads)), x)
    cos, sin = (t.astype(np.float32) for t in rope_tables(5, 6, 100.0))  # rope_dim 6 < head_dim 8
    xh = cpu.split_heads(x, 2, 3)
    for inverse in (False, True):
        got = host(gpu.rope(dev(xh), dev(cos), dev(sin), inverse))
        assert_close(got, cpu.rope(xh, cos, sin, inverse))
    rotated = gpu.rope(dev(xh), dev(cos), dev(sin))
    assert_close(host(gpu.rope(rotated, dev(cos), dev(sin), inverse=True)), xh, atol=1e-6)


@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_attention_forward_backward_gqa(softcap):
    q, k, v = randn(2, 4, 6, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8)
    dout = randn(2, 4, 6, 8)
    out, aux = gpu.attention(dev(q), dev(k), dev(v), 0.35, softcap)
    out_ref, aux_ref = cpu.attention(q, k, v, 0.35, softcap)
    assert_close(host(out), out_ref, rtol=1e-5, atol=1e-6)
    grads = gpu.attention_backward(dev(dout), dev(q), dev(k), dev(v), aux, 0.35, softcap)
    grads_ref = cpu.attention_backward(dout, q, k, v, aux_ref, 0.35, softcap)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_close(host(got), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("entropy_weight", [0.0, 0.2])
def test_cross_entropy_with_ignored_rows(entropy_weight):
    logits, targets = randn(5, 13) * 3, np.array([1, -1, 12, 0, 7])
    ce, ent, grad = gpu.cross_entropy(dev(logits), gpu.asarray(targets, np.int64), entropy_weight, 0.25)
    ce_ref, ent_ref, grad_ref = cpu.cross_entropy(logits, targets, entropy_weight, 0.25)
    assert ce == pytest.approx(ce_ref, rel=1e-6)
    assert ent == pytest.approx(ent_ref, rel=1e-6)
    assert_close(host(grad), grad_ref)
    assert not host(grad)[1].any()


def test_kl_to_teacher_top_k_and_skipped_rows():
    logits = randn(4, 11) * 2
    ids = np.stack([RNG.permutation(11)[:5] for _ in range(4)])
    probs = RNG.random((4, 5)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[2] = 0.0  # a row to skip
    kl, grad = gpu.kl_to_teacher(dev(logits), gpu.asarray(ids, np.int64), dev(probs), 1.7, 0.3)
    kl_ref, grad_ref = cpu.kl_to_teacher(logits, ids, probs, 1.7, 0.3)
    assert kl == pytest.approx(kl_ref, rel=1e-5)
    assert_close(host(grad), grad_ref)


# --------------------------------------------------------------------------------------------- optimizers


def test_adamw_and_lion_updates():
    p, g, m, v = randn(4, 6), randn(4, 6), randn(4, 6), np.abs(randn(4, 6))
    d = [dev(a) for a in (p, g, m, v)]
    gpu.adamw_(*d, 0.01, 0.9, 0.95, 1e-8, 0.1, 3)
    cpu.adamw_(p, g, m, v, 0.01, 0.9, 0.95, 1e-8, 0.1, 3)
    for got, want in zip(d, (p, g, m, v), strict=True):
        assert_close(host(got), want)
    gpu.lion_(d[0], d[1], d[2], 0.01, 0.9, 0.99, 0.1)
    cpu.lion_(p, g, m, 0.01, 0.9, 0.99, 0.1)
    assert_close(host(d[0]), p)
    assert_close(host(d[2]), m)


@pytest.mark.parametrize("shape,nesterov", [((5, 9), True), ((9, 5), False)])  # wide and tall
def test_newton_schulz_and_muon(shape, nesterov):
    g = randn(*shape)
    assert_close(host(gpu.newton_schulz5(dev(g), 3)), cpu.newton_schulz5(g, 3), rtol=1e-4, atol=1e-5)
    p, buf = randn(*shape), randn(*shape)
    dp, dbuf = dev(p), dev(buf)
    gpu.muon_(dp, dev(g), dbuf, 0.02, 0.95, nesterov, 0.1, 2)
    cpu.muon_(p, g, buf, 0.02, 0.95, nesterov, 0.1, 2)
    assert_close(host(dp), p, rtol=1e-5, atol=1e-6)
    assert_close(host(dbuf), buf)


def test_queued_muon_updates_match_one_at_a_time_and_keep_program_order():
    """muon_ only queues; the queue runs as one batched Newton–Schulz per shape before the next op. Mixed
    shapes (wide, tall, twice the same), an unrelated AdamW update in between, and an AdamW update of a
    queued weight (which must see the Muon update first) all match the NumPy backend's sequence."""
    shapes = [(4, 7), (7, 4), (4, 7), (5, 5)]
    ws = [(randn(*s), randn(*s), randn(*s)) for s in shapes]
    dev_ws = [tuple(dev(a) for a in w) for w in ws]
    other = [randn(3, 3), randn(3, 3), randn(3, 3), np.abs(randn(3, 3))]
    dev_other = [dev(a) for a in other]
    m, v = randn(*shapes[0]), np.abs(randn(*shapes[0]))  # AdamW state for the first weight
    dm, dv = dev(m), dev(v)
    for i, ((p, g, buf), (dp, dg, dbuf)) in enumerate(zip(ws, dev_ws, strict=True)):
        cpu.muon_(p, g, buf, 0.02, 0.95, True, 0.1, 2)
        gpu.muon_(dp, dg, dbuf, 0.02, 0.95, True, 0.1, 2)
        if i == 1:
            cpu.adamw_(*other, 0.01, 0.9, 0.95, 1e-8, 0.1, 1)
            gpu.adamw_(*dev_other, 0.01, 0.9, 0.95, 1e-8, 0.1, 1)
    p, g, _ = ws[0]
    assert gpu._PENDING_MUON  # still queued: the unrelated AdamW update did not need them
    cpu.adamw_(p, g, m, v, 0.01, 0.9, 0.95, 1e-8, 0.1, 1)
    gpu.adamw_(dev_ws[0][0], dev_ws[0][1], dm, dv, 0.01, 0.9, 0.95, 1e-8, 0.1, 1)
    for (p, _, buf), (dp, _, dbuf) in zip(ws, dev_ws, strict=True):
        assert_close(host(dp), p, rtol=1e-5, atol=1e-6)
        assert_close(host(dbuf), buf)
    assert_close(host(dev_other[0]), other[0])


# ------------------------------------------------------------------------------- the whole training step


def train_config(tmp_path, device: str, ternary: bool = True, seq: int = 8, n_embd: int = 16) -> str:
    """A tiny model with every option on (QK-norm, both soft-caps, entropy term, Muon + AdamW, grad accum)."""
    src = tmp_path / "src.txt"
    if not src.exists():
        src.write_bytes(Path(json.encoder.__file__).read_bytes()[:2000])
    cfg = {
        "model": {"n_embd": n_embd, "n_layer": 1, "n_head": 2, "n_head_kv": 1, "n_ff": 2 * n_embd,
                  "n_ctx_train": seq, "ffn_act": "silu", "qk_norm": True, "attn_softcap": 4.0,
                  "logit_softcap": 6.0, "ternary": ternary},
        "optim": {"name": "muon", "lr": 3e-3, "muon_lr": 0.02, "ns_steps": 3},
        "schedule": {"steps": 1, "warmup_steps": 0},
        "data": {"path": str(src), "seq_len": seq, "batch_size": 2, "grad_accum": 2},
        "run": {"out_dir": str(tmp_path / device), "entropy_weight": 0.05, "log_every": 1},
    }  # fmt: skip
    path = tmp_path / f"{device}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run_cli_step(tmp_path, device: str, ternary: bool) -> tuple[dict, dict]:
    config = train_config(tmp_path, device, ternary)
    result = CliRunner().invoke(cli_main, ["train", "--config", config, "--device", device])
    assert result.exit_code == 0, result.output
    (_, path), = list_checkpoints(tmp_path / device)  # fmt: skip
    arrays, _ = load_checkpoint(path)
    metrics = json.loads((tmp_path / device / "metrics.jsonl").read_text().splitlines()[-1])
    return arrays, metrics


# Float mode agrees to float32 rounding (~1e-6 of each tensor's largest entry), except where AdamW's
# first step (±lr by the sign of each gradient) meets a gradient within rounding of zero. Ternary mode
# rounds activations to int8 codes: an input one ulp from a .5 tie (this data has one: x·127/amax is -83.5
# on the CPU and -83.49998 on the GPU) moves that code by one step, which moves the max logit by ~1/127 of
# itself and the gradients by up to ~2e-3 of their size; a few near-zero gradients then flip AdamW's sign.
STEP_TOLERANCES = {
    False: dict(sums=1e-5, max_logit=1e-5, params=1e-5, outliers=0.001),
    True: dict(sums=1e-3, max_logit=1e-2, params=5e-3, outliers=0.005),
}


@pytest.mark.parametrize("ternary", [False, True], ids=["float", "ternary"])
def test_cli_training_step_on_cuda_matches_cpu(tmp_path, ternary):
    """`ternary-train train --device cuda`: same loss, gradient norm, parameters and optimizer state."""
    tol = STEP_TOLERANCES[ternary]
    cpu_arrays, cpu_metrics = run_cli_step(tmp_path, "cpu", ternary)
    gpu_arrays, gpu_metrics = run_cli_step(tmp_path, "cuda", ternary)
    assert gpu_metrics["loss"] == pytest.approx(cpu_metrics["loss"], rel=1e-5)
    for key in ("ce", "entropy", "grad_norm"):
        assert gpu_metrics[key] == pytest.approx(cpu_metrics[key], rel=tol["sums"]), key
    assert gpu_metrics["max_logit"] == pytest.approx(cpu_metrics["max_logit"], rel=tol["max_logit"])
    assert sorted(gpu_arrays) == sorted(cpu_arrays)
    for name, want in cpu_arrays.items():
        got = gpu_arrays[name]
        assert got.shape == want.shape, name
        off = np.abs(got - want) > tol["params"] * np.max(np.abs(want))
        assert np.mean(off) <= tol["outliers"], f"{name}: {np.sum(off)} of {off.size} entries differ"
    # the comparison is not vacuous: the step left non-zero optimizer state for both rules
    assert np.abs(gpu_arrays["optim/blk.0.ffn_up.weight/buf"]).min() > 0  # Muon momentum
    assert np.abs(gpu_arrays["optim/token_embd.weight/v"]).max() > 0  # AdamW second moment


@gpu_only
def test_training_is_bitwise_reproducible_on_gpu(tmp_path):
    """No reduction depends on float-atomic order: two runs of the same steps give the same bits."""
    from ternary.training.config import load_config
    from ternary.training.trainer import Trainer

    cfg = load_config(train_config(tmp_path, "cuda", seq=64, n_embd=128)).replace({"schedule.steps": 3})
    runs = []
    for _ in range(2):
        trainer = Trainer(cfg, device="cuda", log=lambda msg: None)
        stats = [trainer.train_step() for _ in range(3)]
        runs.append(([s.loss for s in stats], {k: gpu.to_host(v) for k, v in trainer.params.items()}))
    differ = {
        name: float(np.max(np.abs(a - runs[1][1][name])))
        for name, a in runs[0][1].items()
        if not np.array_equal(a, runs[1][1][name])
    }
    assert runs[0][0] == runs[1][0] and not differ, (
        f"losses {runs[0][0]} vs {runs[1][0]}; differing: {differ}"
    )
