"""Property: any damage to a real GGUF either still opens or raises GGUFError, quickly and in bounded memory.

The oracle files are mutated many ways (truncation, random header bytes, header fields such as counts, string
lengths, n_dims, dims, types and tensor offsets set to boundary or huge values), then opened with GGUFFile and
open_model and every tensor decoded. The property runs in a child process whose address space is capped
(RLIMIT_AS) so an attempt to allocate what a lying header asks for fails the test instead of the machine, and
each example has a hang alarm.

Run alone: ``python tests/test_gguf_fuzz.py`` (TERNARY_FUZZ_EXAMPLES=2000 TERNARY_FUZZ_RANDOM=1 for a deeper,
randomised run).
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from conftest import ORACLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ternary.formats.errors import GGUFError
from ternary.formats.model_file import open_model
from ternary.formats.reader import GGUFFile
from test_formats_validation import SCALAR_FORMATS

BASE_FILES = [ORACLE / "tiny-tq1_0-q6k.gguf", ORACLE / "tiny-tq2_0-scaletensors-q8.gguf"]
ADDRESS_SPACE_HEADROOM = 1 << 30  # the child may map / allocate 1 GiB beyond what it uses at start
HANG_SECONDS = 20


def header_fields(buf: bytes) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """Numeric header fields of a VALID file: ({kind: [(offset, size)]}, end of the tensor infos)."""
    fields: dict[str, list[tuple[int, int]]] = {"count": [(8, 8), (16, 8)]}
    pos = 24

    def add(kind: str, size: int) -> int:
        nonlocal pos
        fields.setdefault(kind, []).append((pos, size))
        (value,) = struct.unpack_from("<Q" if size == 8 else "<I", buf, pos)
        pos += size
        return value

    def string() -> None:
        nonlocal pos
        length = add("string_length", 8)  # (not `pos += add(...)`: that reads pos before add moves it)
        pos += length

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype in SCALAR_FORMATS:
            pos += struct.calcsize(SCALAR_FORMATS[vtype])
        elif vtype == 8:
            string()
        else:
            item = add("array_type", 4)
            count = add("array_count", 8)
            for _ in range(count):
                value(item)

    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    for _ in range(n_kv):
        string()
        value(add("value_type", 4))
    for _ in range(n_tensors):
        string()
        for _ in range(add("n_dims", 4)):
            add("dim", 8)
        add("ggml_type", 4)
        add("tensor_offset", 8)
    return fields, pos


BASES = [(p.read_bytes(), *header_fields(p.read_bytes())) for p in BASE_FILES]
INTERESTING = [0, 1, 2, 3, 4, 5, 8, 12, 14, 30, 31, 32, 33, 34, 35, 36, 37, 39, 64, 255, 256, 4096]
INTERESTING += [2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def mutated_files(draw) -> bytes:
    content, fields, header_end = draw(st.sampled_from(BASES))
    data = bytearray(content)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["truncate", "header bytes", "data bytes", "field", "field", "field"]))
        if kind == "truncate":
            limit = draw(st.sampled_from([header_end + 64, len(data)]))
            del data[draw(st.integers(0, min(limit, len(data)))) :]
        elif kind.endswith("bytes"):
            lo, hi = (0, header_end) if kind == "header bytes" else (header_end, len(content))
            at = draw(st.integers(lo, max(lo, min(hi, len(data)) - 1)))
            patch = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(patch)] = patch
        else:
            positions = fields[draw(st.sampled_from(sorted(fields)))]
            offset, size = draw(st.sampled_from(positions))
            new = draw(st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)) % (1 << (8 * size))
            if offset + size <= len(data):
                data[offset : offset + size] = new.to_bytes(size, "little")
    return bytes(data)


def open_and_decode(path: Path) -> str:
    """'model' / 'container' / 'error': how far the file got; anything but GGUFError propagates."""
    outcome = "error"
    with np.errstate(all="ignore"):  # mutated float data may hold inf/NaN; decoding them is fine
        try:
            with GGUFFile(path) as f:
                outcome = "container"
                for name in f.tensors:
                    try:
                        f.dequantize(name)
                    except GGUFError:
                        pass
        except GGUFError:
            return outcome
        try:
            with open_model(path) as m:
                for layer in range(m.config.n_layer):
                    for linear in m.layer(layer).linears().values():
                        m.ternary_codes(linear)
                m.dequantize(m.output)
            outcome = "model"
        except GGUFError:
            pass
    return outcome


def _on_alarm(signum, frame):
    raise TimeoutError(f"a mutated file took more than {HANG_SECONDS} s to open")


@settings(
    max_examples=int(os.environ.get("TERNARY_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    derandomize=not os.environ.get("TERNARY_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(content=mutated_files())
def check_mutated_files(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutated.gguf"
        path.write_bytes(content)
        signal.alarm(HANG_SECONDS)
        try:
            open_and_decode(path)
        finally:
            signal.alarm(0)


def _cap_address_space() -> None:
    with open("/proc/self/status") as f:
        vm_size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = vm_size_kb * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_unmutated_bases_open_as_models(tmp_path):
    for path in BASE_FILES:
        assert open_and_decode(path) == "model"


def test_header_fields_walker_finds_every_tensor():
    for (_, fields, header_end), path in zip(BASES, BASE_FILES, strict=True):
        with GGUFFile(path) as f:
            assert len(fields["ggml_type"]) == len(f.tensors)
            assert -(-header_end // 32) * 32 == f.data_offset


def test_mutated_files_open_or_raise_gguf_error():
    """Runs the property in a child process with a capped address space (see the module docstring)."""
    child = subprocess.run(
        [sys.executable, __file__],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-8000:]
    assert "examples ok" in child.stdout


if __name__ == "__main__":
    _cap_address_space()
    signal.signal(signal.SIGALRM, _on_alarm)
    check_mutated_files()
    print("examples ok")
