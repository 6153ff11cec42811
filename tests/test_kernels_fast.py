"""Planar layout + fast kernels: every kernel path against a plain NumPy int64 reference, bit for bit.

The reference computes the exact block dot products in int64 and applies the documented float32 epilogue
(``kernels_fast`` module docstring) with NumPy; every path this machine supports (generic Numba, AVX2,
VNNI-256, AVX-512 VNNI) must match it exactly, and a float64 product of the dequantized weights to float32
round-off.
"""

from __future__ import annotations

import gguf
import gguf.quants
import numba
import numpy as np
import pytest
from conftest import ORACLE
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from ternary.engine import cpu_features, kernels_fast, simd
from ternary.engine.kernels_fast import activation_sums, planar_matmul_groups
from ternary.engine.planar import PlanarMatrix, pack_codes, unpack_codes
from ternary.formats.quants import ternary_codes

PATHS = cpu_features.supported_paths()
BLOCK = 256
GROUP = 4


# ---------------------------------------------------------------- the independent reference


def reference_matmul(codes, block_scales, block, xq, x_scale):
    """NumPy: exact int64 block dots, then the float32 segment sums the kernels define."""
    n_out, k = codes.shape
    nb = k // BLOCK
    w_scales = np.repeat(np.asarray(block_scales, np.float32), block // BLOCK, axis=1)  # [N, nb]
    isum = np.einsum(
        "tbj,nbj->tnb",
        xq.astype(np.int64).reshape(len(xq), nb, BLOCK),
        codes.astype(np.int64).reshape(n_out, nb, BLOCK),
    )  # [T, N, nb]
    n_groups = -(-n_out // GROUP)
    row_uniform = np.ones(n_groups * GROUP, bool)
    row_uniform[:n_out] = (w_scales == w_scales[:, :1]).all(axis=1)
    uniform = np.repeat(row_uniform.reshape(n_groups, GROUP).all(axis=1), GROUP)[:n_out]  # per row, by group
    per_token = x_scale.shape[1] == 1
    x_cols = np.arange(nb) // (nb // x_scale.shape[1])
    out = np.zeros((len(xq), n_out), np.float32)
    blockwise = np.zeros_like(out)
    for b in range(nb):
        scale = w_scales[None, :, b] * x_scale[:, x_cols[b], None]  # float32 product first
        blockwise = blockwise + isum[:, :, b].astype(np.float32) * scale
    whole = np.float32(0) + isum.sum(axis=2).astype(np.float32) * (w_scales[None, :, 0] * x_scale[:, :1])
    if per_token:
        out[:] = np.where(uniform[None, :], whole, blockwise)
    else:
        out[:] = blockwise
    return out


def float64_matmul(codes, block_scales, block, xq, x_scale):
    w = codes.astype(np.float64) * np.repeat(block_scales.astype(np.float64), block, axis=1)
    x = xq.astype(np.float64) * np.repeat(x_scale.astype(np.float64), xq.shape[1] // x_scale.shape[1], axis=1)
    return x @ w.T


def random_case(rng, n_out, k, n_tok, scale_kind, x_cols, block=BLOCK):
    codes = rng.integers(-1, 2, size=(n_out, k)).astype(np.int8)
    nwb = k // block
    if scale_kind == "uniform":
        scales = np.repeat(rng.uniform(0.1, 2.0, size=(n_out, 1)), nwb, axis=1)
    elif scale_kind == "per_block":
        scales = rng.uniform(-2.0, 2.0, size=(n_out, nwb))
    else:  # mixed: some rows uniform, some not, so some groups are uniform and some are not
        scales = np.repeat(rng.uniform(0.1, 2.0, size=(n_out, 1)), nwb, axis=1)
        odd = rng.random(n_out) < 0.3
        scales[odd] = rng.uniform(0.1, 2.0, size=(int(odd.sum()), nwb))
    xq = rng.integers(-128, 128, size=(n_tok, k)).astype(np.int8)
    x_scale = rng.uniform(1e-3, 1e-1, size=(n_tok, x_cols)).astype(np.float32)
    return codes, scales.astype(np.float32), xq, x_scale


def run_all_paths(codes, scales, block, xq, x_scale):
    outs = {}
    for path in PATHS:
        m = PlanarMatrix.from_codes(codes, scales, block, kernels=path)
        out = np.full((xq.shape[0], codes.shape[0]), np.nan, np.float32)
        assert m.matmul(xq, x_scale, out) is out
        outs[path] = out
    return outs


def assert_matches_reference(codes, scales, block, xq, x_scale):
    expected = reference_matmul(codes, scales, block, xq, x_scale)
    exact = float64_matmul(codes, scales, block, xq, x_scale)
    bound = 1e-5 * (np.abs(exact).max() + 1) + 1e-6 * codes.shape[1]
    assert np.abs(expected - exact).max() <= bound  # the reference itself is right
    for path, out in run_all_paths(codes, scales, block, xq, x_scale).items():
        np.testing.assert_array_equal(out, expected, err_msg=f"kernel path {path}")


# ---------------------------------------------------------------- kernels


def test_this_machine_has_a_simd_path_and_generic():
    assert PATHS[-1] == "generic"
    assert set(PATHS) <= set(simd.ISAS)


@pytest.mark.parametrize(
    ("n_out", "k", "n_tok", "scale_kind", "x_cols"),
    [
        (8, 256, 1, "uniform", 1),  # decode, integer-only path
        (13, 768, 1, "per_block", 3),  # decode, Q8_K activations, N not a multiple of the row group
        (9, 512, 1, "mixed", 1),  # uniform and non-uniform groups side by side
        (6, 1024, 7, "uniform", 1),  # prefill: full tiles plus tail tokens
        (21, 1024, 9, "mixed", 4),  # prefill with Q8_K
        (5, 1024, 6, "per_block", 2),  # activation blocks of 512
        (1, 256, 4, "per_block", 1),
    ],
)
def test_every_path_equals_the_int64_reference(n_out, k, n_tok, scale_kind, x_cols):
    rng = np.random.default_rng(n_out * 1000 + k + n_tok)
    codes, scales, xq, x_scale = random_case(rng, n_out, k, n_tok, scale_kind, x_cols)
    assert_matches_reference(codes, scales, BLOCK, xq, x_scale)


@settings(max_examples=25, deadline=None)
@given(
    n_out=st.integers(1, 40),
    n_blocks=st.sampled_from([1, 2, 3, 4, 6]),
    n_tok=st.integers(1, 10),
    scale_kind=st.sampled_from(["uniform", "per_block", "mixed"]),
    per_token=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes_every_path(n_out, n_blocks, n_tok, scale_kind, per_token, seed):
    rng = np.random.default_rng(seed)
    x_cols = 1 if per_token else n_blocks
    codes, scales, xq, x_scale = random_case(rng, n_out, n_blocks * BLOCK, n_tok, scale_kind, x_cols)
    assert_matches_reference(codes, scales, BLOCK, xq, x_scale)


def test_extreme_operands_are_exact_integers():
    """Codes ±1 against -128/127 everywhere: the widest products (int16 pairs at -32768 on AVX2), exact."""
    k = 4096
    codes = np.ones((8, k), np.int8)
    codes[1] = -1
    codes[2, ::2] = -1
    codes[3] = 0
    codes[4:] = np.where(np.arange(k) % 3 == 0, 1, -1)
    for x_value in (-128, 127):
        xq = np.full((5, k), x_value, np.int8)
        xq[4, ::2] = -128
        ones = np.ones((5, 1), np.float32)
        expected = (xq.astype(np.int64) @ codes.astype(np.int64).T).astype(np.float32)
        for path, out in run_all_paths(codes, np.ones((8, 1), np.float32), k, xq, ones).items():
            np.testing.assert_array_equal(out, expected, err_msg=path)  # |Σ| < 2^24: exact in float32


def test_weight_block_spanning_the_row_like_i2s():
    rng = np.random.default_rng(7)
    codes, _, xq, x_scale = random_case(rng, 10, 1024, 3, "uniform", 4)
    scales = np.full((10, 1), 0.75, np.float32)  # one scale per tensor, block = K
    assert_matches_reference(codes, scales, 1024, xq, x_scale)
    _, _, xq1, x_scale1 = random_case(rng, 10, 1024, 3, "uniform", 1)
    assert_matches_reference(codes, scales, 1024, xq1, x_scale1)


def test_oracle_per_block_scales(oracle_dir):
    """A real TQ2_0 tensor whose every 256-block has its own scale, against gguf-py's dequantization."""
    path = ORACLE / "tiny-tq2_0-blockscales-f16.gguf"
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    shape = tuple(int(s) for s in reversed(tensor.shape))
    raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
    codes, scales, block = ternary_codes(int(tensor.tensor_type), raw, shape)
    assert len(np.unique(scales)) > scales.shape[0]  # scales really differ per block
    weights = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float64)
    rng = np.random.default_rng(3)
    xq = rng.integers(-127, 128, size=(5, shape[1])).astype(np.int8)
    x_scale = rng.uniform(1e-3, 1e-2, size=(5, shape[1] // BLOCK)).astype(np.float32)
    x = xq.astype(np.float64) * np.repeat(x_scale.astype(np.float64), BLOCK, axis=1)
    expected = x @ weights.T
    for path, out in run_all_paths(codes, scales, block, xq, x_scale).items():
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6, err_msg=path)


@pytest.mark.parametrize("driver", [kernels_fast.planar_matmul, kernels_fast.planar_matmul_summed])
def test_drivers_really_run_in_parallel(driver):
    """The ``prange`` must survive compilation (one in an inlined helper silently runs serially)."""
    m = PlanarMatrix.from_codes(
        np.zeros((8, 256), np.int8), np.ones((8, 1), np.float32), 256, kernels="generic"
    )
    xq = np.zeros((1, 256), np.int8)
    xs = np.ones((1, 1), np.float32)
    sums = kernels_fast.activation_sums(xq)
    fresh = numba.njit(parallel=True)(driver.py_func)  # uncached, so its diagnostics exist
    args = (m._isa, m.packed, m.group_scales, m.row_scales, m.group_uniform, 8, xq)
    args += (*sums, xs) if driver is kernels_fast.planar_matmul_summed else (xs,)
    fresh(*args, np.empty((1, 8), np.float32))
    assert fresh.get_metadata(fresh.signatures[0])["parfor_diagnostics"].count_parfors() == 1


def test_two_threads_give_the_same_bits():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba was started with one thread")
    rng = np.random.default_rng(11)
    codes, scales, xq, x_scale = random_case(rng, 64, 512, 5, "mixed", 2)
    m = PlanarMatrix.from_codes(codes, scales, BLOCK)
    before = numba.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            outs.append(m.matmul(xq, x_scale, np.empty((5, 64), np.float32)))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])


@njit(cache=True)
def _two_matrices_one_loop(isa, a, b, xq, x_scale, out_a, out_b):
    """How a fused forward uses the kernels: its own loop over row groups of several matrices, one input."""
    block_sums, token_sums = activation_sums(xq)
    packed_a, scales_a, rows_a, uniform_a, n_a = a
    packed_b, scales_b, rows_b, uniform_b, n_b = b
    groups_a = uniform_a.shape[0]
    for g in range(groups_a + uniform_b.shape[0]):  # a prange in real use
        if g < groups_a:
            planar_matmul_groups(
                isa, g, g + 1, packed_a, scales_a, rows_a, uniform_a, n_a,
                xq, block_sums, token_sums, x_scale, out_a,
            )  # fmt: skip
        else:
            gb = g - groups_a
            planar_matmul_groups(
                isa, gb, gb + 1, packed_b, scales_b, rows_b, uniform_b, n_b,
                xq, block_sums, token_sums, x_scale, out_b,
            )  # fmt: skip


def test_kernels_are_callable_from_other_jitted_code():
    rng = np.random.default_rng(5)
    codes_a, scales_a, xq, x_scale = random_case(rng, 12, 512, 5, "mixed", 2)
    codes_b, scales_b, _, _ = random_case(rng, 7, 512, 5, "uniform", 2)
    a = PlanarMatrix.from_codes(codes_a, scales_a, BLOCK)
    b = PlanarMatrix.from_codes(codes_b, scales_b, BLOCK)
    out_a, out_b = np.empty((5, 12), np.float32), np.empty((5, 7), np.float32)
    parts = [(m.packed, m.group_scales, m.row_scales, m.group_uniform, m.n_out) for m in (a, b)]
    _two_matrices_one_loop(simd.ISAS[PATHS[0]], *parts, xq, x_scale, out_a, out_b)
    np.testing.assert_array_equal(out_a, reference_matmul(codes_a, scales_a, BLOCK, xq, x_scale))
    np.testing.assert_array_equal(out_b, reference_matmul(codes_b, scales_b, BLOCK, xq, x_scale))


# ---------------------------------------------------------------- layout


def test_pack_roundtrip_padding_and_alignment():
    rng = np.random.default_rng(2)
    codes = rng.integers(-1, 2, size=(7, 512)).astype(np.int8)
    packed = pack_codes(codes)
    assert packed.ctypes.data % 128 == 0
    assert packed.size == 2 * 2 * 4 * 64  # 2 groups × 2 blocks × 4 rows × 64 bytes
    np.testing.assert_array_equal(unpack_codes(packed, 7, 512), codes)
    # byte j of row r, block b holds weights b·256 + s·64 + j at bits 2s, as w+1
    r, b, j = 5, 1, 10
    group, row = divmod(r, 4)
    byte = packed[(group * 2 + b) * 256 + row * 64 + j]
    assert [(byte >> (2 * s)) & 3 for s in range(4)] == [codes[r, b * 256 + s * 64 + j] + 1 for s in range(4)]
    padding = packed[(1 * 2 + 0) * 256 + 3 * 64 : (1 * 2 + 0) * 256 + 4 * 64]  # row 7 does not exist
    assert np.all(padding == 0b01010101)  # weight 0


def test_matrix_interface_and_arrays_roundtrip():
    rng = np.random.default_rng(4)
    codes, scales, xq, x_scale = random_case(rng, 6, 512, 2, "mixed", 2)
    m = PlanarMatrix.from_codes(codes, scales, BLOCK)
    assert (m.n_out, m.n_in) == (6, 512)
    np.testing.assert_array_equal(m.codes(), codes)
    np.testing.assert_array_equal(m.block_scales(), scales)
    np.testing.assert_array_equal(m.dequantize(), codes * np.repeat(scales, BLOCK, axis=1))
    again = PlanarMatrix.from_arrays(m.to_arrays())
    out1 = m.matmul(xq, x_scale, np.empty((2, 6), np.float32))
    out2 = again.matmul(xq, x_scale, np.empty((2, 6), np.float32))
    np.testing.assert_array_equal(out1, out2)


def test_uniform_groups_are_detected_at_repack():
    scales = np.ones((8, 2), np.float32)
    scales[5, 1] = 2.0  # second group has one row with two scales
    m = PlanarMatrix.from_codes(np.zeros((8, 512), np.int8), scales, BLOCK)
    assert m.group_uniform.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("codes_shape", "scales_shape", "block", "message"),
    [
        ((4, 300), (4, 1), 300, "multiple of 256"),
        ((4, 512), (4, 4), 128, "weight block 128"),
        ((4, 512), (4, 3), 256, "block_scales shape"),
        ((512,), (1, 2), 256, "2-D"),
    ],
)
def test_bad_layout_input_is_rejected_clearly(codes_shape, scales_shape, block, message):
    with pytest.raises(ValueError, match=message):
        PlanarMatrix.from_codes(np.zeros(codes_shape, np.int8), np.ones(scales_shape, np.float32), block)


def test_non_ternary_codes_are_rejected():
    codes = np.zeros((4, 256), np.int8)
    codes[2, 3] = 2
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        PlanarMatrix.from_codes(codes, np.ones((4, 1), np.float32), 256)


def test_bad_matmul_arguments_are_rejected_clearly():
    m = PlanarMatrix.from_codes(np.zeros((4, 512), np.int8), np.ones((4, 1), np.float32), 512)
    xq = np.zeros((2, 512), np.int8)
    ok_scale = np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match="int8\\[T, 512\\]"):
        m.matmul(xq.astype(np.int16), ok_scale, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="float32\\[2, 4\\]"):
        m.matmul(xq, ok_scale, np.empty((2, 5), np.float32))
    with pytest.raises(ValueError, match="3 columns"):
        m.matmul(xq, np.ones((2, 3), np.float32), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="x_scale must be float32"):
        m.matmul(xq, np.ones((2, 1), np.float64), np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        m.matmul(xq, ok_scale, np.empty((4, 2), np.float32).T)


# ---------------------------------------------------------------- dispatch


ZEN4_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni avx_vnni\n\n"
HASWELL_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpuinfo_flags_are_parsed_in_llvm_spelling():
    flags = cpu_features.parse_cpuinfo_flags(ZEN4_FLAGS)
    assert {"avx512vnni", "avxvnni", "avx2", "avx512bw"} <= flags
    assert "avx512_vnni" not in flags
    assert cpu_features.parse_cpuinfo_flags("no flags here") == frozenset()


def test_supported_paths_need_cpu_and_compile_target():
    everything = cpu_features.parse_cpuinfo_flags(ZEN4_FLAGS)
    assert cpu_features.supported_paths(everything, everything) == (
        "avx512vnni",
        "avxvnni",
        "avx2",
        "generic",
    )
    haswell = cpu_features.parse_cpuinfo_flags(HASWELL_FLAGS)
    assert cpu_features.supported_paths(haswell, everything) == ("avx2", "generic")
    # the CPU has VNNI but Numba compiles for a narrower target (NUMBA_CPU_FEATURES)
    target = cpu_features.parse_llvm_features("+avx2,+avx512f,-avx512vnni,+avx512bw")
    assert cpu_features.supported_paths(everything, target) == ("avx2", "generic")
    # VNNI on ymm without AVX-VNNI needs AVX512-VL
    no_vl = everything - {"avxvnni", "avx512vl"}
    assert cpu_features.supported_paths(no_vl, no_vl) == ("avx512vnni", "avx2", "generic")


def test_override_from_argument_and_environment(monkeypatch):
    flags = cpu_features.parse_cpuinfo_flags(ZEN4_FLAGS)
    monkeypatch.delenv(cpu_features.ENV_VAR, raising=False)
    assert cpu_features.select_path(None, flags, flags) == "avx512vnni"
    monkeypatch.setenv(cpu_features.ENV_VAR, "AVX2")
    assert cpu_features.select_path(None, flags, flags) == "avx2"
    monkeypatch.setenv(cpu_features.ENV_VAR, "auto")
    assert cpu_features.select_path(None, flags, flags) == "avx512vnni"
    assert cpu_features.select_path("generic", flags, flags) == "generic"
    monkeypatch.setenv(cpu_features.ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="TERNARY_KERNELS='sse9': unknown kernel path"):
        cpu_features.select_path(None, flags, flags)
    haswell = cpu_features.parse_cpuinfo_flags(HASWELL_FLAGS)
    with pytest.raises(ValueError, match="cannot run it \\(supported: avx2, generic\\)"):
        cpu_features.select_path("avx512vnni", haswell, flags)


def test_matrix_honours_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_features.ENV_VAR, "generic")
    m = PlanarMatrix.from_codes(np.zeros((4, 256), np.int8), np.ones((4, 1), np.float32), 256)
    assert m.kernels == "generic"
    m.kernels = PATHS[0]
    assert m.kernels == PATHS[0]
