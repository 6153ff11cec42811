"""The forward pass against the independent float64 reference (tests/reference_forward.py), and the slot KV
cache: batched prompts, one-token decodes and mixed continuous batches must give the same logits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ORACLE, ORACLE_MODELS
from reference_forward import explain_by_near_ties, load_gguf, reference_forward
from ternary.engine import activations
from ternary.engine.model import Layer, Linear, Transformer, load_transformer
from ternary.engine.weights import F16Matrix, F32Matrix, TernaryMatrix
from ternary.formats.config import ModelConfig
from ternary.formats.model_file import open_model

IDS = [1792, 439, 292, 105, 98, 300, 97, 99, 99, 105, 40, 110, 330, 10, 549, 32, 257, 44, 264, 32]


pytestmark = pytest.mark.usefixtures("one_numba_thread")


def run_batch(m: Transformer, ids: list[int]) -> np.ndarray:
    m.reset_slot(0)
    return m.forward(ids, np.arange(len(ids)), np.zeros(len(ids), dtype=np.int32))


def assert_matches_reference(m: Transformer, ids: list[int], want: np.ndarray) -> None:
    """Within 1e-4 everywhere, once roundings that sit within 2e-5 of a tie are taken the reference's way."""
    flips = explain_by_near_ties(activations, lambda: run_batch(m, ids), want, atol=1e-4)
    assert len(flips) <= 2, flips


# ---------------------------------------------------------------- against the float64 reference


@pytest.mark.parametrize("act_quant", ["q8k", "per_token"])
@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_oracle_models_match_reference(name: str, act_quant: str) -> None:
    cfg, tensors, head_act = load_gguf(str(ORACLE / f"{name}.gguf"))
    want = reference_forward(cfg, tensors, IDS, act_quant=act_quant, head_act=head_act)
    with open_model(ORACLE / f"{name}.gguf") as mf:
        m = load_transformer(mf, act_quant=act_quant, n_ctx=64)
    assert_matches_reference(m, IDS, want)


def test_relu2_override_matches_reference() -> None:
    path = ORACLE / "tiny-tq2_0-f16.gguf"
    cfg, tensors, head_act = load_gguf(str(path))
    want = reference_forward(cfg, tensors, IDS, head_act=head_act, ffn_act="relu2")
    silu = reference_forward(cfg, tensors, IDS, head_act=head_act)
    assert np.abs(want - silu).max() > 1.0  # the activation matters: this comparison can fail
    with open_model(path, ffn_act="relu2") as mf:
        m = load_transformer(mf, n_ctx=64)
    assert m.ffn_act == "relu2"
    assert_matches_reference(m, IDS, want)


def synthetic_llama() -> tuple[ModelConfig, dict[str, np.ndarray], Transformer]:
    """A ternary ``llama``-arch model: no sub-norms, adjacent-pair RoPE on half the head, ReLU², an untied F32
    head, per-tensor (block = K) scales on some linears and ``.scale`` multipliers on others."""
    rng = np.random.default_rng(5)
    cfg = ModelConfig(
        arch="llama", n_vocab=96, n_embd=256, n_layer=2, n_head=4, n_head_kv=1, head_dim=64, n_ff=512,
        n_ctx_train=32, rope_dim=32, rope_neox=False, ffn_act="relu2", tied_head=False,
    )  # fmt: skip
    tensors: dict[str, np.ndarray] = {}
    embd = (rng.normal(size=(96, 256)) * 0.5).astype(np.float16)
    tensors["token_embd.weight"] = embd.astype(np.float32)
    tensors["output.weight"] = rng.normal(size=(96, 256)).astype(np.float32)
    tensors["output_norm.weight"] = rng.uniform(0.5, 1.5, 256).astype(np.float32)
    layers = []
    shapes = {"attn_q": (256, 256), "attn_k": (64, 256), "attn_v": (64, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}  # fmt: skip
    for il in range(2):
        lin = {}
        for i, (kind, (n, k)) in enumerate(shapes.items()):
            block = k if i % 2 else 256
            codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
            scales = rng.uniform(0.02, 0.06, size=(n, k // block)).astype(np.float32)
            scale = 1.5 if kind in ("attn_v", "ffn_up") else None
            matrix = TernaryMatrix.from_codes(codes, scales, block)
            tensors[f"blk.{il}.{kind}.weight"] = matrix.dequantize()
            if scale is not None:
                tensors[f"blk.{il}.{kind}.scale"] = np.array([scale], dtype=np.float32)
            lin[kind] = Linear(matrix, scale)
        norms = {kind: rng.uniform(0.5, 1.5, 256).astype(np.float32) for kind in ("attn_norm", "ffn_norm")}
        for kind, w in norms.items():
            tensors[f"blk.{il}.{kind}.weight"] = w
        layers.append(
            Layer(norms["attn_norm"], lin["attn_q"], lin["attn_k"], lin["attn_v"], None, lin["attn_output"],
                  norms["ffn_norm"], lin["ffn_gate"], lin["ffn_up"], None, lin["ffn_down"])
        )  # fmt: skip
    model = Transformer(
        cfg, F16Matrix(embd.view(np.uint16)), F32Matrix(tensors["output.weight"]), layers,
        tensors["output_norm.weight"], n_slots=2,
    )  # fmt: skip
    return cfg, tensors, model


@pytest.mark.parametrize("act_quant", ["q8k", "per_token"])
def test_synthetic_llama_arch_matches_reference(act_quant: str) -> None:
    cfg, tensors, m = synthetic_llama()
    m.act_quant = act_quant
    ids = [5, 17, 3, 95, 0, 42, 42, 7]
    want = reference_forward(cfg, tensors, ids, act_quant=act_quant)
    assert_matches_reference(m, ids, want)


# ---------------------------------------------------------------- the slot KV cache


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    with open_model(ORACLE / "tiny-tq2_0-f16.gguf") as mf:
        return load_transformer(mf, n_slots=3, n_ctx=32)


def fresh(m: Transformer, ids: list[int], slot: int = 0) -> np.ndarray:
    m.reset_slot(slot)
    return m.forward(ids, np.arange(len(ids)), np.full(len(ids), slot))


def test_one_token_at_a_time_equals_the_batch(tiny: Transformer) -> None:
    batch = fresh(tiny, IDS)
    tiny.reset_slot(1)
    steps = np.concatenate([tiny.forward([t], [i], [1]) for i, t in enumerate(IDS)])
    np.testing.assert_allclose(steps, batch, atol=1e-4)
    tiny.reset_slot(2)
    chunks = [
        tiny.forward(IDS[a:b], np.arange(a, b), np.full(b - a, 2)) for a, b in ((0, 7), (7, 8), (8, 20))
    ]
    np.testing.assert_allclose(np.concatenate(chunks), batch, atol=1e-4)


def test_continuous_batch_mixes_slots(tiny: Transformer) -> None:
    a, b = IDS[:9], IDS[9:16]
    want_a = fresh(tiny, a + [7, 8])
    want_b = fresh(tiny, b + [9])
    fresh(tiny, a[:5], slot=0)
    fresh(tiny, b, slot=1)
    # one call: the rest of slot 0's prompt, slot 1's next token, and a new sequence in slot 2
    tiny.reset_slot(2)
    tokens = a[5:] + [9, a[0]]
    positions = [5, 6, 7, 8, len(b), 0]
    slots = [0, 0, 0, 0, 1, 2]
    got = tiny.forward(tokens, positions, slots)
    np.testing.assert_allclose(got[:4], want_a[5:9], atol=1e-5)
    np.testing.assert_allclose(got[4], want_b[-1], atol=1e-5)
    np.testing.assert_allclose(got[5], want_a[0], atol=1e-5)
    # a batch of one decode step per slot, logits only where asked
    got = tiny.forward([7, 5], [9, 1], [0, 2], logits_for=[True, False])
    assert got.shape == (1, tiny.head.n_out)
    np.testing.assert_allclose(got[0], want_a[9], atol=1e-5)
    np.testing.assert_array_equal(tiny.cache.lengths, [10, len(b) + 1, 2])


def test_rewinding_a_slot_overwrites_its_tail(tiny: Transformer) -> None:
    fresh(tiny, IDS[:12])
    got = tiny.forward([3], [5], [0])
    np.testing.assert_allclose(got[0], fresh(tiny, IDS[:5] + [3])[-1], atol=1e-5)


@pytest.mark.parametrize(
    ("tokens", "positions", "slots", "message"),
    [
        ([1, 2], [0, 2], [0, 0], "consecutive"),
        ([1], [3], [0], "leaves a hole"),
        ([1], [0], [3], "slot ids must be in"),
        ([1], [32], [0], "the context size"),
        ([5000], [0], [0], "token ids must be in"),
        ([], [], [], "empty batch"),
        ([1, 2], [0], [0], "same length"),
    ],
)
def test_bad_batches_are_refused(tiny: Transformer, tokens, positions, slots, message: str) -> None:
    tiny.reset_slot(0)
    with pytest.raises(ValueError, match=message):
        tiny.forward(tokens, positions, slots)
