"""Checkpoint files: exact round trip, damage detection, atomic replacement, keep-last-K."""

from __future__ import annotations

import numpy as np
import pytest
from ternary.training.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def sample():
    rng = np.random.default_rng(5)
    arrays = {
        "model/token_embd.weight": rng.standard_normal((7, 3)).astype(np.float32),
        "optim/x/m": rng.standard_normal(5),
        "ids": np.arange(4, dtype=np.int32),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    gen = np.random.default_rng(9)
    gen.standard_normal(3)
    state = {"step": 12, "rng": gen.bit_generator.state, "data": {"epoch": 1, "batch": 3}, "note": "ü"}
    return arrays, state


def test_round_trip_is_exact(tmp_path):
    arrays, state = sample()
    path = checkpoint_path(tmp_path, 12)
    save_checkpoint(path, arrays, state)
    got, got_state = load_checkpoint(path)
    assert list(got) == list(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        np.testing.assert_array_equal(got[name], a)
    assert got_state == state
    gen = np.random.default_rng()
    gen.bit_generator.state = got_state["rng"]
    ref = np.random.default_rng(9)
    ref.standard_normal(3)
    assert gen.standard_normal() == ref.standard_normal()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("where", ["header", "payload", "last byte"])
def test_flipped_byte_is_detected(tmp_path, where):
    arrays, state = sample()
    path = tmp_path / "c.tck"
    save_checkpoint(path, arrays, state)
    data = bytearray(path.read_bytes())
    pos = {"header": 60, "payload": len(data) // 2, "last byte": len(data) - 1}[where]
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.tck: checksum mismatch"):
        load_checkpoint(path)


def test_truncated_and_foreign_files_are_reported(tmp_path):
    arrays, state = sample()
    path = tmp_path / "c.tck"
    save_checkpoint(path, arrays, state)
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"short")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="not a ternary checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.tck")


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.tck"
    save_checkpoint(path, {"a": np.ones(3)}, {"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"a": np.array([object()])}, {"step": 2})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"a": np.ones(3)}, {"step": object()})  # state not JSON-able
    _, state = load_checkpoint(path)
    assert state == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.tck"]


def test_keep_last_k_and_listing(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(checkpoint_path(tmp_path, step), {"a": np.full(2, step)}, {"step": step})
    stale = tmp_path / ".ckpt-00000025.tck.tmp-999999"
    stale.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10, 15, 20]
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == sorted(
        [checkpoint_path(tmp_path, 5).name, checkpoint_path(tmp_path, 10).name, stale.name]
    )
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
    assert (tmp_path / "notes.txt").exists()
