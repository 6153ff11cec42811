"""GGUFFile and open_model on the oracle files; decoders against gguf-py, an independent reference."""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest
from conftest import ORACLE, ORACLE_MODELS
from ternary.formats.model_file import LINEAR_NAMES, open_model
from ternary.formats.reader import GGUFFile


@pytest.fixture(scope="module", params=ORACLE_MODELS)
def oracle_pair(request):
    path = ORACLE / f"{request.param}.gguf"
    with GGUFFile(path) as ours:
        yield request.param, ours, gguf.GGUFReader(path)


def test_metadata_and_tensor_table_match_gguf_py(oracle_pair):
    _, ours, ref = oracle_pair
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(ref_fields)
    for key, field in ref_fields.items():
        assert ours.metadata[key] == field.contents(), key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(s) for s in reversed(t.shape))
        assert info.ggml_type == int(t.tensor_type)
        assert info.offset == int(t.data_offset)  # gguf-py reports absolute offsets
        assert np.array_equal(info.raw, np.asarray(t.data).reshape(-1).view(np.uint8))
        assert not info.raw.flags.writeable


def test_every_tensor_decodes_like_gguf_py(oracle_pair):
    _, ours, ref = oracle_pair
    for t in ref.tensors:
        expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        got = ours.dequantize(t.name)
        assert got.dtype == np.float32
        assert np.array_equal(got, expected.reshape(got.shape)), t.name


@pytest.mark.parametrize("model", ORACLE_MODELS)
def test_open_model_config_and_layers(model):
    with open_model(ORACLE / f"{model}.gguf") as m:
        c = m.config
        assert (c.arch, c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv) == (
            "bitnet",
            2048,
            256,
            4,
            4,
            2,
        )
        assert (c.head_dim, c.n_ff, c.n_ctx_train, c.rope_dim) == (64, 768, 512, 64)
        assert c.rope_neox and c.tied_head and c.ffn_act == "silu"
        assert c.rms_eps == pytest.approx(1e-5) and c.rope_base == 10000.0
        has_scales = "scaletensors" in model
        for layer in range(c.n_layer):
            lt = m.layer(layer)
            for name in LINEAR_NAMES:
                lin = getattr(lt, name)
                assert (lin.scale is not None) == has_scales
                codes, scales, block = m.ternary_codes(lin)
                assert set(np.unique(codes)) <= {-1, 0, 1}
                w = m.dequantize(lin.weight)
                rebuilt = codes.astype(np.float32) * np.repeat(scales, block, axis=1)
                assert np.array_equal(rebuilt, w)
        assert m.output is m.token_embd
        assert m.config.ffn_act == "silu"
    with open_model(ORACLE / f"{model}.gguf", ffn_act="relu2") as m:
        assert m.config.ffn_act == "relu2"


def test_blockscales_file_has_distinct_block_scales():
    with open_model(ORACLE / "tiny-tq2_0-blockscales-f16.gguf") as m:
        _, scales, block = m.ternary_codes(m.layer(0).ffn_down)
        assert block == 256 and scales.shape == (256, 3)
        assert len(np.unique(scales)) > 100
