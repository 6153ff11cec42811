"""write_model: float tensors + ModelConfig + tokenizer metadata -> a GGUF that llama.cpp loads.

Tensors are encoded by ``quants.quantize`` (byte-identical to llama.cpp's reference quantizers) and laid out
by ``gguf.GGUFWriter``. The output is written to a temporary file in the destination directory, fsynced and
then renamed over the destination, so a failure (a full disk, a bad tensor) never leaves a half-written model
and never destroys an existing file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from ternary.formats import quants
from ternary.formats.config import ModelConfig, default_ffn_act
from ternary.formats.model_file import expected_shapes, is_linear_weight, scaled_weight
from ternary.formats.reader import TensorInfo

LINEAR_TYPES = {"TQ1_0": quants.TQ1_0, "TQ2_0": quants.TQ2_0, "I2_S": quants.I2_S}
EMBED_TYPES = {
    "F32": quants.F32,
    "F16": quants.F16,
    "BF16": quants.BF16,
    "Q8_0": quants.Q8_0,
    "Q6_K": quants.Q6_K,
}
# general.file_type (llama_ftype): MOSTLY_TQ1_0 = 36, MOSTLY_TQ2_0 = 37; the BitNet fork's MOSTLY_I2_S = 40
FILE_TYPES = {quants.TQ1_0: 36, quants.TQ2_0: 37, quants.I2_S: 40}
QUANTIZATION_VERSION = 2


def _check_tensors(
    config: ModelConfig, tensors: Mapping[str, np.ndarray | TensorInfo]
) -> dict[str, tuple[int, ...]]:
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, value in tensors.items():
        copied = isinstance(value, TensorInfo)
        shape = value.shape if copied else tuple(np.shape(value))
        if name in expected:
            if shape != expected[name]:
                raise ValueError(
                    f"{name}: shape {shape} does not match the config, expected {expected[name]}"
                )
        elif scaled_weight(name) in expected:
            if int(np.size(value)) != 1:
                raise ValueError(f"{name}: a scale tensor holds one value, got shape {shape}")
        else:
            raise ValueError(
                f"{name}: not a tensor of a {config.arch} model (llama.cpp would refuse the file)"
            )
        if not copied and not np.isfinite(np.asarray(value, dtype=np.float32)).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
    return expected


def _infer_value_type(key: str, value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, array item type) for a plain Python / NumPy metadata value."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], GGUFValueType):
        v, vtype = value
        if vtype == GGUFValueType.ARRAY:
            raise ValueError(f"{key}: give arrays as lists, not (value, ARRAY)")
        return v, vtype, None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, int):
        if 0 <= value < 2**32:
            return value, GGUFValueType.UINT32, None
        if -(2**31) <= value < 2**31:
            return value, GGUFValueType.INT32, None
        return value, GGUFValueType.INT64, None
    if isinstance(value, float):
        return value, GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"{key}: GGUF cannot store an empty array")
        items = list(value)
        if all(isinstance(v, str) for v in items):
            return items, GGUFValueType.ARRAY, GGUFValueType.STRING
        if all(isinstance(v, bool) for v in items):
            return items, GGUFValueType.ARRAY, GGUFValueType.BOOL
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items, GGUFValueType.ARRAY, GGUFValueType.INT32
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
            return [float(v) for v in items], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
        raise ValueError(f"{key}: array items must all be str, bool, int or float")
    raise ValueError(f"{key}: cannot store a value of type {type(value).__name__} in GGUF")


def _model_metadata(config: ModelConfig, hidden_act: bool | None) -> list[tuple[str, Any, GGUFValueType]]:
    c = config
    p = c.arch + "."
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    md = [
        (p + "context_length", c.n_ctx_train, u32),
        (p + "embedding_length", c.n_embd, u32),
        (p + "block_count", c.n_layer, u32),
        (p + "feed_forward_length", c.n_ff, u32),
        (p + "attention.head_count", c.n_head, u32),
        (p + "attention.head_count_kv", c.n_head_kv, u32),
        (p + "attention.layer_norm_rms_epsilon", c.rms_eps, f32),
        (p + "rope.freq_base", c.rope_base, f32),
        (p + "rope.dimension_count", c.rope_dim, u32),
        (p + "vocab_size", c.n_vocab, u32),
    ]
    if c.n_head * c.head_dim != c.n_embd:
        md += [(p + "attention.key_length", c.head_dim, u32), (p + "attention.value_length", c.head_dim, u32)]
    if hidden_act or (hidden_act is None and c.ffn_act != default_ffn_act(c.arch)):
        md.append((p + "hidden_act", c.ffn_act, GGUFValueType.STRING))
    return md


def _encode(
    name: str, value: np.ndarray | TensorInfo, linear_type: int, embed_type: int
) -> tuple[np.ndarray, int]:
    """(bytes, ggml type) for one tensor."""
    if isinstance(value, TensorInfo):  # another file's tensor, in its own type, byte for byte
        return np.asarray(value.raw), value.ggml_type
    x = np.asarray(value, dtype=np.float32)
    if is_linear_weight(name):
        ggml_type = linear_type
    elif name in ("token_embd.weight", "output.weight"):
        ggml_type = embed_type
    else:
        ggml_type = quants.F32  # norms and .scale tensors
        x = x.reshape(-1) if name.endswith(".scale") else x
    try:
        return quants.quantize(ggml_type, x), ggml_type
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def write_model(
    path: str | os.PathLike[str],
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray | TensorInfo],
    tokenizer_metadata: Mapping[str, Any],
    linear_type: str = "TQ2_0",
    embed_type: str = "F16",
    *,
    name: str = "ternary",
    hidden_act: bool | None = None,
) -> None:
    """Write a model GGUF atomically.

    ``tensors``: GGUF names -> float arrays in NumPy order (``blk.0.attn_q.weight`` is [n_out, n_in]); linear
    weights should already be ternary times a scale (the TQ quantizers take each 256-block's absmax as d).
    Optional ``blk.N.<linear>.scale`` one-element tensors are written as F32[1]. A value may also be a reader
    ``TensorInfo``: it is copied byte for byte in its own type (a Q6_K head that a re-encode would change,
    when converting a file's linears to another type). ``tokenizer_metadata`` is
    passed through (``tokenizer.ggml.*``; ints become UINT32, int lists INT32, floats FLOAT32, or give
    ``(value, GGUFValueType)``). ``hidden_act``: write ``<arch>.hidden_act`` always (True), never (False) or
    only when ``config.ffn_act`` differs from the architecture's default (None); llama.cpp ignores the key.
    Raises ValueError for inconsistent input, OSError (with the path and the cause) when writing fails.
    """
    path = os.fspath(path)
    if linear_type not in LINEAR_TYPES:
        raise ValueError(f"linear_type must be one of {', '.join(LINEAR_TYPES)}, got {linear_type!r}")
    if embed_type not in EMBED_TYPES:
        raise ValueError(f"embed_type must be one of {', '.join(EMBED_TYPES)}, got {embed_type!r}")
    expected = _check_tensors(config, tensors)
    tokens = tokenizer_metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != config.n_vocab:
        raise ValueError(
            f"tokenizer.ggml.tokens has {len(tokens)} entries but config.n_vocab = {config.n_vocab}"
        )

    writer_md = [
        ("general.name", name, GGUFValueType.STRING),
        ("general.file_type", FILE_TYPES[LINEAR_TYPES[linear_type]], GGUFValueType.UINT32),
        ("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32),
        *_model_metadata(config, hidden_act),
    ]
    taken = {"general.architecture"} | {key for key, _, _ in writer_md}
    extra = []
    for key, value in tokenizer_metadata.items():
        if key in taken:
            raise ValueError(
                f"{key}: set by write_model from the config, do not pass it in tokenizer_metadata"
            )
        extra.append((key, *_infer_value_type(key, value)))

    # token_embd, output_norm, output, then each block in order (the order llama.cpp's tools write)
    order = [n for n in expected if not n.startswith("blk.")] + [n for n in expected if n.startswith("blk.")]
    for scale_name in sorted(n for n in tensors if n not in expected):
        order.insert(order.index(scaled_weight(scale_name)) + 1, scale_name)

    writer = GGUFWriter(None, config.arch)
    for key, value, vtype in writer_md:
        writer.add_key_value(key, value, vtype)
    for key, value, vtype, sub_type in extra:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for tensor_name in order:
        data, ggml_type = _encode(
            tensor_name, tensors[tensor_name], LINEAR_TYPES[linear_type], EMBED_TYPES[embed_type]
        )
        shape = (1,) if tensor_name.endswith(".scale") else expected[tensor_name]
        # bytes viewed as int8: gguf-py then takes raw_shape as the element shape (it cannot map I2_S bytes)
        writer.add_tensor(tensor_name, data.view(np.int8), raw_shape=shape, raw_dtype=ggml_type)
    _write_atomically(writer, path)


def _write_atomically(writer: GGUFWriter, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the model normal file permissions
    try:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(
                e.errno,
                f"cannot write {path}: {os.strerror(e.errno)} (the existing file, if any, is unchanged)",
            ) from e
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_directory(directory)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
