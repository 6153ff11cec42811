"""On-disk cache of repacked weights: repack a model once, memory-map the result on every later run.

One cache file per (model file, layout version, caller's ``extra`` tag). It is keyed by the model's identity —
real path, size, mtime and a SHA-256 of its first and last MiB (the GGUF header and tensor table live there) —
so an edited or replaced model never meets an old cache. A cache file is never trusted blindly: its magic,
format version, header hash, layout version, key, size and a CRC-32 of all the data are checked on load;
anything wrong (truncated, corrupted, stale) is reported with a warning, deleted and rebuilt. Files are
written to a temporary name, fsynced and renamed, so a crash mid-write leaves no half file under the real
name.

File layout: ``b"TNRYPACK"``, u32 format version, u32 header length, 32-byte SHA-256 of the header, the header
(UTF-8 JSON: layout version, key, source identity, data size, data CRC-32, arrays with dtype/shape/offset),
then the arrays, each at a 128-byte aligned offset (so the memory-mapped arrays keep the kernels' alignment).
Arrays the caller marks ``cold`` (kept, but rarely or never read) come last, from a 2 MiB boundary: the page
cache holds a file in folios of up to 2 MiB and a fault maps the whole folio, so a cold array sharing one with
a hot neighbour would become resident with it.

Loading maps the file and reads nothing through the map: the CRC is computed from ordinary reads, so a page
of the weights becomes part of the process only when a kernel first reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

MAGIC = b"TNRYPACK"
FORMAT_VERSION = 1
ALIGNMENT = 128
COLD_ALIGNMENT = 2 << 20  # the largest page-cache folio on x86-64 / arm64 with 4 KiB pages
_CRC_CHUNK = 1 << 20  # bytes per read while checking the data CRC
SUFFIX = ".tnrp"
ENV_DIR = "TERNARY_CACHE_DIR"
_PREFIX = struct.Struct("<8sII32s")  # magic, format version, header length, header SHA-256
_SAMPLE = 1 << 20  # bytes hashed at each end of the source file


class CacheRejected(Exception):
    """A cache file failed validation (the message says why)."""


def default_directory() -> Path:
    """``$TERNARY_CACHE_DIR``, else ``$XDG_CACHE_HOME/ternary/repack``, else ``~/.cache/ternary/repack``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ternary" / "repack"


def source_identity(source: str | os.PathLike) -> dict[str, object]:
    """What identifies a model file's contents without reading all of it."""
    path = Path(source).resolve()
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLE))
        if st.st_size > _SAMPLE:
            f.seek(max(_SAMPLE, st.st_size - _SAMPLE))
            digest.update(f.read(_SAMPLE))
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sample_sha256": digest.hexdigest(),
    }


class RepackCache:
    """Repacked arrays of model files under ``directory``, for one ``layout_version``."""

    def __init__(self, directory: str | os.PathLike | None = None, layout_version: int = 1) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        self.layout_version = int(layout_version)

    def key(self, source: str | os.PathLike, extra: str = "") -> str:
        """Hex key of (source identity, layout version, ``extra``)."""
        ident = {"source": source_identity(source), "layout_version": self.layout_version, "extra": extra}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def _name_prefix(self, source: str | os.PathLike, extra: str) -> str:
        where = json.dumps([str(Path(source).resolve()), extra])
        return hashlib.sha256(where.encode()).hexdigest()[:16] + "-"

    def path_for(self, source: str | os.PathLike, extra: str = "") -> Path:
        """The cache file for ``source`` as it is now."""
        return self.directory / f"{self._name_prefix(source, extra)}{self.key(source, extra)[:32]}{SUFFIX}"

    # ------------------------------------------------------------ load

    def load(
        self, source: str | os.PathLike, extra: str = "", verify: bool = True
    ) -> dict[str, np.ndarray] | None:
        """The cached arrays (memory-mapped copy-on-write: writable, never written back), or None.

        A missing file is a silent miss; a rejected one is deleted, with a ``RuntimeWarning`` saying why.
        ``verify=False`` skips the data CRC (the header checks still run).
        """
        path = self.path_for(source, extra)
        if not path.is_file():
            return None
        try:
            return _read(path, self.key(source, extra), self.layout_version, verify)
        except CacheRejected as exc:
            warnings.warn(f"repack cache {path}: {exc}; rebuilding", RuntimeWarning, stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    # ------------------------------------------------------------ store

    def store(
        self,
        source: str | os.PathLike,
        arrays: dict[str, np.ndarray],
        extra: str = "",
        cold: Collection[str] = (),
    ) -> Path:
        """Write ``arrays`` atomically as the cache of ``source``; older caches of that source are removed.

        Arrays named in ``cold`` are stored after the others, from a ``COLD_ALIGNMENT`` boundary.
        """
        path = self.path_for(source, extra)
        key = self.key(source, extra)
        unknown = set(cold) - set(arrays)
        if unknown:
            raise ValueError(f"repack cache: cold arrays {sorted(unknown)} are not among the arrays")
        order = [n for n in arrays if n not in cold] + [n for n in arrays if n in cold]
        entries, blobs, offset = [], [], 0
        for i, name in enumerate(order):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype.kind not in "biuf":
                raise ValueError(f"repack cache: array {name!r} has unsupported dtype {arr.dtype}")
            first_cold = name in cold and (i == 0 or order[i - 1] not in cold)
            align = COLD_ALIGNMENT if first_cold else ALIGNMENT
            offset = -(-offset // align) * align
            data = arr.reshape(-1).view(np.uint8)
            entries.append(
                {
                    "name": name,
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "offset": offset,
                    "nbytes": arr.nbytes,
                }
            )
            blobs.append((offset, data))
            offset += arr.nbytes
        header = {
            "layout_version": self.layout_version,
            "key": key,
            "source": source_identity(source),
            "extra": extra,
            "arrays": entries,
            "data_bytes": offset,
        }
        crc, end = 0, 0
        for rel, data in blobs:  # the whole data region, alignment padding included
            crc = zlib.crc32(data, _zeros_crc32(rel - end, crc))
            end = rel + data.nbytes
        header["data_crc32"] = crc
        raw = json.dumps(header, sort_keys=True).encode()
        data_start = _data_start(len(raw))
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw), hashlib.sha256(raw).digest()))
                f.write(raw)
                for rel, data in blobs:
                    f.seek(data_start + rel)
                    f.write(data)
                f.truncate(data_start + offset)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        prefix = self._name_prefix(source, extra)
        for old in self.directory.glob(f"{prefix}*{SUFFIX}"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def load_or_build(
        self,
        source: str | os.PathLike,
        build: Callable[[], dict[str, np.ndarray]],
        extra: str = "",
        verify: bool = True,
    ) -> dict[str, np.ndarray]:
        """Valid cached arrays, else ``build()``, stored, and returned as the memory-mapped copy."""
        cached = self.load(source, extra, verify)
        if cached is not None:
            return cached
        built = build()
        self.store(source, built, extra)
        fresh = self.load(source, extra, verify=False)
        return built if fresh is None else fresh  # None: the file vanished between store and load


def _zeros_crc32(n: int, crc: int) -> int:
    """``crc`` continued over ``n`` zero bytes (alignment padding), without an ``n``-byte buffer."""
    block = bytes(min(n, _CRC_CHUNK))
    while n > 0:
        crc = zlib.crc32(block[:n], crc)
        n -= len(block)
    return crc


def _file_crc32(path: Path, start: int) -> int:
    """CRC-32 of ``path`` from byte ``start`` to the end, read through a small buffer (not a map)."""
    crc, buf = 0, bytearray(_CRC_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _data_start(header_len: int) -> int:
    return -(-(_PREFIX.size + header_len) // ALIGNMENT) * ALIGNMENT


def _read(path: Path, key: str, layout_version: int, verify: bool) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    if size < _PREFIX.size:
        raise CacheRejected(f"truncated ({size} bytes)")
    with open(path, "rb") as f:
        magic, fmt, header_len, header_hash = _PREFIX.unpack(f.read(_PREFIX.size))
        if magic != MAGIC:
            raise CacheRejected("not a repack cache file (bad magic)")
        if fmt != FORMAT_VERSION:
            raise CacheRejected(f"format version {fmt}, expected {FORMAT_VERSION}")
        if _PREFIX.size + header_len > size:
            raise CacheRejected("truncated header")
        raw = f.read(header_len)
    if hashlib.sha256(raw).digest() != header_hash:
        raise CacheRejected("header checksum mismatch")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CacheRejected(f"unreadable header ({exc})") from None
    if header.get("layout_version") != layout_version:
        raise CacheRejected(f"layout version {header.get('layout_version')}, expected {layout_version}")
    if header.get("key") != key:
        raise CacheRejected("stale: made from a different model file or settings")
    data_start = _data_start(header_len)
    expected = data_start + header.get("data_bytes", -1)
    if size != expected:
        raise CacheRejected(f"truncated or padded: {size} bytes, expected {expected}")
    if verify and _file_crc32(path, data_start) != header.get("data_crc32"):
        raise CacheRejected("data checksum mismatch")
    mm = np.memmap(path, dtype=np.uint8, mode="c")
    arrays = {}
    for e in header["arrays"]:
        start = data_start + e["offset"]
        if start % ALIGNMENT or start + e["nbytes"] > size:
            raise CacheRejected(f"array {e['name']!r} lies outside the file or off alignment")
        data = mm[start : start + e["nbytes"]].view(np.ndarray)
        arrays[e["name"]] = data.view(np.dtype(e["dtype"])).reshape(e["shape"])
    return arrays
