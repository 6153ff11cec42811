"""Checkpoints: one self-checking file per save, written atomically, the last K kept.

File layout (little-endian):
    b"TERNCKPT" | u32 version | 32-byte SHA-256 of everything after it | u64 header length |
    header JSON (the training state + a table of arrays: name, dtype, shape, offset) | array bytes
A save writes a temporary file in the same folder, fsyncs it, renames it over the final name and fsyncs the
folder, so a crash (or SIGKILL) at any moment leaves either the old set of checkpoints or the new one, never a
half-written file under a checkpoint name. A load verifies magic, version, length and checksum before trusting
a single byte, and raises `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"TERNCKPT"
VERSION = 1
SUFFIX = ".tck"
_PREFIX = struct.Struct("<8sI32sQ")  # magic, version, sha256, header length
_ALIGN = 64
_NAME = re.compile(r"^ckpt-(\d{8,})" + re.escape(SUFFIX) + r"$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, damaged or not a checkpoint at all."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}{SUFFIX}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in `directory`, oldest first (temporary files are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(path: str | os.PathLike, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    """Write arrays (host NumPy) and a JSON-able state dict to `path` atomically."""
    path = Path(path)
    table, offset = [], 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise TypeError(f"checkpoint array {name!r}: object arrays cannot be saved")
        offset = -(-offset // _ALIGN) * _ALIGN
        table.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += a.nbytes
    header = json.dumps({"state": state, "arrays": table}, separators=(",", ":")).encode()
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGN)  # array data starts aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, VERSION, b"\0" * 32, len(header)))
            digest = hashlib.sha256()
            digest.update(struct.pack("<Q", len(header)))
            _write(f, digest, header)
            base = f.tell()
            for entry, a in zip(table, arrays.values(), strict=True):
                pad = base + entry["offset"] - f.tell()
                _write(f, digest, b"\0" * pad)
                _write(f, digest, np.ascontiguousarray(a).tobytes())
            f.seek(len(MAGIC) + 4)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write(f: Any, digest: Any, data: bytes) -> None:
    digest.update(data)
    f.write(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, state) from a checkpoint, after checking it is whole and undamaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror}") from exc
    if len(data) < _PREFIX.size:
        raise CheckpointError(f"{path}: truncated: {len(data)} bytes is shorter than a checkpoint header")
    magic, version, stored, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a ternary checkpoint (magic {magic!r})")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version} is not supported (expected {VERSION})")
    digest = hashlib.sha256(data[len(MAGIC) + 4 + 32 :]).digest()
    if digest != stored:
        raise CheckpointError(f"{path}: checksum mismatch: the file is damaged or truncated; not loading it")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
        base = _PREFIX.size + header_len
        arrays = {}
        for e in header["arrays"]:
            dtype = np.dtype(e["dtype"])
            count = int(np.prod(e["shape"], dtype=np.int64))
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=base + e["offset"])
            arrays[e["name"]] = flat.reshape(e["shape"]).copy()
        return arrays, header["state"]
    except (ValueError, KeyError, TypeError) as exc:  # checksum fine but content malformed: a writer bug
        raise CheckpointError(f"{path}: malformed checkpoint contents: {exc}") from exc


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and stale temporary files; returns what went."""
    removed = []
    ckpts = list_checkpoints(directory)
    for _, p in ckpts[: max(len(ckpts) - keep_last, 0)]:
        p.unlink(missing_ok=True)
        removed.append(p)
    for p in Path(directory).glob(f".ckpt-*{SUFFIX}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
