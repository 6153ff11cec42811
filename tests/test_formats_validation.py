"""Damaged and inconsistent files always end in GGUFError("<file>: <key or tensor>: <problem>").

Files are built byte by byte here (a tiny GGUF encoder independent of gguf-py and of our writer), so each test
controls exactly which field lies.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from ternary.formats import quants
from ternary.formats.errors import GGUFError
from ternary.formats.model_file import open_model
from ternary.formats.reader import ARRAY, STRING, UINT32, UINT64, GGUFFile
from ternary.formats.writer import write_model
from test_formats_writer import random_tensors, tiny_config, tokenizer_metadata

SCALAR_FORMATS = {  # GGUF value type -> struct format (the spec, not the reader's table)
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<B",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value, item_type: int | None = None) -> bytes:
    if vtype in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[vtype], value)
    if vtype == STRING:
        return _string(value)
    assert vtype == ARRAY and item_type is not None
    return struct.pack("<IQ", item_type, len(value)) + b"".join(_value(item_type, v) for v in value)


def gguf_bytes(kvs, tensors, data: bytes = b"", version: int = 3, alignment: int = 32) -> bytes:
    """kvs: [(key, vtype, value[, item_type])]; tensors: [(name, ggml_type, ne (ggml order), offset)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value, *item in kvs:
        out += _string(key) + struct.pack("<I", vtype) + _value(vtype, value, *(item or [None]))
    for name, ggml_type, ne, offset in tensors:
        out += _string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


ARCH = ("general.architecture", STRING, "bitnet")


def one_tensor_file(ne=(256, 2), ggml_type=quants.F32, offset=0, extra_data=0) -> bytes:
    try:
        nbytes = min(quants.tensor_nbytes(ggml_type, tuple(reversed(ne))), 1 << 16)
    except ValueError:
        nbytes = 64
    return gguf_bytes([ARCH], [("w", ggml_type, ne, offset)], b"\1" * (nbytes + extra_data))


def expect_error(tmp_path, content: bytes, *patterns: str, opener=GGUFFile) -> GGUFError:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError) as info:
        opener(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for pattern in patterns:
        assert pattern in message, message
    return info.value


# ---------------------------------------------------------------- the container


def test_valid_hand_built_file_opens(tmp_path):
    path = tmp_path / "ok.gguf"
    kvs = [ARCH, ("k.arr", ARRAY, ["a", "\u00e9"], STRING), ("k.nums", ARRAY, [1, 2], UINT64)]
    data = np.arange(512, dtype=np.float32).tobytes()
    path.write_bytes(gguf_bytes(kvs, [("w", quants.F32, (256, 2), 0)], data))
    with GGUFFile(path) as f:
        assert f.metadata == {"general.architecture": "bitnet", "k.arr": ["a", "é"], "k.nums": [1, 2]}
        assert f.array_types == {"k.arr": STRING, "k.nums": UINT64}
        np.testing.assert_array_equal(f.dequantize("w"), np.arange(512, dtype=np.float32).reshape(2, 256))


def test_directory_missing_empty_and_tiny_files(tmp_path):
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "absent.gguf")
    expect_error(tmp_path, b"", "header", "0 bytes, too small")
    expect_error(tmp_path, b"GGUF\3\0\0\0", "too small")


def test_magic_and_version(tmp_path):
    good = one_tensor_file()
    expect_error(tmp_path, b"GGML" + good[4:], "magic", "not a GGUF file")
    expect_error(tmp_path, good[:4] + struct.pack("<I", 1) + good[8:], "version", "version 1")
    expect_error(tmp_path, good[:4] + struct.pack(">I", 3) + good[8:], "big-endian")
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(good[:4] + struct.pack("<I", 2) + good[8:])
    assert GGUFFile(v2).version == 2


def test_every_truncation_is_an_error(tmp_path):
    content = gguf_bytes(
        [ARCH, ("tok", ARRAY, ["x", "yy", "zzz"], STRING), ("eps", 6, 1e-5)],
        [("a", quants.F32, (4,), 0), ("b", quants.TQ2_0, (256, 1), 32)],
        b"\0" * (32 + 66),
    )
    for cut in range(len(content)):
        expect_error(tmp_path, content[:cut])


@pytest.mark.parametrize("field_offset, what", [(8, "tensor_count"), (16, "kv_count")])
def test_huge_counts(tmp_path, field_offset, what):
    good = one_tensor_file()
    for value in (2**20, 2**63, 2**64 - 1):
        bad = good[:field_offset] + struct.pack("<Q", value) + good[field_offset + 8 :]
        expect_error(tmp_path, bad, what, "cannot fit")


def test_lying_string_and_array_lengths(tmp_path):
    good = gguf_bytes([ARCH, ("k", ARRAY, [1, 2, 3], UINT32)], [])
    key_len_at = 24
    bad = good[:key_len_at] + struct.pack("<Q", 2**62) + good[key_len_at + 8 :]
    expect_error(tmp_path, bad, "metadata key #0", "needs")
    count_at = good.index(b"k") + 1 + 4 + 4  # key "k", value type ARRAY, item type
    bad = good[:count_at] + struct.pack("<Q", 2**40) + good[count_at + 8 :]
    expect_error(tmp_path, bad, "k: count 1099511627776 cannot fit")


def test_bad_metadata_values(tmp_path):
    unknown = gguf_bytes([ARCH], [])[:16] + struct.pack("<Q", 1) + _string("x") + struct.pack("<IQ", 13, 0)
    expect_error(tmp_path, unknown + b"\0" * 32, "x: unknown value type 13")
    expect_error(tmp_path, gguf_bytes([ARCH, ARCH], []), "general.architecture: duplicate metadata key")
    content = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("x") + struct.pack("<I", ARRAY)
    # four levels of arrays around one UINT32
    content += struct.pack("<IQ", ARRAY, 1) * 4 + struct.pack("<IQ", UINT32, 1) + struct.pack("<I", 1)
    expect_error(tmp_path, content + b"\0" * 32, "nested deeper")
    bad_align = gguf_bytes([ARCH, ("general.alignment", UINT32, 48)], [])
    expect_error(tmp_path, bad_align, "general.alignment", "power of two")
    expect_error(tmp_path, gguf_bytes([("general.alignment", STRING, "32")], []), "must be a UINT32")


@pytest.mark.parametrize(
    "ne, ggml_type, offset, patterns",
    [
        ((256, 2, 1, 1, 1), quants.F32, 0, ("w", "n_dims = 5")),
        ((256, 0), quants.F32, 0, ("w", "ne[1] = 0")),
        ((2**32, 2**32), quants.F32, 0, ("w", "overflows int64")),
        ((2**40, 2**20), quants.F32, 0, ("w", "extends past the end")),
        ((256, 2), 99, 0, ("w", "unknown ggml type id 99")),
        ((100, 2), quants.TQ2_0, 0, ("w", "multiple of 256")),
        ((256, 2), quants.F32, 16, ("w", "not a multiple of 32")),
        ((256, 2), quants.F32, 2**40, ("w", "extends past the end")),
    ],
)
def test_lying_tensor_infos(tmp_path, ne, ggml_type, offset, patterns):
    expect_error(tmp_path, one_tensor_file(ne, ggml_type, offset), *patterns)


def test_overlapping_duplicate_and_long_tensor_names(tmp_path):
    data = b"\0" * 2048
    two = [("a", quants.F32, (256,), 0), ("b", quants.F32, (256,), 512)]
    expect_error(tmp_path, gguf_bytes([ARCH], two, data), "b", "overlaps tensor 'a'")
    dup = [("a", quants.F32, (4,), 0), ("a", quants.F32, (4,), 32)]
    expect_error(tmp_path, gguf_bytes([ARCH], dup, data), "a: duplicate tensor name")
    expect_error(tmp_path, gguf_bytes([ARCH], [("n" * 64, quants.F32, (4,), 0)], data), "longer than 63")


def test_i2s_tensor_is_accepted_and_code_three_named(tmp_path):
    codes = np.zeros((2, 128), np.int8)
    raw = quants.quantize(quants.I2_S, codes.astype(np.float32))
    raw[0] = 0xFF
    path = tmp_path / "i2s.gguf"
    path.write_bytes(gguf_bytes([ARCH], [("w", quants.I2_S, (128, 2), 0)], raw.tobytes()))
    with GGUFFile(path) as f:
        assert f.tensors["w"].type_name == "I2_S" and f.tensors["w"].raw.size == 2 * 128 // 4 + 32
        with pytest.raises(GGUFError, match=r"i2s.gguf: w: I2_S code 3"):
            f.dequantize("w")
        with pytest.raises(GGUFError, match="no such tensor"):
            f.dequantize("nope")


# ---------------------------------------------------------------- the model on top of the container


def rebuild(path, src, drop_keys=(), set_keys=(), drop_tensors=(), add_tensors=(), retype=None):
    """Copy a GGUF through the hand encoder, changing metadata / tensors."""
    with GGUFFile(src) as f:
        kvs = []
        for key, value in f.metadata.items():
            if key in drop_keys:
                continue
            vtype = f.value_types[key]
            kvs.append((key, vtype, value, f.array_types[key]) if vtype == ARRAY else (key, vtype, value))
        kvs += list(set_keys)
        infos, data = [], b""
        items = [(t.name, t.ggml_type, t.shape, t.raw.tobytes()) for t in f.tensors.values()]
    items = [i for i in items if i[0] not in drop_tensors] + list(add_tensors)
    for name, ggml_type, shape, raw in items:
        if retype and name in retype:
            ggml_type, raw = retype[name]
        infos.append((name, ggml_type, tuple(reversed(shape)), len(data)))
        data += raw + b"\0" * (-len(raw) % 32)
    path.write_bytes(gguf_bytes(kvs, infos, data))
    return path


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "good.gguf"
    config = tiny_config(n_layer=1)
    write_model(path, config, random_tensors(config), tokenizer_metadata())
    return path


def expect_model_error(tmp_path, good_model, *patterns, **changes):
    path = rebuild(tmp_path / "bad.gguf", good_model, **changes)
    return expect_error(tmp_path, path.read_bytes(), *patterns, opener=open_model)


def test_rebuilt_good_model_opens(tmp_path, good_model):
    path = rebuild(tmp_path / "same.gguf", good_model)
    with open_model(path) as m, open_model(good_model) as ref:
        assert m.config == ref.config


@pytest.mark.parametrize(
    "changes, patterns",
    [
        (dict(drop_keys=["bitnet.embedding_length"]), ("bitnet.embedding_length", "required key is missing")),
        (
            dict(drop_keys=["bitnet.attention.layer_norm_rms_epsilon"]),
            ("layer_norm_rms_epsilon", "required key is missing"),
        ),
        (dict(drop_keys=["general.architecture"]), ("general.architecture", "missing")),
        (
            dict(drop_keys=["general.architecture"], set_keys=[("general.architecture", STRING, "gpt2")]),
            ("unsupported architecture 'gpt2'",),
        ),
        (
            dict(
                drop_keys=["bitnet.embedding_length"], set_keys=[("bitnet.embedding_length", STRING, "256")]
            ),
            ("bitnet.embedding_length", "must be an integer"),
        ),
        (
            dict(
                drop_keys=["bitnet.embedding_length"], set_keys=[("bitnet.embedding_length", UINT64, 2**40)]
            ),
            ("bitnet.embedding_length", "out of range"),
        ),
        (
            dict(
                drop_keys=["bitnet.attention.head_count"],
                set_keys=[("bitnet.attention.head_count", ARRAY, [4], UINT32)],
            ),
            ("bitnet.attention.head_count", "per-layer arrays"),
        ),
        (
            dict(
                drop_keys=["bitnet.attention.head_count_kv"],
                set_keys=[("bitnet.attention.head_count_kv", UINT32, 3)],
            ),
            ("head_count_kv", "not a multiple"),
        ),
        (
            dict(
                drop_keys=["bitnet.attention.layer_norm_rms_epsilon"],
                set_keys=[("bitnet.attention.layer_norm_rms_epsilon", 6, float("nan"))],
            ),
            ("layer_norm_rms_epsilon", "positive finite"),
        ),
        (
            dict(set_keys=[("bitnet.hidden_act", STRING, "gelu")]),
            ("bitnet.hidden_act", "unknown FFN activation"),
        ),
        (dict(drop_tensors=["blk.0.ffn_up.weight"]), ("blk.0.ffn_up.weight", "required tensor is missing")),
        (dict(drop_tensors=["output_norm.weight"]), ("output_norm.weight", "required tensor is missing")),
        (
            dict(add_tensors=[("rope_freqs.weight", quants.F32, (32,), b"\0" * 128)]),
            ("rope_freqs.weight", "unexpected tensor"),
        ),
        (
            dict(add_tensors=[("blk.0.attn_q.scale", quants.F32, (2,), b"\0" * 8)]),
            ("blk.0.attn_q.scale", "one element"),
        ),
        (
            dict(
                drop_tensors=["blk.0.attn_k.weight"],
                add_tensors=[("blk.0.attn_k.weight", quants.TQ2_0, (256, 256), b"\0" * 66 * 256)],
            ),
            ("blk.0.attn_k.weight", "shape (256, 256) does not match", "expected (128, 256)"),
        ),
        (
            dict(retype={"blk.0.attn_q.weight": (quants.F16, b"\0" * 2 * 256 * 256)}),
            ("blk.0.attn_q.weight", "is not ternary"),
        ),
        (
            dict(retype={"token_embd.weight": (quants.TQ2_0, b"\0" * 66 * 512)}),
            ("token_embd.weight", "not supported"),
        ),
        (
            dict(retype={"blk.0.attn_norm.weight": (quants.Q8_0, b"\0" * 34 * 8)}),
            ("blk.0.attn_norm.weight", "F32/F16/BF16"),
        ),
        (
            dict(drop_keys=["general.architecture"], set_keys=[("general.architecture", STRING, "llama")]),
            ("llama.context_length", "required key is missing"),
        ),
    ],
)
def test_model_validation(tmp_path, good_model, changes, patterns):
    expect_model_error(tmp_path, good_model, *patterns, **changes)


def test_sub_norms_in_a_llama_file_are_refused(tmp_path, good_model):
    with GGUFFile(good_model) as f:
        renamed = [
            (k.replace("bitnet.", "llama.", 1), f.value_types[k], v)
            for k, v in f.metadata.items()
            if k.startswith("bitnet.")
        ]
    changes = dict(
        drop_keys=["general.architecture", *(k.replace("llama.", "bitnet.", 1) for k, _, _ in renamed)],
        set_keys=[("general.architecture", STRING, "llama"), *renamed],
    )
    expect_model_error(tmp_path, good_model, "blk.0.attn_sub_norm.weight", "no sub-norms", **changes)
    changes["drop_tensors"] = ["blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"]
    with open_model(rebuild(tmp_path / "llama.gguf", good_model, **changes)) as m:
        assert m.config.arch == "llama" and not m.config.rope_neox and m.config.ffn_act == "silu"
        assert m.layer(0).attn_sub_norm is None


def test_model_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="n_head_kv"):
        tiny_config(n_head_kv=3)
    with pytest.raises(ValueError, match="rope_dim"):
        tiny_config(rope_dim=65)
    with pytest.raises(ValueError, match="n_embd: 1099511627776 is out of range"):
        tiny_config(n_embd=2**40)
    with pytest.raises(ValueError, match="ffn_act"):
        tiny_config(ffn_act="gelu")
    assert tiny_config(rope_dim=0).rope_dim == 64
