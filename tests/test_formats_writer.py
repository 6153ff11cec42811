"""write_model: round trips, byte identity with llama.cpp's files, architectures, atomic replacement."""

from __future__ import annotations

import errno
import os

import gguf
import numpy as np
import pytest
from conftest import ORACLE, ORACLE_MODELS
from ternary.formats import quants
from ternary.formats.config import ModelConfig
from ternary.formats.errors import GGUFError
from ternary.formats.model_file import LINEAR_NAMES, expected_shapes, open_model
from ternary.formats.reader import GGUFFile
from ternary.formats.writer import write_model

N_VOCAB = 512


def tokenizer_metadata(n_vocab: int = N_VOCAB) -> dict:
    """A small gpt2-style vocabulary (the oracle's first tokens): enough for llama.cpp-shaped metadata."""
    with GGUFFile(ORACLE / "tiny-tq2_0-f16.gguf") as f:
        tokens = f.metadata["tokenizer.ggml.tokens"][:n_vocab]
        types = f.metadata["tokenizer.ggml.token_type"][:n_vocab]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        arch="bitnet", n_vocab=N_VOCAB, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512,
        n_ctx_train=128, rms_eps=float(np.float32(1e-5)), rope_base=10000.0, rope_neox=True,
        ffn_act="silu", tied_head=True,
    )  # fmt: skip
    values.update(overrides)
    return ModelConfig(**values)


def random_tensors(
    config: ModelConfig, seed: int = 0, per_tensor_scale: bool = False
) -> dict[str, np.ndarray]:
    """Exactly representable values: ternary x fp16 scales (per 256-block, or one per tensor for I2_S),
    fp16-representable embeddings, float32 norms."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if name.split(".")[-2] in LINEAR_NAMES:
            codes = rng.integers(-1, 2, size=shape).astype(np.float32)
            n, k = shape
            if per_tensor_scale:
                scales = np.full((n, k // 256, 1), rng.uniform(0.5, 2.0), dtype=np.float32)
            else:
                scales = rng.uniform(0.01, 2.0, size=(n, k // 256, 1)).astype(np.float32)
            codes.reshape(n, k // 256, 256)[:, :, 0] = 1  # a nonzero in every block: absmax == its scale
            scales = scales.astype(np.float16).astype(np.float32)
            out[name] = (codes.reshape(n, k // 256, 256) * scales).reshape(shape)
        elif len(shape) == 2:
            out[name] = rng.standard_normal(shape).astype(np.float16).astype(np.float32)
        else:
            out[name] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    return out


@pytest.mark.parametrize(
    "arch, linear_type, embed_type",
    [
        ("bitnet", "TQ2_0", "F16"),
        ("bitnet", "TQ1_0", "Q8_0"),
        ("bitnet", "TQ2_0", "Q6_K"),
        ("bitnet-25", "I2_S", "F32"),
        ("bitnet-b1.58", "I2_S", "BF16"),
        ("llama", "TQ1_0", "F16"),
    ],
)
def test_round_trip(tmp_path, arch, linear_type, embed_type):
    config = tiny_config(
        arch=arch, rope_neox=arch != "llama", ffn_act="silu" if arch in ("bitnet", "llama") else "relu2"
    )
    tensors = random_tensors(config, per_tensor_scale=linear_type == "I2_S")
    tok = tokenizer_metadata()
    path = tmp_path / "m.gguf"
    write_model(path, config, tensors, tok, linear_type=linear_type, embed_type=embed_type)
    with open_model(path) as m:
        assert m.config == config
        assert m.gguf.architecture == arch
        for key, value in tok.items():
            assert m.gguf.metadata[key] == value, key
        assert set(m.gguf.tensors) == set(tensors)
        embed_code = quants.quantize(getattr(quants, embed_type), tensors["token_embd.weight"])
        expected_embd = quants.dequantize(getattr(quants, embed_type), embed_code, (N_VOCAB, 256))
        np.testing.assert_array_equal(m.dequantize(m.token_embd), expected_embd)
        for name, value in tensors.items():
            if name != "token_embd.weight":
                np.testing.assert_array_equal(m.gguf.dequantize(name), value, err_msg=name)
        layer = m.layer(1)
        assert layer.attn_q.weight.type_name == linear_type
        assert (layer.attn_sub_norm is None) == (arch == "llama")
        codes, _, _ = m.ternary_codes(layer.ffn_down)
        np.testing.assert_array_equal(codes, np.sign(tensors["blk.1.ffn_down.weight"]))


@pytest.mark.parametrize("model", ORACLE_MODELS)
def test_rewriting_an_oracle_file_reproduces_its_tensor_bytes(tmp_path, model):
    """Dequantize every tensor of a llama.cpp file, write it again: the same bytes (Q6_K: the same values)."""
    src = ORACLE / f"{model}.gguf"
    with open_model(src) as m:
        tensors = {name: m.gguf.dequantize(name) for name in m.gguf.tensors}
        tok = {k: v for k, v in m.gguf.metadata.items() if k.startswith("tokenizer.")}
        linear_type = m.layer(0).attn_q.weight.type_name
        embed_type = m.token_embd.type_name
        write_model(tmp_path / "copy.gguf", m.config, tensors, tok, linear_type, embed_type)
        with open_model(tmp_path / "copy.gguf") as copy:
            assert copy.config == m.config
            assert copy.gguf.metadata["general.file_type"] == m.gguf.metadata["general.file_type"]
            for name, t in m.gguf.tensors.items():
                ours = copy.gguf.tensors[name]
                assert (ours.ggml_type, ours.shape) == (t.ggml_type, t.shape)
                if t.ggml_type == quants.Q6_K:
                    np.testing.assert_array_equal(copy.gguf.dequantize(name), tensors[name])
                else:
                    np.testing.assert_array_equal(ours.raw, t.raw, err_msg=name)


def test_written_file_reads_with_gguf_py(tmp_path):
    config = tiny_config()
    tensors = random_tensors(config)
    write_model(tmp_path / "m.gguf", config, tensors, tokenizer_metadata())
    ref = gguf.GGUFReader(tmp_path / "m.gguf")
    assert ref.fields["general.architecture"].contents() == "bitnet"
    assert ref.fields["bitnet.embedding_length"].contents() == 256
    assert ref.fields["bitnet.attention.layer_norm_rms_epsilon"].types == [gguf.GGUFValueType.FLOAT32]
    by_name = {t.name: t for t in ref.tensors}
    t = by_name["blk.0.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.TQ2_0 and list(t.shape) == [512, 256]
    np.testing.assert_array_equal(
        gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), tensors["blk.0.ffn_down.weight"]
    )


def test_separate_head_and_scale_tensors(tmp_path):
    config = tiny_config(tied_head=False)
    tensors = random_tensors(config)
    tensors["output.weight"] = tensors["token_embd.weight"][::-1].copy()
    tensors["blk.0.attn_q.scale"] = np.array([0.75], np.float32)
    tensors["blk.1.ffn_down.scale"] = np.array([1.25], np.float32)
    write_model(tmp_path / "m.gguf", config, tensors, tokenizer_metadata())
    with open_model(tmp_path / "m.gguf") as m:
        assert not m.config.tied_head
        assert m.output.name == "output.weight"
        np.testing.assert_array_equal(m.dequantize(m.output), tensors["output.weight"])
        assert m.layer(0).attn_q.scale == 0.75 and m.layer(1).ffn_down.scale == 1.25
        assert m.layer(0).attn_k.scale is None
        names = list(m.gguf.tensors)
        assert names.index("blk.0.attn_q.scale") == names.index("blk.0.attn_q.weight") + 1


def test_ffn_activation_key_and_override(tmp_path):
    tensors = random_tensors(tiny_config())
    path = tmp_path / "m.gguf"
    write_model(path, tiny_config(ffn_act="relu2"), tensors, tokenizer_metadata())
    with open_model(path) as m:
        assert m.gguf.metadata["bitnet.hidden_act"] == "relu2"
        assert m.config.ffn_act == "relu2"
    with open_model(path, ffn_act="silu") as m:
        assert m.config.ffn_act == "silu"
    write_model(path, tiny_config(ffn_act="relu2"), tensors, tokenizer_metadata(), hidden_act=False)
    with open_model(path) as m:
        assert "bitnet.hidden_act" not in m.gguf.metadata and m.config.ffn_act == "silu"  # bitnet default
    tok = tokenizer_metadata() | {"bitnet.hidden_activation": "relu_squared"}
    write_model(path, tiny_config(), tensors, tok)
    with open_model(path) as m:
        assert m.config.ffn_act == "relu2"
    with pytest.raises(GGUFError, match="ffn_act"):
        open_model(path, ffn_act="gelu")


def test_failed_write_keeps_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"precious")
    config = tiny_config()
    tensors = random_tensors(config)

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left on device") as info:
        write_model(path, config, tensors, tokenizer_metadata())
    assert str(path) in str(info.value) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["model.gguf"]  # no temporary file left behind


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("blk.1.ffn_up.weight"), "missing tensors: blk.1.ffn_up.weight"),
        (lambda t: t.update({"blk.0.attn_k.weight": np.zeros((256, 256), np.float32)}), "shape"),
        (lambda t: t.update({"blk.0.attn_sub_norm.weight": np.full(256, np.nan, np.float32)}), "NaN"),
        (lambda t: t.update({"rope_freqs.weight": np.ones(32, np.float32)}), "not a tensor of a bitnet"),
        (lambda t: t.update({"blk.0.attn_q.scale": np.ones(2, np.float32)}), "one value"),
    ],
)
def test_bad_tensors_are_refused_before_writing(tmp_path, mutate, message):
    config = tiny_config()
    tensors = random_tensors(config)
    mutate(tensors)
    with pytest.raises(ValueError, match=message):
        write_model(tmp_path / "m.gguf", config, tensors, tokenizer_metadata())
    assert not os.listdir(tmp_path)


def test_bad_arguments(tmp_path):
    config = tiny_config()
    tensors = random_tensors(config)
    with pytest.raises(ValueError, match="linear_type"):
        write_model(tmp_path / "m.gguf", config, tensors, tokenizer_metadata(), linear_type="Q4_0")
    with pytest.raises(ValueError, match="embed_type"):
        write_model(tmp_path / "m.gguf", config, tensors, tokenizer_metadata(), embed_type="TQ2_0")
    with pytest.raises(ValueError, match="entries but config.n_vocab"):
        write_model(tmp_path / "m.gguf", config, tensors, tokenizer_metadata(N_VOCAB - 1))
    with pytest.raises(ValueError, match="set by write_model"):
        write_model(tmp_path / "m.gguf", config, tensors, {"bitnet.block_count": 3})
    with pytest.raises(ValueError, match="empty array"):
        write_model(tmp_path / "m.gguf", config, tensors, {"tokenizer.ggml.merges": []})
    assert not os.listdir(tmp_path)
