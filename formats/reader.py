"""GGUFFile: a memory-mapped, validated GGUF container (v2/v3, little-endian).

The header is parsed here rather than by ``gguf.GGUFReader`` because that reader trusts the file: lying counts
or string lengths make it allocate huge arrays or throw arbitrary exceptions, and it rejects the BitNet fork's
I2_S (type 36). Every count and length is checked against the bytes actually left in the file before anything
is allocated, and every tensor's data must lie, aligned, inside the file, so a damaged file always ends in
``GGUFError("<file>: <key or tensor>: <problem>")``. Type ids, block sizes and names come from the ``gguf``
package. Tensor bytes are read-only views into the map; nothing is copied until
``dequantize``/``ternary_codes``. The header's pages are let go once parsed (its values are Python objects
now), and ``release_pages()`` lets every page go once a caller has copied what it needs.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from ternary.formats import quants
from ternary.formats.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml stores names in char[64], so at most 63 bytes
MAX_ARRAY_NESTING = 3
INT64_MAX = 2**63 - 1

# GGUF value types (gguf.GGUFValueType): id -> (struct format or None, byte size)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FORMATS: dict[int, str] = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<B",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}
_SCALAR_DTYPES: dict[int, str] = {
    UINT8: "<u1",
    INT8: "<i1",
    UINT16: "<u2",
    INT16: "<i2",
    UINT32: "<u4",
    INT32: "<i4",
    FLOAT32: "<f4",
    BOOL: "<u1",
    UINT64: "<u8",
    INT64: "<i8",
    FLOAT64: "<f8",
}
VALUE_TYPE_NAMES = {
    UINT8: "UINT8",
    INT8: "INT8",
    UINT16: "UINT16",
    INT16: "INT16",
    UINT32: "UINT32",
    INT32: "INT32",
    FLOAT32: "FLOAT32",
    BOOL: "BOOL",
    STRING: "STRING",
    ARRAY: "ARRAY",
    UINT64: "UINT64",
    INT64: "INT64",
    FLOAT64: "FLOAT64",
}
_MIN_VALUE_BYTES = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()} | {STRING: 8, ARRAY: 12}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. ``shape`` is NumPy order (rows first: the reverse of ggml's ``ne``)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    raw: np.ndarray = field(repr=False, compare=False)  # read-only uint8 view of the tensor's bytes
    offset: int = 0  # absolute byte offset of the data in the file

    @property
    def type_name(self) -> str:
        return quants.type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; every failure names the field being read."""

    def __init__(self, path: str, buf: memoryview) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                self.path,
                what,
                f"needs {n} bytes at offset {self.pos} but the file ends at {self.size} (truncated/corrupt)",
            )

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return bool(value) if vtype == BOOL else value

    def u32(self, what: str) -> int:
        return self.scalar(UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(what + " (string length)")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        # surrogateescape keeps any invalid UTF-8 (some vocabularies have it) recoverable byte for byte
        return raw.decode("utf-8", errors="surrogateescape")

    def count(self, item_bytes: int, what: str) -> int:
        """A u64 count whose items (each at least ``item_bytes``) must fit in the rest of the file."""
        n = self.u64(what + " (count)")
        left = self.size - self.pos
        if n * item_bytes > left:
            raise GGUFError(
                self.path, what, f"count {n} cannot fit in the {left} bytes left in the file (corrupt header)"
            )
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(vtype, what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise GGUFError(self.path, what, f"arrays nested deeper than {MAX_ARRAY_NESTING} levels")
            item_type = self.u32(what + " (array item type)")
            if item_type not in _MIN_VALUE_BYTES:
                raise GGUFError(self.path, what, f"unknown array item type {item_type}")
            n = self.count(_MIN_VALUE_BYTES[item_type], what)
            if item_type in _SCALAR_DTYPES:
                arr = np.frombuffer(self.buf, dtype=_SCALAR_DTYPES[item_type], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.astype(bool).tolist() if item_type == BOOL else arr.tolist()
            if item_type == STRING:  # token lists: 100k+ strings, so no per-item label
                return [self.string(what + " (array item)") for _ in range(n)]
            return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(n)]
        raise GGUFError(self.path, what, f"unknown value type {vtype}")


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    ``.metadata`` holds plain Python values (arrays as lists); ``.value_types[key]`` the GGUF value type id
    (``reader.UINT32`` ...), and for arrays ``.array_types[key]`` the item type. ``.tensors`` maps names to
    ``TensorInfo`` in file order. Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}
        self.array_types: dict[str, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mmap: mmap.mmap | None = None
        self._data: np.ndarray | None = None
        self._map()
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening

    def _map(self) -> None:
        if os.path.isdir(self.path):
            raise GGUFError(self.path, "file", "is a directory, not a GGUF file")
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise GGUFError(self.path, "header", f"file is {size} bytes, too small for a GGUF header")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(self.path, "file", f"cannot open: {e.strerror or e}") from e
        self.file_size = size
        self._data = np.frombuffer(self._mmap, dtype=np.uint8)

    def _parse(self) -> None:
        cur = _Cursor(self.path, memoryview(self._mmap))
        magic = bytes(cur.buf[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(self.path, "magic", f"expected b'GGUF', found {magic!r}: not a GGUF file")
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in SUPPORTED_VERSIONS:
                raise GGUFError(self.path, "version", "big-endian GGUF files are not supported")
            raise GGUFError(self.path, "version", f"GGUF version {version} is not supported (need 2 or 3)")
        self.version = version
        n_tensors = cur.count(8 + 4 + 4 + 8, "tensor_count")  # name length, n_dims, type, offset
        n_kv = cur.count(8 + 4 + 1, "kv_count")  # key length, value type, smallest value

        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise GGUFError(self.path, key, "duplicate metadata key")
            vtype = cur.u32(f"{key} (value type)")
            if vtype not in _MIN_VALUE_BYTES:
                raise GGUFError(self.path, key, f"unknown value type {vtype}")
            if vtype == ARRAY:
                cur.need(4, f"{key} (array item type)")
                self.array_types[key] = struct.unpack_from("<I", cur.buf, cur.pos)[0]
            self.metadata[key] = cur.value(vtype, key)
            self.value_types[key] = vtype

        self.alignment = self._alignment()
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._place_tensors(infos)
        self.release_pages(0, cur.pos)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"]
        if self.value_types["general.alignment"] != UINT32:
            raise GGUFError(self.path, "general.alignment", "must be a UINT32")
        if value == 0 or value & (value - 1) or value > 1 << 20:
            raise GGUFError(self.path, "general.alignment", f"{value} is not a power of two up to 2**20")
        return value

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
        name = cur.string(f"tensor #{i} name")
        if len(name.encode("utf-8", errors="surrogateescape")) >= GGML_MAX_NAME:
            raise GGUFError(self.path, f"tensor #{i}", f"name {name[:80]!r} is longer than 63 bytes")
        n_dims = cur.u32(f"{name} (n_dims)")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFError(self.path, name, f"n_dims = {n_dims}, must be 1 to {GGML_MAX_DIMS}")
        ne = [cur.u64(f"{name} (dimension {j})") for j in range(n_dims)]
        for j, d in enumerate(ne):
            if d == 0 or d > INT64_MAX:
                raise GGUFError(self.path, name, f"dimension ne[{j}] = {d} is out of range")
        if math.prod(ne) > INT64_MAX:
            raise GGUFError(self.path, name, f"element count of ne={ne} overflows int64")
        ggml_type = cur.u32(f"{name} (type)")
        if not quants.is_known_type(ggml_type):
            raise GGUFError(self.path, name, f"unknown ggml type id {ggml_type}")
        offset = cur.u64(f"{name} (offset)")
        return name, ggml_type, tuple(reversed(ne)), offset

    def _place_tensors(self, infos: list[tuple[str, int, tuple[int, ...], int]]) -> None:
        if infos and self.data_offset > self.file_size:
            raise GGUFError(
                self.path, "tensor data", f"starts at {self.data_offset}, past the end of the file"
            )
        spans = []
        for name, ggml_type, shape, rel in infos:
            if name in self.tensors:
                raise GGUFError(self.path, name, "duplicate tensor name")
            try:
                nbytes = quants.tensor_nbytes(ggml_type, shape)
            except ValueError as e:
                raise GGUFError(self.path, name, f"{e} (shape {shape})") from None
            if rel % self.alignment:
                raise GGUFError(self.path, name, f"data offset {rel} is not a multiple of {self.alignment}")
            start = self.data_offset + rel
            end = start + nbytes
            if end > self.file_size:
                raise GGUFError(
                    self.path,
                    name,
                    f"data [{start}, {end}) extends past the end of the file ({self.file_size} bytes)",
                )
            spans.append((start, end, name))
            raw = self._data[start:end]
            self.tensors[name] = TensorInfo(name, ggml_type, shape, raw, start)
        spans.sort()
        for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:], strict=False):
            if start1 < end0:
                raise GGUFError(
                    self.path, name1, f"data at {start1} overlaps tensor {name0!r}, which ends at {end0}"
                )

    # ------------------------------------------------------------------ access

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or self.value_types.get("general.architecture") != STRING:
            raise GGUFError(self.path, "general.architecture", "missing or not a string")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, name, "no such tensor in the file") from None

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 of its NumPy-order shape (a fresh array)."""
        t = self.tensor(name)
        try:
            return quants.dequantize(t.ggml_type, t.raw, t.shape)
        except ValueError as e:
            raise GGUFError(self.path, name, str(e)) from None

    def ternary_codes(self, name: str) -> tuple[np.ndarray, np.ndarray, int]:
        """``quants.ternary_codes`` of a TQ1_0 / TQ2_0 / I2_S matrix: (codes int8[N,K], scales, block)."""
        t = self.tensor(name)
        try:
            return quants.ternary_codes(t.ggml_type, t.raw, t.shape)
        except ValueError as e:
            raise GGUFError(self.path, name, str(e)) from None

    def release_pages(self, start: int = 0, end: int | None = None) -> None:
        """Take the resident pages of bytes [start, end) (default: the whole file) out of this process.

        The map is read-only and shared, so nothing is lost: views stay valid and a page is read back from
        the file (usually from the page cache) when next touched. Best effort: nothing happens where madvise
        is unavailable.
        """
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        page = mmap.PAGESIZE
        first = start // page * page  # a page partly in the range goes too: it is read back if needed
        stop = self.file_size if end is None else min(end, self.file_size)
        if stop > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, stop - first)

    def close(self) -> None:
        """Drop the map. Views handed out earlier keep the pages alive until they are garbage-collected."""
        self.tensors = {}
        self._data = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # arrays still reference the map; it closes when they go
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{getattr(self, 'version', '?')}, {len(self.tensors)} tensors)"
