"""Repack cache: memory-mapped on later runs; truncated, corrupted or stale files are detected and rebuilt."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ternary.engine.planar import LAYOUT_VERSION, PlanarMatrix
from ternary.engine.repack_cache import ENV_DIR, RepackCache, default_directory


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    return path


@pytest.fixture
def cache(tmp_path):
    return RepackCache(tmp_path / "cache", layout_version=LAYOUT_VERSION)


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "a/packed": rng.integers(0, 256, size=1000, dtype=np.uint8),
        "a/scales": rng.random((3, 5, 4), dtype=np.float32),
        "b/n": np.array([7], dtype=np.int64),
        "empty": np.zeros(0, dtype=np.float32),
    }


class Builder:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return sample_arrays()


def assert_same(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_first_run_builds_later_runs_memory_map(cache, model):
    build = Builder()
    first = cache.load_or_build(model, build)
    second = cache.load_or_build(model, build)
    assert build.calls == 1
    assert_same(first, sample_arrays())
    assert_same(second, sample_arrays())
    for arr in second.values():
        assert arr.ctypes.data % 128 == 0 or arr.size == 0
        base = arr
        while base.base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap)  # backed by the file, not a copy
    second["a/packed"][:] = 0  # copy-on-write: writable for Numba, never written back
    assert_same(cache.load(model), sample_arrays())


def corrupt(path, offset_from_end=None, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) - offset_from_end if offset_from_end is not None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: os.truncate(p, p.stat().st_size - 100), "truncated"),
        (lambda p: os.truncate(p, 20), "truncated"),
        (lambda p: corrupt(p, offset_from_end=5), "data checksum mismatch"),
        (lambda p: corrupt(p, offset=60), "header checksum mismatch"),
        (lambda p: corrupt(p, offset=0), "bad magic"),
        (lambda p: corrupt(p, offset=8), "format version"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 7), "padded"),
    ],
)
def test_damaged_cache_is_rejected_and_rebuilt(cache, model, damage, reason):
    build = Builder()
    cache.load_or_build(model, build)
    damage(cache.path_for(model))
    with pytest.warns(RuntimeWarning, match=reason):
        again = cache.load_or_build(model, build)
    assert build.calls == 2
    assert_same(again, sample_arrays())
    assert_same(cache.load(model), sample_arrays())  # the rebuilt file is valid


def test_header_fields_are_checked_not_just_the_file_name(cache, model, tmp_path):
    cache.store(model, sample_arrays())
    other = RepackCache(cache.directory, layout_version=LAYOUT_VERSION + 1)
    os.replace(cache.path_for(model), other.path_for(model))  # a file under the right name, wrong contents
    with pytest.warns(RuntimeWarning, match="layout version"):
        assert other.load(model) is None
    assert not other.path_for(model).exists()
    cache.store(model, sample_arrays(), extra="q8k")
    os.replace(cache.path_for(model, extra="q8k"), cache.path_for(model))
    with pytest.warns(RuntimeWarning, match="stale"):
        assert cache.load(model) is None


def test_changed_model_is_a_miss_and_the_old_cache_goes(cache, model):
    build = Builder()
    cache.load_or_build(model, build)
    old_path = cache.path_for(model)
    stat = model.stat()
    data = bytearray(model.read_bytes())
    data[10] ^= 1  # same size, same mtime: only the header hash can tell
    model.write_bytes(bytes(data))
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.path_for(model) != old_path
    assert cache.load(model) is None
    cache.load_or_build(model, build)
    assert build.calls == 2
    assert not old_path.exists()
    assert len(list(cache.directory.iterdir())) == 1


def test_layout_version_and_extra_key_separate_entries(cache, model):
    v2 = RepackCache(cache.directory, layout_version=LAYOUT_VERSION + 1)
    assert v2.key(model) != cache.key(model)
    assert cache.key(model, extra="a") != cache.key(model, extra="b")
    cache.store(model, sample_arrays())
    assert v2.load(model) is None


def test_unsupported_dtype_is_refused(cache, model):
    with pytest.raises(ValueError, match="unsupported dtype"):
        cache.store(model, {"x": np.array(["a"], dtype=object)})


def test_default_directory_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "here"))
    assert default_directory() == tmp_path / "here"
    monkeypatch.delenv(ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "ternary" / "repack"


def test_planar_matrix_through_the_cache(cache, model):
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, size=(10, 512)).astype(np.int8)
    scales = rng.uniform(0.5, 1.5, size=(10, 2)).astype(np.float32)
    original = PlanarMatrix.from_codes(codes, scales, 256)
    arrays = cache.load_or_build(model, original.to_arrays)
    loaded = PlanarMatrix.from_arrays(arrays)
    assert loaded.packed.ctypes.data % 128 == 0
    xq = rng.integers(-128, 128, size=(3, 512)).astype(np.int8)
    xs = rng.uniform(0.01, 0.1, size=(3, 2)).astype(np.float32)
    want = original.matmul(xq, xs, np.empty((3, 10), np.float32))
    np.testing.assert_array_equal(loaded.matmul(xq, xs, np.empty((3, 10), np.float32)), want)
    np.testing.assert_array_equal(loaded.codes(), codes)
